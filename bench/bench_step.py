#!/usr/bin/env python3
"""Benchmark of the update cost of one optimizer step: the fused L2L step, its pure-PyTorch
reference, the hierarchical optimizer (fused, float32 and bfloat16 state, and its reference), and
``torch.optim.Adam`` (foreach and fused).

Run it as a script (``python bench/bench_step.py [options]``), through the package CLI
(``python -m learnedopt bench-step [options]``), or import it and call ``main(argv)`` (which returns
the results as a dict). Helpers (timing, machine description, table layout, JSON output) come from
``bench_coord_lstm.py`` next to it.

Workloads, each a list of parameter tensors (``--dtype``, default float32):

* ``--sizes`` (default 1e4 1e5 1e6 1e7 3e7; ``--quick``: 1e4 1e5 1e6): a total number of elements
  split over five tensors of mixed shapes (:func:`synthetic_shapes`: about 50% a matrix, 30% a 3x3
  conv weight, 15% a narrow matrix, the conv's bias, and the rest as a vector);
* ``--models`` (default resnet50 inception_v3; none with ``--quick`` or ``--sizes``): the parameter shapes of
  torchvision's ResNet-50 (161 tensors, 25,557,032 elements) and Inception-V3 with its auxiliary
  classifier (292 tensors, 27,161,264 elements), listed in ``bench/model_shapes.py``.

Parameters are N(0, 1), gradients N(0, 0.01^2), set once before anything is timed (``p.grad`` is
never touched again). All implementations step the *same* parameter tensors one after the other
(their values drift from step to step, which does not change the cost). Per workload and device:

* ``adam-foreach``: ``torch.optim.Adam(params, lr=1e-3, foreach=True).step()``;
* ``adam-fused``: ``torch.optim.Adam(params, lr=1e-3, fused=True).step()`` (n/a where torch has no
  fused Adam for the dtype / device: the row says why);
* ``l2l-fused``: ``learnedopt.L2LOptimizer(params, CoordinateLSTMNet(), lr=1.0).step()`` (the default
  net: LSTM layers (20, 20), log/sign preprocessing, untrained weights drawn with seed 0): one
  ``torch.ops.learnedopt.l2l_step_`` over the whole list;
* ``l2l-ref``: ``learnedopt.reference.l2l_step_`` on the same parameters and gradients, with the
  optimizer's own LSTM states (``optimizer.state[p]["lstm"]``, stepped in place) and network
  weights, lr, weight decay, output scale and preprocessing: the same step in plain PyTorch ops.
  Skipped (n/a) above ``--max-ref-size`` elements (default 1e7; the reference needs ~1.4 KB of
  temporaries per element of its largest tensor and is ~10x slower than the fused step on CPU).

* ``hier-fused`` / ``hier-fused-bf16``: ``learnedopt.HierarchicalOptimizer(params, lr=1e-3,
  net=HierarchicalNet(), state_dtype=float32 / bfloat16).step()`` (untrained weights, seed
  ``--seed``): one ``torch.ops.learnedopt.hier_step_`` over the list plus the tensor and global RNNs;
* ``hier-ref``: the same optimizer with ``fused=False`` (the pure-PyTorch reference,
  ``learnedopt.rules.hierarchical.step_reference`` over the whole list; n/a above ``--max-ref-size``). Its agreement with the fused step is tested in
  tests/test_hierarchical.py, not checked here.

Timing (``time_calls`` of bench_coord_lstm): untimed warm-up steps (``--warmup``; default 2, 1 for
workloads above 1e6 elements; at least 1, since the first step allocates the optimizer state), then
timed steps, each timed on its own: ``time.perf_counter`` on CPU; on CUDA a synchronize, then
``step()`` between two CUDA events, then a synchronize after the end event. Only ``step()`` is in
the timed region. The number of timed steps is ``--repeat``, or by default enough steps for about
``--target-s`` seconds (estimated from the last warm-up step), at least 3 and at most
``--max-repeat``. The table gives the median (and the min); the JSON keeps every time.

Bytes moved per parameter element (the minimum traffic: every tensor read or written once; scalars
and the network's few KB of weights not counted), with s_p the parameter itemsize and s_s the
itemsize of the optimizer state:

* Adam: read p, g, m, v and write p, m, v: ``7 * s_p`` (m and v have the parameter dtype):
  float32 28 B.
* L2L with LSTM layers H_1..H_L: each element has a state row of ``2 * sum(H)`` values (h and c of
  every layer; float32, float64 for float64 parameters). The step reads p, g and the state row and
  writes p and the state row: ``s_p * (2 + 1) + s_s * 2 * 2 * sum(H)``.
* Hierarchical: each element has 32 state rows (31 inputs + the step's update u): read p, g and 31
  rows, write p and 32 rows: ``3 * s_p + 63 * s_s``; float32 state 264 B (9.4x Adam's), bfloat16
  state 138 B (4.9x). (20, 20), float32:
  ``4 * (2 + 80) + 4 * (1 + 80) = 652`` B, 23x Adam's. The reference moves far more (it
  materialises the gates and every intermediate), but its GB/s use the same count: they say how far
  each is from the minimum.

Derived per row: ns per element (``time / elements``), GB/s (``bytes per element * elements /
time``), %copy (GB/s over the bandwidth of a large ``dst.copy_(src)``, 256 MiB on CPU and 1 GiB on
CUDA, measured in the same run, counted as read + write; on CPU the copy also pays a write-allocate
read of dst, which in-place updates do not, so in-place steps can exceed 100%), the time over fused
Adam's and over foreach Adam's at the same workload ("x fused Adam": how many fused-Adam steps one
step costs), and on ``l2l-fused`` rows the speed-up over the reference (reference median / fused
median). ``other``: CPU cores kept busy by other processes (from /proc/stat and this process's CPU
time) during the row's timed steps, or, for rows timed in under 0.25 s (too short for /proc/stat's
10 ms ticks), during the whole workload (JSON: ``other_cores``, ``other_cores_workload``): with as
many torch threads as cores, one busy core elsewhere can stall every parallel region by a scheduler
time slice (a 0.1 ms step became 30 ms on the 2-core development machine), so CPU rows with other
> ~0.1 are suspect.

Check: before timing the reference, one fused step and one reference step start from the same
parameters and states (copies); ``err`` (on the l2l-fused row) is the larger of
``max|update_fused - update_ref| / max|update_ref|`` and ``max|state_fused - state_ref| /
max|state_ref|`` over the list, computed in float32 (~1e-6 expected in float32; both compute 16-bit
parameters' updates in float32 and round them the same way). That reference step also counts as the
reference's first warm-up step. ``--no-check`` skips it.

Devices: ``--device cpu``, ``cuda``, or ``all`` (default): CUDA first when a GPU is visible, then
CPU, so a run cut short by a time limit keeps the GPU rows. The L2L rows on CUDA need learnedopt's
CUDA kernels (n/a without).

Output: progress lines and an aligned table on stdout; JSON (``--out``: a file, or a directory for
the default name; default ``bench/results/step-<device kind>-<git rev>[-quick].json``, device kind
``cpu`` or ``cuda-<gpu>``) with the rows, the workloads' shapes, the machine, the command line and
the copy bandwidths. The JSON is rewritten after every workload (``"complete": false`` until the
run ends), so a run that is killed still leaves what it measured. An L2L implementation that raises
gives an n/a row with the error (``"error": true``) and the script's exit status 1.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run through `python -m learnedopt bench-step` or imported by path
    sys.path.insert(0, str(HERE))

import bench_coord_lstm as bcl  # noqa: E402  (also puts the checkout's learnedopt on sys.path if needed)
import model_shapes  # noqa: E402

import learnedopt  # noqa: E402
from learnedopt import reference  # noqa: E402
from learnedopt._progress import progress  # noqa: E402
from learnedopt.optim import HierarchicalOptimizer  # noqa: E402
from learnedopt.rules.hierarchical import HierarchicalNet  # noqa: E402
from learnedopt.rules.l2l import CoordinateLSTMNet  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
IMPLS = ["adam-foreach", "adam-fused", "l2l-fused", "l2l-ref", "hier-fused", "hier-fused-bf16", "hier-ref"]
# hierarchical rows: (state dtype, fused)
HIER = {"hier-fused": (torch.float32, True), "hier-fused-bf16": (torch.bfloat16, True), "hier-ref": (torch.float32, False)}
HIER_LR = 1e-3
HIER_ROWS = 32  # per-coordinate state rows (learnedopt.rules.hierarchical.Rows, H = 10, S = 4)
FULL_SIZES = [10_000, 100_000, 1_000_000, 10_000_000, 30_000_000]
QUICK_SIZES = [10_000, 100_000, 1_000_000]
MODELS = list(model_shapes.MODELS)
ADAM_LR = 1e-3
L2L_LR = 1.0
GRAD_STD = 1e-2


# ----------------------------------------------------------------------------------------------
# Workloads


def synthetic_shapes(total: int) -> list[tuple[int, ...]]:
    """Five tensors of mixed shapes holding `total` elements in all: a matrix [r, c] with ~50%
    (c = 1000 from 1e6 elements on, 100 below), a conv weight [o, k, 3, 3] with ~30% (k = 64 from
    1e6 on, 16 below), a matrix [r, 10] with ~15%, the conv's bias [o], and the rest as a vector.
    Below 1000 elements: one vector."""
    if total < 1000:
        return [(total,)]
    big = total >= 1_000_000
    c = 1000 if big else 100
    k = 64 if big else 16
    o = (total * 3 // 10) // (k * 9)
    shapes = [(total // 2 // c, c), (o, k, 3, 3), (total * 15 // 100 // 10, 10), (o,)]
    rest = total - sum(math.prod(s) for s in shapes)
    shapes.append((rest,))
    return [s for s in shapes if math.prod(s) > 0]


def workloads(sizes: list[int], models: list[str]) -> list[tuple[str, str, list[tuple[int, ...]]]]:
    """(name, kind, shapes) of every workload: sizes first, then models."""
    out = [(bcl._fmt_n(n), "size", synthetic_shapes(n)) for n in sizes]
    out += [(m, "model", model_shapes.shapes(m)) for m in models]
    return out


def make_params(shapes, dtype: torch.dtype, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """Leaf parameters N(0, 1) with gradients N(0, GRAD_STD^2), in `dtype` (drawn in float32)."""
    g = torch.Generator(device=device).manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.randn(s, device=device, generator=g).to(dtype).requires_grad_()
        p.grad = (torch.randn(s, device=device, generator=g) * GRAD_STD).to(dtype)
        params.append(p)
    return params


# ----------------------------------------------------------------------------------------------
# Work model


def state_width(layers) -> int:
    return 2 * sum(layers)


def bytes_per_elem(impl: str, dtype: torch.dtype, layers) -> int:
    s_p = torch.empty((), dtype=dtype).element_size()
    if impl.startswith("adam"):
        return 7 * s_p  # read p, g, m, v; write p, m, v
    if impl.startswith("hier"):
        # read p, g and the 31 state rows that are inputs; write p and all 32 rows (u included)
        s_s = 8 if dtype == torch.float64 else HIER[impl][0].itemsize
        return 3 * s_p + (2 * HIER_ROWS - 1) * s_s
    s_s = 8 if dtype == torch.float64 else 4
    W = state_width(layers)
    return s_p * (2 + 1) + s_s * 2 * W  # read p, g, state; write p, state


# ----------------------------------------------------------------------------------------------
# Timing


def _cpu_busy() -> tuple[float, float, float] | None:
    """(seconds of CPU time used by the whole machine, by this process, wall clock) now; None
    where /proc/stat is not available."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(v) - v[3] - (v[4] if len(v) > 4 else 0)  # all but idle and iowait
    t = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system, time.perf_counter()


def _other_cores(start, end, min_s: float = 0.25) -> float | None:
    """CPU cores kept busy by other processes between two _cpu_busy() samples (other work on the
    machine distorts CPU timings); None for windows under min_s seconds (/proc/stat counts in
    clock ticks, 10 ms)."""
    if start is None or end is None or end[2] - start[2] < min_s:
        return None
    return max(0.0, ((end[0] - start[0]) - (end[1] - start[1])) / (end[2] - start[2]))


def _timed_once(fn, device: torch.device) -> float:
    """Milliseconds of one fn() (synchronized on CUDA), for the check step."""
    bcl._sync(device)
    t0 = time.perf_counter()
    fn()
    bcl._sync(device)
    return (time.perf_counter() - t0) * 1e3


def time_step(fn, device, warmup: int, repeat: int | None, target_s: float, max_repeat: int,
              est_ms: float | None = None) -> dict:
    """Warm up, pick the number of timed calls (fixed `repeat`, or about target_s seconds of calls,
    3 to max_repeat, from the last warm-up time or est_ms), time them; bcl._stats plus the counts."""
    warm = bcl.time_calls(fn, device, 0, warmup) if warmup > 0 else []
    if repeat is None:
        est = warm[-1] if warm else est_ms
        repeat = 3 if not est else min(max_repeat, max(3, math.ceil(target_s * 1e3 / est)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    busy0 = _cpu_busy()
    res = bcl._stats(bcl.time_calls(fn, device, 0, repeat))
    res.update(warmup=warmup, repeat=repeat, warmup_times_ms=warm, other_cores=_other_cores(busy0, _cpu_busy()))
    if device.type == "cuda":
        res["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return res


def _l2l_ref_fn(opt, params, states):
    """reference.l2l_step_ with the optimizer's weights and hyper-parameters on (params, states)."""
    group = opt.param_groups[0]
    net = opt.net
    w_ih, w_hh, b, w_out, b_out = opt._weights(params[0].device)
    grads = [p.grad for p in opt.param_groups[0]["params"]]

    def fn():
        reference.l2l_step_(params, grads, states, w_ih, w_hh, b, w_out, b_out, float(group["lr"]),
                            float(group["weight_decay"]), net.output_scale, net.p, net.preprocess == "log_sign")

    return fn


@torch.no_grad()
def check_l2l(opt, params, states, device) -> tuple[float, float]:
    """One fused step on (params, states) and one reference step on copies of them; returns (err,
    ms of the reference step). Leaves params and states one fused step further."""
    before = [p.detach().clone() for p in params]
    p_ref = [p.detach().clone() for p in params]
    s_ref = [s.clone() for s in states]
    opt.step()
    ref_ms = _timed_once(_l2l_ref_fn(opt, p_ref, s_ref), device)
    num = den = 0.0
    for p, b, r in zip(params, before, p_ref):
        num = max(num, (p.float() - r.float()).abs().max().item())
        den = max(den, (r.float() - b.float()).abs().max().item())
    err_p = num / den if den > 0 else num
    num = den = 0.0
    for s, r in zip(states, s_ref):
        num = max(num, (s - r).abs().max().item())
        den = max(den, r.abs().max().item())
    err_s = num / den if den > 0 else num
    del before, p_ref, s_ref
    return max(err_p, err_s), ref_ms


# ----------------------------------------------------------------------------------------------
# One workload on one device


def bench_workload(device, name, kind, shapes, dtype, impls, args, l2l_na: str | None) -> list[dict]:
    """Rows of every impl for one (device, workload). l2l_na: None, or why L2L cannot run here."""
    busy0 = _cpu_busy()
    numel = sum(math.prod(s) for s in shapes)
    warmup = max(1, args.warmup if args.warmup is not None else (2 if numel <= 1_000_000 else 1))
    timing = dict(repeat=args.repeat, target_s=args.target_s, max_repeat=args.max_repeat)
    params = make_params(shapes, dtype, device, seed=args.seed)
    layers = tuple(args.layers)
    res: dict[str, dict] = {}

    def na(impl, why, error=False):
        res[impl] = {"na": why, "error": error}

    def failed(impl, e):  # an L2L implementation raised: n/a with the error, and the run exits 1
        na(impl, f"error: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}", error=True)

    for impl, kw in (("adam-foreach", dict(foreach=True)), ("adam-fused", dict(fused=True))):
        if impl not in impls:
            continue
        try:
            opt = torch.optim.Adam(params, lr=ADAM_LR, **kw)
            res[impl] = time_step(opt.step, device, warmup, **timing)
        except (RuntimeError, ValueError, NotImplementedError) as e:
            na(impl, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}")
        opt = None
        bcl._free(device)

    err = None
    if "l2l-fused" in impls or "l2l-ref" in impls:
        if l2l_na is not None:
            for impl in ("l2l-fused", "l2l-ref"):
                if impl in impls:
                    na(impl, l2l_na)
        else:
            torch.manual_seed(args.seed)
            net = CoordinateLSTMNet(layers).to(device)
            opt = learnedopt.L2LOptimizer(params, net, lr=L2L_LR)
            for p in params:
                opt.state[p]["lstm"] = opt._init_state(p)
            states = [opt.state[p]["lstm"] for p in params]
            if "l2l-fused" in impls:
                try:
                    res["l2l-fused"] = time_step(opt.step, device, warmup, **timing)
                except RuntimeError as e:
                    failed("l2l-fused", e)
            if "l2l-ref" in impls:
                if numel > args.max_ref_size:
                    na("l2l-ref", f"above --max-ref-size {bcl._fmt_n(args.max_ref_size)}")
                else:
                    try:
                        ref_warmup, est = warmup, None
                        if "median_ms" in res.get("l2l-fused", {}) and not args.no_check:
                            err, est = check_l2l(opt, params, states, device)
                            ref_warmup = warmup - 1  # the check's reference step was the first
                        bcl._free(device)
                        res["l2l-ref"] = time_step(_l2l_ref_fn(opt, params, states), device, ref_warmup, **timing,
                                                   est_ms=est)
                    except RuntimeError as e:
                        failed("l2l-ref", e)
            opt = net = states = None
    for impl, (sdt, fused) in HIER.items():
        if impl not in impls:
            continue
        if l2l_na is not None:
            na(impl, l2l_na)
            continue
        if not fused and numel > args.max_ref_size:
            na(impl, f"above --max-ref-size {bcl._fmt_n(args.max_ref_size)}")
            continue
        try:
            torch.manual_seed(args.seed)
            hopt = HierarchicalOptimizer(params, lr=HIER_LR, net=HierarchicalNet().to(device), state_dtype=sdt,
                                         fused=fused)
            res[impl] = time_step(hopt.step, device, warmup, **timing)
        except RuntimeError as e:
            failed(impl, e)
        hopt = None
        bcl._free(device)
    params = None
    bcl._free(device)

    other = _other_cores(busy0, _cpu_busy())
    rows = []
    t = {k: v["median_ms"] for k, v in res.items() if "median_ms" in v}
    for impl in impls:
        r = res[impl]
        row = {"device": device.type, "workload": name, "kind": kind, "numel": numel, "n_tensors": len(shapes),
               "dtype": str(dtype).replace("torch.", ""), "impl": impl,
               "layers": list(layers) if impl.startswith("l2l") else None,
               "bytes_per_elem": bytes_per_elem(impl, dtype, layers), "na": r.get("na"),
               "error": r.get("error", False), "other_cores_workload": other}
        if "median_ms" in r:
            ms = r["median_ms"]
            row.update(
                median_ms=ms, min_ms=r["min_ms"], ns_per_elem=ms * 1e6 / numel,
                gbs=row["bytes_per_elem"] * numel / (ms * 1e6),
                x_adam_fused=ms / t["adam-fused"] if "adam-fused" in t else None,
                x_adam_foreach=ms / t["adam-foreach"] if "adam-foreach" in t else None,
                speedup_vs_ref=(t["l2l-ref"] / ms if impl == "l2l-fused" and "l2l-ref" in t else
                                t["hier-ref"] / ms if impl.startswith("hier-fused") and "hier-ref" in t else None),
                max_scaled_diff=err if impl == "l2l-fused" else None,
                warmup=r["warmup"], repeat=r["repeat"], other_cores=r["other_cores"], times_ms=r["times_ms"],
                warmup_times_ms=r["warmup_times_ms"],
                **({"peak_mem_mb": r["peak_mem_mb"]} if "peak_mem_mb" in r else {}),
            )
        else:
            row.update(median_ms=None, min_ms=None, ns_per_elem=None, gbs=None, x_adam_fused=None,
                       x_adam_foreach=None, speedup_vs_ref=None, max_scaled_diff=None, other_cores=None)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Table


def _x(v):
    return "-" if v is None else f"{v:.2f}x" if v < 100 else f"{v:.0f}x"


def format_table(rows: list[dict]) -> str:
    f = bcl._fmt
    cols = [
        ("device", "<", lambda r: r["device"]),
        ("workload", "<", lambda r: r["workload"]),
        ("elements", ">", lambda r: f"{r['numel']:,}"),
        ("tensors", ">", lambda r: str(r["n_tensors"])),
        ("impl", "<", lambda r: r["impl"]),
        ("ms/step", ">", lambda r: "n/a" if r["median_ms"] is None else f(r["median_ms"], ".3f")),
        ("(min)", ">", lambda r: f(r["min_ms"], ".3f")),
        ("ns/elem", ">", lambda r: f(r["ns_per_elem"], ".3f")),
        ("B/elem", ">", lambda r: str(r["bytes_per_elem"])),
        ("GB/s", ">", lambda r: f(r["gbs"], ".1f")),
        ("%copy", ">", lambda r: f(None if r["gbs"] is None else 100 * r["frac_of_copy"], ".1f")),
        ("x fusedAdam", ">", lambda r: _x(r["x_adam_fused"])),
        ("x foreachAdam", ">", lambda r: _x(r["x_adam_foreach"])),
        ("ref/fused", ">", lambda r: _x(r["speedup_vs_ref"])),
        ("err", ">", lambda r: f(r["max_scaled_diff"], ".1e")),
        ("other", ">", lambda r: f(r["other_cores_workload"] if r["other_cores"] is None else r["other_cores"],
                                   ".2f")),
    ]
    return bcl.render_table(cols, rows)


def _loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages (other work on the machine skews CPU timings)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _progress(rows: list[dict]) -> str:
    r0 = rows[0]
    parts = [f"{r['impl']} " + ("n/a" if r["median_ms"] is None else f"{r['median_ms']:.3f} ms") for r in rows]
    head = f"# {r0['device']} {r0['workload']} ({r0['numel']:,} elements, {r0['n_tensors']} tensors): "
    o = r0["other_cores_workload"]
    return head + ", ".join(parts) + ("" if o is None else f"  (other processes: {o:.2f} cores)")


# ----------------------------------------------------------------------------------------------
# CLI


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Time one optimizer step: learnedopt.L2LOptimizer (fused l2l_step_), its pure-PyTorch "
                    "reference, and torch.optim.Adam (foreach, fused), per parameter element. See the module "
                    "docstring for what is counted.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--sizes", type=bcl._size, nargs="*", default=None,
                   help="total elements of the synthetic parameter lists (1e6 notation accepted); default "
                        "1e4 1e5 1e6 1e7 3e7, or 1e4 1e5 1e6 with --quick")
    p.add_argument("--models", nargs="*", choices=MODELS, default=None,
                   help="parameter shapes of these models (bench/model_shapes.py); default all, none with --quick "
                        "or --sizes")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=IMPLS, help="implementations to time")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="parameter dtype")
    p.add_argument("--layers", type=int, nargs="+", default=[20, 20], help="LSTM hidden sizes of the L2L net")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                   help="all: CUDA (when a GPU is visible) then CPU")
    p.add_argument("--max-ref-size", type=bcl._size, default=10_000_000,
                   help="skip the L2L reference (n/a) on workloads with more elements than this")
    p.add_argument("--no-check", action="store_true", help="skip the fused-vs-reference check")
    p.add_argument("--repeat", type=int, default=None,
                   help="timed steps per row (default: about --target-s seconds' worth, 3 to --max-repeat)")
    p.add_argument("--target-s", type=float, default=None,
                   help="seconds of timed steps to aim for without --repeat (default 2, 0.5 with --quick)")
    p.add_argument("--max-repeat", type=int, default=30, help="most timed steps per row without --repeat")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps before timing (default 2, 1 above 1e6 elements; at least 1)")
    p.add_argument("--quick", action="store_true", help="sizes 1e4 1e5 1e6, no models, --target-s 0.5")
    p.add_argument("--seed", type=int, default=0, help="seed of the parameters, gradients and L2L net")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default=None,
                   help="JSON file to write (a directory: the default file name inside it); default "
                        "bench/results/step-<device kind>-<git rev>[-quick].json")
    p.add_argument("--no-save", action="store_true", help="print the table only, write no JSON")
    return p


def main(argv=None, prog: str | None = None) -> dict:
    """Run the benchmark with command-line arguments `argv` (default sys.argv[1:]); print the table,
    write the JSON, and return the results dict."""
    args = build_parser(prog).parse_args(argv)
    sizes = args.sizes if args.sizes is not None else (QUICK_SIZES if args.quick else FULL_SIZES)
    models = args.models if args.models is not None else ([] if args.quick or args.sizes is not None else MODELS)
    if args.target_s is None:
        args.target_s = 0.5 if args.quick else 2.0
    if (args.repeat is not None and args.repeat < 1) or (args.warmup is not None and args.warmup < 0) \
            or args.max_repeat < 3 or args.target_s < 0 or any(h < 1 for h in args.layers):
        sys.exit("bench_step: need --repeat >= 1, --warmup >= 0, --max-repeat >= 3, --target-s >= 0, --layers >= 1")
    if not sizes and not models:
        sys.exit("bench_step: nothing to run (no --sizes and no --models)")
    impls = [i for i in IMPLS if i in args.impls]
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)

    wants_l2l = any(i.startswith("l2l") for i in impls)
    if wants_l2l and not learnedopt.extension_available():
        sys.exit(f"bench_step: the compiled extension learnedopt._C is not available "
                 f"({learnedopt.ops._IMPORT_ERROR}); build it first (see README), or time --impls adam-* only")
    gpu = torch.cuda.is_available()
    if args.device == "cuda" and not gpu:
        sys.exit("bench_step: --device cuda, but no GPU is visible")
    devices = {"cpu": ["cpu"], "cuda": ["cuda"], "all": (["cuda"] if gpu else []) + ["cpu"]}[args.device]
    l2l_cuda_na = None if learnedopt.ops.cuda_built() else "learnedopt._C has no CUDA kernels"

    gpu_name = torch.cuda.get_device_name() if "cuda" in devices else None
    wl = workloads(sizes, models)
    info = {
        "benchmark": "step",
        "cpu": bcl.cpu_name(),
        "gpu": gpu_name,
        "num_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_rev": bcl.git_rev(),
        "loadavg_start": _loadavg(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable] + sys.argv),
        "bench_args": list(sys.argv[1:] if argv is None else argv),
        "config": {"sizes": sizes, "models": models, "impls": impls, "dtype": args.dtype, "devices": devices,
                   "warmup": args.warmup, "repeat": args.repeat, "target_s": args.target_s,
                   "max_repeat": args.max_repeat, "max_ref_size": args.max_ref_size, "check": not args.no_check,
                   "seed": args.seed, "grad_std": GRAD_STD, "adam_lr": ADAM_LR,
                   "l2l": {"layers": list(args.layers), "preprocess": "log_sign", "p": 10.0, "output_scale": 0.1,
                           "lr": L2L_LR, "weight_decay": 0.0}},
        "workloads": {name: {"kind": kind, "numel": sum(math.prod(s) for s in shapes), "n_tensors": len(shapes),
                             "shapes": [list(s) for s in shapes] if kind == "size" else f"bench/model_shapes.py:{name}"}
                      for name, kind, shapes in wl},
    }
    print(f"# learnedopt optimizer-step benchmark  rev {info['git_rev'] or 'unknown'}  torch {torch.__version__}"
          f"  cuda {torch.version.cuda}")
    print(f"# CPU: {info['cpu']}  ({info['num_threads']} torch threads, load average {info['loadavg_start']})"
          + (f"   GPU: {gpu_name}" if gpu_name else ""))
    print(f"# workloads: {' '.join(n for n, _, _ in wl)}  {args.dtype}  impls: {' '.join(impls)}  "
          f"L2L layers {tuple(args.layers)}  reference up to {bcl._fmt_n(args.max_ref_size)} elements", flush=True)

    out_path = None
    fname = f"step-{bcl.device_kind(gpu_name)}-{info['git_rev'] or 'norev'}"
    fname += "-quick.json" if args.quick else ".json"
    copy, rows = {}, []

    def result(complete: bool) -> dict:
        for r in rows:
            c = copy.get(r["device"])
            r["frac_of_copy"] = r["gbs"] / c["gbs"] if c and r["gbs"] is not None else None
        return {**info, "loadavg_end": _loadavg() if complete else None, "complete": complete, "copy": copy,
                "copy_gbs": {d: v["gbs"] for d, v in copy.items()}, "rows": rows}

    def save(complete: bool) -> dict:
        nonlocal out_path
        res = result(complete)
        if not args.no_save:
            out_path = bcl.write_json(res, args.out, fname)
        return res

    bar = progress(total=len(devices) * len(wl), desc="bench-step", unit="workload")
    for dev_name in devices:
        device = torch.device(dev_name)
        copy[dev_name] = bcl.bench_copy(device, (1 << 30) if dev_name == "cuda" else (256 << 20), warmup=1, repeat=5)
        print(f"# {dev_name}: copy {copy[dev_name]['bytes'] >> 20} MiB: {copy[dev_name]['gbs']:.1f} GB/s "
              f"(best {copy[dev_name]['gbs_best']:.1f})", flush=True)
        for name, kind, shapes in wl:
            bar.set_postfix_str(f"{dev_name} {name}")
            new = bench_workload(device, name, kind, shapes, dtype, impls, args,
                                 l2l_cuda_na if dev_name == "cuda" else None)
            rows += new
            bar.set_postfix_str(_progress(new), refresh=False)
            bar.update(1)
            save(complete=False)
    bar.close()

    res = save(complete=True)
    print()
    print(format_table(rows))
    print("\n# B/elem: Adam 7*s_p (read p,g,m,v; write p,m,v); L2L 3*s_p + 2*2*sum(H)*s_s (read p,g,state; write p,"
          "state);\n# hierarchical 3*s_p + 63*s_s (read p,g and 31 state rows; write p and 32 rows);"
          "\n# GB/s from the median and that minimum count; x fusedAdam / x foreachAdam: time over theirs;"
          "\n# ref/fused: the reference's time over the fused step's (L2L, hierarchical);"
          "\n# err: max|fused-ref|/max|ref| over updates and states (L2L rows);"
          "\n# other: CPU cores busy with other processes during the row's timed steps (the whole workload's for rows"
          "\n# timed in under 0.25 s); > 0.1: CPU timings suspect")
    for r in rows:
        if r["na"]:
            print(f"# n/a: {r['device']} {r['workload']} {r['impl']}: {r['na']}")
    print(f"# load average at the end: {res['loadavg_end']}")
    if out_path is not None:
        print(f"# wrote {out_path}")
        res["json_path"] = str(out_path)
    return res


if __name__ == "__main__":
    sys.exit(1 if any(r["error"] for r in main()["rows"]) else 0)
