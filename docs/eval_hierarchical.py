"""Evaluation of a hierarchical learned optimizer on problems never seen in meta-training (its
ensemble has no convnets, no MNIST and no residual networks):

* an MLP (784-64-10, sigmoid, batch 64) and a small convnet (3x3x8, 5x5x8, ReLU, batch 64) on the
  1,000 real MNIST test digits; a small ResNet (2 residual blocks, width 16) on scikit-learn's 8x8
  digits;
* against Adam and RMSprop with learning rates tuned on a half-decade grid (separate tuning seeds) and
  Adam at its default learning rate 1e-3, all on the same trajectories (θ₀ and minibatches);
* the final parameters of every run also measured on held-out digits (``Task.heldout_metrics``: the
  1,000 "valid" MNIST digits, the 1,200 other 8×8 digits): loss and accuracy;
* and the robustness to the initial learning rate: every method at lr = 1e-6 ... 1e-1, untuned, on the
  MNIST MLP and convnet.

    python docs/eval_hierarchical.py --weights learnedopt/pretrained/hierarchical-ensemble.safetensors --out docs/eval/hierarchical

``--tasks`` / ``--robustness-tasks`` choose a subset; their results replace those entries of the
summary.json and lr-robustness.json already in ``--out`` and leave the others.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

from learnedopt import evaluate, meta, tasks
from learnedopt.optim import HierarchicalOptimizer

TASKS = {
    "mnist-mlp": ("mnist", dict(hidden=[64], batch_size=64, split="test")),
    "mnist-conv": ("mnist_conv", dict()),
    "digits-resnet": ("digits_resnet", dict()),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--runs", type=int, default=20, help="runs per method (5 proved too few on the ResNet)")
    ap.add_argument("--lr", type=float, default=1e-4,
                    help="the hierarchical optimizer's initial learning rate (default: its default, 1e-4)")
    ap.add_argument("--tasks", nargs="*", default=list(TASKS))
    ap.add_argument("--robustness-tasks", nargs="*", default=["mnist-mlp", "mnist-conv"])
    a = ap.parse_args()
    torch.set_num_threads(1)
    net = meta.load_rule(a.weights).net
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name in a.tasks:
        fam_name, kw = TASKS[name]
        family = tasks.make_family(fam_name, **kw)
        t0 = time.time()
        learned = {
            "hierarchical": lambda ps: HierarchicalOptimizer(ps, lr=a.lr, net=net),
            "adam (lr 1e-3, untuned)": lambda ps: torch.optim.Adam(ps, lr=1e-3),
        }
        res = evaluate.evaluate(learned, family, steps=a.steps, runs=a.runs, seed=1000,
                                baselines=("adam", "rmsprop"), tune_runs=2)
        res["task"] = {"family": fam_name, **kw}
        res["methods"]["adam (lr 1e-3, untuned)"]["lr"] = 1e-3  # fixed, not tuned
        res["methods"]["hierarchical"]["lr"] = a.lr  # its initial learning rate (then learned)
        title = f"{name}, {a.steps} steps, {a.runs} runs (hierarchical lr {a.lr:g})"
        table = evaluate.format_table(res, title)
        print(table, f"({time.time() - t0:.0f} s)", flush=True)
        evaluate.save_result(res, out / f"{name}.json")
        (out / f"{name}.md").write_text(table)
        evaluate.plot_curves(res, out / f"{name}.png", title)
        summary[name] = {k: (v["final_mean"], v["final_std"], v["lr"]) for k, v in res["methods"].items()}
    # robustness to the initial learning rate
    lrs = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    makers = {
        "hierarchical": lambda ps, lr: HierarchicalOptimizer(ps, lr=lr, net=net),
        "adam": lambda ps, lr: torch.optim.Adam(ps, lr=lr),
        "rmsprop": evaluate.BASELINES["rmsprop"],
    }
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    robustness = {}
    for name in a.robustness_tasks:
        family = tasks.make_family(TASKS[name][0], **TASKS[name][1])
        rob = {}
        for m, make in makers.items():
            rob[m] = {}
            for lr in lrs:
                finals = []
                for i in range(3):
                    g = evaluate._generator(2000, i)
                    finals.append(evaluate.run_optimizer(lambda ps: make(ps, lr), family.sample(g), a.steps, g)[0][-1])
                rob[m][lr] = sum(finals) / len(finals)
        robustness[name] = rob
        lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---" * (len(lrs) + 1) + "|"]
        for m, row in rob.items():
            lines.append(f"| {m} | " + " | ".join(f"{row[lr]:.4g}" for lr in lrs) + " |")
        table = (f"**{name}**: final training loss after {a.steps} steps, mean of 3 runs, per initial learning "
                 f"rate (untuned)\n\n" + "\n".join(lines) + "\n")
        print(table, flush=True)
        (out / f"lr-robustness-{name}.md").write_text(table)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for m, row in rob.items():
            ax.plot(lrs, [min(row[lr], 10.0) for lr in lrs], marker="o", label=m)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("initial learning rate")
        ax.set_ylabel(f"final loss after {a.steps} steps (capped at 10)")
        ax.set_title(name)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"lr-robustness-{name}.png", dpi=110)
        plt.close(fig)
    # Merged into what an earlier run of other --tasks / --robustness-tasks wrote to the same --out.
    rob_file, sum_file = out / "lr-robustness.json", out / "summary.json"
    if rob_file.exists() and robustness:
        robustness = {**json.loads(rob_file.read_text())["final_loss"], **robustness}
    if robustness or not rob_file.exists():
        rob_file.write_text(json.dumps({"lrs": lrs, "steps": a.steps, "final_loss": robustness}, indent=1))
    if sum_file.exists():
        summary = {**json.loads(sum_file.read_text()), **summary}
    sum_file.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
