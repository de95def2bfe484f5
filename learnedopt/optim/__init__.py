"""The learned optimizers as ``torch.optim.Optimizer`` classes (one module each; what they share is
in ``_base``). They use the rules' networks (:mod:`learnedopt.rules`) and the shipped weights
(:mod:`learnedopt.pretrained`), never the meta-training code."""

from .hierarchical import DEFAULT_HIERARCHICAL, HierarchicalOptimizer
from .l2l import DEFAULT_L2L, L2LOptimizer

__all__ = ["L2LOptimizer", "HierarchicalOptimizer", "DEFAULT_L2L", "DEFAULT_HIERARCHICAL"]
