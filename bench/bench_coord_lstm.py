#!/usr/bin/env python3
"""Benchmark of the fused op ``learnedopt.coord_lstm`` against the pure-PyTorch reference.

Run it as a script (``python bench/bench_coord_lstm.py [options]``), through the package CLI
(``python -m learnedopt bench [options]``), or import it and call ``main(argv)`` (which returns the
results as a dict).

What is timed, for every N in ``--sizes`` (default 1e4 1e5 1e6; ``--quick``: 1e4 1e5), on CPU and,
when ``learnedopt.ops.cuda_available()``, on CUDA:

* ``fwd``: ``(h_new, c_new) = op(x, h, c, w_ih, w_hh, b)`` under ``torch.no_grad()`` with no input
  requiring grad (inference: the learned optimizer applied with frozen weights).
* ``fwd+bwd``: all six inputs require grad, then ``(h_new, c_new) = op(...)`` and
  ``torch.autograd.backward([h_new, c_new], [gh, gc])`` (what meta-training does). The ``.grad`` of
  the inputs are reset to None outside the timed region, so every repeat allocates fresh gradients.

``op`` is the fused ``learnedopt.coord_lstm`` or the reference ``learnedopt.reference.coord_lstm``
(plain autograd over the same maths). Shapes: x [N, I], h and c [N, H], w_ih [4H, I], w_hh [4H, H],
b [4H]; H=20, I=2, float32 unless told otherwise.

Timing: ``--warmup`` untimed calls, then ``--repeat`` timed calls, each timed on its own; the table
gives the median (and the JSON the min as well). On CPU each call is timed with
``time.perf_counter``. On CUDA, ``torch.cuda.synchronize()`` is called before a repeat, the call is
bracketed by two ``torch.cuda.Event(enable_timing=True)``, and the host synchronizes after the end
event; nothing synchronizes inside the op.

Work counted per coordinate (one row of x):

* FLOPs, forward: ``2 * 4H * (I + H)``, the gate products ``x @ w_ih.T + h @ w_hh.T`` (a
  multiply-add counts 2). Elementwise work (bias, sigmoid/tanh, the cell update) is ignored.
  H=20, I=2: 3520 FLOP.
* FLOPs, forward+backward: ``3 * 2 * 4H * (I + H)``: the forward products, plus the products that
  give the input gradients (``dgates @ [w_ih | w_hh]``) and the weight gradients
  (``dgates.T @ [x | h]``). The fused backward recomputes the forward gates instead of storing them;
  that recomputation is NOT counted (only useful work is). H=20, I=2: 10560 FLOP.
* Bytes, forward: the minimum traffic, each tensor read or written once: read x, h, c and write
  h_new, c_new: ``(I + 4H) * itemsize`` (float32: ``4 * (I + 4H)`` = 328 bytes for H=20, I=2).
  Weights (a few KB) are not counted.
* Bytes, forward+backward: forward as above, plus the backward's minimum: read gh, gc, x, h, c and
  write gx, gh_prev, gc_prev: ``(3I + 10H) * itemsize`` in all (float32, H=20, I=2: 824 bytes).

Rates use the median time of the fused op: GFLOP/s = FLOPs * N / time and GB/s = bytes * N / time.
For scale, the same run times a large ``torch.mm`` (``--mm-size``; default 2048 on CPU, 8192 on
CUDA, in the benchmark dtype; on CUDA with PyTorch's default float32 matmul precision, i.e. no TF32
unless enabled) and a large tensor copy (``dst.copy_(src)``: 256 MiB on CPU, 1 GiB on CUDA, counted
as read + write), and reports the fused rates as fractions of those ("%mm", "%copy").

Every row also checks the results: ``err`` is the largest ``max|fused - ref| / max|ref|`` over the
outputs (fwd) or over the six input gradients (fwd+bwd), computed outside the timed region.

Output: an aligned table on stdout, and JSON (``--out``: a file, or a directory for the default
name; default ``bench/results/coord_lstm-<device kind>-<git rev>[-quick].json``, device kind
``cpu`` or ``cuda-<gpu>`` such as ``cuda-h100-80gb-hbm3``, ``-quick`` for ``--quick`` runs) holding
the rows and the machine (CPU / GPU name, torch threads, torch and CUDA versions, git revision with
``-dirty`` when tracked files have uncommitted changes, or the environment variable
``LEARNEDOPT_GIT_REV`` where there is no git), the timestamp, the command line, and the mm / copy
rates.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

try:
    import learnedopt
except ImportError:  # run from a checkout that is not installed: use the checkout's package
    sys.path.insert(0, str(REPO))
    import learnedopt
from learnedopt import reference
from learnedopt._progress import progress

DTYPES = {"float32": torch.float32, "float64": torch.float64}
QUICK_SIZES = [10_000, 100_000]
FULL_SIZES = [10_000, 100_000, 1_000_000]


# ----------------------------------------------------------------------------------------------
# Work model


def flops_per_coord(H: int, I: int, phase: str) -> int:
    fwd = 2 * 4 * H * (I + H)
    return fwd if phase == "fwd" else 3 * fwd


def bytes_per_coord(H: int, I: int, phase: str, itemsize: int) -> int:
    fwd = I + 4 * H  # read x, h, c; write h_new, c_new
    bwd = (I + 4 * H) + (I + 2 * H)  # read gh, gc, x, h, c; write gx, gh, gc
    return (fwd if phase == "fwd" else fwd + bwd) * itemsize


# ----------------------------------------------------------------------------------------------
# Timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, warmup: int, repeat: int, before=None) -> list[float]:
    """Milliseconds of `repeat` calls of fn() after `warmup` untimed ones. `before()` (untimed) runs
    ahead of every call."""
    for _ in range(warmup):
        if before is not None:
            before()
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _stats(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "times_ms": times}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_mm(device: torch.device, n: int, dtype: torch.dtype, warmup: int, repeat: int) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    out = torch.empty(n, n, device=device, dtype=dtype)
    s = _stats(time_calls(lambda: torch.mm(a, b, out=out), device, warmup, repeat))
    flop = 2.0 * n ** 3
    del a, b, out
    _free(device)
    return {"n": n, **s, "gflops": flop / (s["median_ms"] * 1e6), "gflops_best": flop / (s["min_ms"] * 1e6)}


def bench_copy(device: torch.device, nbytes: int, warmup: int, repeat: int) -> dict:
    src = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    s = _stats(time_calls(lambda: dst.copy_(src), device, warmup, repeat))
    moved = 2.0 * src.numel() * 4  # read + write
    del src, dst
    _free(device)
    return {"bytes": nbytes, **s, "gbs": moved / (s["median_ms"] * 1e6), "gbs_best": moved / (s["min_ms"] * 1e6)}


def _max_scaled_diff(got, want) -> float:
    err = 0.0
    for a, b in zip(got, want):
        scale = b.abs().max().item()
        d = (a - b).abs().max().item()
        err = max(err, d / scale if scale > 0 else d)
    return err


def make_inputs(N: int, H: int, I: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """x, h, c, w_ih, w_hh, b with nn.LSTMCell's weight scale, and the output gradients gh, gc."""
    g = torch.Generator(device=device).manual_seed(seed)
    k = H ** -0.5

    def u(*shape, a=1.0):
        return (torch.rand(*shape, device=device, dtype=dtype, generator=g) * 2 - 1) * a

    ins = [u(N, I, a=2.0), u(N, H), u(N, H, a=2.0), u(4 * H, I, a=k), u(4 * H, H, a=k), u(4 * H, a=k)]
    grads = [u(N, H), u(N, H)]
    return ins, grads


def bench_case(device, N, H, I, dtype, warmup, repeat, with_reference=True):
    """The fwd and fwd+bwd rows of one (device, N)."""
    ins, (gh, gc) = make_inputs(N, H, I, dtype, device)
    ops = {"fused": learnedopt.coord_lstm}
    if with_reference:
        ops["reference"] = reference.coord_lstm
    rows = []

    # fwd: inference, no autograd graph.
    res, outs = {}, {}
    for name, op in ops.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            outs[name] = op(*ins)
            res[name] = _stats(time_calls(lambda: op(*ins), device, warmup, repeat))
        if device.type == "cuda":
            res[name]["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        _free(device)
    err = _max_scaled_diff(outs["fused"], outs["reference"]) if with_reference else None
    del outs
    rows.append(_row(device, N, H, I, dtype, "fwd", res, err))
    _free(device)

    # fwd+bwd: all six inputs require grad; backward with (gh, gc).
    leaves = [t.detach().clone().requires_grad_() for t in ins]

    def clear():
        for t in leaves:
            t.grad = None

    def step(op):
        h_new, c_new = op(*leaves)
        torch.autograd.backward([h_new, c_new], [gh, gc])

    res, grads = {}, {}
    for name, op in ops.items():
        clear()
        step(op)
        grads[name] = [t.grad for t in leaves]
        clear()
        _free(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        res[name] = _stats(time_calls(lambda: step(op), device, warmup, repeat, before=clear))
        if device.type == "cuda":
            res[name]["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        clear()
        _free(device)
    err = _max_scaled_diff(grads["fused"], grads["reference"]) if with_reference else None
    del grads, leaves, ins, gh, gc
    rows.append(_row(device, N, H, I, dtype, "fwd+bwd", res, err))
    _free(device)
    return rows


def _row(device, N, H, I, dtype, phase, res, err) -> dict:
    fused = res["fused"]
    ref = res.get("reference")
    itemsize = torch.empty((), dtype=dtype).element_size()
    fl = flops_per_coord(H, I, phase)
    by = bytes_per_coord(H, I, phase, itemsize)
    t = fused["median_ms"]
    return {
        "device": device.type,
        "N": N,
        "H": H,
        "I": I,
        "dtype": str(dtype).replace("torch.", ""),
        "phase": phase,
        "fused_ms": t,
        "fused_min_ms": fused["min_ms"],
        "reference_ms": ref["median_ms"] if ref else None,
        "reference_min_ms": ref["min_ms"] if ref else None,
        "speedup": ref["median_ms"] / t if ref else None,
        "flop_per_coord": fl,
        "bytes_per_coord": by,
        "fused_gflops": fl * N / (t * 1e6),
        "fused_gbs": by * N / (t * 1e6),
        "max_scaled_diff": err,
        "fused_times_ms": fused["times_ms"],
        "reference_times_ms": ref["times_ms"] if ref else None,
        **({"fused_peak_mem_mb": fused["peak_mem_mb"]} if "peak_mem_mb" in fused else {}),
        **({"reference_peak_mem_mb": ref["peak_mem_mb"]} if ref and "peak_mem_mb" in ref else {}),
    }


# ----------------------------------------------------------------------------------------------
# Machine description


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def git_rev() -> str | None:
    """Short HEAD, with "-dirty" when tracked files differ from it; LEARNEDOPT_GIT_REV, or None,
    without git."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        if rev.returncode == 0 and rev.stdout.strip():
            st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True, timeout=30)
            dirty = st.returncode == 0 and st.stdout.strip() != ""
            return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("LEARNEDOPT_GIT_REV") or None


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def matmul_precision() -> str:
    try:
        return str(torch.backends.cuda.matmul.fp32_precision)
    except AttributeError:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def device_kind(gpu_name: str | None) -> str:
    """The device kind of a result file name: "cpu", or "cuda-<gpu>" (such as cuda-h100-80gb-hbm3)
    when a GPU was benchmarked."""
    return "cuda-" + _slug(re.sub(r"(?i)^nvidia\s+", "", gpu_name)) if gpu_name else "cpu"


def write_json(result: dict, out_arg: str | None, fname: str) -> Path:
    """Write result to out_arg (a file; a directory, or a path ending in the separator: fname inside
    it), or to bench/results/fname without out_arg. Returns the path written."""
    out = Path(out_arg) if out_arg else HERE / "results" / fname
    if out_arg and (out.is_dir() or out_arg.endswith(os.sep)):
        out = out / fname
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    return out


# ----------------------------------------------------------------------------------------------
# Table


def _fmt_n(n: int) -> str:
    """1e4 for 10000; plain digits where the exponent form would not be exact."""
    e = len(str(n)) - 1
    return f"{n // 10 ** e}e{e}" if n >= 1000 and n % 10 ** e == 0 else str(n)


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def format_table(rows: list[dict], mm: dict, copy: dict) -> str:
    cols = [
        ("device", "<", lambda r: r["device"]),
        ("N", ">", lambda r: _fmt_n(r["N"])),
        ("H", ">", lambda r: str(r["H"])),
        ("I", ">", lambda r: str(r["I"])),
        ("phase", "<", lambda r: r["phase"]),
        ("fused ms", ">", lambda r: _fmt(r["fused_ms"], ".3f")),
        ("(min)", ">", lambda r: _fmt(r["fused_min_ms"], ".3f")),
        ("ref ms", ">", lambda r: _fmt(r["reference_ms"], ".3f")),
        ("(min)", ">", lambda r: _fmt(r["reference_min_ms"], ".3f")),
        ("speedup", ">", lambda r: _fmt(r["speedup"], ".2f") + "x" if r["speedup"] else "-"),
        ("GFLOP/s", ">", lambda r: _fmt(r["fused_gflops"], ".1f")),
        ("%mm", ">", lambda r: _fmt(100 * r["fused_gflops"] / mm[r["device"]]["gflops"], ".1f")),
        ("B/coord", ">", lambda r: str(r["bytes_per_coord"])),
        ("GB/s", ">", lambda r: _fmt(r["fused_gbs"], ".1f")),
        ("%copy", ">", lambda r: _fmt(100 * r["fused_gbs"] / copy[r["device"]]["gbs"], ".1f")),
        ("err", ">", lambda r: _fmt(r["max_scaled_diff"], ".1e")),
    ]
    return render_table(cols, rows)


def render_table(cols, rows: list[dict]) -> str:
    """Aligned text table: cols is a list of (header, alignment "<" or ">", row -> cell text)."""
    cells = [[c[0] for c in cols]] + [[c[2](r) for c in cols] for r in rows]
    widths = [max(len(row[k]) for row in cells) for k in range(len(cols))]

    def line(row):
        return "  ".join(format(v, f"{cols[k][1]}{widths[k]}") for k, v in enumerate(row)).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# CLI


def _size(s: str) -> int:
    v = float(s)
    if v < 1 or v != int(v):
        raise argparse.ArgumentTypeError(f"not a positive integer size: {s}")
    return int(v)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Time learnedopt.coord_lstm (fused) against learnedopt.reference.coord_lstm, forward and "
                    "forward+backward, on CPU and CUDA. See the module docstring for what is counted.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--sizes", type=_size, nargs="+", default=None,
                   help="numbers of coordinates N (1e5 notation accepted); default 1e4 1e5 1e6, or 1e4 1e5 "
                        "with --quick")
    p.add_argument("--hidden", "-H", type=int, default=20, help="hidden size H")
    p.add_argument("--input", "-I", type=int, default=2, help="input size I")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                   help="all: CPU, and CUDA when learnedopt.ops.cuda_available()")
    p.add_argument("--repeat", type=int, default=None, help="timed calls per case (default 5, 3 with --quick)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    p.add_argument("--quick", action="store_true", help="N = 1e4 1e5 only and --repeat 3 (unless given)")
    p.add_argument("--no-reference", action="store_true", help="time the fused op only")
    p.add_argument("--mm-size", type=int, default=None, help="size n of the n x n torch.mm (default 2048 on "
                                                             "CPU, 8192 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default=None,
                   help="JSON file to write (a directory: the default file name inside it); default "
                        "bench/results/coord_lstm-<device kind>-<git rev>[-quick].json")
    p.add_argument("--no-save", action="store_true", help="print the table only, write no JSON")
    return p


def main(argv=None, prog: str | None = None) -> dict:
    """Run the benchmark with command-line arguments `argv` (default sys.argv[1:]); print the table,
    write the JSON, and return the results dict."""
    args = build_parser(prog).parse_args(argv)
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    repeat = args.repeat or (3 if args.quick else 5)
    if repeat < 1 or args.warmup < 0:
        sys.exit("bench_coord_lstm: --repeat must be >= 1 and --warmup >= 0")
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)

    if not learnedopt.extension_available():
        sys.exit(f"bench_coord_lstm: the compiled extension learnedopt._C is not available "
                 f"({learnedopt.ops._IMPORT_ERROR}); build it first (see README)")
    cuda_ok = learnedopt.ops.cuda_available()
    if args.device == "cuda" and not cuda_ok:
        why = "no GPU is visible" if learnedopt.ops.cuda_built() else "learnedopt._C has no CUDA kernels"
        sys.exit(f"bench_coord_lstm: --device cuda, but {why}")
    devices = {"cpu": ["cpu"], "cuda": ["cuda"], "all": ["cpu"] + (["cuda"] if cuda_ok else [])}[args.device]

    gpu_name = torch.cuda.get_device_name() if "cuda" in devices else None
    info = {
        "cpu": cpu_name(),
        "gpu": gpu_name,
        "num_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_matmul_fp32_precision": matmul_precision() if gpu_name else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_rev": git_rev(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable] + sys.argv),
        "bench_args": list(sys.argv[1:] if argv is None else argv),
        "config": {"sizes": sizes, "H": args.hidden, "I": args.input, "dtype": args.dtype, "repeat": repeat,
                   "warmup": args.warmup, "devices": devices},
    }
    print(f"# learnedopt coord_lstm benchmark  rev {info['git_rev'] or 'unknown'}  torch {torch.__version__}"
          f"  cuda {torch.version.cuda}")
    print(f"# CPU: {info['cpu']}  ({info['num_threads']} torch threads)" + (f"   GPU: {gpu_name}" if gpu_name else ""))
    print(f"# N = {' '.join(_fmt_n(n) for n in sizes)}  H={args.hidden}  I={args.input}  {args.dtype}  "
          f"warmup {args.warmup}  repeat {repeat}  (times: median; min in parentheses)", flush=True)

    mm, copy, rows = {}, {}, []
    for dev_name in devices:
        device = torch.device(dev_name)
        n = args.mm_size or (8192 if dev_name == "cuda" else 2048)
        mm[dev_name] = bench_mm(device, n, dtype, warmup=1, repeat=max(3, repeat))
        copy[dev_name] = bench_copy(device, (1 << 30) if dev_name == "cuda" else (256 << 20), warmup=1,
                                    repeat=max(3, repeat))
        print(f"# {dev_name}: torch.mm {n}x{n} {args.dtype}: {mm[dev_name]['gflops']:.1f} GFLOP/s "
              f"(best {mm[dev_name]['gflops_best']:.1f});  copy {copy[dev_name]['bytes'] >> 20} MiB: "
              f"{copy[dev_name]['gbs']:.1f} GB/s (best {copy[dev_name]['gbs_best']:.1f})", flush=True)
        for N in progress(sizes, desc=f"bench coord_lstm {dev_name}", unit="size"):
            rows += bench_case(device, N, args.hidden, args.input, dtype, args.warmup, repeat,
                               with_reference=not args.no_reference)

    for r in rows:
        r["fused_frac_of_mm"] = r["fused_gflops"] / mm[r["device"]]["gflops"]
        r["fused_frac_of_copy"] = r["fused_gbs"] / copy[r["device"]]["gbs"]
    print()
    print(format_table(rows, mm, copy))
    print("\n# FLOP/coord: fwd 2*4H*(I+H), fwd+bwd 3x that; B/coord: fwd (I+4H)*itemsize, fwd+bwd (3I+10H)*itemsize;"
          "\n# rates from the fused median; err = max|fused-ref|/max|ref| over outputs (fwd) or input grads (fwd+bwd)")

    result = {**info, "mm": mm, "copy": copy,
              "mm_gflops": {d: v["gflops"] for d, v in mm.items()},
              "copy_gbs": {d: v["gbs"] for d, v in copy.items()},
              "rows": rows}
    if not args.no_save:
        fname = f"coord_lstm-{device_kind(gpu_name)}-{info['git_rev'] or 'norev'}"
        fname += "-quick.json" if args.quick else ".json"
        out = write_json(result, args.out, fname)
        print(f"# wrote {out}")
        result["json_path"] = str(out)
    return result


if __name__ == "__main__":
    main()
