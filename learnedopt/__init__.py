"""learnedopt: learned optimizers for PyTorch with fused C++/CUDA kernels."""

from . import data, ensemble, evaluate, hierarchical, meta, nets, ops, optim, pretrained, reference, tasks
from .hierarchical import HierarchicalNet
from .nets import CoordinateLSTMNet
from .ops import coord_lstm, coord_lstm_stack, cuda_available, extension_available
from .optim import HierarchicalOptimizer, L2LOptimizer

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
    "hierarchical",
    "CoordinateLSTMNet",
    "HierarchicalNet",
    "L2LOptimizer",
    "HierarchicalOptimizer",
    "coord_lstm",
    "coord_lstm_stack",
    "cuda_available",
    "extension_available",
]
