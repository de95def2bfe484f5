#!/usr/bin/env python3
"""Benchmark of the meta-gradient estimators: optimizee steps per second of meta-training with truncated
BPTT, ES and PES (:mod:`learnedopt.meta.estimators`) on the same problem, against the fused optimizer's
own throughput.

Per workload (``--workload``: ``quadratic`` — the L2L paper's 10-d quadratics, 128 functions, 1,280
coordinates; ``mnist`` — the paper's MLP on real MNIST digits, 20 sigmoid units, batch 128, 15,910
coordinates) and rule (``--rule``: ``l2l`` (LSTM 20, 20, log/sign preprocessing) and ``hierarchical``
(LSTM 10 per coordinate)), rows:

* ``optimizer``: the rule's ``torch.optim`` class (``L2LOptimizer`` / ``HierarchicalOptimizer``, the
  fused in-place step) training the task: per step the task's loss, its backward and ``step()``. This is
  the reference throughput;
* ``bptt``: one truncated unroll of ``--unroll`` steps with its meta-gradient (``TruncatedBPTT``);
* ``es`` / ``pes``: one meta-gradient estimate over ``--unroll`` steps with ``--pairs`` antithetic
  pairs: 2 × pairs optimizee trajectories (``ES`` with ``last=True``: no unperturbed trajectory).

``steps/s`` counts optimizee steps (for ES/PES every particle's); ``vs optimizer`` is a row's steps/s
over the optimizer row's (the target for ES/PES: >= 0.5, i.e. within 2x). Median of ``--repeat``
timings after ``--warmup``, the rows' runs interleaved
(a busy machine slows every row alike).

Output: a table on stdout; JSON under bench/results/ (``estimators-cpu-<rev>.json``) or ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_coord_lstm", HERE / "bench_coord_lstm.py")
bcl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bcl)

import learnedopt  # noqa: E402
from learnedopt import meta, tasks  # noqa: E402
from learnedopt.meta import estimators as E  # noqa: E402

RULES = {"l2l": dict(layers=[20, 20]), "hierarchical": {}}


def make_task(name: str):
    if name == "quadratic":
        return tasks.QuadraticFamily(dim=10, num_functions=128).sample(torch.Generator().manual_seed(0))
    if name == "mnist":
        return tasks.MNISTTask(hidden=(20,), batch_size=128, split="train")
    raise ValueError(f"unknown workload {name!r}")


def optimizer_fn(rule, task, steps: int):
    opt_cls = learnedopt.L2LOptimizer if isinstance(rule, meta.L2LRule) else learnedopt.HierarchicalOptimizer
    g = torch.Generator().manual_seed(1)
    params = [p.requires_grad_(True) for p in task.init_params(g)]
    opt = opt_cls(params, net=rule.net, lr=1.0 if opt_cls is learnedopt.L2LOptimizer else 1e-3)

    def fn():
        for _ in range(steps):
            loss = task.loss(params, task.sample_batch(g))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return fn


def estimator_fn(rule, task, est, steps: int):
    def fn():
        g = torch.Generator().manual_seed(2)
        traj = est.start(rule, task, g)
        rule.zero_grad(set_to_none=True)
        est.estimate(rule, traj, steps, g, "sum", last=True)
    return fn


def bench(workload: str, rule_name: str, args) -> list[dict]:
    task = make_task(workload)
    torch.manual_seed(args.seed)
    rule = meta.make_rule(rule_name, **RULES[rule_name])
    T, N = args.unroll, args.pairs
    impls = [("optimizer", optimizer_fn(rule, task, T), T), ("bptt", estimator_fn(rule, task, E.TruncatedBPTT(), T), T),
             ("es", estimator_fn(rule, task, E.ES(pairs=N), T), 2 * N * T),
             ("pes", estimator_fn(rule, task, E.PES(pairs=N), T), 2 * N * T)]
    for _, fn, _ in impls:
        for _ in range(args.warmup):
            fn()
    times = {name: [] for name, _, _ in impls}
    for _ in range(args.repeat):  # interleaved: a busy machine slows every row alike
        for name, fn, _ in impls:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    rows = []
    for name, _, steps in impls:
        med = statistics.median(times[name])
        rows.append({"workload": workload, "coords": task.num_params(), "rule": rule_name, "impl": name,
                     "unroll": T, "pairs": N if name in ("es", "pes") else None, "optimizee_steps": steps,
                     "median_s": med, "min_s": min(times[name]), "times_s": times[name], "steps_per_s": steps / med})
    base = rows[0]["steps_per_s"]
    for r in rows:
        r["vs_optimizer"] = r["steps_per_s"] / base
    return rows


def format_table(rows: list[dict]) -> str:
    f = bcl._fmt
    cols = [
        ("workload", "<", lambda r: r["workload"]),
        ("coords", ">", lambda r: str(r["coords"])),
        ("rule", "<", lambda r: r["rule"]),
        ("impl", "<", lambda r: r["impl"]),
        ("pairs", ">", lambda r: str(r["pairs"] or "")),
        ("optimizee steps", ">", lambda r: str(r["optimizee_steps"])),
        ("median s", ">", lambda r: f(r["median_s"], ".3f")),
        ("steps/s", ">", lambda r: f(r["steps_per_s"], ".0f")),
        ("vs optimizer", ">", lambda r: f(r["vs_optimizer"], ".2f") + "x"),
    ]
    return bcl.render_table(cols, rows)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    ap.add_argument("--workload", nargs="+", default=["quadratic", "mnist"], choices=["quadratic", "mnist"])
    ap.add_argument("--rule", nargs="+", default=["l2l", "hierarchical"], choices=sorted(RULES))
    ap.add_argument("--unroll", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON file or folder (default bench/results/)")
    ap.add_argument("--no-save", action="store_true")
    return ap


def main(argv=None, prog: str | None = None) -> dict:
    args = build_parser(prog).parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not learnedopt.extension_available():
        sys.exit(f"bench_estimators: learnedopt._C is not available ({learnedopt.ops._IMPORT_ERROR}); build it first")
    info = {
        "benchmark": "meta-estimators", "device": "cpu", "cpu": bcl.cpu_name(), "num_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "git_rev": bcl.git_rev(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable] + sys.argv), "config": dict(vars(args)),
    }
    print(f"# learnedopt meta-gradient estimators: optimizee steps/s  rev {info['git_rev']}  torch {torch.__version__}"
          f"\n# CPU: {info['cpu']} ({info['num_threads']} threads)", flush=True)
    rows = []
    for w in args.workload:
        for r in args.rule:
            rows += bench(w, r, args)
    res = {**info, "rows": rows}
    print(format_table(rows))
    print("# steps/s: optimizee steps (ES/PES: of all 2 x pairs particles) per second; vs optimizer: over the fused "
          "optimizer's (loss + backward + step() per step)")
    if not args.no_save:
        path = bcl.write_json(res, args.out, f"estimators-cpu-{info['git_rev'] or 'norev'}.json")
        print(f"# wrote {path}")
        res["json_path"] = str(path)
    return res


if __name__ == "__main__":
    main()
