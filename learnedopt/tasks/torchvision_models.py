"""Training torchvision models (ResNet-18, ResNet-50, …) on real digits with any optimizer, as a user
would: an ``nn.Module``, ``loss.backward()``, ``optimizer.step()``. The card's use case (README,
docs/resnet.md, ``python -m learnedopt demo --model resnet18``).

The images are the 5,000 real MNIST digits of :func:`learnedopt.tasks.data.mnist` (train: 3,000, held
out: the 1,000 "test" digits), bilinearly upscaled to ``image_size`` (32 by default), repeated on 3
channels and standardised. Needs ``torchvision`` (``pip install torchvision``; not a requirement of
the library).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["digit_images", "make_model", "train", "MODELS"]

MODELS = ("resnet18", "resnet34", "resnet50")


def _torchvision():
    try:
        import torchvision
    except ImportError:
        raise RuntimeError("learnedopt.tasks.torchvision_models needs torchvision (`pip install torchvision`, the "
                           "build matching your torch); it is not a requirement of learnedopt") from None
    return torchvision


def digit_images(split: str = "train", image_size: int = 32) -> tuple[Tensor, Tensor]:
    """Real MNIST digits as ``[n, 3, image_size, image_size]`` standardised images and their labels."""
    from .data import mnist

    if not (isinstance(image_size, int) and image_size >= 8):
        raise ValueError(f"digit_images: image_size must be an int >= 8, got {image_size!r}")
    x, y = mnist(split)
    x = F.interpolate(x.view(-1, 1, 28, 28), size=image_size, mode="bilinear", align_corners=False)
    x = (x - 0.1307) / 0.3081
    return x.expand(-1, 3, -1, -1).contiguous(), y


def make_model(name: str, seed: int = 0) -> nn.Module:
    """``torchvision.models.<name>(weights=None, num_classes=10)``, initialised from ``seed``."""
    if name not in MODELS:
        raise ValueError(f"make_model: model must be one of {MODELS}, got {name!r}")
    tv = _torchvision()
    torch.manual_seed(seed)
    return getattr(tv.models, name)(weights=None, num_classes=10)


def train(model_name: str, make_opt: Callable[[list[nn.Parameter]], torch.optim.Optimizer], steps: int,
          seed: int = 0, batch_size: int = 32, image_size: int = 32, eval_every: int = 0,
          log: Callable[[str], None] | None = None) -> dict:
    """Train ``model_name`` from initialisation ``seed`` for ``steps`` minibatches of ``batch_size``
    training digits (the same minibatches for every optimizer with the same seed; train mode,
    BatchNorm batch statistics). Returns ``{"loss": [steps] minibatch losses, "initial_loss",
    "max_loss", "spike" (the largest minibatch loss over the initial one, ≥ 0 means above it),
    "nonfinite" (a non-finite loss happened), "heldout_accuracy", "heldout_loss" (eval mode, the
    1,000 held-out digits), "seconds"}``. A non-finite loss stops the run (its remaining losses are
    NaN)."""
    model = make_model(model_name, seed)
    x, y = digit_images("train", image_size)
    opt = make_opt(list(model.parameters()))
    g = torch.Generator().manual_seed(seed + 12345)
    losses: list[float] = []
    t0 = time.time()
    model.train()
    for s in range(steps):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        v = loss.item()
        losses.append(v)
        if not math.isfinite(v):
            losses.extend([math.nan] * (steps - s - 1))
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log is not None and eval_every and (s + 1) % eval_every == 0:
            log(f"  step {s + 1}: loss {sum(losses[-eval_every:]) / eval_every:.4f}")
    seconds = time.time() - t0
    xt, yt = digit_images("test", image_size)
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(xt[i:i + 250]) for i in range(0, xt.shape[0], 250)])
        held_loss = F.cross_entropy(logits, yt).item()
        acc = (logits.argmax(1) == yt).float().mean().item()
    finite = [v for v in losses if math.isfinite(v)]
    return {"loss": losses, "initial_loss": losses[0], "max_loss": max(finite) if finite else math.nan,
            "spike": (max(finite) - losses[0]) if finite else math.nan,
            "nonfinite": len(finite) < len(losses), "heldout_accuracy": acc, "heldout_loss": held_loss,
            "seconds": seconds}
