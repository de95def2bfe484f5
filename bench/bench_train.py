#!/usr/bin/env python3
"""End-to-end training-step benchmark: forward, backward and optimizer step of torchvision models,
with Adam and with learnedopt's learned optimizers.

Run it as a script (``python bench/bench_train.py [options]``) or import it and call ``main(argv)``
(which returns the results as a dict). Helpers (timing, machine description, JSON output) come from
``bench_coord_lstm.py`` next to it. Needs torchvision (``pip install torchvision``).

Models (``--models``, default all; 1000 classes, float32, train mode, so BatchNorm uses batch
statistics and updates its running stats):

* ``resnet18``, ``resnet50``: ``torchvision.models.resnet18 / resnet50(weights=None)``
  (11,689,512 and 25,557,032 parameters);
* ``vit``: a small ``torchvision.models.VisionTransformer``: image ``--image-size``, patch
  ``--vit-patch`` (default 8 up to image 64, 16 above: 224 gives ViT-B/16's 196 patches), 6 layers,
  hidden 192, 3 heads, MLP 768, no dropout (about 2.9M parameters at image 64, patch 8).

Each model is built once per run on CPU with ``torch.manual_seed(--seed)``; every optimizer gets a
``copy.deepcopy`` of that initial model (weights and BatchNorm buffers), moved to the device, so all
optimizers start from the same state. The batch is fixed: ``--batch`` images N(0, 1) of
``--image-size`` pixels and random labels in [0, 1000), drawn once per model (seed ``--seed``) and
reused at every step.

Optimizers (``--optimizers``, default all):

* ``adam-foreach``: ``torch.optim.Adam(params, lr=1e-3, foreach=True)``;
* ``adam-fused``: ``torch.optim.Adam(params, lr=1e-3, fused=True)`` (an n/a row with torch's reason
  where fused Adam is not supported);
* ``l2l``: ``learnedopt.L2LOptimizer(params, pretrained="l2l-mnist")`` (lr 1.0);
* ``hier``, ``hier-bf16``: ``learnedopt.HierarchicalOptimizer(params)`` (its default lr 1e-4 and
  shipped weights) with ``state_dtype`` float32 / bfloat16.

The learned optimizers on CUDA need learnedopt's CUDA kernels (n/a rows without). Their weights
were meta-trained on small problems, so the loss of these models may not go down (or may blow up)
under them; the loss of every step is kept in the JSON and its first and last values are in the
table. A parameter whose gradient is not finite is skipped by the learned optimizers, which changes
the cost of their step: rows whose loss became non-finite are flagged.

One training step: ``optimizer.zero_grad(set_to_none=True)``; forward and
``F.cross_entropy(model(x), y)``; ``loss.backward()``; ``optimizer.step()``. ``--warmup`` steps
(default 2, 1 with ``--quick``; at least 1, the first step creates the optimizer state) are timed as
whole steps only (kept in the JSON, not in the statistics), then ``--repeat`` steps (default 5 on
CPU, 10 on CUDA, 2 with ``--quick``) are timed phase by phase: on CPU ``time.perf_counter`` at each
phase boundary; on CUDA ``torch.cuda.synchronize()`` before the step, a CUDA event recorded at each
boundary (nothing synchronizes between phases, so the host may queue the next phase's kernels
while the GPU still runs the last one, as in a real training loop), and a synchronize after the last
event. A phase's time is the time between its two boundaries (on CUDA: GPU time, including any gap
where the GPU waited for the host's launches). The whole step runs from the first boundary (before
``zero_grad``) to the last, so it is the sum of ``zero_grad`` (not in the table), forward
(including the loss), backward and optimizer step.

Reported per (device, model, optimizer), median and min over the timed steps (each phase's median
on its own, so the medians need not add up): the whole step, forward, backward and optimizer step;
``opt %``: the optimizer step's median over the whole step's median; ``opt/fwd``: the optimizer
step's median over the forward's; ``opt x adam``: the optimizer step's median over that of
``adam-fused`` on the same model and device (``adam-foreach`` where fused Adam is n/a; the JSON
says which), and ``step x adam`` the same for the whole step; samples/s: batch / the whole step's
median; ``other``: CPU cores kept busy by other processes during the timed steps (from /proc/stat,
with bench_step.py's helpers; JSON ``other_cores``), or during the whole configuration where the
timed steps took under 0.25 s (``other_cores_config``): on a small machine another busy process
stalls torch's parallel regions, so CPU rows with other > ~0.1 are suspect. For comparison the
footnote quotes PyLO's published figure for its fused VeLO step (about 6-8x a ViT-B/16 forward at
batch 32 on an A100): not measured here.

Image size: ``--image-size``, default 64 on CPU (keeps a CPU run to minutes) and 224 on CUDA.
``--quick``: resnet18 and vit only, batch 8, image 32, warmup 1, repeat 2 (each unless given).

Output: a progress bar on stderr (tqdm; quiet when stderr is not a terminal), a
line per configuration and a Markdown table on stdout; JSON (``--out``: a file, or a directory for
the default name; default ``bench/results/train-<device kind>-<git rev>[-quick].json``, device kind
``cpu`` or ``cuda-<gpu>``) with the rows (every raw time: warm-up steps, and every phase of every
timed step), the machine (CPU / GPU, torch threads, torch, torchvision, CUDA and cuDNN versions,
git revision), the command line and the configuration. The JSON is rewritten after every
configuration (``"complete": false`` until the run ends), so a run that is killed keeps what it
measured. A configuration that raises (out of memory included) gives an error row
(``"error": true``) and the script's exit status 1; the next configuration still runs.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # imported by path or run from elsewhere
    sys.path.insert(0, str(HERE))

import bench_coord_lstm as bcl  # noqa: E402  (also puts the checkout's learnedopt on sys.path if needed)

import learnedopt  # noqa: E402
from learnedopt._progress import progress  # noqa: E402

try:
    import torchvision
except ImportError:  # main() exits with a message
    torchvision = None

try:  # CPU time used by other processes (bench_step's helpers); without them "other" is not measured
    from bench_step import _cpu_busy, _other_cores
except Exception:  # noqa: BLE001
    def _cpu_busy():
        return None

    def _other_cores(start, end, min_s=0.25):
        return None

MODELS = ["resnet18", "resnet50", "vit"]
OPTIMIZERS = ["adam-foreach", "adam-fused", "l2l", "hier", "hier-bf16"]
QUICK_MODELS = ["resnet18", "vit"]
VIT = {"num_layers": 6, "num_heads": 3, "hidden_dim": 192, "mlp_dim": 768}
NUM_CLASSES = 1000
ADAM_LR = 1e-3
L2L_PRETRAINED = "l2l-mnist"
PHASES = ["zero_grad", "forward", "backward", "opt"]
# PyLO (Janson et al., "PyLO: Towards Accessible Learned Optimizers in PyTorch", arXiv:2506.10315):
# their figure, quoted for comparison, not measured here.
PYLO_FIGURE = ("PyLO's published figure (not measured here): its fused VeLO optimizer step takes about 6-8x "
               "the forward pass of a ViT-B/16 at batch 32 on an A100")
OOM = getattr(torch.cuda, "OutOfMemoryError", RuntimeError)


# ----------------------------------------------------------------------------------------------
# Models, data, optimizers


def default_vit_patch(image_size: int) -> int:
    return 8 if image_size <= 64 else 16


def build_model(name: str, image_size: int, vit_patch: int, seed: int) -> torch.nn.Module:
    """The model on CPU, initialised with torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    if name == "resnet18":
        return torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES)
    if name == "resnet50":
        return torchvision.models.resnet50(weights=None, num_classes=NUM_CLASSES)
    if name == "vit":
        return torchvision.models.VisionTransformer(image_size=image_size, patch_size=vit_patch,
                                                    num_classes=NUM_CLASSES, **VIT)
    raise ValueError(f"unknown model {name!r}")


def make_batch(batch: int, image_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, image_size, image_size, generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    return x, y


class NotAvailable(Exception):
    """This optimizer cannot run here (an n/a row, not an error)."""


def make_optimizer(name: str, params: list[torch.Tensor], device: torch.device):
    if name in ("adam-foreach", "adam-fused"):
        kw = {"foreach": True} if name == "adam-foreach" else {"fused": True}
        try:
            return torch.optim.Adam(params, lr=ADAM_LR, **kw)
        except (RuntimeError, ValueError, NotImplementedError) as e:
            raise NotAvailable(f"{type(e).__name__}: {_first_line(e)}") from None
    if not learnedopt.extension_available():
        raise NotAvailable("learnedopt._C is not built")
    if device.type == "cuda" and not learnedopt.ops.cuda_available():
        raise NotAvailable("learnedopt._C has no CUDA kernels")
    if name == "l2l":
        return learnedopt.L2LOptimizer(params, pretrained=L2L_PRETRAINED)
    if name in ("hier", "hier-bf16"):
        return learnedopt.HierarchicalOptimizer(params, state_dtype=torch.bfloat16 if name == "hier-bf16"
                                                else torch.float32)
    raise ValueError(f"unknown optimizer {name!r}")


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:200]


# ----------------------------------------------------------------------------------------------
# Timing


def _stamper(stamps: list[float]):
    return lambda: stamps.append(time.perf_counter())


def timed_steps(model, opt, x, y, device: torch.device, repeat: int) -> tuple[dict, list[float]]:
    """`repeat` training steps, each phase timed (ms): ({phase: [ms, ...], "step": [...]}, losses)."""
    times = {k: [] for k in PHASES + ["step"]}
    losses = []
    cuda = device.type == "cuda"
    for _ in range(repeat):
        if cuda:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(len(PHASES) + 1)]
            torch.cuda.synchronize(device)
            mark = [e.record for e in ev]
        else:
            stamps: list[float] = []
            mark = [_stamper(stamps)] * (len(PHASES) + 1)
        mark[0]()
        opt.zero_grad(set_to_none=True)
        mark[1]()
        loss = F.cross_entropy(model(x), y)
        mark[2]()
        loss.backward()
        mark[3]()
        opt.step()
        mark[4]()
        if cuda:
            ev[-1].synchronize()
            b = [0.0] + [ev[0].elapsed_time(e) for e in ev[1:]]
        else:
            b = [(t - stamps[0]) * 1e3 for t in stamps]
        for k, phase in enumerate(PHASES):
            times[phase].append(b[k + 1] - b[k])
        times["step"].append(b[-1])
        losses.append(loss.item())
    return times, losses


def run_config(base: torch.nn.Module, opt_name: str, x, y, device: torch.device, warmup: int, repeat: int) -> dict:
    """Time one (model, optimizer) on device: warm-up whole steps, then phase-timed steps."""
    model = copy.deepcopy(base).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(opt_name, params, device)
    x, y = x.to(device), y.to(device)
    warm_losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        warm_losses.append(loss.detach())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warm = bcl.time_calls(step, device, 0, warmup)
    busy0 = _cpu_busy()
    times, losses = timed_steps(model, opt, x, y, device, repeat)
    res = {"times_ms": times, "warmup_times_ms": warm, "other_cores": _other_cores(busy0, _cpu_busy()),
           "losses": [float(v) for v in warm_losses] + losses}
    if device.type == "cuda":
        res["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return res


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Rows


def make_row(device, model_name, n_params, n_tensors, batch, image_size, opt_name, res, other_config) -> dict:
    row = {"device": device.type, "model": model_name, "n_params": n_params, "n_tensors": n_tensors,
           "batch": batch, "image_size": image_size, "optimizer": opt_name, "na": res.get("na"),
           "error": res.get("error", False), "other_cores": res.get("other_cores"),
           "other_cores_config": other_config}
    if "times_ms" in res:
        t = res["times_ms"]
        for k in ["step"] + PHASES:
            s = bcl._stats(t[k])
            row[f"{k}_ms"], row[f"{k}_min_ms"] = s["median_ms"], s["min_ms"]
        row["phase_sum_ms"] = bcl._stats([sum(v) for v in zip(*(t[p] for p in PHASES))])["median_ms"]
        row["opt_share"] = row["opt_ms"] / row["step_ms"]
        row["opt_over_fwd"] = row["opt_ms"] / row["forward_ms"]
        row["samples_per_s"] = batch / (row["step_ms"] * 1e-3)
        losses = res["losses"]
        row["loss_first"], row["loss_last"] = losses[0], losses[-1]
        row["loss_finite"] = all(math.isfinite(v) for v in losses)
        row.update(warmup=len(res["warmup_times_ms"]), repeat=len(t["step"]), times_ms=t,
                   warmup_times_ms=res["warmup_times_ms"], losses=losses)
        if "peak_mem_mb" in res:
            row["peak_mem_mb"] = res["peak_mem_mb"]
    else:
        for k in ["step"] + PHASES:
            row[f"{k}_ms"] = row[f"{k}_min_ms"] = None
        row.update(phase_sum_ms=None, opt_share=None, opt_over_fwd=None, samples_per_s=None)
    row.update(adam_baseline=None, opt_x_adam=None, step_x_adam=None)
    return row


def add_adam_ratios(rows: list[dict]) -> None:
    """opt_x_adam / step_x_adam against adam-fused (adam-foreach where fused is n/a) of the same
    (device, model)."""
    for r in rows:
        if r["opt_ms"] is None:
            continue
        same = {q["optimizer"]: q for q in rows
                if q["device"] == r["device"] and q["model"] == r["model"] and q["opt_ms"] is not None}
        base = same.get("adam-fused") or same.get("adam-foreach")
        if base is not None:
            r["adam_baseline"] = base["optimizer"]
            r["opt_x_adam"] = r["opt_ms"] / base["opt_ms"]
            r["step_x_adam"] = r["step_ms"] / base["step_ms"]


# ----------------------------------------------------------------------------------------------
# Table


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 0.1 else f"{v:.3f}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x" if v < 100 else f"{v:.0f}x"


def _params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def _loss(r) -> str:
    if r.get("loss_first") is None:
        return "-"
    return f"{r['loss_first']:.3g} -> {r['loss_last']:.3g}" + ("" if r["loss_finite"] else " (non-finite)")


def _status(r, v) -> str:
    if r["error"]:
        return "error"
    if r["na"]:
        return "n/a"
    return _ms(v)


COLUMNS = [
    ("device", "<", lambda r: r["device"]),
    ("model", "<", lambda r: r["model"]),
    ("params", ">", lambda r: _params(r["n_params"])),
    ("batch", ">", lambda r: str(r["batch"])),
    ("image", ">", lambda r: str(r["image_size"])),
    ("optimizer", "<", lambda r: r["optimizer"]),
    ("step ms", ">", lambda r: _status(r, r["step_ms"])),
    ("(min)", ">", lambda r: _ms(r["step_min_ms"])),
    ("fwd ms", ">", lambda r: _ms(r["forward_ms"])),
    ("bwd ms", ">", lambda r: _ms(r["backward_ms"])),
    ("opt ms", ">", lambda r: _ms(r["opt_ms"])),
    ("(min)", ">", lambda r: _ms(r["opt_min_ms"])),
    ("opt %", ">", lambda r: "-" if r["opt_share"] is None else f"{100 * r['opt_share']:.1f}"),
    ("opt/fwd", ">", lambda r: _x(r["opt_over_fwd"])),
    ("opt x adam", ">", lambda r: _x(r["opt_x_adam"])),
    ("step x adam", ">", lambda r: _x(r["step_x_adam"])),
    ("samples/s", ">", lambda r: "-" if r["samples_per_s"] is None else f"{r['samples_per_s']:.1f}"),
    ("other", ">", lambda r: bcl._fmt(r["other_cores_config"] if r["other_cores"] is None else r["other_cores"],
                                      ".2f")),
    ("loss first -> last", "<", _loss),
]


def markdown_table(cols, rows: list[dict]) -> str:
    """A Markdown table with padded cells: cols is a list of (header, "<" or ">", row -> text)."""
    cells = [[c[0] for c in cols]] + [[c[2](r) for c in cols] for r in rows]
    widths = [max(3, max(len(row[k]) for row in cells)) for k in range(len(cols))]

    def line(row):
        return "| " + " | ".join(format(v, f"{cols[k][1]}{widths[k]}") for k, v in enumerate(row)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if c[1] == ">" else ("-" * (w + 2))
                          for c, w in zip(cols, widths)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def footnotes(rows: list[dict]) -> str:
    out = [
        "# median over the timed steps (min in parentheses); fwd = forward + cross-entropy, bwd = loss.backward(),",
        "# opt = optimizer.step(); step = zero_grad + fwd + bwd + opt, timed as a whole (each median on its own);",
        "# opt % = opt / step; opt/fwd = opt / fwd; opt x adam, step x adam: over adam-fused's on the same model",
        "# and device (adam-foreach's where fused is n/a); samples/s = batch / step; other: CPU cores busy with",
        "# other processes during the timed steps (the whole configuration's where those took under 0.25 s);",
        "# > 0.1: CPU timings suspect.",
        f"# For comparison, {PYLO_FIGURE}.",
    ]
    for r in rows:
        if r["na"]:
            out.append(f"# {'error' if r['error'] else 'n/a'}: {r['device']} {r['model']} {r['optimizer']}: {r['na']}")
        elif r["opt_x_adam"] is not None and r["adam_baseline"] != "adam-fused" and r["optimizer"] != "adam-foreach":
            out.append(f"# {r['device']} {r['model']} {r['optimizer']}: x adam against {r['adam_baseline']}")
        if r.get("loss_finite") is False:
            out.append(f"# {r['device']} {r['model']} {r['optimizer']}: the loss became non-finite (the learned "
                       "optimizers skip parameters with non-finite gradients, so their step cost changes)")
    return "\n".join(out)


def _progress_line(r: dict) -> str:
    head = f"# {r['device']} {r['model']} {r['optimizer']}: "
    if r["na"]:
        return head + ("error: " if r["error"] else "n/a: ") + r["na"]
    o = r["other_cores_config"] if r["other_cores"] is None else r["other_cores"]
    return head + (f"step {r['step_ms']:.2f} ms (fwd {r['forward_ms']:.2f}, bwd {r['backward_ms']:.2f}, "
                   f"opt {r['opt_ms']:.2f}), loss {r['loss_first']:.3g} -> {r['loss_last']:.3g}"
                   + ("" if o is None else f"  (other processes: {o:.2f} cores)"))


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


# ----------------------------------------------------------------------------------------------
# CLI


def _positive(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {s}")
    return v


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Time whole training steps (forward, backward, optimizer step) of torchvision ResNet-18, "
                    "ResNet-50 and a small ViT with Adam and learnedopt's learned optimizers. See the module "
                    "docstring for what is timed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--models", nargs="+", choices=MODELS, default=None,
                   help="models, run in this order: resnet18 resnet50 vit (default all; resnet18 vit with --quick)")
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=OPTIMIZERS, help="optimizers")
    p.add_argument("--batch", type=_positive, default=None, help="batch size (default 32, 8 with --quick)")
    p.add_argument("--image-size", type=_positive, default=None,
                   help="image side in pixels (default 64 on CPU, 224 on CUDA; 32 with --quick)")
    p.add_argument("--vit-patch", type=_positive, default=None,
                   help="ViT patch size (default 8 for images up to 64 pixels, 16 above)")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default=None,
                   help="default: cuda when a GPU is visible, else cpu; all: CUDA (when visible) then CPU")
    p.add_argument("--warmup", type=_positive, default=None,
                   help="untimed warm-up steps, at least 1 (default 2, 1 with --quick)")
    p.add_argument("--repeat", type=_positive, default=None,
                   help="timed steps (default 5 on CPU, 10 on CUDA, 2 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="resnet18 and vit, batch 8, image 32, warmup 1, repeat 2 (each unless given)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model initialisation and the batch")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default=None,
                   help="JSON file to write (a directory: the default file name inside it); default "
                        "bench/results/train-<device kind>-<git rev>[-quick].json")
    p.add_argument("--no-save", action="store_true", help="print the table only, write no JSON")
    return p


def main(argv=None, prog: str | None = None) -> dict:
    """Run the benchmark with command-line arguments `argv` (default sys.argv[1:]); print the table,
    write the JSON, and return the results dict."""
    args = build_parser(prog).parse_args(argv)
    if torchvision is None:
        sys.exit("bench_train: needs torchvision (pip install torchvision)")
    models = [m for m in MODELS if m in (args.models or (QUICK_MODELS if args.quick else MODELS))]
    opt_names = [o for o in OPTIMIZERS if o in args.optimizers]
    batch = args.batch or (8 if args.quick else 32)
    warmup = args.warmup or (1 if args.quick else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available()
    dev_arg = args.device or ("cuda" if gpu else "cpu")
    if dev_arg == "cuda" and not gpu:
        sys.exit("bench_train: --device cuda, but no GPU is visible")
    devices = {"cpu": ["cpu"], "cuda": ["cuda"], "all": (["cuda"] if gpu else []) + ["cpu"]}[dev_arg]

    def image_size(dev):
        return args.image_size or (32 if args.quick else 224 if dev == "cuda" else 64)

    def repeat(dev):
        return args.repeat or (2 if args.quick else 10 if dev == "cuda" else 5)

    gpu_name = torch.cuda.get_device_name() if "cuda" in devices else None
    cfg_dev = {d: {"image_size": image_size(d), "vit_patch": args.vit_patch or default_vit_patch(image_size(d)),
                   "repeat": repeat(d)} for d in devices}
    info = {
        "benchmark": "train",
        "cpu": bcl.cpu_name(),
        "gpu": gpu_name,
        "num_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if gpu_name else None,
        "cuda_matmul_fp32_precision": bcl.matmul_precision() if gpu_name else None,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32 if gpu_name else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark if gpu_name else None,
        "learnedopt_cuda_kernels": learnedopt.ops.cuda_available() if gpu_name else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_rev": bcl.git_rev(),
        "loadavg_start": _loadavg(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable] + sys.argv),
        "bench_args": list(sys.argv[1:] if argv is None else argv),
        "config": {"models": models, "optimizers": opt_names, "batch": batch, "warmup": warmup, "devices": devices,
                   "per_device": cfg_dev, "seed": args.seed, "quick": args.quick, "num_classes": NUM_CLASSES,
                   "vit": VIT, "adam_lr": ADAM_LR, "l2l_pretrained": L2L_PRETRAINED,
                   "hier": "HierarchicalOptimizer defaults (lr 1e-4, shipped weights)"},
        "pylo_reference": PYLO_FIGURE,
    }
    print(f"# learnedopt training-step benchmark  rev {info['git_rev'] or 'unknown'}  torch {torch.__version__}  "
          f"torchvision {torchvision.__version__}  cuda {torch.version.cuda}")
    print(f"# CPU: {info['cpu']}  ({info['num_threads']} torch threads, load average {info['loadavg_start']})"
          + (f"   GPU: {gpu_name}" if gpu_name else ""))
    for d, c in cfg_dev.items():
        print(f"# {d}: models {' '.join(models)}  batch {batch}  image {c['image_size']}  ViT patch {c['vit_patch']}  "
              f"warmup {warmup}  repeat {c['repeat']}  optimizers {' '.join(opt_names)}")
    sys.stdout.flush()

    fname = f"train-{bcl.device_kind(gpu_name)}-{info['git_rev'] or 'norev'}"
    fname += "-quick.json" if args.quick else ".json"
    out_path = None
    rows: list[dict] = []

    def save(complete: bool) -> dict:
        nonlocal out_path
        add_adam_ratios(rows)
        res = {**info, "loadavg_end": _loadavg() if complete else None, "complete": complete,
               "elapsed_s": round(time.perf_counter() - t_start, 1), "rows": rows}
        if not args.no_save:
            out_path = bcl.write_json(res, args.out, fname)
        return res

    configs = [(d, m, o) for d in devices for m in models for o in opt_names]
    bar = progress(total=len(configs), desc="bench_train", unit="config")
    say = bar.write
    t_start = time.perf_counter()
    for dev_name in devices:
        device = torch.device(dev_name)
        c = cfg_dev[dev_name]
        for model_name in models:
            base = x = y = None
            build_err = None
            try:
                base = build_model(model_name, c["image_size"], c["vit_patch"], args.seed).train()
                x, y = make_batch(batch, c["image_size"], args.seed)
                params = [p for p in base.parameters() if p.requires_grad]
                n_params, n_tensors = sum(p.numel() for p in params), len(params)
                params = None
            except Exception as e:  # noqa: BLE001  (a bad configuration, e.g. image not divisible by patch)
                build_err = f"building the model: {type(e).__name__}: {_first_line(e)}"
                n_params = n_tensors = 0
            for opt_name in opt_names:
                bar.set_postfix_str(f"{dev_name} {model_name} {opt_name}")
                busy0 = _cpu_busy()
                if build_err is not None:
                    res = {"na": build_err, "error": True}
                else:
                    try:
                        res = run_config(base, opt_name, x, y, device, warmup, c["repeat"])
                    except NotAvailable as e:
                        res = {"na": str(e)}
                    except OOM as e:
                        res = {"na": f"out of memory: {_first_line(e)}", "error": True}
                    except Exception as e:  # noqa: BLE001  (any failure becomes an error row)
                        res = {"na": f"{type(e).__name__}: {_first_line(e)}", "error": True}
                _free(device)
                row = make_row(device, model_name, n_params, n_tensors, batch, c["image_size"], opt_name, res,
                               _other_cores(busy0, _cpu_busy()))
                rows.append(row)
                say(_progress_line(row))
                sys.stdout.flush()
                save(complete=False)
                bar.update(1)
            base = x = y = None
            _free(device)
    bar.close()

    res = save(complete=True)
    print()
    print(markdown_table(COLUMNS, rows))
    print()
    print(footnotes(rows))
    print(f"# load average at the end: {res['loadavg_end']};  {res['elapsed_s']:.0f} s")
    if out_path is not None:
        print(f"# wrote {out_path}")
        res["json_path"] = str(out_path)
    return res


if __name__ == "__main__":
    sys.exit(1 if any(r["error"] for r in main()["rows"]) else 0)
