"""Meta-training of learned update rules: unrolled optimization with truncated BPTT.

**The update-rule interface.** Anything meta-trainable is an ``nn.Module`` (its parameters are the
meta-parameters φ) with two methods::

    init_state(params: list[Tensor]) -> state          # any pytree of tensors ((), tuples, dicts, ...)
    forward(params, grads, state) -> (new_params, new_state)

``forward`` is functional: it returns new tensors (differentiable in φ, in ``params`` and in
``state``) and never changes its inputs. The smallest rule is a learnable step size::

    class LearnedSGD(nn.Module):
        def __init__(self, lr=0.1):
            super().__init__()
            self.lr = nn.Parameter(torch.tensor(lr))
        def init_state(self, params):
            return ()
        def forward(self, params, grads, state):
            return [p - self.lr * g for p, g in zip(params, grads)], state

:class:`L2LRule` wraps the L2L network: the gradients of all tensors of the task are concatenated
so that all coordinates go through **one** fused ``coord_lstm_stack`` call (forward and backward) per
step.

**Unrolls.** :func:`unroll` runs ``T`` steps of a rule on a task from a carried point (parameters,
rule state) and returns the meta-loss; gradients of the task loss are detached (second derivatives
dropped, as in the paper) unless ``second_derivatives=True``. Between unrolls the parameters and the
rule state are carried *without* gradient (truncated BPTT). Meta-objectives (``OBJECTIVES``), over the
objective values o_0 … o_T of an unroll (o_t = f(θ_t) on the step's training batch, on a fresh batch
for o_T; with ``validation=True`` f on a held-out batch instead: train-by-validation):

* ``"sum"``: Σ_{t=0}^{T} o_t — L2L (the unroll's first point included, weights 1);
* ``"final"``: o_T;
* ``"log_ratio"``: mean_{t=1..T} log(o_t / f_0), f_0 the loss at the trajectory's start (Wichrowska);
* ``"log_final"``: log o_T (Wang et al.: its meta-gradient neither explodes nor vanishes).

:class:`MetaTrainer` runs the outer loop: a meta-optimizer (any ``torch.optim`` class; Adam by default),
meta-gradient clipping, non-finite meta-gradients skipped and counted, periodic evaluation with the
best weights kept (early stopping as in the paper), atomic checkpoints and exact resume, a JSONL log,
a progress line and a PNG of the curves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from .nets import CoordinateLSTMNet
from .tasks import Task, TaskFamily, make_family

__all__ = ["L2LRule", "LearnedSGD", "RULES", "make_rule", "OBJECTIVES", "Carry", "start", "unroll", "run_rule",
           "MetaConfig", "MetaTrainer", "save_rule", "load_rule"]

LOG_EPS = 1e-12  # floor of the losses inside the log objectives


# ----------------------------------------------------------------------------------------------
# update rules
# ----------------------------------------------------------------------------------------------
class L2LRule(nn.Module):
    """The L2L update rule θ ← θ + net(∇f) with a :class:`~learnedopt.nets.CoordinateLSTMNet`.

    All gradient coordinates of a step are concatenated and go through one fused op call.
    ``fused`` picks the fused op (default: whenever it can run) or the pure-PyTorch reference.
    The rule's state is the LSTM state ``([h per layer], [c per layer])``, float32 (float64 when the
    parameters are float64).
    """

    kind = "l2l"

    def __init__(self, net: CoordinateLSTMNet | None = None, fused: bool | None = None, **net_kwargs):
        super().__init__()
        if net is not None and net_kwargs:
            raise TypeError("L2LRule: pass either net or the CoordinateLSTMNet keyword arguments, not both")
        self.net = net if net is not None else CoordinateLSTMNet(**net_kwargs)
        self.fused = fused

    def config(self) -> dict[str, Any]:
        n = self.net
        return {"layers": list(n.layers), "preprocess": n.preprocess, "p": n.p, "output_scale": n.output_scale}

    def init_state(self, params: Sequence[Tensor]):
        n = sum(p.numel() for p in params)
        dtype = torch.float64 if params and params[0].dtype == torch.float64 else torch.float32
        device = params[0].device if params else None
        return self.net.initial_state(n, device=device, dtype=dtype)

    def forward(self, params: Sequence[Tensor], grads: Sequence[Tensor], state):
        flat = torch.cat([g.reshape(-1) for g in grads])
        update, state = self.net(flat, state, fused=self.fused)
        update = update.split([p.numel() for p in params])
        return [p + u.view_as(p).to(p.dtype) for p, u in zip(params, update)], state


class LearnedSGD(nn.Module):
    """θ ← θ − η g with one learnable step size η: the smallest update rule."""

    kind = "sgd"

    def __init__(self, lr: float = 0.1):
        super().__init__()
        self.lr = nn.Parameter(torch.tensor(float(lr)))

    def config(self) -> dict[str, Any]:
        return {"lr": float(self.lr.detach())}

    def init_state(self, params: Sequence[Tensor]):
        return ()

    def forward(self, params: Sequence[Tensor], grads: Sequence[Tensor], state):
        return [p - self.lr * g for p, g in zip(params, grads)], state


def _hierarchical_rule(**kwargs) -> nn.Module:
    from .hierarchical import HierarchicalRule

    return HierarchicalRule(**kwargs)


RULES: dict[str, Callable[..., nn.Module]] = {"l2l": L2LRule, "sgd": LearnedSGD, "hierarchical": _hierarchical_rule}


def make_rule(kind: str, **kwargs) -> nn.Module:
    if kind not in RULES:
        raise ValueError(f"make_rule: unknown rule {kind!r}; known: {sorted(RULES)}")
    return RULES[kind](**kwargs)


def save_rule(rule: nn.Module, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Writes a rule's kind, configuration and weights (loadable with ``torch.load(weights_only=True)``),
    atomically."""
    kind = getattr(rule, "kind", None)
    if kind not in RULES:
        raise ValueError(f"save_rule: rule must be one of {sorted(RULES)} (its .kind), got {kind!r}")
    blob = {"kind": kind, "config": rule.config(),
            "state_dict": {k: v.detach().cpu().clone() for k, v in rule.state_dict().items()}}
    if extra:
        blob["extra"] = extra
    _atomic_save(blob, path)


def load_rule(path: str | os.PathLike) -> nn.Module:
    """The rule written by :func:`save_rule` (no code is unpickled)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return rule_from_blob(blob)


def rule_from_blob(blob: dict[str, Any]) -> nn.Module:
    kind = blob["kind"]
    if kind not in RULES:
        raise ValueError(f"load_rule: unknown rule kind {kind!r}; known: {sorted(RULES)}")
    rule = make_rule(kind, **blob["config"])
    rule.load_state_dict(blob["state_dict"])
    return rule


def _init_weights(source: str) -> dict[str, Tensor]:
    """The state dict of a save_rule file, or of shipped weights by name (MetaConfig.init_from)."""
    from . import pretrained

    path = pretrained.path(source) if source in pretrained.WEIGHTS else Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"MetaConfig.init_from: {source!r} is neither shipped weights "
                                f"({sorted(pretrained.WEIGHTS)}) nor a file")
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _atomic_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# unrolls
# ----------------------------------------------------------------------------------------------
OBJECTIVES = ("sum", "final", "log_ratio", "log_final")


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


def _objective(kind: str, values: list[Tensor], f0: float) -> Tensor:
    if kind == "sum":
        return torch.stack(values).sum()
    if kind == "final":
        return values[-1]
    if kind == "log_ratio":
        logs = torch.log(torch.stack(values[1:]).clamp_min(LOG_EPS))
        return (logs - math.log(max(f0, LOG_EPS))).mean()
    if kind == "log_final":
        return torch.log(values[-1].clamp_min(LOG_EPS))
    raise ValueError(f"unknown meta-objective {kind!r}; known: {OBJECTIVES}")


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


# ----------------------------------------------------------------------------------------------
# the outer loop
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class MetaConfig:
    """Everything a meta-training run depends on (a JSON config file holds these keys)."""

    task: str = "quadratic"
    task_kwargs: dict = dataclasses.field(default_factory=dict)
    rule: str = "l2l"
    rule_kwargs: dict = dataclasses.field(default_factory=dict)
    # start from these weights (a file written by save_rule, or the name of shipped weights) instead
    # of a fresh initialisation; the rule's configuration must fit them
    init_from: str | None = None
    objective: str = "sum"
    validation: bool = False
    second_derivatives: bool = False
    num_steps: int = 100  # optimizee steps per trajectory ("epoch" of the paper)
    unroll: int = 20  # steps per truncated unroll
    # "fixed": num_steps // unroll unrolls of `unroll` steps; "heavy_tailed" (Wichrowska et al.): per
    # trajectory 1 + round(Exp(num_unrolls_scale)) unrolls of unroll_min + round(Exp(unroll_scale)) steps
    unroll_schedule: str = "fixed"
    num_unrolls_scale: float = 40.0
    unroll_scale: float = 200.0
    unroll_min: int = 50
    max_trajectory_steps: int | None = None  # caps a heavy-tailed trajectory's length
    epochs: int = 100  # trajectories
    meta_optimizer: str = "Adam"
    meta_lr: float = 1e-3
    meta_optimizer_kwargs: dict = dataclasses.field(default_factory=dict)
    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None  # elementwise clip of the meta-gradient (original code: 1e4)
    seed: int = 0
    eval_every: int = 0  # epochs between evaluations (0: never)
    eval_tasks: int = 10  # trajectories per evaluation (the same ones every time)
    eval_steps: int | None = None  # default num_steps
    # "final_loss": mean final loss; "log_ratio": mean of log(final loss / initial loss) (for ensembles
    # of problems whose losses differ by orders of magnitude)
    eval_metric: str = "final_loss"
    checkpoint_every: int = 10  # epochs between checkpoints
    log_every: int = 1  # epochs between progress lines when stderr is not a terminal
    threads: int | None = None

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"MetaConfig: objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.unroll_schedule not in ("fixed", "heavy_tailed"):
            raise ValueError(f"MetaConfig: unroll_schedule must be 'fixed' or 'heavy_tailed', got {self.unroll_schedule!r}")
        if self.unroll_schedule == "heavy_tailed" and not (self.num_unrolls_scale >= 0 and self.unroll_scale >= 0
                                                            and self.unroll_min >= 1):
            raise ValueError("MetaConfig: heavy_tailed needs num_unrolls_scale >= 0, unroll_scale >= 0 and unroll_min >= 1, "
                             f"got {self.num_unrolls_scale}, {self.unroll_scale}, {self.unroll_min}")
        if self.max_trajectory_steps is not None and self.max_trajectory_steps < 1:
            raise ValueError(f"MetaConfig: max_trajectory_steps must be >= 1 or null, got {self.max_trajectory_steps}")
        if self.clip_grad_value is not None and not self.clip_grad_value > 0:
            raise ValueError(f"MetaConfig: clip_grad_value must be > 0 or null, got {self.clip_grad_value}")
        if self.unroll < 1 or self.num_steps < 1 or self.num_steps % self.unroll:
            raise ValueError(f"MetaConfig: num_steps ({self.num_steps}) must be a positive multiple of unroll ({self.unroll})")
        if self.epochs < 0:
            raise ValueError(f"MetaConfig: epochs must be >= 0, got {self.epochs}")
        if not hasattr(torch.optim, self.meta_optimizer):
            raise ValueError(f"MetaConfig: meta_optimizer must name a torch.optim class, got {self.meta_optimizer!r}")
        if self.eval_every < 0 or (self.eval_every and self.eval_tasks < 1):
            raise ValueError(f"MetaConfig: eval_every must be >= 0 and eval_tasks >= 1 when evaluating, got "
                             f"{self.eval_every} and {self.eval_tasks}")
        if self.eval_metric not in ("final_loss", "log_ratio"):
            raise ValueError(f"MetaConfig: eval_metric must be 'final_loss' or 'log_ratio', got {self.eval_metric!r}")
        if self.checkpoint_every < 1:
            raise ValueError(f"MetaConfig: checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"MetaConfig: clip_grad_norm must be > 0 or null, got {self.clip_grad_norm}")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "MetaConfig":
        with open(path) as f:
            raw = json.load(f)
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"MetaConfig: unknown keys {unknown} in {path}")
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Progress:
    """A one-line progress bar on a terminal; a plain line every ``every`` epochs otherwise."""

    def __init__(self, total: int, every: int, stream=None):
        self.total, self.every = total, max(1, every)
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.time()

    def update(self, epoch: int, text: str) -> None:
        done = epoch / max(1, self.total)
        rate = (time.time() - self.t0) / max(1, epoch)
        line = f"epoch {epoch}/{self.total} {text} ({rate:.2f} s/epoch)"
        if self.tty:
            bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
            self.stream.write(f"\r[{bar}] {line}\033[K")
            if epoch >= self.total:
                self.stream.write("\n")
        elif epoch % self.every == 0 or epoch >= self.total:
            self.stream.write(line + "\n")
        self.stream.flush()


# Config keys that do not change the training trajectory: a run may be resumed with other values
# (e.g. more epochs).
RESUME_FREE = ("epochs", "log_every", "threads", "checkpoint_every")


class MetaTrainer:
    """Meta-trains an update rule on a task family (see the module docstring).

    Files in ``out_dir``: ``config.json``; ``log.jsonl`` (one JSON object per epoch, plus evaluation
    records); ``checkpoint.pt`` (written atomically every ``checkpoint_every`` epochs and at the end:
    rule, meta-optimizer, random generator, counters — ``resume=True`` continues from it and gives
    bitwise the same run as one never stopped, on CPU; ``epochs`` may be raised to train longer); ``best.pt`` (the rule with the lowest
    evaluation loss, :func:`save_rule` format); ``final.pt``; ``curves.png``.
    """

    def __init__(self, config: MetaConfig, out_dir: str | os.PathLike, rule: nn.Module | None = None,
                 family: TaskFamily | None = None, resume: bool = False):
        self.config = config
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)  # the rule's initial weights
        self.rule = rule if rule is not None else make_rule(config.rule, **config.rule_kwargs)
        if config.init_from:
            self.rule.load_state_dict(_init_weights(config.init_from))
        self.family = family if family is not None else make_family(config.task, **config.task_kwargs)
        opt_cls = getattr(torch.optim, config.meta_optimizer)
        self.meta_opt = opt_cls(self.rule.parameters(), lr=config.meta_lr, **config.meta_optimizer_kwargs)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.epoch = 0
        self.skipped = 0
        self.best: float | None = None
        self.log_path = self.out / "log.jsonl"
        self.ckpt_path = self.out / "checkpoint.pt"
        if resume and self.ckpt_path.is_file():
            self._load_checkpoint()
        else:  # a fresh run: nothing of an earlier run in out_dir may pass for this one's
            for name in ("log.jsonl", "checkpoint.pt", "best.pt", "final.pt", "curves.png"):
                (self.out / name).unlink(missing_ok=True)
            with open(self.out / "config.json", "w") as f:
                json.dump(config.to_dict(), f, indent=2)

    # -- checkpoints -------------------------------------------------------------------------
    def _trajectory_config(self) -> str:
        """The config keys a resumed run must share with the checkpoint (all but RESUME_FREE)."""
        d = {k: v for k, v in self.config.to_dict().items() if k not in RESUME_FREE}
        return json.dumps(d, sort_keys=True)

    def _checkpoint(self) -> None:
        lines = sum(1 for _ in open(self.log_path)) if self.log_path.exists() else 0
        _atomic_save({
            "epoch": self.epoch,
            "skipped": self.skipped,
            "best": self.best,
            "rule": self.rule.state_dict(),
            "meta_opt": self.meta_opt.state_dict(),
            "generator": self.generator.get_state(),
            "log_lines": lines,
            "config": self._trajectory_config(),
        }, self.ckpt_path)

    def _load_checkpoint(self) -> None:
        ck = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        if ck["config"] != self._trajectory_config():
            raise ValueError(f"MetaTrainer: {self.ckpt_path} was written with another config; resume with the "
                             f"same config (only {', '.join(RESUME_FREE)} may change) or start a new out_dir")
        self.epoch, self.skipped, self.best = ck["epoch"], ck["skipped"], ck["best"]
        self.rule.load_state_dict(ck["rule"])
        self.meta_opt.load_state_dict(ck["meta_opt"])
        self.generator.set_state(ck["generator"])
        if self.log_path.exists():  # drop records written after the checkpoint
            with open(self.log_path) as f:
                kept = f.readlines()[: ck["log_lines"]]
            with open(self.log_path, "w") as f:
                f.writelines(kept)

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- one trajectory ------------------------------------------------------------------------
    def train_epoch(self) -> dict[str, Any]:
        cfg = self.config
        task = self.family.sample(self.generator)
        carry = start(self.rule, task, self.generator)
        meta_losses, skipped, norms = [], 0, []
        for length in self.schedule():
            self.meta_opt.zero_grad(set_to_none=True)
            meta_loss, carry, losses = unroll(self.rule, carry, length, self.generator, cfg.objective,
                                              cfg.validation, cfg.second_derivatives)
            ok = bool(torch.isfinite(meta_loss))
            if ok:
                meta_loss.backward()
                grads = [p.grad for p in self.rule.parameters() if p.grad is not None]
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else torch.tensor(0.0)
                ok = bool(torch.isfinite(norm))
            if not ok:  # skip the meta-step; the trajectory has diverged: stop it
                skipped += 1
                self.meta_opt.zero_grad(set_to_none=True)
                break
            if cfg.clip_grad_value is not None:
                torch.nn.utils.clip_grad_value_(self.rule.parameters(), cfg.clip_grad_value)
            if cfg.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.rule.parameters(), cfg.clip_grad_norm)
            self.meta_opt.step()
            meta_losses.append(float(meta_loss.detach()))
            norms.append(float(norm))
        self.skipped += skipped
        return {"epoch": self.epoch + 1, "task": getattr(task, "name", type(task).__name__), "steps": carry.step,
                "meta_loss": sum(meta_losses) / len(meta_losses) if meta_losses else None,
                "final_loss": losses[-1] if meta_losses else None,
                "grad_norm": max(norms) if norms else None, "skipped": skipped}

    def schedule(self) -> list[int]:
        """The unroll lengths of the next trajectory (drawn with the trainer's generator when heavy-tailed)."""
        cfg = self.config
        if cfg.unroll_schedule == "fixed":
            return [cfg.unroll] * (cfg.num_steps // cfg.unroll)
        g = self.generator
        exp = lambda scale: round(float(torch.empty(1).exponential_(1.0, generator=g)) * scale)  # noqa: E731
        n = 1 + exp(cfg.num_unrolls_scale)
        lengths = [cfg.unroll_min + exp(cfg.unroll_scale) for _ in range(n)]
        if cfg.max_trajectory_steps is not None:
            out, total = [], 0
            for length in lengths:
                if total >= cfg.max_trajectory_steps:
                    break
                out.append(min(length, cfg.max_trajectory_steps - total))
                total += out[-1]
            lengths = out
        return lengths

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean final loss (or, with ``eval_metric="log_ratio"``, mean log(final / initial loss)) of the
        rule over ``eval_tasks`` fixed trajectories (the same ones every time); NaN if any diverged."""
        cfg = self.config
        g = torch.Generator().manual_seed(cfg.seed + 1_000_003)
        finals = []
        for _ in range(cfg.eval_tasks):
            task = self.family.sample(g)
            losses, _ = run_rule(self.rule, task, cfg.eval_steps or cfg.num_steps, g)
            if cfg.eval_metric == "log_ratio":
                finals.append(math.log(max(losses[-1], LOG_EPS) / max(losses[0], LOG_EPS))
                              if math.isfinite(losses[-1]) else math.nan)
            else:
                finals.append(losses[-1])
        return sum(finals) / len(finals)

    def run(self) -> nn.Module:
        """Trains until ``config.epochs``; returns the rule (with the final weights)."""
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        progress = _Progress(cfg.epochs, cfg.log_every)
        while self.epoch < cfg.epochs:
            t0 = time.time()
            rec = self.train_epoch()
            self.epoch += 1
            rec["time"] = round(time.time() - t0, 4)
            text = f"meta-loss {rec['meta_loss']:.4g}" if rec["meta_loss"] is not None else "meta-loss non-finite"
            if cfg.eval_every and self.epoch % cfg.eval_every == 0:
                ev = self.evaluate()
                key = "eval_final_loss" if cfg.eval_metric == "final_loss" else "eval_log_ratio"
                rec[key] = ev
                if math.isfinite(ev) and (self.best is None or ev < self.best):
                    self.best = ev
                    save_rule(self.rule, self.out / "best.pt", extra={"epoch": self.epoch, key: ev})
                text += f" eval {ev:.4g} (best {self.best:.4g})"
            if self.skipped:
                text += f" skipped {self.skipped}"
            self._log(rec)
            progress.update(self.epoch, text)
            if self.epoch % max(1, cfg.checkpoint_every) == 0 or self.epoch == cfg.epochs:
                self._checkpoint()
        save_rule(self.rule, self.out / "final.pt", extra={"epoch": self.epoch})
        try:
            plot_log(self.log_path, self.out / "curves.png")
        except ImportError:
            pass
        return self.rule


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_log(log_path: str | os.PathLike, png: str | os.PathLike) -> None:
    """PNG of a run's meta-loss per epoch and its evaluation losses (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_log(log_path)
    ep = [r["epoch"] for r in recs if r.get("meta_loss") is not None]
    ml = [r["meta_loss"] for r in recs if r.get("meta_loss") is not None]
    key = "eval_log_ratio" if any("eval_log_ratio" in r for r in recs) else "eval_final_loss"
    ev = [(r["epoch"], r[key]) for r in recs if key in r]
    fig, axes = plt.subplots(1, 2 if ev else 1, figsize=(10 if ev else 5, 3.5), squeeze=False)
    ax = axes[0][0]
    ax.plot(ep, ml, lw=0.8, alpha=0.5 if len(ml) > 100 else 1.0)
    if len(ml) > 100:  # trajectories differ (task families, lengths): a running mean shows the trend
        w = max(10, len(ml) // 30)
        run = [sum(ml[max(0, i - w + 1): i + 1]) / len(ml[max(0, i - w + 1): i + 1]) for i in range(len(ml))]
        ax.plot(ep, run, lw=1.5, color="k", label=f"running mean ({w})")
        ax.legend()
    ax.set_xlabel("epoch")
    ax.set_ylabel("meta-loss (per unroll)")
    if ml and min(ml) > 0:
        ax.set_yscale("log")
    if ev:
        ax = axes[0][1]
        ax.plot([e for e, _ in ev], [v for _, v in ev], marker=".")
        ax.set_xlabel("epoch")
        ax.set_ylabel("evaluation: " + ("mean log(final / initial loss)" if key == "eval_log_ratio" else "final loss"))
        if key == "eval_final_loss":
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
