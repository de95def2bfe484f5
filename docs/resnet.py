"""The card's use case: torchvision ResNets trained by the shipped hierarchical optimizer at its defaults
(``HierarchicalOptimizer(model.parameters())``) against ``torch.optim.Adam`` at its default lr, on real
digits (learnedopt.tasks.torchvision_models: the MNIST digits upscaled to 32×32, batch 32). Writes
docs/eval/resnet/results.json (one record per run, kept across invocations: a run already there is not
redone) and docs/figures/resnet-*.png; docs/resnet.md reads them.

    python docs/resnet.py                 # every run of RUNS (about an hour on 2 CPU cores)
    python docs/resnet.py --only r18-1000  # one group

The pass rule, fixed before any of these runs was made (issue 18): at the defaults, on every model,
(1) no minibatch loss above the first minibatch's loss and no non-finite loss; (2) at least as fast
as Adam at its default lr: the mean minibatch loss over the run and the mean over its last 10 % both
at most Adam's; (3) started anywhere in lr 1e-6 … 1e-2, no minibatch loss above the first one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from learnedopt import HierarchicalOptimizer  # noqa: E402
from learnedopt.tasks import torchvision_models as tvm  # noqa: E402

OUT = ROOT / "eval" / "resnet" / "results.json"

# (group, model, steps, method, lr) — method: "adam" (torch.optim.Adam), "hier" (HierarchicalOptimizer at
# its defaults, but lr), "hier-0.01" (the same with the update-ratio safeguard max_update_ratio=0.01)
RUNS = [
    ("r18-1000", "resnet18", 1000, "adam", None),
    ("r18-1000", "resnet18", 1000, "hier-0.01", None),
    ("r18-early", "resnet18", 200, "hier-0.01", 1e-6),
    ("r18-early", "resnet18", 200, "hier-0.01", 1e-2),
    ("r50-100", "resnet50", 100, "adam", None),
    ("r50-100", "resnet50", 100, "hier-0.01", None),
    ("r50-100", "resnet50", 100, "hier", None),
    ("r18-1000", "resnet18", 1000, "hier", None),
]
NAMES = {"adam": "Adam", "hier": "hierarchical (defaults)", "hier-0.01": "hierarchical, max_update_ratio 0.01"}


def make_opt(method: str, lr):
    kw = {} if lr is None else {"lr": lr}
    if method == "adam":
        return lambda ps: torch.optim.Adam(ps, **kw)
    if method == "hier":
        return lambda ps: HierarchicalOptimizer(ps, **kw)
    if method == "hier-0.01":
        return lambda ps: HierarchicalOptimizer(ps, max_update_ratio=0.01, **kw)
    raise ValueError(method)


def key(group, model, steps, method, lr, seed):
    return f"{group}/{model}/{steps}/{method}/{'default' if lr is None else f'{lr:g}'}/seed{seed}"


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir = ROOT / "figures"
    for group in sorted({k.split("/")[0] for k in results}):
        fig, ax = plt.subplots(figsize=(7, 4))
        for k, r in sorted(results.items()):
            if not k.startswith(group + "/"):
                continue
            _, model, steps, method, lr, seed = k.split("/")
            loss = torch.tensor(r["loss"], dtype=torch.float64)
            w = 10
            smooth = torch.nn.functional.avg_pool1d(loss[None, None], w, 1).flatten()
            name = NAMES[method]
            ax.plot(range(w - 1, len(loss)), smooth, label=f"{name} ({model}, lr {lr})", lw=1.2)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("minibatch loss (running mean of 10)")
        ax.set_title(f"{group}: torchvision ResNet on MNIST digits (32x32), batch 32")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(fig_dir / f"resnet-{group}.png", dpi=110)
        plt.close(fig)


def table(results: dict) -> str:
    """The markdown table of docs/resnet.md."""
    rows = ["| model | steps | optimizer | lr | first loss | max loss | mean loss | mean, last 10 % | "
            "held-out accuracy | s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in results.items():
        _, model, steps, method, lr, _seed = k.split("/")
        L = r["loss"]
        tail = L[-max(1, len(L) // 10):]
        rows.append(f"| {model} | {steps} | {NAMES[method]} | {'default' if lr == 'default' else lr} | {L[0]:.3f} | "
                    f"{r['max_loss']:.3f} | {sum(L) / len(L):.4f} | {sum(tail) / len(tail):.4f} | "
                    f"{r['heldout_accuracy']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None, help="one group of RUNS")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table", action="store_true", help="print the table of the runs made and exit")
    a = ap.parse_args()
    if a.table:
        print(table(json.loads(OUT.read_text())))
        return
    torch.set_num_threads(a.threads)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    for group, model, steps, method, lr in RUNS:
        if a.only and group != a.only:
            continue
        k = key(group, model, steps, method, lr, a.seed)
        if k in results:
            continue
        print(k, flush=True)
        r = tvm.train(model, make_opt(method, lr), steps, seed=a.seed, eval_every=max(1, steps // 10), log=print)
        results[k] = r
        L = r["loss"]
        print(f"  first {L[0]:.3f} max {r['max_loss']:.3f} mean {sum(L) / len(L):.4f} "
              f"last10% {sum(L[-steps // 10:]) / (steps // 10):.4f} held-out acc {r['heldout_accuracy']:.3f} "
              f"{r['seconds']:.0f}s", flush=True)
        OUT.write_text(json.dumps(results))
        plot(results)
    plot(results)


if __name__ == "__main__":
    main()
