"""learnedopt: learned optimizers for PyTorch with fused C++/CUDA kernels."""

from . import ops, reference
from .ops import coord_lstm, coord_lstm_stack, cuda_available, extension_available

__version__ = "0.1.0"

__all__ = [
    "ops",
    "reference",
    "coord_lstm",
    "coord_lstm_stack",
    "cuda_available",
    "extension_available",
]
