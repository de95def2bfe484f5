"""Functional optimization tasks for meta-training and evaluation.

A **task** is a problem to optimize, written functionally so that an unrolled optimization can be
differentiated through:

* ``task.init_params(generator) -> list[Tensor]``: initial parameters θ₀ (plain tensors);
* ``task.sample_batch(generator, split="train")``: a batch (``None`` for deterministic problems);
  ``split="valid"`` gives held-out data for train-by-validation;
* ``task.loss(params, batch) -> Tensor``: the scalar loss f(θ; batch), differentiable in ``params``;
* ``task.transform_grads(grads, generator)``: what the optimizer sees of ∇f (default: ∇f itself;
  :mod:`learnedopt.ensemble` adds gradient noise and sparse gradients).

A **task family** draws task instances: ``family.sample(generator) -> Task`` (a new quadratic per
call; the MNIST family returns its one task, whose randomness is θ₀ and the minibatches). Every
random number comes from the ``torch.Generator`` passed in, so runs are seeded and reproducible.

Included (Andrychowicz et al. 2016 and its official code):

* ``simple``: f(x) = x² from x = 1 (the official tests' problem);
* ``quadratic``: f(θ) = mean over F functions of ‖W θ − y‖², W [d, d] and y [d] Gaussian (the paper;
  the official code averages F = 128 independent functions per task and draws θ₀ ~ N(0, 0.01²));
* ``mnist``: cross-entropy of an MLP on real MNIST digits (:func:`learnedopt.data.mnist`), one hidden
  layer of 20 sigmoid units, minibatches of 128 drawn with replacement, weights and biases
  ~ N(0, 0.01²); variants by ``hidden`` (``(40,)``, ``(20, 20)``) and ``activation="relu"``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Task", "TaskFamily", "SimpleTask", "QuadraticTask", "QuadraticFamily", "MNISTTask", "MNISTConvTask",
           "DigitsResNetTask", "FixedFamily", "classification_metrics",
           "make_family", "FAMILIES"]


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


ACTIVATIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh}


class MNISTTask(Task):
    """Cross-entropy of an MLP (784 → hidden… → 10) on real MNIST digits.

    Args:
        hidden: hidden layer sizes (paper: ``(20,)``; variants ``(40,)``, ``(20, 20)``).
        activation: ``"sigmoid"`` (paper), ``"relu"`` or ``"tanh"``.
        batch_size: minibatch size, drawn uniformly with replacement at every step (paper: 128).
        split: the digits the task is trained on: ``"train"`` for meta-training, ``"test"`` for
            evaluation (:func:`learnedopt.data.mnist`); ``sample_batch(g, "valid")`` draws from
            ``valid_split`` (default ``"valid"``), on which :meth:`heldout_metrics` also measures
            the final parameters (all of its digits; ``{}`` if ``valid_split == split``).
        init_std: weights and biases ~ N(0, init_std²) (official code: 0.01).
    """

    name = "mnist"

    def __init__(self, hidden: Sequence[int] = (20,), activation: str = "sigmoid", batch_size: int = 128,
                 split: str = "train", valid_split: str = "valid", init_std: float = 0.01):
        from . import data

        if activation not in ACTIVATIONS:
            raise ValueError(f"MNISTTask: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if batch_size < 1:
            raise ValueError(f"MNISTTask: batch_size must be >= 1, got {batch_size}")
        self.hidden = tuple(int(h) for h in hidden)
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"MNISTTask: hidden sizes must be >= 1, got {self.hidden}")
        self.activation, self.batch_size, self.init_std = activation, int(batch_size), float(init_std)
        self.split, self.valid_split = split, valid_split
        self.data = {"train": data.mnist(split), "valid": data.mnist(valid_split)}
        self.sizes = (784,) + self.hidden + (10,)

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        params = []
        for fan_in, fan_out in zip(self.sizes[:-1], self.sizes[1:]):
            params.append(torch.randn(fan_in, fan_out, generator=generator) * self.init_std)
            params.append(torch.randn(fan_out, generator=generator) * self.init_std)
        return params

    def sample_batch(self, generator: torch.Generator, split: str = "train") -> tuple[Tensor, Tensor]:
        x, y = self.data[split]
        idx = torch.randint(0, x.shape[0], (self.batch_size,), generator=generator)
        return x[idx], y[idx]

    def logits(self, params: Sequence[Tensor], x: Tensor) -> Tensor:
        act = ACTIVATIONS[self.activation]
        n = len(params) // 2
        for l in range(n):
            x = torch.addmm(params[2 * l + 1], x, params[2 * l])
            if l < n - 1:
                x = act(x)
        return x

    def loss(self, params: Sequence[Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.logits(params, x), y)

    def heldout_metrics(self, params: Sequence[Tensor]) -> dict[str, float]:
        if self.valid_split == self.split:
            return {}
        x, y = self.data["valid"]
        with torch.no_grad():
            return classification_metrics(self.logits(params, x), y)


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


def make_family(name: str, **kwargs) -> TaskFamily:
    """A task family by name: ``"simple"``, ``"quadratic"`` (kwargs of :class:`QuadraticFamily`) or
    ``"mnist"`` (kwargs of :class:`MNISTTask`)."""
    if name not in FAMILIES:
        raise ValueError(f"make_family: unknown task family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name](**kwargs)


FAMILIES = {
    "simple": lambda **kw: FixedFamily(SimpleTask(**kw)),
    "quadratic": QuadraticFamily,
    "mnist": lambda **kw: FixedFamily(MNISTTask(**kw)),
    "ensemble": lambda **kw: _ensemble(**kw),
    "mnist_conv": lambda **kw: FixedFamily(MNISTConvTask(**kw)),
    "digits_resnet": lambda **kw: FixedFamily(DigitsResNetTask(**kw)),
}


def _ensemble(**kwargs) -> TaskFamily:
    from .ensemble import default_ensemble

    return default_ensemble(**kwargs)


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


class _HeldOutClassifier(Task):
    """A classifier task with held-out data ``self.heldout = (x, y)``: subclasses define
    ``logits(params, x)``; the loss is the cross-entropy of a batch, the held-out metrics are
    :func:`classification_metrics` on all of ``self.heldout``."""

    heldout: tuple[Tensor, Tensor]

    def logits(self, params: Sequence[Tensor], x: Tensor) -> Tensor:
        raise NotImplementedError

    def loss(self, params: Sequence[Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.logits(params, x), y)

    def heldout_metrics(self, params: Sequence[Tensor]) -> dict[str, float]:
        with torch.no_grad():
            return classification_metrics(self.logits(params, self.heldout[0]), self.heldout[1])


class MNISTConvTask(_HeldOutClassifier):
    """Cross-entropy of a small convnet on real MNIST digits (the original code's MNIST convnet test
    problem, filters (3×3, 8) and (5×5, 8)): conv 3×3 → 8, ``activation``, 2×2 max-pool, conv 5×5 → 8,
    ``activation``, 2×2 max-pool, linear → 10. He-normal weights, zero biases (the original's N(0, 0.01)
    leaves a sigmoid convnet nearly untrainable in a few hundred steps). Batches of ``batch_size``
    drawn with replacement from ``split``; :meth:`heldout_metrics` measures all the digits of
    ``heldout_split`` (default: ``"valid"``, or ``"test"`` when trained on ``"valid"``)."""

    name = "mnist-conv"

    def __init__(self, activation: str = "relu", batch_size: int = 64, split: str = "test",
                 heldout_split: str | None = None):
        from . import data

        if activation not in ACTIVATIONS:
            raise ValueError(f"MNISTConvTask: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        heldout_split = heldout_split or ("test" if split == "valid" else "valid")
        if heldout_split == split:
            raise ValueError(f"MNISTConvTask: heldout_split must differ from split, got {split!r} for both")
        self.activation, self.batch_size = activation, int(batch_size)
        x, y = data.mnist(split)
        self.data = (x.reshape(-1, 1, 28, 28), y)
        xh, yh = data.mnist(heldout_split)
        self.heldout = (xh.reshape(-1, 1, 28, 28), yh)
        self.shapes = [(8, 1, 3, 3), (8,), (8, 8, 5, 5), (8,), (8 * 4 * 4, 10), (10,)]

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        return [_he_normal(s, generator) for s in self.shapes]

    def sample_batch(self, generator: torch.Generator, split: str = "train") -> tuple[Tensor, Tensor]:
        return _minibatch(self.data, self.batch_size, generator)

    def logits(self, params: Sequence[Tensor], x: Tensor) -> Tensor:
        act = ACTIVATIONS[self.activation]
        x = F.max_pool2d(act(F.conv2d(x, params[0], params[1])), 2)  # 28 -> 26 -> 13
        x = F.max_pool2d(act(F.conv2d(x, params[2], params[3])), 2)  # 13 -> 9 -> 4
        return torch.addmm(params[5], x.flatten(1), params[4])


class DigitsResNetTask(_HeldOutClassifier):
    """Cross-entropy of a small ResNet (pre-activation style, batch-norm free) on scikit-learn's real
    8×8 digits: conv 3×3 → ``width``; ``blocks`` residual blocks x + conv(relu(conv(relu(x)))) (3×3,
    He-normal weights, the second conv of each block × 0.1 so that every block starts near the
    identity); global average pool; linear → 10. Batches of ``batch_size`` from ``split``;
    :meth:`heldout_metrics` measures all the digits of the other split."""

    name = "digits-resnet"

    def __init__(self, width: int = 16, blocks: int = 2, batch_size: int = 64, split: str = "test"):
        from . import data

        self.width, self.blocks, self.batch_size = int(width), int(blocks), int(batch_size)
        self.data = data.digits(split)
        self.heldout = data.digits("train" if split == "test" else "test")
        w = self.width
        self.shapes = [(w, 1, 3, 3), (w,)]
        for _ in range(self.blocks):
            self.shapes += [(w, w, 3, 3), (w,), (w, w, 3, 3), (w,)]
        self.shapes += [(w, 10), (10,)]

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        # shapes: stem conv, bias, then per block (conv, bias, conv, bias), then the linear read-out
        second_conv = {2 + 4 * b + 2 for b in range(self.blocks)}
        return [_he_normal(s, generator, 0.1 if i in second_conv else 1.0) for i, s in enumerate(self.shapes)]

    def sample_batch(self, generator: torch.Generator, split: str = "train") -> tuple[Tensor, Tensor]:
        return _minibatch(self.data, self.batch_size, generator)

    def logits(self, params: Sequence[Tensor], x: Tensor) -> Tensor:
        x = F.conv2d(x, params[0], params[1], padding=1)
        k = 2
        for _ in range(self.blocks):
            r = F.conv2d(F.relu(x), params[k], params[k + 1], padding=1)
            r = F.conv2d(F.relu(r), params[k + 2], params[k + 3], padding=1)
            x = x + r
            k += 4
        x = F.relu(x).mean((2, 3))
        return torch.addmm(params[k + 1], x, params[k])
