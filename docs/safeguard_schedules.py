"""A schedule of the update-ratio safeguard (docs/resnet.md, "Two more shapes of safeguard tried"):
each param group's ``max_update_ratio`` is set to τ(t) before step t, with the shipped weights.

    python docs/safeguard_schedules.py digits-resnet 300 1e-4 "0.01*1.05**t" 5   # a small problem, 5 runs
    python docs/safeguard_schedules.py resnet18 60 1e-4 "0.01*1.05**t"           # torchvision ResNet-18

PROBLEM is one of docs/eval_hierarchical.py's TASKS (evaluated as there, seed 1000) or a torchvision
model name (learnedopt.tasks.torchvision_models.train, seed 0). τ(t) is a Python expression in t.
Prints one line of results.
"""
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from eval_hierarchical import TASKS
from learnedopt import tasks, evaluate
from learnedopt.optim import HierarchicalOptimizer
torch.set_num_threads(2)
which, steps, lr, sched = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
runs = int(sys.argv[5]) if len(sys.argv) > 5 else 1
tau = eval(  # noqa: S307 (a command-line expression, as documented)
    "lambda t: " + sched)
def make(ps):
    opt = HierarchicalOptimizer(ps, lr=lr); orig = opt.step; st = [0]
    def step(closure=None):
        for g in opt.param_groups: g["max_update_ratio"] = float(tau(st[0]))
        st[0] += 1
        return orig(closure)
    opt.step = step
    return opt
t0 = time.time()
if which in TASKS:
    fam, kw = TASKS[which]; family = tasks.make_family(fam, **kw)
    res = evaluate.evaluate({"h": make}, family, steps=steps, runs=runs, seed=1000, baselines=())
    m = res["methods"]["h"]; print(f"{which} lr={lr:g} sched=[{sched}] final_mean={m['final_mean']:.4g} max_curve={max(m['curve']):.3g} first={m['curve'][0]:.3g} {time.time()-t0:.0f}s", flush=True)
else:
    from learnedopt.tasks import torchvision_models as tvm
    res = tvm.train(which, make, steps); L = res["loss"]
    n = len(L); print(f"{which} lr={lr:g} sched=[{sched}] first={L[0]:.3g} max={max(L):.3g} at {L.index(max(L))} mean={sum(L)/n:.3g} last10%={sum(L[-n//10:])/(n//10):.3g} acc={res['heldout_accuracy']:.3f} {time.time()-t0:.0f}s", flush=True)
