"""The problems of Wang, Yuan, Wu & Ge 2021, "Guarantees for Tuning the Step Size using a
Learning-to-Learn Approach" (ICML; docs/wang.md reproduces its experiments with them).

* :class:`HessianQuadraticTask`: f(w) = ½ wᵀHw from a fixed w₀ (§3: one task, the meta-gradient's
  explosion and the log objective); :func:`wang_quadratic` draws the paper's instance, H = XᵀX with X a
  d×d standard Gaussian matrix;
* :class:`LeastSquaresTask` / :class:`LeastSquaresFamily` (§4): w* uniform on the unit sphere, x ~ N(0, I_d),
  y = ⟨w*, x⟩ + ξ with ξ ~ N(0, σ²), loss ½ mean (y − ⟨w, x⟩)² over the training samples, gradient
  descent from w = 0. The ``"train"`` batch is the whole training set (full-batch GD), ``"valid"`` the
  held-out samples of train-by-validation (``n_valid > 0``); :meth:`LeastSquaresTask.heldout_metrics`
  measures ``n_test`` fresh test samples.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from .base import Task, TaskFamily

__all__ = ["HessianQuadraticTask", "wang_quadratic", "LeastSquaresTask", "LeastSquaresFamily"]


class HessianQuadraticTask(Task):
    """f(w) = ½ wᵀHw from the fixed point ``w0`` (deterministic: no batches, the same w₀ every time)."""

    name = "hessian-quadratic"

    def __init__(self, H: Tensor, w0: Tensor):
        if H.dim() != 2 or H.shape[0] != H.shape[1] or w0.shape != H.shape[:1]:
            raise ValueError(f"HessianQuadraticTask: H must be [d, d] and w0 [d], got {tuple(H.shape)} and {tuple(w0.shape)}")
        if H.dtype != w0.dtype or not H.dtype.is_floating_point:
            raise ValueError(f"HessianQuadraticTask: H and w0 must have the same floating dtype, got {H.dtype} and {w0.dtype}")
        if not torch.equal(H, H.T):
            raise ValueError("HessianQuadraticTask: H must be symmetric")
        self.H, self.w0 = H, w0

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        return [self.w0.clone()]

    def loss(self, params: Sequence[Tensor], batch: Any) -> Tensor:
        w = params[0]
        return 0.5 * (w @ (self.H @ w))

    def eigen(self) -> tuple[Tensor, Tensor]:
        """(λ ascending, c = coordinates of w₀ in H's eigenbasis): f(w_t) = ½ Σ_i c_i² λ_i (1 − ηλ_i)^{2t}
        for gradient descent with step η (the closed form that the paper's analysis uses)."""
        lam, U = torch.linalg.eigh(self.H)
        return lam, U.T @ self.w0


def wang_quadratic(dim: int = 20, generator: torch.Generator | None = None, unit_w0: bool = True,
                   dtype: torch.dtype = torch.float64) -> HessianQuadraticTask:
    """The §3 instance: H = XᵀX with X [dim, dim] standard Gaussian and w₀ ~ N(0, I) (drawn in that
    order from ``generator``), scaled to ‖w₀‖ = 1 when ``unit_w0`` (the paper's analysis; its code does
    not normalise: that scales f, not the step size η* nor the log objective's meta-gradient)."""
    if dim < 1:
        raise ValueError(f"wang_quadratic: dim must be >= 1, got {dim}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    X = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    w0 = torch.randn(dim, generator=g, dtype=torch.float64)
    if unit_w0:
        w0 = w0 / torch.linalg.vector_norm(w0)
    H = X.T @ X
    H = 0.5 * (H + H.T)  # exactly symmetric
    return HessianQuadraticTask(H.to(dtype), w0.to(dtype))


class LeastSquaresTask(Task):
    """½ mean_i (y_i − ⟨w, x_i⟩)² over the training samples, from w = 0 (see the module docstring)."""

    name = "least-squares"

    def __init__(self, w_star: Tensor, train: tuple[Tensor, Tensor], valid: tuple[Tensor, Tensor] | None = None,
                 test: tuple[Tensor, Tensor] | None = None, sigma: float | None = None):
        d = w_star.shape[0]
        for split, data in (("train", train), ("valid", valid), ("test", test)):
            if data is None:
                continue
            x, y = data
            if x.dim() != 2 or x.shape[1] != d or y.shape != x.shape[:1] or x.shape[0] < 1:
                raise ValueError(f"LeastSquaresTask: {split} must be (x [n >= 1, {d}], y [n]), got "
                                 f"{tuple(x.shape)} and {tuple(y.shape)}")
        self.w_star, self.train, self.valid, self.test, self.sigma = w_star, train, valid, test, sigma

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        return [torch.zeros_like(self.w_star)]

    def sample_batch(self, generator: torch.Generator, split: str = "train") -> tuple[Tensor, Tensor]:
        if split == "train":
            return self.train
        if split == "valid":
            if self.valid is None:
                raise ValueError("LeastSquaresTask: no validation samples (built with n_valid = 0); "
                                 "train-by-validation needs n_valid > 0")
            return self.valid
        raise ValueError(f"LeastSquaresTask: split must be 'train' or 'valid', got {split!r}")

    def loss(self, params: Sequence[Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return 0.5 * (y - x @ params[0]).square().mean()

    def rmse(self, params: Sequence[Tensor], split: str = "train") -> float:
        """√(mean (y − ⟨w, x⟩)²) on ``split`` (``"train"``, ``"valid"`` or ``"test"``)."""
        splits = {"train": self.train, "valid": self.valid, "test": self.test}
        if split not in splits:
            raise ValueError(f"LeastSquaresTask.rmse: split must be one of {sorted(splits)}, got {split!r}")
        data = splits[split]
        if data is None:
            raise ValueError(f"LeastSquaresTask.rmse: the task has no {split!r} samples")
        with torch.no_grad():
            return math.sqrt(2.0 * float(self.loss(params, data)))

    def heldout_metrics(self, params: Sequence[Tensor]) -> dict[str, float]:
        """On the test samples: ``rmse``, ``zero_rmse`` (the predictor w = 0), and ``param_error``
        ‖w − w*‖²; ``{}`` without test samples."""
        if self.test is None:
            return {}
        with torch.no_grad():
            return {"rmse": self.rmse(params, "test"),
                    "zero_rmse": self.rmse([torch.zeros_like(self.w_star)], "test"),
                    "param_error": float((params[0] - self.w_star).square().sum())}


class LeastSquaresFamily(TaskFamily):
    """New w* (uniform on the unit sphere) and samples per task (the paper's §4: d = 1000, σ ≥ 1,
    500 samples: n_train = 500 for train-by-train, 250 + 250 for train-by-validation).

    A task's draws come in a fixed order — w*, then the ``n_train + n_valid`` samples (x, then ξ),
    then the test samples — so that two families that differ only in how they split the same number
    of samples (``n_train=500`` vs ``n_train=250, n_valid=250``) draw the same w* and samples from
    the same generator state: train-by-validation's training and validation sets are then the two
    halves of train-by-train's training set, as in the paper's code.
    """

    name = "least-squares"

    def __init__(self, dim: int = 1000, n_train: int = 500, n_valid: int = 0, n_test: int = 0, sigma: float = 1.0,
                 dtype: torch.dtype = torch.float32):
        if dim < 1 or n_train < 1 or n_valid < 0 or n_test < 0:
            raise ValueError(f"LeastSquaresFamily: need dim >= 1, n_train >= 1, n_valid >= 0 and n_test >= 0, got "
                             f"{dim}, {n_train}, {n_valid} and {n_test}")
        if not sigma >= 0:
            raise ValueError(f"LeastSquaresFamily: sigma must be >= 0, got {sigma}")
        self.dim, self.n_train, self.n_valid, self.n_test = int(dim), int(n_train), int(n_valid), int(n_test)
        self.sigma, self.dtype = float(sigma), dtype

    def _samples(self, w_star: Tensor, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        y = x @ w_star + self.sigma * torch.randn(n, generator=generator, dtype=torch.float64)
        return x.to(self.dtype), y.to(self.dtype)

    def sample(self, generator: torch.Generator) -> LeastSquaresTask:
        w = torch.randn(self.dim, generator=generator, dtype=torch.float64)
        w = w / torch.linalg.vector_norm(w)
        x, y = self._samples(w, self.n_train + self.n_valid, generator)
        nt = self.n_train
        valid = (x[nt:], y[nt:]) if self.n_valid else None
        test = self._samples(w, self.n_test, generator) if self.n_test else None
        return LeastSquaresTask(w.to(self.dtype), (x[:nt], y[:nt]), valid, test, self.sigma)
