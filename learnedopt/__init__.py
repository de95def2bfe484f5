"""learnedopt: learned optimizers for PyTorch with fused C++/CUDA kernels.

Layout, by role (dependencies point down; nothing that uses an optimizer imports the meta-training
code):

* :mod:`learnedopt.ops`, :mod:`learnedopt.reference`: the fused custom ops and their pure-PyTorch
  oracle;
* :mod:`learnedopt.rules`: the learned rules (``l2l``, ``hierarchical``, ``sgd``), each with its
  network, its reference step and its meta-training adapter, and their file format;
* :mod:`learnedopt.optim`: the ``torch.optim`` classes;
* :mod:`learnedopt.pretrained`: the shipped weights (depends on the rules only);
* :mod:`learnedopt.meta`: meta-training (unrolls, objectives, the trainer, checkpoints);
* :mod:`learnedopt.tasks`: problems (classic, vision, the meta-training ensemble, data);
* :mod:`learnedopt.evaluate`, :mod:`learnedopt.cli`: evaluation against tuned baselines, the command
  line.

``meta``, ``tasks``, ``evaluate`` and ``cli`` are imported on first use, so ``import learnedopt``
and the optimizers do not load the meta-training code or the data sets. The module paths of 0.1.0
(``learnedopt.nets``, ``.hierarchical``, ``.ensemble``, ``.data``) still import, with a
``DeprecationWarning``, as the same module objects as their new paths.
"""

from __future__ import annotations

import importlib

from . import ops, optim, pretrained, reference, rules
from .ops import coord_lstm, coord_lstm_stack, cuda_available, extension_available
from .optim import HierarchicalOptimizer, L2LOptimizer
from .rules import CoordinateLSTMNet, HierarchicalNet

__version__ = "0.2.0"

_LAZY = ("meta", "tasks", "evaluate", "cli")
_DEPRECATED = ("nets", "hierarchical", "ensemble", "data")  # 0.1.0 paths: see the shim files



def __getattr__(name: str):
    if name in _LAZY or name in _DEPRECATED:
        module = importlib.import_module("." + name, __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ops",
    "reference",
    "rules",
    "optim",
    "pretrained",
    "meta",
    "tasks",
    "evaluate",
    "CoordinateLSTMNet",
    "HierarchicalNet",
    "L2LOptimizer",
    "HierarchicalOptimizer",
    "coord_lstm",
    "coord_lstm_stack",
    "cuda_available",
    "extension_available",
    "__version__",
]
