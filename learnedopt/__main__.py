"""Command line of learnedopt: ``python -m learnedopt <command> [args]``.

Commands:
  bench [args]        time the fused coord_lstm op against the pure-PyTorch reference
                      (bench/bench_coord_lstm.py of the source checkout; needs an editable install).
  bench-step [args]   time one optimizer step: L2LOptimizer (fused), its reference, torch.optim.Adam
                      (bench/bench_step.py of the source checkout; needs an editable install).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PROG = "python -m learnedopt"

USAGE = f"""\
usage: {PROG} <command> [args]

commands:
  bench [args]   time learnedopt.coord_lstm (fused) against learnedopt.reference.coord_lstm,
                 forward and forward+backward, on CPU and on CUDA when available; prints a table
                 and writes JSON under bench/results/.
                 With no size option it runs the quick configuration (N = 1e4 1e5, 3 repeats; well
                 under a minute on CPU). `--sizes 1e4 1e5 1e6` (or `--full`) gives the full table.
                 `{PROG} bench --help` lists every option.
  bench-step [args]
                 time one optimizer step per parameter element: learnedopt.L2LOptimizer (the fused
                 l2l_step_), learnedopt.reference.l2l_step_, and torch.optim.Adam (foreach, fused),
                 on CPU and on CUDA when available; prints a table and writes JSON under bench/results/.
                 With no size option it runs the quick configuration (1e4 1e5 1e6 elements, no model
                 shapes; about a minute on CPU). `--full` gives the full table (1e4 .. 3e7 elements and
                 the ResNet-50 / Inception-V3 shapes; many minutes on CPU).
                 `{PROG} bench-step --help` lists every option.
"""

# command -> (benchmark script in bench/, what the full configuration is)
BENCHMARKS = {
    "bench": ("bench_coord_lstm.py", "--sizes 1e4 1e5 1e6 (or --full) gives the full table."),
    "bench-step": ("bench_step.py", "--full gives the full table (sizes 1e4 .. 3e7 and the two models)."),
}


def bench_script(name: str = "bench_coord_lstm.py") -> Path:
    """bench/<name> of the checkout this package was imported from."""
    return Path(__file__).resolve().parent.parent / "bench" / name


def load_bench(cmd: str = "bench"):
    name = BENCHMARKS[cmd][0]
    path = bench_script(name)
    if not path.is_file():
        sys.stderr.write(
            f"{PROG} {cmd}: the benchmark script is not installed with the package (looked for {path}).\n"
            "It ships with the source repository only: run it from a checkout, installed editable\n"
            f"(`pip install --no-build-isolation -e .`), or as `python bench/{name}` there.\n"
        )
        return None
    spec = importlib.util.spec_from_file_location("learnedopt_" + path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench(args: list[str], cmd: str = "bench") -> int:
    if any(a in ("-h", "--help") for a in args):
        print(f"'{PROG} {cmd}' adds --quick unless --sizes or --full is given; {BENCHMARKS[cmd][1]}\n")
    full = "--full" in args
    args = [a for a in args if a != "--full"]
    if not full and not any(a == "--sizes" or a.startswith("--sizes=") for a in args) and "--quick" not in args:
        args = ["--quick"] + args
    mod = load_bench(cmd)
    if mod is None:
        return 2
    res = mod.main(args, prog=f"{PROG} {cmd}")
    return 1 if any(r.get("error") for r in res.get("rows", [])) else 0  # bench-step: an implementation failed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in BENCHMARKS:
        return bench(rest, cmd)
    sys.stderr.write(f"{PROG}: unknown command {cmd!r}\n\n{USAGE}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
