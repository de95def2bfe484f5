"""A quick comparison of hierarchical weights on the problems of docs/eval_hierarchical.py: the
HierarchicalOptimizer alone (no baselines), 300 steps, 5 runs with the same seeds as the first 5 runs
there, at initial learning rates 1e-4 (and 1e-3, 1e-2 on the MNIST problems). Used to screen
candidate weights (docs/hierarchical.md, "Fine-tuning longer").

    python docs/eval_hierarchical_quick.py WEIGHTS.pt OUT.json
"""

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_hierarchical import TASKS  # noqa: E402

from learnedopt import evaluate, meta, tasks  # noqa: E402
from learnedopt.optim import HierarchicalOptimizer  # noqa: E402


def main():
    weights, out_path = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    net = meta.load_rule(weights).net
    out = {}
    for name, (fam, kw) in TASKS.items():
        family = tasks.make_family(fam, **kw)
        for lr in [1e-4] + ([1e-3, 1e-2] if name != "digits-resnet" else []):
            t = time.time()
            r = evaluate.evaluate({"h": (lambda ps, lr=lr: HierarchicalOptimizer(ps, lr=lr, net=net))}, family,
                                  steps=300, runs=5, seed=1000, baselines=())
            out[f"{name}@{lr:g}"] = r["methods"]["h"]["final_mean"]
            print(name, lr, out[f"{name}@{lr:g}"], f"{time.time() - t:.0f}s", flush=True)
    Path(out_path).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
