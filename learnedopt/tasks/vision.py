"""Vision problems on real digits (:mod:`learnedopt.tasks.data`; nothing is downloaded).

* :class:`MNISTTask`: cross-entropy of an MLP on real MNIST digits, one hidden layer of 20 sigmoid
  units, minibatches of 128 drawn with replacement, weights and biases ~ N(0, 0.01²) (Andrychowicz
  et al. 2016); variants by ``hidden`` (``(40,)``, ``(20, 20)``) and ``activation="relu"``;
* :class:`MNISTConvTask`: a small convnet on MNIST (the original code of Wichrowska et al.);
* :class:`DigitsResNetTask`: a small residual network with batch normalisation on the 8×8 digits.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Task, _he_normal, _minibatch, classification_metrics

__all__ = ["MNISTTask", "MNISTConvTask", "DigitsResNetTask", "ACTIVATIONS"]


ACTIVATIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh}


class MNISTTask(Task):
    """Cross-entropy of an MLP (784 → hidden… → 10) on real MNIST digits.

    Args:
        hidden: hidden layer sizes (paper: ``(20,)``; variants ``(40,)``, ``(20, 20)``).
        activation: ``"sigmoid"`` (paper), ``"relu"`` or ``"tanh"``.
        batch_size: minibatch size, drawn uniformly with replacement at every step (paper: 128).
        split: the digits the task is trained on: ``"train"`` for meta-training, ``"test"`` for
            evaluation (:func:`learnedopt.tasks.data.mnist`); ``sample_batch(g, "valid")`` draws from
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
