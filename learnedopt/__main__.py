"""Command line of learnedopt: ``python -m learnedopt <command> [args]``.

Commands:
  bench [args]   time the fused coord_lstm op against the pure-PyTorch reference
                 (bench/bench_coord_lstm.py of the source checkout; needs an editable install).
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
"""

BENCH_NOTE = (
    f"'{PROG} bench' adds --quick unless --sizes or --full is given; "
    "--sizes 1e4 1e5 1e6 (or --full) gives the full table."
)


def bench_script() -> Path:
    """bench/bench_coord_lstm.py of the checkout this package was imported from."""
    return Path(__file__).resolve().parent.parent / "bench" / "bench_coord_lstm.py"


def load_bench():
    path = bench_script()
    if not path.is_file():
        sys.stderr.write(
            f"{PROG} bench: the benchmark script is not installed with the package (looked for {path}).\n"
            "It ships with the source repository only: run it from a checkout, installed editable\n"
            "(`pip install --no-build-isolation -e .`), or as `python bench/bench_coord_lstm.py` there.\n"
        )
        return None
    spec = importlib.util.spec_from_file_location("learnedopt_bench_coord_lstm", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(BENCH_NOTE + "\n")
    full = "--full" in args
    args = [a for a in args if a != "--full"]
    if not full and not any(a == "--sizes" or a.startswith("--sizes=") for a in args) and "--quick" not in args:
        args = ["--quick"] + args
    mod = load_bench()
    if mod is None:
        return 2
    mod.main(args, prog=f"{PROG} bench")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "bench":
        return bench(rest)
    sys.stderr.write(f"{PROG}: unknown command {cmd!r}\n\n{USAGE}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
