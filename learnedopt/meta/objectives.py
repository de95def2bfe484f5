"""Meta-objectives over the objective values o_0 … o_T of an unroll (o_t = f(θ_t) on the step's
training batch, on a fresh batch for o_T; with train-by-validation f on a held-out batch instead):

* ``"sum"``: Σ_{t=0}^{T} o_t — L2L (the unroll's first point included, weights 1);
* ``"final"``: o_T;
* ``"log_ratio"``: mean_{t=1..T} log(o_t / f_0), f_0 the loss at the trajectory's start (Wichrowska);
* ``"log_final"``: log o_T (Wang et al.: its meta-gradient neither explodes nor vanishes);
* ``"log_rate"``: (1/T) log o_T, T the unroll's number of steps — Wang et al.'s log objective
  F̂(η) = (1/t) log f(w_t) exactly (its meta-gradient stays O(1) as t grows, so a meta-learning rate
  need not shrink with the horizon).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["OBJECTIVES", "LOG_EPS", "objective"]

LOG_EPS = 1e-12  # floor of the losses inside the log objectives
OBJECTIVES = ("sum", "final", "log_ratio", "log_final", "log_rate")


def objective(kind: str, values: list[Tensor], f0: float) -> Tensor:
    """The meta-objective ``kind`` of an unroll's objective values (see the module docstring). Each
    value is a scalar, or a vector [P] (one entry per particle of ES/PES): the objective is then [P]."""
    if kind == "sum":
        return torch.stack(values).sum(0)
    if kind == "final":
        return values[-1]
    if kind == "log_ratio":
        logs = torch.log(torch.stack(values[1:]).clamp_min(LOG_EPS))
        return (logs - math.log(max(f0, LOG_EPS))).mean(0)
    if kind == "log_final":
        return torch.log(values[-1].clamp_min(LOG_EPS))
    if kind == "log_rate":
        if len(values) < 2:
            raise ValueError(f"objective 'log_rate' needs the values of at least one step (o_0, o_1, ...), got {len(values)}")
        return torch.log(values[-1].clamp_min(LOG_EPS)) / (len(values) - 1)
    raise ValueError(f"unknown meta-objective {kind!r}; known: {OBJECTIVES}")
