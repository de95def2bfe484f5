"""Evaluation of learned optimizers against hand-written ones with tuned learning rates.

Every method optimizes the same trajectories: run ``i`` draws its task, θ₀ and minibatches from a
generator seeded with ``(seed, i)``, and every method consumes it in the same order (θ₀, one batch
per step, one more for the end point), so the curves differ only by the update rule.

Baselines (Andrychowicz et al. 2016: SGD, RMSprop, ADAM and NAG, each with its learning rate tuned;
other hyper-parameters at Torch7's defaults): ``sgd``; ``rmsprop`` (α = 0.99, ε = 1e-8); ``adam``
(β = (0.9, 0.999), ε = 1e-8); ``nag`` (Nesterov momentum 0.9). The learning rate of each is picked
from ``LR_GRID`` by the lowest mean final loss over ``tune_runs`` trajectories that are *not* the
evaluation trajectories (seeds ``(seed + 1, i)``).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ._progress import progress
from .meta.unroll import run_rule
from .tasks import Task, TaskFamily

__all__ = ["BASELINES", "LR_GRID", "run_optimizer", "tune_lr", "evaluate", "format_table", "plot_curves"]

BASELINES: dict[str, Callable[[list[Tensor], float], torch.optim.Optimizer]] = {
    "sgd": lambda ps, lr: torch.optim.SGD(ps, lr=lr),
    "rmsprop": lambda ps, lr: torch.optim.RMSprop(ps, lr=lr, alpha=0.99, eps=1e-8),
    "adam": lambda ps, lr: torch.optim.Adam(ps, lr=lr, betas=(0.9, 0.999), eps=1e-8),
    "nag": lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, nesterov=True),
}
LR_GRID = tuple(round(10 ** (k / 2), 6) for k in range(-9, 3))  # 3.2e-5 ... 10, half decades


def _generator(seed: int, run: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + run)


def run_optimizer(make_opt: Callable[[list[Tensor]], torch.optim.Optimizer], task: Task, steps: int,
                  generator: torch.Generator) -> tuple[list[float], list[Tensor]]:
    """Optimizes ``task`` with a ``torch.optim`` optimizer built by ``make_opt(params)``. Returns the
    losses at t = 0 … steps (the last on a fresh batch) and the final parameters; a diverged run
    continues with inf losses."""
    params = [p.requires_grad_(True) for p in task.init_params(generator)]
    opt = make_opt(params)
    losses = []
    for _ in range(steps):
        loss = task.loss(params, task.sample_batch(generator))
        losses.append(float(loss.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for p, g in zip(params, task.transform_grads([p.grad for p in params], generator)):
                p.grad = g
        opt.step()
    with torch.no_grad():
        losses.append(float(task.loss(params, task.sample_batch(generator))))
    return [x if math.isfinite(x) else math.inf for x in losses], [p.detach() for p in params]


def _runs(method: Callable[[Task, torch.Generator], tuple[list[float], list[Tensor]]], family: TaskFamily,
          steps: int, seed: int, runs: int, heldout: bool = False, bar=None) -> tuple[list[list[float]], list[dict[str, float]]]:
    """The loss curves of ``runs`` trajectories and, with ``heldout``, the held-out metrics of each
    run's final parameters (:meth:`Task.heldout_metrics`; computed after the run, so they consume no
    random numbers and change no trajectory)."""
    curves, metrics = [], []
    for i in range(runs):
        g = _generator(seed, i)
        task = family.sample(g)
        curve, params = method(task, g)
        curves.append(curve)
        metrics.append(task.heldout_metrics(params) if heldout else {})
        if bar is not None:
            bar.update(1)
    return curves, metrics


def _method(spec: nn.Module | Callable[[list[Tensor]], torch.optim.Optimizer], steps: int):
    if isinstance(spec, nn.Module):  # a learned update rule (learnedopt.rules interface)
        def run(task, g):
            losses, params = run_rule(spec, task, steps, g)
            return [x if math.isfinite(x) else math.inf for x in losses], params
        return run
    return lambda task, g: run_optimizer(spec, task, steps, g)


def _summarize_heldout(metrics: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """``{metric: {"mean", "std", "median", "values"}}`` over runs (``{}`` if the task has none)."""
    if not metrics or not metrics[0]:
        return {}
    out = {}
    for key in metrics[0]:
        v = torch.tensor([m[key] for m in metrics], dtype=torch.float64)
        out[key] = {"mean": float(v.mean()), "std": float(v.std()) if len(v) > 1 else 0.0,
                    "median": float(v.median()), "values": v.tolist()}
    return out


def tune_lr(name: str, family: TaskFamily, steps: int, seed: int = 0, runs: int = 3,
            grid: Sequence[float] = LR_GRID, bar=None) -> tuple[float, dict[float, float]]:
    """The learning rate of baseline ``name`` with the lowest mean final loss over ``runs`` tuning
    trajectories (seeds ``(seed + 1, i)``). Returns ``(best_lr, {lr: mean final loss})``."""
    scores = {}
    for lr in grid:
        if bar is not None:
            bar.set_postfix_str(f"tuning {name} lr {lr:g}", refresh=False)
        curves, _ = _runs(_method(lambda ps, lr=lr: BASELINES[name](ps, lr), steps), family, steps, seed + 1, runs,
                          bar=bar)
        finals = [c[-1] for c in curves]
        scores[lr] = sum(finals) / len(finals)
    best = min(scores, key=lambda lr: (scores[lr], lr))
    if best in (min(grid), max(grid)):
        warnings.warn(f"learnedopt.evaluate: the tuned learning rate of {name} ({best}) is at the edge of the grid "
                      f"({min(grid)} .. {max(grid)})", stacklevel=2)
    return best, scores


def evaluate(learned: dict[str, nn.Module | Callable], family: TaskFamily, steps: int = 100, runs: int = 10,
             seed: int = 0, baselines: Sequence[str] = ("sgd", "rmsprop", "adam", "nag"), tune_runs: int = 3,
             grid: Sequence[float] = LR_GRID, lrs: dict[str, float] | None = None) -> dict[str, Any]:
    """Learned optimizers (update rules, or ``make_opt(params)`` callables) and tuned baselines on the
    same ``runs`` trajectories of ``steps`` steps. ``lrs`` fixes baseline learning rates instead of
    tuning them. Returns ``{"steps", "runs", "methods": {name: {"lr", "curve" (mean loss per step),
    "final_mean", "final_std", "finals", "heldout"}}}``; ``"heldout"`` is ``{metric: {"mean", "std",
    "median", "values"}}`` of the final parameters on the task's held-out data
    (:meth:`Task.heldout_metrics`, e.g. ``"loss"`` and ``"accuracy"``), ``{}`` for tasks without.
    A progress bar (trajectories) is shown when stderr is a terminal."""
    for name in baselines:
        if name not in BASELINES:
            raise ValueError(f"evaluate: unknown baseline {name!r}; known: {sorted(BASELINES)}")
    tuned = [b for b in baselines if (lrs or {}).get(b) is None]
    total = (len(learned) + len(baselines)) * runs + len(tuned) * len(grid) * tune_runs
    with progress(total=total, desc="evaluate", unit="run") as bar:
        methods = _evaluate_methods(learned, family, steps, runs, seed, baselines, tune_runs, grid, lrs, bar)
    for m in methods.values():
        curves = torch.tensor(m.pop("curves"), dtype=torch.float64)
        finals = curves[:, -1]
        m["curve"] = curves.mean(0).tolist()
        m["finals"] = finals.tolist()
        m["final_mean"] = float(finals.mean())
        m["final_std"] = float(finals.std()) if len(finals) > 1 else 0.0
    return {"steps": steps, "runs": runs, "seed": seed, "methods": methods}


def _evaluate_methods(learned, family, steps, runs, seed, baselines, tune_runs, grid, lrs, bar):
    methods: dict[str, dict[str, Any]] = {}
    for name, spec in learned.items():
        bar.set_postfix_str(name, refresh=False)
        curves, metrics = _runs(_method(spec, steps), family, steps, seed, runs, heldout=True, bar=bar)
        methods[name] = {"lr": None, "curves": curves, "heldout": _summarize_heldout(metrics)}
    for name in baselines:
        lr = (lrs or {}).get(name)
        scores = None
        if lr is None:
            lr, scores = tune_lr(name, family, steps, seed, tune_runs, grid, bar=bar)
        bar.set_postfix_str(f"{name} lr {lr:g}", refresh=False)
        curves, metrics = _runs(_method(lambda ps, lr=lr, name=name: BASELINES[name](ps, lr), steps), family, steps,
                                seed, runs, heldout=True, bar=bar)
        methods[name] = {"lr": lr, "tuning": scores, "curves": curves, "heldout": _summarize_heldout(metrics)}
    return methods


def format_table(result: dict[str, Any], title: str = "") -> str:
    """A Markdown table of final losses, best first, with the held-out loss and accuracy of the final
    parameters where the task has held-out data."""
    rows = sorted(result["methods"].items(), key=lambda kv: kv[1]["final_mean"])
    keys = [k for k in ("loss", "accuracy") if all(k in m.get("heldout", {}) for _, m in rows)] if rows else []
    lines = [f"**{title}**", ""] if title else []
    head = f"| method | learning rate | final loss (mean ± std over {result['runs']} runs, step {result['steps']}) |"
    head += "".join(f" held-out {k} (mean ± std; median) |" for k in keys)
    lines += [head, "|---" * (3 + len(keys)) + "|"]
    for name, m in rows:
        lr = "learned" if m["lr"] is None else f"{m['lr']:g} (tuned)" if m.get("tuning") else f"{m['lr']:g}"
        line = f"| {name} | {lr} | {m['final_mean']:.4f} ± {m['final_std']:.4f} |"
        for k in keys:
            h = m["heldout"][k]
            line += f" {h['mean']:.4f} ± {h['std']:.4f}; {h['median']:.4f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def plot_curves(result: dict[str, Any], png: str | os.PathLike, title: str = "") -> None:
    """PNG of the mean loss per step of every method (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in sorted(result["methods"].items(), key=lambda kv: kv[1]["final_mean"]):
        label = name if m["lr"] is None else f"{name} (lr {m['lr']:g})"
        ax.plot(range(len(m["curve"])), m["curve"], label=label, lw=2.0 if m["lr"] is None else 1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (mean of {result['runs']} runs)")
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def save_result(result: dict[str, Any], path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
