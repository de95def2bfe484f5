"""The smallest meta-trainable update rule: SGD with one learnable step size (a baseline of the
meta-training engine and the example of the rule interface, :mod:`learnedopt.rules`).

Two options of Wang et al. 2021 ("Guarantees for Tuning the Step Size using a Learning-to-Learn
Approach"), both off by default:

* ``min_lr``: meta-training projects η back to ``min_lr`` after a meta-step that took it below
  (:meth:`LearnedSGD.project_`; the paper resets η to 0 whenever it goes negative);
* ``max_norm``: the paper's truncated gradient descent (§4) — the first step whose result has
  ‖w‖ ≥ ``max_norm`` (all tensors together) puts w at norm ``max_norm`` (along its own direction) and
  freezes the trajectory there, so that a diverging step size costs a bounded loss.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

__all__ = ["LearnedSGD"]


class LearnedSGD(nn.Module):
    """θ ← θ − η g with one learnable step size η: the smallest update rule (options: see the module
    docstring)."""

    kind = "sgd"

    def __init__(self, lr: float = 0.1, min_lr: float | None = None, max_norm: float | None = None):
        super().__init__()
        if min_lr is not None and not float(lr) >= min_lr:
            raise ValueError(f"LearnedSGD: lr must be >= min_lr, got lr {lr} and min_lr {min_lr}")
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"LearnedSGD: max_norm must be > 0 or None, got {max_norm}")
        self.lr = nn.Parameter(torch.tensor(float(lr)))
        self.min_lr = None if min_lr is None else float(min_lr)
        self.max_norm = None if max_norm is None else float(max_norm)

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"lr": float(self.lr.detach())}
        if self.min_lr is not None:
            cfg["min_lr"] = self.min_lr
        if self.max_norm is not None:
            cfg["max_norm"] = self.max_norm
        return cfg

    def init_state(self, params: Sequence[Tensor]):
        if self.max_norm is None:
            return ()
        device = params[0].device if len(params) else None
        return (torch.zeros((), dtype=torch.bool, device=device),)  # frozen: the trajectory reached max_norm

    def forward(self, params: Sequence[Tensor], grads: Sequence[Tensor], state):
        new = [p - self.lr * g for p, g in zip(params, grads)]
        if self.max_norm is None:
            return new, state
        (frozen,) = state
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(q) for q in new]))
        hit = ~frozen & (norm >= self.max_norm)
        scale = self.max_norm / norm.clamp_min(self.max_norm)  # 1 below max_norm (no 0/0 at w = 0)
        new = [torch.where(frozen, p, q * scale) for p, q in zip(params, new)]
        return new, (frozen | hit,)

    @torch.no_grad()
    def project_(self) -> None:
        """After a meta-step: η ← max(η, ``min_lr``) (nothing without ``min_lr``)."""
        if self.min_lr is not None:
            self.lr.clamp_(min=self.min_lr)

    def log_values(self) -> dict[str, float]:
        """What meta-training logs of the rule after each trajectory: the step size."""
        return {"lr": float(self.lr.detach())}
