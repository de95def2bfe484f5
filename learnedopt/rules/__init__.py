"""Learned update rules: one module per rule, each with its network, its reference step and its
meta-training adapter (:mod:`~learnedopt.rules.l2l`, :mod:`~learnedopt.rules.hierarchical`,
:mod:`~learnedopt.rules.sgd`); :mod:`~learnedopt.rules.weights` writes and reads a rule's
configuration and weights (the format of the shipped weights in :mod:`learnedopt.pretrained`).

**The update-rule interface.** Anything meta-trainable is an ``nn.Module`` (its parameters are the
meta-parameters φ) with a ``kind`` (a key of :data:`RULES`), a ``config()`` (the keyword arguments
that rebuild it) and two methods::

    init_state(params: list[Tensor]) -> state          # any pytree of tensors ((), tuples, dicts, ...)
    forward(params, grads, state) -> (new_params, new_state)

``forward`` is functional: it returns new tensors (differentiable in φ, in ``params`` and in
``state``) and never changes its inputs. The smallest rule is a learnable step size
(:class:`~learnedopt.rules.sgd.LearnedSGD`)::

    class LearnedSGD(nn.Module):
        kind = "sgd"
        def __init__(self, lr=0.1):
            super().__init__()
            self.lr = nn.Parameter(torch.tensor(lr))
        def config(self):
            return {"lr": float(self.lr)}
        def init_state(self, params):
            return ()
        def forward(self, params, grads, state):
            return [p - self.lr * g for p, g in zip(params, grads)], state

A rule with a random initial state sets ``random_init = True``; meta-training then calls
``init_state(params, generator)``.

Two optional methods, used by :class:`~learnedopt.meta.MetaTrainer`: ``project_()`` (called after
each meta-step, in place: e.g. ``LearnedSGD(min_lr=0.0)`` keeps η >= 0) and ``log_values() -> dict``
(scalars added to each epoch's log record as ``rule_<name>``: ``LearnedSGD`` logs ``rule_lr``).

This package depends on :mod:`learnedopt.ops` and :mod:`learnedopt.reference` only: the optimizers
(:mod:`learnedopt.optim`) and the shipped weights (:mod:`learnedopt.pretrained`) use it without
pulling in meta-training or tasks.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .hierarchical import HierarchicalNet, HierarchicalRule
from .l2l import CoordinateLSTMNet, L2LRule
from .sgd import LearnedSGD

__all__ = ["RULES", "make_rule", "L2LRule", "LearnedSGD", "HierarchicalRule", "CoordinateLSTMNet",
           "HierarchicalNet", "save_rule", "load_rule", "rule_from_blob"]

RULES: dict[str, Callable[..., nn.Module]] = {"l2l": L2LRule, "sgd": LearnedSGD, "hierarchical": HierarchicalRule}


def make_rule(kind: str, **kwargs) -> nn.Module:
    """A fresh rule of ``kind`` (a key of :data:`RULES`) built with ``kwargs`` (its ``config()``)."""
    if kind not in RULES:
        raise ValueError(f"make_rule: unknown rule {kind!r}; known: {sorted(RULES)}")
    return RULES[kind](**kwargs)


from .weights import load_rule, rule_from_blob, save_rule  # noqa: E402  (weights uses RULES)
