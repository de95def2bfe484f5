"""Unrolled optimization of a task by an update rule (:mod:`learnedopt.rules`).

:func:`unroll` runs ``T`` steps of a rule on a task from a carried point (parameters, rule state)
and returns the meta-loss (:mod:`~learnedopt.meta.objectives`); gradients of the task loss are
detached (second derivatives dropped, as in the paper) unless ``second_derivatives=True``. Between
unrolls the parameters and the rule state are carried *without* gradient (truncated BPTT).
:func:`run_rule` optimizes a task with a rule without meta-gradient (evaluation).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ..tasks import Task
from .objectives import OBJECTIVES, objective as _objective

__all__ = ["Carry", "start", "unroll", "run_rule"]


@dataclasses.dataclass
class Carry:
    """What is carried (without gradient) from one unroll to the next."""

    task: Task
    params: list[Tensor]
    state: Any
    step: int = 0
    f0: float | None = None  # the loss at the trajectory's start (log_ratio)


def start(rule: nn.Module, task: Task, generator: torch.Generator) -> Carry:
    """A trajectory's start: θ₀ from the task and the rule's initial state (drawn with ``generator``
    when the rule has a random initial state: ``rule.random_init``)."""
    params = task.init_params(generator)
    if getattr(rule, "random_init", False):
        return Carry(task, params, rule.init_state(params, generator))
    return Carry(task, params, rule.init_state(params))


def _detach(tree):
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


def unroll(
    rule: nn.Module,
    carry: Carry,
    steps: int,
    generator: torch.Generator,
    objective: str = "sum",
    validation: bool = False,
    second_derivatives: bool = False,
) -> tuple[Tensor, Carry, list[float]]:
    """``steps`` steps of ``rule`` from ``carry``; returns ``(meta_loss, next_carry, losses)``.

    ``meta_loss`` is differentiable in the rule's parameters (call ``backward`` on it);
    ``next_carry`` holds the detached end point; ``losses`` are the training losses f(θ_t; b_t) of
    the steps (floats, for logging). Batches come from ``generator``: per step one training batch
    (and with ``validation`` one held-out batch), and one more for the end point.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unroll: objective must be one of {OBJECTIVES}, got {objective!r}")
    if steps < 1:
        raise ValueError(f"unroll: steps must be >= 1, got {steps}")
    task = carry.task
    params = [p.detach().requires_grad_(True) for p in carry.params]
    state = _detach(carry.state)
    values: list[Tensor] = []
    losses: list[float] = []
    f0 = carry.f0
    for t in range(steps):
        loss = task.loss(params, task.sample_batch(generator))
        if f0 is None:
            f0 = float(loss.detach())
        grads = torch.autograd.grad(loss, params, retain_graph=True, create_graph=second_derivatives)
        if not second_derivatives:
            grads = [g.detach() for g in grads]
        grads = task.transform_grads(grads, generator)
        values.append(task.loss(params, task.sample_batch(generator, "valid")) if validation else loss)
        losses.append(float(loss.detach()))
        params, state = rule(params, list(grads), state)
    end = task.loss(params, task.sample_batch(generator, "valid" if validation else "train"))
    values.append(end)
    meta_loss = _objective(objective, values, f0)
    nxt = Carry(task, [p.detach() for p in params], _detach(state), carry.step + steps, f0)
    return meta_loss, nxt, losses


@torch.no_grad()
def _rule_step(rule, params, grads, state):
    return rule(params, grads, state)


def run_rule(rule: nn.Module, task: Task, steps: int, generator: torch.Generator) -> tuple[list[float], list[Tensor]]:
    """Optimizes ``task`` for ``steps`` steps with ``rule`` (no meta-gradient). Returns the losses
    f(θ_t; b_t) for t = 0 … steps (the last on a fresh batch) and the final parameters. Consumes
    ``generator`` exactly like :func:`learnedopt.evaluate.run_optimizer` does, so that rules and
    baselines see the same θ₀ and batches."""
    params = task.init_params(generator)
    state = rule.init_state(params)
    losses = []
    for _ in range(steps):
        params = [p.detach().requires_grad_(True) for p in params]
        with torch.enable_grad():
            loss = task.loss(params, task.sample_batch(generator))
            grads = torch.autograd.grad(loss, params)
        grads = task.transform_grads(grads, generator)
        losses.append(float(loss.detach()))
        params, state = _rule_step(rule, [p.detach() for p in params], list(grads), state)
    with torch.no_grad():
        losses.append(float(task.loss(params, task.sample_batch(generator))))
    return losses, params
