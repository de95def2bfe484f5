#!/usr/bin/env python3
"""Benchmark of the learned optimizers on torch.distributed (gloo, CPU processes).

Two parts:

* ``step``: one ``HierarchicalOptimizer.step()`` on an MLP (``--widths``), unsharded in 1 process vs
  FSDP2 (``fully_shard``) on 2 processes (each steps its half and takes part in the two all-reduces:
  the per-tensor non-finite flags before the kernel, the per-tensor sums after it). Per row: the median step time over ``--repeat`` steps after ``--warmup``, the
  time inside ``torch.distributed.all_reduce`` (timed around the call) and its share of the step. Each
  process runs ``--threads`` threads.
* ``meta``: meta-training throughput (trajectories per second of training, start-up excluded: the sum
  of the per-epoch times of log.jsonl) of ``python -m learnedopt meta-train`` in 1 process vs
  ``torchrun --nproc_per_node 2`` (each rank its own trajectories: twice the trajectories per
  meta-step).

Output: a table on stdout; JSON under bench/results/ (``distributed-cpu-<rev>.json``) or ``--out``.
Run: ``python bench/bench_distributed.py [--parts step meta] [--widths 784 1024 1024 10]``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_coord_lstm", HERE / "bench_coord_lstm.py")
bcl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bcl)
REPO = HERE.parent


def _mlp(widths):
    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def _step_worker(rank, world, store, widths, warmup, repeat, threads, out):
    import torch.distributed as dist

    import learnedopt

    torch.set_num_threads(threads)
    model = _mlp(widths)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        mesh = init_device_mesh("cpu", (world,))
        for m in model:
            if isinstance(m, torch.nn.Linear):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = learnedopt.HierarchicalOptimizer(model.parameters())
    g = torch.Generator().manual_seed(rank)
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        grad = torch.randn(local.shape, generator=g) * 1e-2
        if world > 1:
            from torch.distributed.tensor import DTensor

            grad = DTensor.from_local(grad, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                      stride=p.stride())
        p.grad = grad
    spent = [0.0]
    if world > 1:
        orig = dist.all_reduce

        def timed(*a, **k):
            t0 = time.perf_counter()
            r = orig(*a, **k)
            spent[0] += time.perf_counter() - t0
            return r

        dist.all_reduce = timed
    steps, colls = [], []
    for i in range(warmup + repeat):
        if world > 1:
            dist.barrier()
        spent[0] = 0.0
        t0 = time.perf_counter()
        opt.step()
        dt = time.perf_counter() - t0
        if i >= warmup:
            steps.append(dt)
            colls.append(spent[0])
    n = sum(p.numel() for p in model.parameters())
    res = {"rank": rank, "world": world, "params": n, "threads": threads, "step_s": statistics.median(steps),
           "allreduce_s": statistics.median(colls), "steps_s": steps, "allreduce_all_s": colls}
    with open(os.path.join(out, f"step-{world}-{rank}.json"), "w") as f:
        json.dump(res, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def bench_step(widths, warmup, repeat, threads) -> list[dict]:
    import torch.multiprocessing as mp

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            ctx = mp.get_context("spawn")
            store = os.path.join(tmp, f"store{world}")
            procs = [ctx.Process(target=_step_worker, args=(r, world, store, widths, warmup, repeat, threads, tmp))
                     for r in range(world)]
            for p in procs:
                p.start()
            for p in procs:
                p.join(600)
                if p.exitcode != 0:
                    raise RuntimeError(f"step benchmark on {world} ranks failed (exit code {p.exitcode})")
            res = [json.load(open(os.path.join(tmp, f"step-{world}-{r}.json"))) for r in range(world)]
            step = max(r["step_s"] for r in res)  # the slowest rank sets the pace
            coll = max(r["allreduce_s"] for r in res)
            rows.append({"part": "step", "optimizer": "HierarchicalOptimizer", "world": world,
                         "sharding": "none" if world == 1 else "FSDP2", "params": res[0]["params"],
                         "threads_per_rank": threads, "step_ms": step * 1e3, "allreduce_ms": coll * 1e3,
                         "allreduce_share": coll / step, "ranks": res})
    base = rows[0]["step_ms"]
    for r in rows:
        r["speedup_vs_1"] = base / r["step_ms"]
    return rows


def _meta_config(epochs: int) -> dict:
    return dict(task="quadratic", task_kwargs=dict(dim=10, num_functions=8), rule="l2l",
                rule_kwargs=dict(layers=[20, 20]), num_steps=40, unroll=20, epochs=epochs, meta_lr=1e-3,
                eval_every=0, checkpoint_every=max(1, epochs), threads=1)


def bench_meta(epochs: int) -> list[dict]:
    rows = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "LEARNEDOPT_PROGRESS": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "config.json"
        cfg_path.write_text(json.dumps(_meta_config(epochs)))
        for world in (1, 2):
            out = Path(tmp) / f"run{world}"
            launch = ([sys.executable] if world == 1 else
                      [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)])
            cmd = launch + ["-m", "learnedopt", "meta-train", "--config", str(cfg_path), "--out", str(out)]
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=900)
            wall = time.perf_counter() - t0
            log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
            train = sum(r["time"] for r in log)
            trajectories = epochs * world
            rows.append({"part": "meta", "world": world, "epochs": epochs, "trajectories": trajectories,
                         "train_s": train, "wall_s": wall, "trajectories_per_s": trajectories / train,
                         "command": shlex.join(cmd[:1] + [c for c in cmd[1:]])})
    base = rows[0]["trajectories_per_s"]
    for r in rows:
        r["speedup_vs_1"] = r["trajectories_per_s"] / base
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", default=["step", "meta"], choices=["step", "meta"])
    ap.add_argument("--widths", nargs="+", type=int, default=[784, 1024, 1024, 10])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="threads per process")
    ap.add_argument("--meta-epochs", type=int, default=12)
    ap.add_argument("--out", default=None, help="JSON file or folder (default bench/results/)")
    a = ap.parse_args(argv)
    rows = []
    if "step" in a.parts:
        rows += bench_step(a.widths, a.warmup, a.repeat, a.threads)
    if "meta" in a.parts:
        rows += bench_meta(a.meta_epochs)
    print(f"\n{'part':<5} {'world':>5} {'what':<34} {'time':>12} {'all-reduce':>12} {'share':>7} {'vs 1':>6}")
    for r in rows:
        if r["part"] == "step":
            what = f"hier step, {r['sharding']}, {r['params']:,} params"
            print(f"{'step':<5} {r['world']:>5} {what:<34} {r['step_ms']:>9.2f} ms {r['allreduce_ms']:>9.3f} ms "
                  f"{100 * r['allreduce_share']:>6.2f}% {r['speedup_vs_1']:>5.2f}x")
        else:
            what = f"{r['trajectories']} trajectories"
            print(f"{'meta':<5} {r['world']:>5} {what:<34} {r['trajectories_per_s']:>7.2f} tr/s {'':>12} {'':>7} "
                  f"{r['speedup_vs_1']:>5.2f}x")
    result = {"benchmark": "distributed", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "git_rev": bcl.git_rev(), "torch": torch.__version__, "python": platform.python_version(),
              "cpu": bcl.cpu_name(), "cpu_count": os.cpu_count(), "backend": "gloo", "argv": sys.argv[1:],
              "rows": rows}
    path = bcl.write_json(result, a.out, f"distributed-cpu-{bcl.git_rev() or 'norev'}.json")
    print(f"\nJSON: {path}")
    return result


if __name__ == "__main__":
    main()
