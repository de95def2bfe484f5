"""Deprecated path of :mod:`learnedopt.rules.hierarchical` (0.1.0's layout): importing it gives that module."""

import importlib
import sys
import warnings

warnings.warn("learnedopt.hierarchical moved to learnedopt.rules.hierarchical; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("learnedopt.rules.hierarchical")
