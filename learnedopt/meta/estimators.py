"""Gradient estimators of meta-training, behind one interface: :class:`TruncatedBPTT` (back-propagation
through each truncated unroll: :func:`~learnedopt.meta.unroll.unroll`), :class:`ES` (antithetic
evolution strategies) and :class:`PES` (persistent evolution strategies, Vicol et al. 2021).

**The interface.** An estimator starts a trajectory (``start(rule, task, generator)``: what it
carries between truncations) and, per truncation of ``steps`` optimizee steps,
``estimate(rule, traj, steps, generator, objective, validation, last)`` returns an :class:`Estimate`:
the meta-loss of that truncation (a float), the meta-gradient (written into the ``.grad`` of the rule's
parameters, as ``backward`` would), the next ``traj`` and the training losses of the steps. ``last``
says no truncation follows in this trajectory (ES then need not advance its unperturbed trajectory).
:class:`~learnedopt.meta.trainer.MetaTrainer` picks one from ``MetaConfig.estimator``.

**The maths.** φ: the rule's parameters (flattened, D numbers); L_k(φ): the meta-objective of
truncation k (:mod:`~learnedopt.meta.objectives`) along a trajectory run with φ from the trajectory's
start; its Gaussian smoothing L̃_k(φ) = E_{ε ~ N(0, σ²I)} L_k(φ + ε).

* ES, antithetic, N pairs: ε_1 … ε_N ~ N(0, σ²I); for each pair, the truncation is run twice from the
  *unperturbed* trajectory's state s_k (the "mean" trajectory, run with φ), with φ + ε_i and φ − ε_i:

      ĝ = 1/(2Nσ²) Σ_i ε_i (L_k(φ + ε_i) − L_k(φ − ε_i)).

  Over a whole trajectory (one truncation) ĝ is an unbiased estimate of ∇L̃(φ). With several
  truncations ("truncated ES") each one ignores how φ changed the state s_k it starts from: biased
  towards short horizons, like truncated BPTT.
* PES (Vicol et al. 2021, antithetic form): every particle keeps its own state across truncations
  (particle i+ always runs with φ + its current perturbation, particle i− with φ − it), a fresh
  ε_i ~ N(0, σ²I) is drawn per pair and truncation, and the pair accumulates ξ_i ← ξ_i + ε_i (ξ_i = 0 at
  the trajectory's start):

      ĝ_k = 1/(2Nσ²) Σ_i ξ_i (L_k^{i+} − L_k^{i−}),

  where L_k^{i±} is truncation k's meta-objective of particle i±. Σ_k ĝ_k is an unbiased estimate of
  ∇ Σ_k L̃_k, the gradient of the smoothed *full-horizon* loss in which the perturbation of every
  truncation is an independent variable (so unbiased across truncations, unlike truncated ES/BPTT);
  its variance grows with the number of truncations (ξ grows). With one truncation ξ = ε: PES is ES.

ES and PES run the optimizee with the rule's network weights perturbed, through the fused in-place
step ops (``learnedopt::l2l_step_``, ``learnedopt::hier_step_``; one call per particle: a call takes one
set of weights) with no autograd graph of the rule: a particle's step costs what an optimizer step
costs. The task's gradients of all 2N particles (and the mean) are computed together: one vectorised
call (``torch.func.vmap``) per step where the task allows it, else one backward of the summed losses.
All particles of a step see the same batch (common random numbers). Rules the fused ops do not cover
(:class:`~learnedopt.rules.sgd.LearnedSGD`, hierarchical with attention or other sizes) step through
their own ``forward`` under ``torch.no_grad``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from .. import ops
from ..rules.hierarchical import HierarchicalRule, HierState, fused_step_
from ..rules.l2l import L2LRule
from ..tasks import Task
from .objectives import OBJECTIVES, objective as _objective
from .unroll import Carry, start, unroll

__all__ = ["Estimate", "GradientEstimator", "TruncatedBPTT", "ES", "PES", "ESTIMATORS", "make_estimator",
           "Swarm", "run_swarm"]


@dataclasses.dataclass
class Estimate:
    """What an estimator returns for one truncation (the meta-gradient is in the rule's ``.grad``)."""

    meta_loss: float  # BPTT: of φ's trajectory; ES/PES: the mean over the perturbed particles
    traj: Any  # what the next truncation starts from
    losses: list[float]  # training losses of the steps (BPTT: φ's; ES/PES: mean over particles)
    per_particle: Tensor | None = None  # ES/PES: the meta-objective of each particle [P]


class GradientEstimator:
    """Base class (see the module docstring)."""

    name = "estimator"

    def start(self, rule: nn.Module, task: Task, generator: torch.Generator) -> Any:
        raise NotImplementedError

    def estimate(self, rule: nn.Module, traj: Any, steps: int, generator: torch.Generator, objective: str = "sum",
                 validation: bool = False, last: bool = False) -> Estimate:
        raise NotImplementedError

    @staticmethod
    def step_of(traj: Any) -> int:
        """Optimizee steps taken so far in the trajectory ``traj``."""
        return traj.step


class TruncatedBPTT(GradientEstimator):
    """Back-propagation through each truncated unroll (:func:`~learnedopt.meta.unroll.unroll`); the
    carry between unrolls is detached. ``second_derivatives``: as in ``unroll``."""

    name = "bptt"

    def __init__(self, second_derivatives: bool = False):
        self.second_derivatives = bool(second_derivatives)

    def start(self, rule, task, generator):
        return start(rule, task, generator)

    def estimate(self, rule, traj, steps, generator, objective="sum", validation=False, last=False):
        meta_loss, nxt, losses = unroll(rule, traj, steps, generator, objective, validation, self.second_derivatives)
        if torch.isfinite(meta_loss):
            meta_loss.backward()
        return Estimate(float(meta_loss.detach()), nxt, losses)


# -- particles: many optimizee trajectories, each with its own rule weights ------------------------

def flat_params(rule: nn.Module) -> Tensor:
    """The rule's parameters as one detached vector φ (in ``rule.parameters()`` order)."""
    return torch.cat([p.detach().reshape(-1) for p in rule.parameters()])


class _Stepper:
    """Steps P particles, each with its own copy of the rule (its weights one row of ``load``'s matrix).
    Generic version: the rule's own ``forward`` under ``no_grad`` (functional; the new parameters are
    copied into the particle's tensors)."""

    def __init__(self, rule: nn.Module, P: int):
        self.clones = [copy.deepcopy(rule).requires_grad_(False) for _ in range(P)]

    @torch.no_grad()
    def load(self, weights: Tensor) -> None:
        """Row i of ``weights`` [P, D] becomes particle i's φ."""
        for clone, w in zip(self.clones, weights):
            off = 0
            for p in clone.parameters():
                p.copy_(w[off:off + p.numel()].view_as(p))
                off += p.numel()
        self._loaded()

    def _loaded(self) -> None:
        pass

    def convert(self, params: list[Tensor], state: Any) -> Any:
        """The stepper's state of one particle from a rule state (a copy)."""
        return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, state)

    def restart(self, i: int, state: Any) -> Any:
        """Particle i's state at the trajectory's start, with the parts of the initial state that are
        meta-parameters taken from particle i's (perturbed) weights. Generic rules: unchanged (their
        initial state is the unperturbed rule's)."""
        return state

    @torch.no_grad()
    def step(self, i: int, params: list[Tensor], grads: list[Tensor], state: Any) -> Any:
        new, state = self.clones[i](params, grads, state)
        for p, q in zip(params, new):
            p.copy_(q)
        return state


class _L2LStepper(_Stepper):
    """L2L particles through ``learnedopt::l2l_step_`` (state per parameter: [numel, 2 * sum(H)])."""

    def _loaded(self) -> None:
        self.weights = []
        for clone in self.clones:
            net = clone.net
            w = [net.layer_weights(l) for l in range(len(net.layers))]
            self.weights.append(([t[0] for t in w], [t[1] for t in w], [t[2] for t in w], net.w_out, net.b_out))

    def convert(self, params, state):
        h, c = state
        flat = torch.cat([t for pair in zip(h, c) for t in pair], 1) if h else \
            torch.zeros(sum(p.numel() for p in params), 0, dtype=torch.float32)
        return [s.contiguous() for s in flat.split([p.numel() for p in params])]

    @torch.no_grad()
    def step(self, i, params, grads, state):
        net = self.clones[i].net
        w_ih, w_hh, b, w_out, b_out = self.weights[i]
        torch.ops.learnedopt.l2l_step_(params, grads, state, w_ih, w_hh, b, w_out, b_out, 1.0, 0.0, net.output_scale,
                                       net.p, net.preprocess == "log_sign", None, None)
        return state


class _HierStepper(_Stepper):
    """Hierarchical particles through ``learnedopt::hier_step_`` and the tensor/global RNNs
    (:func:`learnedopt.rules.hierarchical.fused_step_`, the optimizer's step)."""

    def _loaded(self) -> None:
        self.packed = [clone.net.packed_coord_weights() for clone in self.clones]

    def convert(self, params, state: HierState):
        R = self.clones[0].net.rows
        sizes = [p.numel() for p in params]
        coords = [r.contiguous() for r in state.coord.split(sizes, 1)]
        dt = state.tensor.dtype
        return {"coords": coords, "tensor": state.tensor.clone(), "glob": state.glob.clone(),
                "log_lr_sums": torch.stack([r[R.log_lr].sum() for r in coords]).to(dt),
                "numels": torch.tensor(sizes, dtype=dt)}

    @torch.no_grad()
    def restart(self, i, state):
        net = self.clones[i].net
        R = net.rows
        for r in state["coords"]:
            r[R.h] = net.h0.to(r.dtype)[:, None]
        state["tensor"] = net.tensor0.to(state["tensor"].dtype).expand_as(state["tensor"]).clone()
        state["glob"] = net.global0.to(state["glob"].dtype).clone()
        return state

    @torch.no_grad()
    def step(self, i, params, grads, state):
        mean_log_lr = state["log_lr_sums"].sum() / state["numels"].sum()
        stepped, new_t, new_g, sums = fused_step_(self.clones[i].net, params, grads, state["coords"], state["tensor"],
                                                  state["glob"], state["numels"], mean_log_lr, self.packed[i],
                                                  [1.0] * len(params),
                                                  max_update_ratios=[self.clones[i].max_update_ratio] * len(params))
        state["tensor"] = new_t
        state["glob"] = new_g
        state["log_lr_sums"] = torch.where(stepped, sums, state["log_lr_sums"])
        return state


def make_stepper(rule: nn.Module, P: int, fused: bool | None = None) -> _Stepper:
    """The stepper of ``P`` particles of ``rule``: fused where the ops implement the rule (``fused=None``:
    whenever the extension is loaded), else the rule's own forward."""
    can = ops.extension_available()
    if isinstance(rule, L2LRule):
        kind = _L2LStepper
    elif isinstance(rule, HierarchicalRule) and rule.net.fusable:
        kind = _HierStepper
    else:
        kind = None
    if fused and (kind is None or not can):
        why = "the extension learnedopt._C is not loaded" if not can else \
            f"the fused ops do not implement {type(rule).__name__} with this configuration"
        raise ValueError(f"ES/PES: fused=True but {why}")
    if kind is None or fused is False or not can:
        return _Stepper(rule, P)
    return kind(rule, P)


@dataclasses.dataclass
class Swarm:
    """P optimizee trajectories of one task: parameters stacked ([P, *shape] per tensor, particle i's
    tensors are views of row i), one stepper state per particle."""

    task: Task
    params: list[Tensor]
    states: list[Any]
    step: int = 0
    f0: float | None = None

    @property
    def size(self) -> int:
        return self.params[0].shape[0]

    def particle(self, i: int) -> list[Tensor]:
        return [p[i] for p in self.params]

    @classmethod
    def replicate(cls, task: Task, params: list[Tensor], state: Any, P: int, stepper: _Stepper, step: int = 0,
                  f0: float | None = None) -> "Swarm":
        """P copies of one point (``params``, a stepper state)."""
        stacked = [p.detach().unsqueeze(0).repeat(P, *([1] * p.dim())).contiguous() for p in params]
        one = stepper.convert(params, state) if not isinstance(state, _Converted) else state.value
        states = [tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, one) for _ in range(P)]
        return cls(task, stacked, states, step, f0)

    def take(self, idx: Sequence[int]) -> "Swarm":
        """The particles ``idx`` (copies)."""
        params = [p[list(idx)].contiguous() for p in self.params]
        clone = lambda s: tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, s)  # noqa: E731
        return Swarm(self.task, params, [clone(self.states[i]) for i in idx], self.step, self.f0)


class _Converted:
    """A state already in the stepper's format (for Swarm.replicate)."""

    def __init__(self, value):
        self.value = value


def _batched_loss_and_grads(task: Task, params: list[Tensor], batch: Any, vmapped: list[bool]):
    """Per-particle losses [P] and gradients ([P, *shape] per tensor) of ``task`` at stacked ``params``:
    one ``torch.func.vmap`` call where the task's loss allows it (``vmapped[0]``, switched off for good at
    the first failure), else one backward of the summed per-particle losses."""
    if vmapped[0]:
        try:
            def f(ps):
                loss = task.loss(ps, batch)
                return loss, loss.detach()

            grads, losses = torch.func.vmap(torch.func.grad(f, has_aux=True))(params)
            return losses, list(grads)
        except Exception:  # noqa: BLE001  (not vmappable: fall back to the loop, once and for all)
            vmapped[0] = False
    leaves = [p.detach().requires_grad_(True) for p in params]
    with torch.enable_grad():
        losses = torch.stack([task.loss([t[i] for t in leaves], batch) for i in range(params[0].shape[0])])
        grads = torch.autograd.grad(losses.sum(), leaves)
    return losses.detach(), list(grads)


@torch.no_grad()
def _batched_loss(task: Task, params: list[Tensor], batch: Any, vmapped: list[bool]) -> Tensor:
    if vmapped[0]:
        try:
            return torch.func.vmap(lambda ps: task.loss(ps, batch))(params)
        except Exception:  # noqa: BLE001
            vmapped[0] = False
    return torch.stack([task.loss([t[i] for t in params], batch) for i in range(params[0].shape[0])])


def run_swarm(stepper: _Stepper, swarm: Swarm, steps: int, generator: torch.Generator, objective: str = "sum",
              validation: bool = False, vmapped: list[bool] | None = None) -> tuple[Tensor, Tensor]:
    """``steps`` steps of every particle of ``swarm`` (in place), consuming ``generator`` as
    :func:`~learnedopt.meta.unroll.unroll` does (per step one training batch, the task's gradient
    transform per particle, a held-out batch with ``validation``; one batch for the end point).
    Returns the per-particle meta-objectives [P] and the per-step mean training losses [steps]."""
    task = swarm.task
    vmapped = [True] if vmapped is None else vmapped
    P = swarm.size
    values: list[Tensor] = []
    means = []
    if swarm.step == 0:  # the learned parts of the initial state (hierarchical: h0, tensor0, global0)
        swarm.states = [stepper.restart(i, s) for i, s in enumerate(swarm.states)]
    for _ in range(steps):
        losses, grads = _batched_loss_and_grads(task, swarm.params, task.sample_batch(generator), vmapped)
        if swarm.f0 is None:
            swarm.f0 = float(losses[0])
        per = [task.transform_grads([g[i] for g in grads], generator) for i in range(P)]
        values.append(_batched_loss(task, swarm.params, task.sample_batch(generator, "valid"), vmapped)
                      if validation else losses)
        means.append(losses.mean())
        for i in range(P):
            swarm.states[i] = stepper.step(i, swarm.particle(i), [g.contiguous() for g in per[i]], swarm.states[i])
    values.append(_batched_loss(task, swarm.params, task.sample_batch(generator, "valid" if validation else "train"),
                                vmapped))
    swarm.step += steps
    return _objective(objective, values, swarm.f0), torch.stack(means)


class _EvolutionStrategy(GradientEstimator):
    """What ES and PES share: antithetic pairs, σ, the stepper."""

    def __init__(self, pairs: int = 8, sigma: float = 0.01, fused: bool | None = None):
        if not (isinstance(pairs, int) and pairs >= 1):
            raise ValueError(f"{type(self).__name__}: pairs must be an integer >= 1, got {pairs!r}")
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"{type(self).__name__}: sigma must be a finite number > 0, got {sigma!r}")
        self.pairs, self.sigma, self.fused = pairs, float(sigma), fused
        self._stepper: tuple[Any, _Stepper] | None = None
        self.vmapped = [True]

    def stepper(self, rule: nn.Module, P: int) -> _Stepper:
        key = (id(rule), P)
        if self._stepper is None or self._stepper[0] != key:
            self._stepper = (key, make_stepper(rule, P, self.fused))
        return self._stepper[1]

    def noise(self, rule: nn.Module, generator: torch.Generator) -> Tensor:
        """ε [N, D] ~ N(0, σ²I), drawn from ``generator``."""
        phi = flat_params(rule)
        return torch.randn(self.pairs, phi.numel(), generator=generator, dtype=phi.dtype) * self.sigma

    def _write_grad(self, rule: nn.Module, xi: Tensor, per: Tensor) -> Tensor:
        """ĝ = 1/(2Nσ²) Σ_i ξ_i (L^{i+} − L^{i−}) into the rule's ``.grad``; returns ĝ."""
        N = self.pairs
        diff = (per[:N] - per[N:2 * N]).to(xi.dtype)
        g = (xi * diff[:, None]).sum(0) / (2 * N * self.sigma ** 2)
        off = 0
        for p in rule.parameters():
            p.grad = g[off:off + p.numel()].view_as(p).to(p.dtype).clone()
            off += p.numel()
        return g

    @staticmethod
    def _check(objective: str, steps: int) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"estimate: objective must be one of {OBJECTIVES}, got {objective!r}")
        if steps < 1:
            raise ValueError(f"estimate: steps must be >= 1, got {steps}")


class ES(_EvolutionStrategy):
    """Antithetic ES with ``pairs`` pairs of perturbations N(0, σ²I) (see the module docstring). Over
    several truncations it is truncated ES: each truncation starts from the unperturbed trajectory
    (run alongside the particles, as one more particle, unless ``last``)."""

    name = "es"

    def start(self, rule, task, generator):
        carry = start(rule, task, generator)
        stepper = self.stepper(rule, 2 * self.pairs + 1)
        return Swarm.replicate(task, carry.params, carry.state, 1, stepper, carry.step, carry.f0)

    def estimate(self, rule, traj: Swarm, steps, generator, objective="sum", validation=False, last=False):
        self._check(objective, steps)
        N = self.pairs
        eps = self.noise(rule, generator)
        phi = flat_params(rule)
        P = 2 * N + (0 if last else 1)
        weights = torch.cat([phi + eps, phi - eps] + ([phi[None]] if not last else []))
        stepper = self.stepper(rule, 2 * N + 1)
        stepper.load(weights)
        mean = traj
        swarm = Swarm.replicate(mean.task, mean.particle(0), _Converted(mean.states[0]), P, stepper, mean.step, mean.f0)
        per, losses = run_swarm(stepper, swarm, steps, generator, objective, validation, self.vmapped)
        self._write_grad(rule, eps, per)
        nxt = swarm.take([2 * N]) if not last else swarm.take([0])
        anti = per[:2 * N]
        return Estimate(float(anti.mean()), nxt, [float(v) for v in losses], per)


@dataclasses.dataclass
class PESState:
    """A PES trajectory: its 2N particles (pair i: particles i and N + i) and the accumulated
    perturbations ξ [N, D]."""

    swarm: Swarm
    xi: Tensor

    @property
    def step(self) -> int:
        return self.swarm.step


class PES(_EvolutionStrategy):
    """Persistent ES with ``pairs`` antithetic pairs (see the module docstring)."""

    name = "pes"

    def start(self, rule, task, generator):
        carry = start(rule, task, generator)
        stepper = self.stepper(rule, 2 * self.pairs)
        swarm = Swarm.replicate(task, carry.params, carry.state, 2 * self.pairs, stepper, carry.step, carry.f0)
        return PESState(swarm, torch.zeros(self.pairs, flat_params(rule).numel()))

    def estimate(self, rule, traj: PESState, steps, generator, objective="sum", validation=False, last=False):
        self._check(objective, steps)
        eps = self.noise(rule, generator)
        phi = flat_params(rule)
        xi = traj.xi + eps
        stepper = self.stepper(rule, 2 * self.pairs)
        stepper.load(torch.cat([phi + eps, phi - eps]))
        per, losses = run_swarm(stepper, traj.swarm, steps, generator, objective, validation, self.vmapped)
        self._write_grad(rule, xi, per)
        return Estimate(float(per.mean()), PESState(traj.swarm, xi), [float(v) for v in losses], per)


ESTIMATORS = {"bptt": TruncatedBPTT, "es": ES, "pes": PES}


def make_estimator(kind: str, **kwargs) -> GradientEstimator:
    """An estimator by name (``"bptt"``, ``"es"``, ``"pes"``) with its keyword arguments."""
    if kind not in ESTIMATORS:
        raise ValueError(f"make_estimator: unknown estimator {kind!r}; known: {sorted(ESTIMATORS)}")
    return ESTIMATORS[kind](**kwargs)
