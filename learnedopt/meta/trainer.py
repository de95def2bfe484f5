"""The outer loop of meta-training: :class:`MetaConfig` (everything a run depends on, a JSON file)
and :class:`MetaTrainer`: a meta-optimizer (any ``torch.optim`` class; Adam by default),
meta-gradient clipping, non-finite meta-gradients skipped and counted, periodic evaluation with the
best weights kept (early stopping as in the paper), atomic checkpoints and exact resume, a JSONL log,
a progress bar and a PNG of the curves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._progress import progress
from ..rules import make_rule, save_rule
from ..tasks import TaskFamily, make_family
from .checkpoints import init_weights, load_checkpoint, previous_path, save_checkpoint
from .distributed import average_meta_grads, barrier, broadcast_lengths, rank_and_world
from .logs import plot_log
from .objectives import LOG_EPS, OBJECTIVES
from .estimators import ESTIMATORS, GradientEstimator, TruncatedBPTT, make_estimator
from .unroll import run_rule

__all__ = ["MetaConfig", "MetaTrainer", "RESUME_FREE"]


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
    # the meta-gradient estimator (learnedopt.meta.estimators): "bptt" (truncated back-propagation through
    # each unroll), "es" (antithetic evolution strategies; truncated ES when a trajectory has several
    # unrolls) or "pes" (persistent ES); es_pairs antithetic pairs of perturbations N(0, es_sigma² I) of
    # the rule's weights per meta-step
    estimator: str = "bptt"
    es_pairs: int = 8
    es_sigma: float = 0.01
    num_steps: int = 100  # optimizee steps per trajectory ("epoch" of the paper)
    unroll: int = 20  # steps per truncated unroll
    # "fixed": num_steps // unroll unrolls of `unroll` steps; "heavy_tailed" (Wichrowska et al.): per
    # trajectory 1 + round(Exp(num_unrolls_scale)) unrolls of unroll_min + round(Exp(unroll_scale)) steps
    unroll_schedule: str = "fixed"
    num_unrolls_scale: float = 40.0
    unroll_scale: float = 200.0
    unroll_min: int = 50
    max_trajectory_steps: int | None = None  # caps a heavy-tailed trajectory's length
    epochs: int = 100  # meta-batches of trajectories (one trajectory each, unless `trajectories` says more)
    # trajectories per process run side by side; every meta-step takes the mean of their meta-gradients
    # (and, under torchrun, of all ranks': N ranks = one process with N times the trajectories)
    trajectories: int = 1
    meta_optimizer: str = "Adam"
    meta_lr: float = 1e-3
    meta_optimizer_kwargs: dict = dataclasses.field(default_factory=dict)
    # "constant": meta_lr at every meta-step; "inv_sqrt": meta_lr / √k at the k-th meta-step (k = 1, 2, …:
    # Wang et al.'s μ_k, under which meta-gradient descent on the log objective provably converges)
    meta_lr_schedule: str = "constant"
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
    log_every: int = 1  # epochs between updates of the progress bar's text (it is shown on a terminal only)
    threads: int | None = None

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"MetaConfig: estimator must be one of {sorted(ESTIMATORS)}, got {self.estimator!r}")
        if self.estimator != "bptt":
            if self.second_derivatives:
                raise ValueError(f"MetaConfig: second_derivatives applies to estimator 'bptt' only, got estimator "
                                 f"{self.estimator!r}")
            if not (isinstance(self.es_pairs, int) and self.es_pairs >= 1):
                raise ValueError(f"MetaConfig: es_pairs must be an integer >= 1, got {self.es_pairs!r}")
            if not (isinstance(self.es_sigma, (int, float)) and math.isfinite(self.es_sigma) and self.es_sigma > 0):
                raise ValueError(f"MetaConfig: es_sigma must be a finite number > 0, got {self.es_sigma!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"MetaConfig: objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.meta_lr_schedule not in ("constant", "inv_sqrt"):
            raise ValueError(f"MetaConfig: meta_lr_schedule must be 'constant' or 'inv_sqrt', got {self.meta_lr_schedule!r}")
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
        if not (isinstance(self.trajectories, int) and self.trajectories >= 1):
            raise ValueError(f"MetaConfig: trajectories must be an integer >= 1, got {self.trajectories!r}")
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


# Config keys that do not change the training trajectory: a run may be resumed with other values
# (e.g. more epochs).
RESUME_FREE = ("epochs", "log_every", "threads", "checkpoint_every")
# Keys added after checkpoints were written without them: left out of a checkpoint's config record
# while at these defaults, so that those checkpoints still resume.
_ADDED_KEYS = {"estimator": "bptt", "es_pairs": 8, "es_sigma": 0.01, "meta_lr_schedule": "constant",
               "trajectories": 1}


class MetaTrainer:
    """Meta-trains an update rule on a task family (see the module docstring).

    Files in ``out_dir``: ``config.json``; ``log.jsonl`` (one JSON object per epoch, plus evaluation
    records); ``checkpoint.pt`` (written atomically every ``checkpoint_every`` epochs and at the end:
    rule, meta-optimizer, random generator, counters — ``resume=True`` continues from it and gives
    bitwise the same run as one never stopped, on CPU; ``epochs`` may be raised to train longer);
    ``checkpoint.prev.pt`` (the checkpoint before it: a truncated or corrupted ``checkpoint.pt``
    makes ``resume=True`` raise :class:`~learnedopt.meta.checkpoints.CheckpointError`, which says
    whether the previous one is intact and how to resume from it; nothing falls back on its own);
    ``best.pt`` (the rule with the lowest
    evaluation loss, :func:`save_rule` format); ``final.pt``; ``curves.png``.

    After each meta-step the trainer calls the rule's ``project_()`` if it has one (e.g. a step size
    kept >= 0: :class:`~learnedopt.rules.sgd.LearnedSGD`), and each epoch's record includes the rule's
    ``log_values()`` if it has them (e.g. the step size).
    """

    def __init__(self, config: MetaConfig, out_dir: str | os.PathLike, rule: nn.Module | None = None,
                 family: TaskFamily | None = None, resume: bool = False):
        self.config = config
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)  # the rule's initial weights
        self.rule = rule if rule is not None else make_rule(config.rule, **config.rule_kwargs)
        if config.init_from:
            self.rule.load_state_dict(init_weights(config.init_from))
        self.family = family if family is not None else make_family(config.task, **config.task_kwargs)
        opt_cls = getattr(torch.optim, config.meta_optimizer)
        self.meta_opt = opt_cls(self.rule.parameters(), lr=config.meta_lr, **config.meta_optimizer_kwargs)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.epoch = 0
        self.skipped = 0
        self.meta_steps = 0
        self.best: float | None = None
        self.log_path = self.out / "log.jsonl"
        self.ckpt_path = self.out / "checkpoint.pt"
        self.rank, self.world = rank_and_world()
        if self.rank == 0:
            for stale in self.out.glob("checkpoint*.tmp*"):  # left by a run killed during a write
                stale.unlink(missing_ok=True)
        if resume and (self.ckpt_path.is_file() or previous_path(self.ckpt_path).is_file()):
            self._load_checkpoint()  # a damaged or missing checkpoint.pt raises CheckpointError
        elif self.rank == 0:  # a fresh run: nothing of an earlier run in out_dir may pass for this one's
            for name in ("log.jsonl", "checkpoint.pt", "checkpoint.prev.pt", "best.pt", "final.pt", "curves.png"):
                (self.out / name).unlink(missing_ok=True)
            with open(self.out / "config.json", "w") as f:
                json.dump(config.to_dict(), f, indent=2)

    # -- checkpoints -------------------------------------------------------------------------
    def _trajectory_config(self) -> str:
        """The config keys a resumed run must share with the checkpoint (all but RESUME_FREE)."""
        d = {k: v for k, v in self.config.to_dict().items()
             if k not in RESUME_FREE and not (k in _ADDED_KEYS and v == _ADDED_KEYS[k])}
        return json.dumps(d, sort_keys=True)

    def _checkpoint(self) -> None:
        lines = sum(1 for _ in open(self.log_path)) if self.log_path.exists() else 0
        save_checkpoint({
            "epoch": self.epoch,
            "skipped": self.skipped,
            "meta_steps": self.meta_steps,
            "best": self.best,
            "rule": self.rule.state_dict(),
            "meta_opt": self.meta_opt.state_dict(),
            "generator": self.generator.get_state(),
            "log_lines": lines,
            "config": self._trajectory_config(),
            "world": self.world,
        }, self.ckpt_path)

    def _load_checkpoint(self) -> None:
        ck = load_checkpoint(self.ckpt_path)
        if ck["config"] != self._trajectory_config():
            raise ValueError(f"MetaTrainer: {self.ckpt_path} was written with another config; resume with the "
                             f"same config (only {', '.join(RESUME_FREE)} may change) or start a new out_dir")
        if ck.get("world", 1) != self.world:
            raise ValueError(f"MetaTrainer: {self.ckpt_path} was written by {ck.get('world', 1)} processes, this run "
                             f"has {self.world}; resume with as many (each runs its own trajectories)")
        self.epoch, self.skipped, self.best = ck["epoch"], ck["skipped"], ck["best"]
        self.meta_steps = ck.get("meta_steps", 0)  # absent before meta_lr_schedule existed (constant only)
        self.rule.load_state_dict(ck["rule"])
        self.meta_opt.load_state_dict(ck["meta_opt"])
        self.generator.set_state(ck["generator"])
        if self.rank == 0 and self.log_path.exists():  # drop records written after the checkpoint
            with open(self.log_path) as f:
                kept = f.readlines()[: ck["log_lines"]]
            with open(self.log_path, "w") as f:
                f.writelines(kept)

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- one trajectory ------------------------------------------------------------------------
    @property
    def estimator(self) -> GradientEstimator:
        """The meta-gradient estimator of the config (made at first use)."""
        est = self.__dict__.get("_estimator")
        if est is None:
            est = self._estimator = self.make_estimator(self.config)
        return est

    @staticmethod
    def make_estimator(config: MetaConfig) -> GradientEstimator:
        """The meta-gradient estimator of ``config`` (:mod:`learnedopt.meta.estimators`)."""
        if config.estimator == "bptt":
            return TruncatedBPTT(config.second_derivatives)
        return make_estimator(config.estimator, pairs=config.es_pairs, sigma=config.es_sigma)

    def _generator_of(self, k: int) -> torch.Generator:
        """The random stream of trajectory k of the current meta-batch (k = rank * trajectories + b):
        the trainer's generator for k = 0 (a one-trajectory run draws everything from it, as always),
        a generator seeded from (seed, epoch, k) for the others."""
        if k == 0:
            return self.generator
        return torch.Generator().manual_seed(hash((self.config.seed, self.epoch, k)) & (2**63 - 1))

    def train_epoch(self) -> dict[str, Any]:
        """One meta-batch: ``trajectories`` trajectories on this process (of all ranks' under
        torchrun), unrolled side by side; each meta-step averages their meta-gradients."""
        cfg = self.config
        rank, world = rank_and_world()
        B = cfg.trajectories
        gens = [self._generator_of(rank * B + b) for b in range(B)]
        tasks, trajs = [], []
        for g in gens:
            tasks.append(self.family.sample(g))
            trajs.append(self.estimator.start(self.rule, tasks[-1], g))
        task = tasks[0]
        if cfg.unroll_schedule == "fixed":
            lengths = self.schedule()
        else:  # drawn from trajectory 0's generator, on rank 0
            lengths = broadcast_lengths(self.schedule() if rank == 0 else [])
        params = list(self.rule.parameters())
        meta_losses, skipped, norms = [], 0, []
        for k, length in enumerate(lengths):
            self.meta_opt.zero_grad(set_to_none=True)
            ok, loss_sum = True, 0.0
            total: list | None = None  # B > 1: the sum of the trajectories' meta-gradients
            for b in range(B):
                est = self.estimator.estimate(self.rule, trajs[b], length, gens[b], cfg.objective, cfg.validation,
                                              last=k == len(lengths) - 1)
                trajs[b] = est.traj
                if b == 0:
                    losses = est.losses
                if not math.isfinite(est.meta_loss):
                    ok = False
                    break
                loss_sum += est.meta_loss
                if B > 1:  # an estimator writes .grad (ES/PES assign it): sum them here
                    got = [p.grad for p in params]
                    total = got if total is None else [
                        t if g is None else g if t is None else t + g for t, g in zip(total, got)]
                    for p in params:
                        p.grad = None
            if B > 1 and ok:
                for p, t in zip(params, total):
                    p.grad = t
            ok, mean_loss = average_meta_grads(params, B * world, ok, loss_sum)
            if ok:
                grads = [p.grad for p in params if p.grad is not None]
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else torch.tensor(0.0)
                ok = bool(torch.isfinite(norm))
            if not ok:  # skip the meta-step; the trajectories have diverged: stop them
                skipped += 1
                self.meta_opt.zero_grad(set_to_none=True)
                break
            if cfg.clip_grad_value is not None:
                torch.nn.utils.clip_grad_value_(self.rule.parameters(), cfg.clip_grad_value)
            if cfg.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.rule.parameters(), cfg.clip_grad_norm)
            self.meta_steps += 1
            if cfg.meta_lr_schedule == "inv_sqrt":
                for group in self.meta_opt.param_groups:
                    group["lr"] = cfg.meta_lr / math.sqrt(self.meta_steps)
            self.meta_opt.step()
            project = getattr(self.rule, "project_", None)
            if project is not None:
                project()
            meta_losses.append(mean_loss)
            norms.append(float(norm))
        self.skipped += skipped
        rec = {"epoch": self.epoch + 1, "task": getattr(task, "name", type(task).__name__),
               "steps": self.estimator.step_of(trajs[0]),
               "meta_loss": sum(meta_losses) / len(meta_losses) if meta_losses else None,
               "final_loss": losses[-1] if meta_losses else None,
               "grad_norm": max(norms) if norms else None, "skipped": skipped}
        values = getattr(self.rule, "log_values", None)
        if values is not None:
            rec.update({f"rule_{k}": v for k, v in values().items()})
        return rec

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
        """Trains until ``config.epochs``; returns the rule (with the final weights). Under torchrun every
        rank trains; rank 0 evaluates and writes the log, checkpoints, weights and plot."""
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        main = self.rank == 0
        bar = progress(total=cfg.epochs, initial=self.epoch, desc="meta-train", unit="epoch", disable=not main)
        while self.epoch < cfg.epochs:
            t0 = time.time()
            rec = self.train_epoch()
            self.epoch += 1
            rec["time"] = round(time.time() - t0, 4)
            if not main:
                continue
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
            bar.update(1)
            if self.epoch % max(1, cfg.log_every) == 0 or self.epoch == cfg.epochs:
                bar.set_postfix_str(text, refresh=False)
            if self.epoch % max(1, cfg.checkpoint_every) == 0 or self.epoch == cfg.epochs:
                self._checkpoint()
        bar.close()
        if main:
            save_rule(self.rule, self.out / "final.pt", extra={"epoch": self.epoch})
            try:
                plot_log(self.log_path, self.out / "curves.png")
            except ImportError:
                pass
        barrier()
        return self.rule
