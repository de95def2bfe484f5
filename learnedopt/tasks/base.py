"""The task interface: what a problem to optimize is, written functionally so that an unrolled
optimization can be differentiated through.

* ``task.init_params(generator) -> list[Tensor]``: initial parameters θ₀ (plain tensors);
* ``task.sample_batch(generator, split="train")``: a batch (``None`` for deterministic problems);
  ``split="valid"`` gives held-out data for train-by-validation;
* ``task.loss(params, batch) -> Tensor``: the scalar loss f(θ; batch), differentiable in ``params``;
* ``task.transform_grads(grads, generator)``: what the optimizer sees of ∇f (default: ∇f itself;
  :mod:`learnedopt.tasks.ensemble` adds gradient noise and sparse gradients);
* ``task.heldout_metrics(params)``: metrics on data the task is not trained on.

A **task family** draws task instances: ``family.sample(generator) -> Task``. Every random number
comes from the ``torch.Generator`` passed in, so runs are seeded and reproducible.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Task", "TaskFamily", "FixedFamily", "classification_metrics"]


class Task:
    """Base class of a functional task (see the module docstring)."""

    name = "task"

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        raise NotImplementedError

    def sample_batch(self, generator: torch.Generator, split: str = "train") -> Any:
        return None

    def loss(self, params: Sequence[Tensor], batch: Any) -> Tensor:
        raise NotImplementedError

    def transform_grads(self, grads: Sequence[Tensor], generator: torch.Generator) -> list[Tensor]:
        """What the optimizer sees of the gradient (default: the gradient itself). Tasks with noisy or
        sparse gradients override it; it is called once per step, after the gradient is computed."""
        return list(grads)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.init_params(torch.Generator().manual_seed(0)))

    def heldout_metrics(self, params: Sequence[Tensor]) -> dict[str, float]:
        """How well ``params`` generalise: metrics on data the task is not trained on (for the
        classification tasks ``{"loss", "accuracy"}`` on a held-out split), ``{}`` where the task has
        no such data (synthetic problems). Never consumes a generator."""
        return {}


class TaskFamily:
    """Draws task instances: ``sample(generator) -> Task``."""

    name = "family"

    def sample(self, generator: torch.Generator) -> Task:
        raise NotImplementedError


class FixedFamily(TaskFamily):
    """A family of one task (its randomness is θ₀ and the batches)."""

    def __init__(self, task: Task):
        self.task = task
        self.name = task.name

    def sample(self, generator: torch.Generator) -> Task:
        return self.task



def classification_metrics(logits: Tensor, y: Tensor) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``logits`` [n, classes] for labels ``y`` [n]. A row with a
    non-finite logit counts as a wrong prediction (argmax of NaNs is no prediction), and a non-finite
    mean loss is reported as inf, as :mod:`learnedopt.evaluate` reports diverged runs."""
    with torch.no_grad():
        logits = logits.double()
        loss = float(F.cross_entropy(logits, y))
        finite = torch.isfinite(logits).all(1)
        correct = (logits.argmax(1) == y) & finite
        return {"loss": loss if math.isfinite(loss) else math.inf, "accuracy": float(correct.double().mean())}



def _he_normal(shape: tuple[int, ...], generator: torch.Generator, gain: float = 1.0) -> Tensor:
    """Zeros for a bias (1-D); N(0, 2 / fan_in) · gain² for a linear weight [in, out] or a conv weight
    [out, in, kh, kw]."""
    if len(shape) == 1:
        return torch.zeros(shape)
    fan_in = shape[0] if len(shape) == 2 else shape[1] * shape[2] * shape[3]
    return torch.randn(shape, generator=generator) * (gain * (2.0 / fan_in) ** 0.5)


def _minibatch(data: tuple[Tensor, Tensor], batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``batch_size`` examples drawn uniformly with replacement."""
    x, y = data
    idx = torch.randint(0, x.shape[0], (batch_size,), generator=generator)
    return x[idx], y[idx]

