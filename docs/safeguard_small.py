"""Does the update-ratio safeguard (HierarchicalOptimizer's max_update_ratio, default 0.01) change the
shipped optimizer on the small evaluation problems of docs/hierarchical.md? The shipped weights with
the safeguard on (0.01) and off (0), on the same runs (300 steps, 5 runs, seed 1000, as
docs/eval_hierarchical_quick.py), at the default initial learning rate 1e-4.
Writes docs/eval/resnet/safeguard-small.json; docs/resnet.md reads it.

    python docs/safeguard_small.py     # ~4 min on 2 CPU cores
"""

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from eval_hierarchical import TASKS  # noqa: E402

from learnedopt import evaluate, tasks  # noqa: E402
from learnedopt.optim import HierarchicalOptimizer  # noqa: E402


def main():
    torch.set_num_threads(1)
    out = {}
    for name, (fam, kw) in TASKS.items():
        family = tasks.make_family(fam, **kw)
        for lr in (1e-4,):
            t = time.time()
            learned = {f"ratio {r:g}": (lambda ps, lr=lr, r=r: HierarchicalOptimizer(ps, lr=lr, max_update_ratio=r))
                       for r in (0.0, 0.01)}
            res = evaluate.evaluate(learned, family, steps=300, runs=5, seed=1000, baselines=())
            out[f"{name}@{lr:g}"] = {k: {"final_mean": m["final_mean"], "finals": m["finals"],
                                         "max_curve": max(m["curve"]), "first": m["curve"][0]}
                                     for k, m in res["methods"].items()}
            print(name, lr, {k: round(v["final_mean"], 6) for k, v in out[f"{name}@{lr:g}"].items()},
                  f"{time.time() - t:.0f}s", flush=True)
    path = ROOT / "eval" / "resnet" / "safeguard-small.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
