"""Pretrained learned optimizers shipped inside the package (no download, no unpickled code).

Each entry is a ``.pt`` file in this folder written by :func:`learnedopt.meta.save_rule` and read with
``torch.load(weights_only=True)``; ``WEIGHTS`` says how each was made (one command, its config in
``configs/`` and its log in ``docs/``).

    >>> learnedopt.pretrained.available()
    ['hierarchical-ensemble', 'l2l-mnist', 'l2l-quadratic']
    >>> rule = learnedopt.pretrained.load("l2l-mnist")          # a learnedopt.meta.L2LRule
    >>> opt = learnedopt.L2LOptimizer(model.parameters(), pretrained="l2l-mnist")
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["available", "load", "load_net", "path", "info", "WEIGHTS"]

_DIR = Path(__file__).resolve().parent

# name -> (file, what it is, the command that reproduces it)
WEIGHTS: dict[str, tuple[str, str, str]] = {
    "l2l-mnist": (
        "l2l-mnist.pt",
        "L2L (2x20 coordinatewise LSTM, log/sign preprocessing p=10, output x0.1) meta-trained on an MLP "
        "(784-20-10, sigmoid) on real MNIST digits, 100 steps, unroll 20",
        "python -m learnedopt meta-train --config configs/l2l-mnist.json --out runs/l2l-mnist",
    ),
    "l2l-quadratic": (
        "l2l-quadratic.pt",
        "L2L (2x20 coordinatewise LSTM, log/sign preprocessing p=10, output x0.1) meta-trained on 10-d "
        "Gaussian quadratics ||W theta - y||^2 (128 per task), 100 steps, unroll 20",
        "python -m learnedopt meta-train --config configs/l2l-quadratic.json --out runs/l2l-quadratic",
    ),
    "hierarchical-ensemble": (
        "hierarchical-ensemble.pt",
        "Hierarchical optimizer (per-coordinate LSTM 10, tensor GRU 20, global GRU 20; Wichrowska et al. 2017) "
        "meta-trained on the 101-problem ensemble of the original code (quadratics, bowls, 2-D test functions, "
        "logistic regression, random-label MLPs, matrix-multiplication algorithms, norms, sums; rescaled, "
        "log-objective, noisy and sparse variants), heavy-tailed unrolls, log loss-ratio meta-objective; "
        "the default of learnedopt.HierarchicalOptimizer",
        "python -m learnedopt meta-train --config configs/hierarchical-ensemble.json --out runs/hierarchical-ensemble",
    ),
}


def available() -> list[str]:
    """Names of the pretrained weights present in this installation."""
    return sorted(name for name, (f, _, _) in WEIGHTS.items() if (_DIR / f).is_file())


def path(name: str) -> Path:
    if name not in WEIGHTS:
        raise ValueError(f"learnedopt.pretrained: unknown weights {name!r}; available: {available()}")
    p = _DIR / WEIGHTS[name][0]
    if not p.is_file():
        raise FileNotFoundError(f"learnedopt.pretrained: the file of {name!r} ({p}) is not installed")
    return p


def info(name: str) -> dict:
    """What the weights are, the command that made them, and what the training run recorded."""
    blob = torch.load(path(name), map_location="cpu", weights_only=True)
    return {"name": name, "description": WEIGHTS[name][1], "command": WEIGHTS[name][2], "kind": blob["kind"],
            "config": blob["config"], **blob.get("extra", {})}


def load(name: str) -> nn.Module:
    """The pretrained update rule ``name`` (a :mod:`learnedopt.meta` rule module, on CPU, in float32
    — the weights' own dtype — whatever ``torch.get_default_dtype()`` is)."""
    from ..meta import load_rule

    return load_rule(path(name)).float()


def load_net(name: str):
    """The network of a rule: a :class:`learnedopt.nets.CoordinateLSTMNet` (L2L) for ``L2LOptimizer``, a
    :class:`learnedopt.hierarchical.HierarchicalNet` for ``HierarchicalOptimizer``."""
    rule = load(name)
    net = getattr(rule, "net", None)
    if net is None:
        raise ValueError(f"learnedopt.pretrained: {name!r} is a {type(rule).__name__}, which has no network")
    return net
