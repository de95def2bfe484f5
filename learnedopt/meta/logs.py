"""A meta-training run's log (``log.jsonl``: one JSON object per epoch) and its plot."""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["read_log", "plot_log"]


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
