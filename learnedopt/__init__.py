"""learnedopt: learned optimizers for PyTorch with fused C++/CUDA kernels."""

from . import data, ensemble, evaluate, meta, nets, ops, optim, pretrained, reference, tasks
from .nets import CoordinateLSTMNet
from .ops import coord_lstm, coord_lstm_stack, cuda_available, extension_available
from .optim import L2LOptimizer

__version__ = "0.1.0"

__all__ = [
    "ops",
    "data",
    "ensemble",
    "evaluate",
    "meta",
    "pretrained",
    "tasks",
    "reference",
    "nets",
    "optim",
    "CoordinateLSTMNet",
    "L2LOptimizer",
    "coord_lstm",
    "coord_lstm_stack",
    "cuda_available",
    "extension_available",
]
