#!/usr/bin/env python3
"""Benchmark of meta-training speed: one truncated unroll (forward and backward) of the L2L rule.

Run it as a script (``python bench/bench_meta.py [options]``), through the package CLI
(``python -m learnedopt bench-meta [options]``), or import it and call ``main(argv)``.

Per workload — an MLP on real MNIST digits (``--hidden``, default 20 (the paper's, 15,910
parameters), 100 and 400), batch 128, sigmoid — and device, one "unroll" is what a meta-training
step does (:func:`learnedopt.meta.unroll` + ``backward``): ``--unroll`` (default 20) steps of the L2L
rule (LSTM (20, 20), log/sign preprocessing) from a fixed starting point, the "sum" meta-objective,
and the meta-gradient by back-propagation through the unroll (second derivatives dropped). Rows:

* ``fused``: the rule through the fused ops (one ``coord_lstm_stack`` forward and one backward per
  step for all coordinates);
* ``reference``: the same rule through ``learnedopt.reference.coord_lstm_stack`` (plain autograd);
* ``task only``: the same unroll with ``learnedopt.meta.LearnedSGD`` (θ ← θ − η g): the cost of the
  task itself (the MLP's forward, its gradient, the meta-loss and its backward), which both L2L rows
  also pay.

``speedup`` is reference / fused (whole unroll); ``rule speedup`` removes the task-only time from
both (how much faster the learned rule's part is). ``err``: the largest difference between the fused
and the reference meta-gradients over their largest magnitude. Times are the median of ``--repeat``
unrolls after ``--warmup``, each from the same start (same θ₀, batches and LSTM state).

Output: a table on stdout; JSON under bench/results/ (``meta-<device>-<rev>.json``) or ``--out``.
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
from learnedopt._progress import progress  # noqa: E402


def _unroll_fn(rule, task, unroll: int, seed: int):
    start = meta.start(rule, task, torch.Generator().manual_seed(seed))

    def fn():
        rule.zero_grad(set_to_none=True)
        loss, _, _ = meta.unroll(rule, start, unroll, torch.Generator().manual_seed(seed + 1))
        loss.backward()
        return loss

    return fn


def _time(fn, warmup: int, repeat: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def bench_workload(hidden: int, args) -> list[dict]:
    task = tasks.MNISTTask(hidden=(hidden,), batch_size=128, split="train")
    n = task.num_params()
    torch.manual_seed(args.seed)
    net = learnedopt.CoordinateLSTMNet(layers=tuple(args.layers))
    rows, grads = [], {}
    impls = [("fused", meta.L2LRule(net, fused=True)), ("reference", meta.L2LRule(net, fused=False)),
             ("task only", meta.LearnedSGD(0.1))]
    for name, rule in impls:
        fn = _unroll_fn(rule, task, args.unroll, args.seed)
        times = _time(fn, args.warmup, args.repeat)
        if isinstance(rule, meta.L2LRule):
            grads[name] = [p.grad.detach().clone() for p in rule.parameters()]
        rows.append({"workload": f"mnist-mlp-{hidden}", "hidden": hidden, "coords": n, "unroll": args.unroll,
                     "impl": name, "median_ms": statistics.median(times), "min_ms": min(times), "times_ms": times})
    fused, ref, task_only = (r["median_ms"] for r in rows)
    scale = max(float(g.abs().max()) for g in grads["reference"])
    err = max(float((a - b).abs().max()) for a, b in zip(grads["fused"], grads["reference"])) / scale
    rows[0].update(speedup=ref / fused, rule_speedup=(ref - task_only) / max(fused - task_only, 1e-9), err=err)
    return rows


def format_table(rows: list[dict]) -> str:
    f = bcl._fmt
    cols = [
        ("workload", "<", lambda r: r["workload"]),
        ("coords", ">", lambda r: str(r["coords"])),
        ("T", ">", lambda r: str(r["unroll"])),
        ("impl", "<", lambda r: r["impl"]),
        ("median ms", ">", lambda r: f(r["median_ms"], ".1f")),
        ("(min)", ">", lambda r: f(r["min_ms"], ".1f")),
        ("ms/step", ">", lambda r: f(r["median_ms"] / r["unroll"], ".2f")),
        ("speedup", ">", lambda r: f(r.get("speedup"), ".2f") + ("x" if r.get("speedup") else "")),
        ("rule speedup", ">", lambda r: f(r.get("rule_speedup"), ".2f") + ("x" if r.get("rule_speedup") else "")),
        ("err", ">", lambda r: f(r.get("err"), ".1e")),
    ]
    return bcl.render_table(cols, rows)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[20, 100, 400], help="MLP hidden sizes (workloads)")
    ap.add_argument("--quick", action="store_true", help="--hidden 20 100 --repeat 3")
    ap.add_argument("--layers", type=int, nargs="+", default=[20, 20], help="L2L LSTM layers")
    ap.add_argument("--unroll", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON file or folder (default bench/results/)")
    ap.add_argument("--no-save", action="store_true")
    return ap


def main(argv=None, prog: str | None = None) -> dict:
    args = build_parser(prog).parse_args(argv)
    if args.quick:
        args.hidden, args.repeat = [20, 100], 3
    if args.threads:
        torch.set_num_threads(args.threads)
    if not learnedopt.extension_available():
        sys.exit(f"bench_meta: learnedopt._C is not available ({learnedopt.ops._IMPORT_ERROR}); build it first")
    info = {
        "benchmark": "meta-unroll", "device": "cpu", "cpu": bcl.cpu_name(), "num_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "git_rev": bcl.git_rev(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable] + sys.argv), "config": {k: v for k, v in vars(args).items()},
    }
    print(f"# learnedopt meta-training benchmark (one unroll, forward + backward)  rev {info['git_rev']}  "
          f"torch {torch.__version__}\n# CPU: {info['cpu']} ({info['num_threads']} threads)", flush=True)
    rows = []
    bar = progress(args.hidden, desc="bench-meta", unit="workload")
    for hidden in bar:
        rows += bench_workload(hidden, args)
        bar.set_postfix_str(f"mnist-mlp-{hidden}: fused {rows[-3]['median_ms']:.0f} ms, reference "
                            f"{rows[-2]['median_ms']:.0f} ms, task only {rows[-1]['median_ms']:.0f} ms", refresh=False)
    res = {**info, "rows": rows}
    print()
    print(format_table(rows))
    print("# speedup: reference / fused (whole unroll); rule speedup: the same after subtracting the task-only time;"
          "\n# err: max |fused - reference| over the meta-gradient / its max |reference|")
    if not args.no_save:
        path = bcl.write_json(res, args.out, f"meta-cpu-{info['git_rev'] or 'norev'}{'-quick' if args.quick else ''}.json")
        print(f"# wrote {path}")
        res["json_path"] = str(path)
    return res


if __name__ == "__main__":
    main()
