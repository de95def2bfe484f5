"""Classic problems of Andrychowicz et al. 2016 and its official code.

* :class:`SimpleTask`: f(x) = x² from x = 1 (the official tests' problem);
* :class:`QuadraticFamily`: f(θ) = mean over F functions of ‖W θ − y‖², W [d, d] and y [d] Gaussian
  (the paper; the official code averages F = 128 independent functions per task and draws
  θ₀ ~ N(0, 0.01²)).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from .base import Task, TaskFamily

__all__ = ["SimpleTask", "QuadraticTask", "QuadraticFamily"]


class SimpleTask(Task):
    """f(x) = x², x₀ = 1 (google-deepmind/learning-to-learn's "simple" problem)."""

    name = "simple"

    def __init__(self, x0: float = 1.0, dtype: torch.dtype = torch.float32):
        self.x0, self.dtype = float(x0), dtype

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        return [torch.full((1,), self.x0, dtype=self.dtype)]

    def loss(self, params: Sequence[Tensor], batch: Any) -> Tensor:
        return params[0].square().sum()


class QuadraticTask(Task):
    """f(θ) = (1/F) Σ_f ‖W_f θ_f − y_f‖², θ [F, d]; deterministic (no batches)."""

    name = "quadratic"

    def __init__(self, W: Tensor, y: Tensor, init_std: float = 0.01):
        if W.dim() != 3 or y.dim() != 2 or W.shape[:2] != y.shape or W.shape[1] != W.shape[2]:
            raise ValueError(f"QuadraticTask: W must be [F, d, d] and y [F, d], got {tuple(W.shape)} and {tuple(y.shape)}")
        self.W, self.y, self.init_std = W, y, float(init_std)

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        F_, d = self.y.shape
        return [torch.randn(F_, d, generator=generator, dtype=self.y.dtype) * self.init_std]

    def loss(self, params: Sequence[Tensor], batch: Any) -> Tensor:
        r = torch.bmm(self.W, params[0].unsqueeze(-1)).squeeze(-1) - self.y
        return r.square().sum(-1).mean()


class QuadraticFamily(TaskFamily):
    """New Gaussian W [d, d] and y [d] (F functions of them) per task: the paper's quadratics."""

    name = "quadratic"

    def __init__(self, dim: int = 10, num_functions: int = 128, init_std: float = 0.01,
                 dtype: torch.dtype = torch.float32):
        if dim < 1 or num_functions < 1:
            raise ValueError(f"QuadraticFamily: dim and num_functions must be >= 1, got {dim} and {num_functions}")
        self.dim, self.num_functions, self.init_std, self.dtype = int(dim), int(num_functions), init_std, dtype

    def sample(self, generator: torch.Generator) -> QuadraticTask:
        W = torch.randn(self.num_functions, self.dim, self.dim, generator=generator, dtype=self.dtype)
        y = torch.randn(self.num_functions, self.dim, generator=generator, dtype=self.dtype)
        return QuadraticTask(W, y, self.init_std)
