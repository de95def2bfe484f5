"""Pretrained learned optimizers shipped inside the package (no download, no unpickled code).

Each entry is a ``.safetensors`` file in this folder (the rule's weights, with its kind, configuration
and training record in the file's metadata: :mod:`learnedopt.rules.weights`); ``WEIGHTS`` says how
each was made (one command, its config in ``configs/`` and its log in ``docs/logs/``). A training
run's ``final.pt`` / ``best.pt`` becomes such a file with ``learnedopt export RUN/best.pt NAME.safetensors``.
This package depends on :mod:`learnedopt.rules` only.

    >>> learnedopt.pretrained.available()
    ['hierarchical-ensemble', 'l2l-mnist', 'l2l-quadratic']
    >>> rule = learnedopt.pretrained.load("l2l-mnist")          # a learnedopt.rules.L2LRule
    >>> opt = learnedopt.L2LOptimizer(model.parameters(), pretrained="l2l-mnist")
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..rules.weights import load_rule, read_rule_file

__all__ = ["available", "load", "load_net", "path", "info", "WEIGHTS"]

_DIR = Path(__file__).resolve().parent

# name -> (file, what it is, the command that reproduces it)
WEIGHTS: dict[str, tuple[str, str, str]] = {
    "l2l-mnist": (
        "l2l-mnist.safetensors",
        "L2L (2x20 coordinatewise LSTM, log/sign preprocessing p=10, output x0.1) meta-trained on an MLP "
        "(784-20-10, sigmoid) on real MNIST digits, 100 steps, unroll 20",
        "python -m learnedopt meta-train --config configs/l2l-mnist.json --out runs/l2l-mnist && "
        "python -m learnedopt export runs/l2l-mnist/best.pt learnedopt/pretrained/l2l-mnist.safetensors",
    ),
    "l2l-quadratic": (
        "l2l-quadratic.safetensors",
        "L2L (2x20 coordinatewise LSTM, log/sign preprocessing p=10, output x0.1) meta-trained on 10-d "
        "Gaussian quadratics ||W theta - y||^2 (128 per task), 100 steps, unroll 20",
        "python -m learnedopt meta-train --config configs/l2l-quadratic.json --out runs/l2l-quadratic && "
        "python -m learnedopt export runs/l2l-quadratic/best.pt learnedopt/pretrained/l2l-quadratic.safetensors",
    ),
    "hierarchical-ensemble": (
        "hierarchical-ensemble.safetensors",
        "Hierarchical optimizer (per-coordinate LSTM 10, tensor GRU 20, global GRU 20; Wichrowska et al. 2017) "
        "meta-trained on the 101-problem ensemble of the original code (quadratics, bowls, 2-D test functions, "
        "logistic regression, random-label MLPs, matrix-multiplication algorithms, norms, sums; rescaled, "
        "log-objective, noisy and sparse variants), heavy-tailed unrolls, log loss-ratio meta-objective; "
        "the default of learnedopt.HierarchicalOptimizer",
        "python -m learnedopt meta-train --config configs/hierarchical-ensemble.json --out runs/hierarchical-ensemble && "
        "python -m learnedopt export runs/hierarchical-ensemble/best.pt learnedopt/pretrained/hierarchical-ensemble.safetensors",
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
    blob = read_rule_file(path(name))
    return {"name": name, "description": WEIGHTS[name][1], "command": WEIGHTS[name][2], "kind": blob["kind"],
            "config": blob["config"], **blob.get("extra", {})}


def load(name: str) -> nn.Module:
    """The pretrained update rule ``name`` (a :mod:`learnedopt.rules` module, on CPU, in float32 —
    the weights' own dtype — whatever ``torch.get_default_dtype()`` is)."""
    return load_rule(path(name)).float()


def load_net(name: str):
    """The network of a rule: a :class:`learnedopt.rules.l2l.CoordinateLSTMNet` (L2L) for ``L2LOptimizer``, a
    :class:`learnedopt.rules.hierarchical.HierarchicalNet` for ``HierarchicalOptimizer``."""
    rule = load(name)
    net = getattr(rule, "net", None)
    if net is None:
        raise ValueError(f"learnedopt.pretrained: {name!r} is a {type(rule).__name__}, which has no network")
    return net
