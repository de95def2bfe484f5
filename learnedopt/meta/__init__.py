"""Meta-training of learned update rules (:mod:`learnedopt.rules`): unrolled optimization, with the
meta-gradient from truncated BPTT, ES or PES.

* :mod:`~learnedopt.meta.unroll`: ``Carry``, ``start``, ``unroll`` (one truncation, differentiable in
  the rule's parameters), ``run_rule`` (a whole trajectory, no meta-gradient);
* :mod:`~learnedopt.meta.estimators`: the meta-gradient estimators ``TruncatedBPTT``, ``ES``, ``PES``
  (one interface; ``MetaConfig.estimator`` picks one);
* :mod:`~learnedopt.meta.objectives`: the meta-objectives (``OBJECTIVES``);
* :mod:`~learnedopt.meta.trainer`: ``MetaConfig`` and ``MetaTrainer`` (the outer loop);
* :mod:`~learnedopt.meta.checkpoints`: the trainer's checkpoints;
* :mod:`~learnedopt.meta.logs`: ``read_log``, ``plot_log``.

The rules and their file format are in :mod:`learnedopt.rules`; their names are also reachable from
here (``learnedopt.meta.L2LRule``, ``save_rule``, ...), as before the package had sub-packages.
"""

from __future__ import annotations

from ..rules import RULES, L2LRule, LearnedSGD, load_rule, make_rule, rule_from_blob, save_rule
from .checkpoints import CheckpointError, init_weights, load_checkpoint, previous_path, save_checkpoint
from .estimators import ES, ESTIMATORS, PES, Estimate, GradientEstimator, TruncatedBPTT, make_estimator
from .logs import plot_log, read_log
from .objectives import LOG_EPS, OBJECTIVES, objective
from .trainer import RESUME_FREE, MetaConfig, MetaTrainer
from .unroll import Carry, run_rule, start, unroll

__all__ = ["L2LRule", "LearnedSGD", "RULES", "make_rule", "OBJECTIVES", "objective", "Carry", "start", "unroll",
           "run_rule", "MetaConfig", "MetaTrainer", "RESUME_FREE", "save_rule", "load_rule", "rule_from_blob",
           "read_log", "plot_log", "save_checkpoint", "load_checkpoint", "previous_path", "CheckpointError",
           "init_weights", "LOG_EPS", "GradientEstimator", "Estimate", "TruncatedBPTT", "ES", "PES", "ESTIMATORS",
           "make_estimator"]
