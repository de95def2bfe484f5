"""The smallest meta-trainable update rule: SGD with one learnable step size (a baseline of the
meta-training engine and the example of the rule interface, :mod:`learnedopt.rules`)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

__all__ = ["LearnedSGD"]


class LearnedSGD(nn.Module):
    """θ ← θ − η g with one learnable step size η: the smallest update rule."""

    kind = "sgd"

    def __init__(self, lr: float = 0.1):
        super().__init__()
        self.lr = nn.Parameter(torch.tensor(float(lr)))

    def config(self) -> dict[str, Any]:
        return {"lr": float(self.lr.detach())}

    def init_state(self, params: Sequence[Tensor]):
        return ()

    def forward(self, params: Sequence[Tensor], grads: Sequence[Tensor], state):
        return [p - self.lr * g for p, g in zip(params, grads)], state
