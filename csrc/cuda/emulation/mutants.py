#!/usr/bin/env python3
"""Do the emulated CUDA tests catch a missing barrier? For each file of csrc/cuda, builds the CUDA
emulation from a copy of csrc/ in which every ``__syncthreads();`` statement of that file is deleted,
and runs tests/test_cuda_emu.py against it (LEARNEDOPT_CUDA_EMU_LIBRARY). A file whose mutant passes
the tests means the tests cannot see its barriers: the script then exits 1.

    python csrc/cuda/emulation/mutants.py [--files coord_lstm_cuda.cu ...] [--each] [--keep DIR]

About 25 s per mutant on two cores (one emulation build and the emulated tests). Prints one line
per mutant: barriers deleted, tests failed / run. ``--each`` deletes one barrier at a time instead
(one mutant per barrier).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
BARRIER = re.compile(r"^\s*__syncthreads\(\);\s*(//.*)?$")


def build(csrc: Path, out: Path, name: str) -> Path:
    from torch.utils import cpp_extension

    emu = csrc / "cuda" / "emulation"
    sources = [str(p) for p in sorted(emu.glob("*.cpp"))]
    cpp_extension.load(
        name=name, sources=sources, build_directory=str(out), verbose=False, is_python_module=False,
        extra_include_paths=[str(emu / "include"), str(csrc)],
        # setup.py's flags of learnedopt._cuda_emu, the memory checker's instrumentation included (without
        # it the checker's own tests fail on every mutant, which would pass for a caught barrier)
        extra_cflags=["-O1", "-DLEARNEDOPT_CUDA_EMULATION", "-fvisibility=hidden", "-fno-extern-tls-init",
                      "-Wno-unknown-pragmas", "-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0"])
    import torch

    if not torch.ops.learnedopt_emu.memcheck_instrumented():
        sys.exit(f"mutants.py: {name} was built without the memory checker's instrumentation")
    return out / f"{name}.so"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", nargs="*", default=None, help="files of csrc/cuda (default: every .cu)")
    ap.add_argument("--keep", default=None, help="build in this folder and keep it")
    ap.add_argument("--each", action="store_true", help="one mutant per barrier instead of one per file")
    ap.add_argument("--build", nargs=2, metavar=("TREE", "NAME"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.build:
        build(Path(a.build[0]) / "csrc", Path(a.build[0]) / "build", a.build[1])
        return 0
    files = a.files or sorted(p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    work = Path(a.keep or tempfile.mkdtemp(prefix="learnedopt-mutants-"))
    status = 0
    mutants = []  # (file, line numbers of the barriers to delete)
    for f in files:
        lines = (ROOT / "csrc" / "cuda" / f).read_text().splitlines()
        barriers = [i for i, ln in enumerate(lines) if BARRIER.match(ln)]
        mutants += [(f, [i]) for i in barriers] if a.each else [(f, barriers)]
    for f, drop in mutants:
        label = f + ("" if not a.each else f":{drop[0] + 1}")
        tree = work / label.replace(".", "_").replace(":", "_")
        if tree.exists():
            shutil.rmtree(tree)
        shutil.copytree(ROOT / "csrc", tree / "csrc")
        target = tree / "csrc" / "cuda" / f
        lines = target.read_text().splitlines(keepends=True)
        target.write_text("".join(ln for i, ln in enumerate(lines) if i not in drop))
        (tree / "build").mkdir()
        name = "cuda_emu_mutant_" + tree.name
        # built in a child process: building loads the library, and a process registers the
        # learnedopt_emu ops once
        subprocess.run([sys.executable, __file__, "--build", str(tree), name], check=True)
        lib = tree / "build" / f"{name}.so"
        env = {**os.environ, "LEARNEDOPT_CUDA_EMU_LIBRARY": str(lib)}
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-header", "-rN",
                              str(ROOT / "tests" / "test_cuda_emu.py")], cwd=ROOT, env=env, capture_output=True,
                             text=True)
        summary = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr[-300:]
        caught = res.returncode != 0 and "failed" in summary
        print(f"{label}: {len(drop)} __syncthreads(); deleted -> {summary}  [{'caught' if caught else 'NOT CAUGHT'}]",
              flush=True)
        if not caught or not drop:
            status = 1
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
