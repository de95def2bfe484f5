"""Deprecated path of :mod:`learnedopt.tasks.data` (0.1.0's layout): importing it gives that module."""

import importlib
import sys
import warnings

warnings.warn("learnedopt.data moved to learnedopt.tasks.data; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("learnedopt.tasks.data")
