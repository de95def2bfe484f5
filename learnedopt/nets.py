"""Deprecated path of :mod:`learnedopt.rules.l2l` (0.1.0's layout): importing it gives that module."""

import importlib
import sys
import warnings

warnings.warn("learnedopt.nets moved to learnedopt.rules.l2l; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("learnedopt.rules.l2l")
