#!/usr/bin/env python3
"""Registers, spills and shared memory of every CUDA kernel for sm_90, from ptxas (``nvcc
--resource-usage``), as the CUDA emulation checks them at every launch: registers x threads of the
block within an SM's 65,536, static + dynamic shared memory within the block limits.

    python csrc/cuda/emulation/resources.py [--out FILE] [--markdown]

Compiles each csrc/cuda/*.cu for sm_90 with the build's flags (a CUDA toolkit is needed, not a GPU;
about a minute per file on two cores) and writes JSON (default: csrc/cuda/emulation/resources.json,
which the emulated tests read; LEARNEDOPT_CUDA_RESOURCES=FILE makes them read another):
``{"nvcc": version, "kernels": {kernel name: {"registers", "spill_stores", "spill_loads",
"stack", "static_smem", "max_threads", "instances"}}}`` — per kernel the largest value over its
template instances (the emulator knows a launch's kernel by name, not by instance), and for
``max_threads`` (the kernel's ``__launch_bounds__``: PTX ``.maxntid``; 0 where it has none) the
smallest — and, with ``--markdown``, prints the per-instance table for the docs.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_OUT = Path(__file__).resolve().parent / "resources.json"
FLAGS = ["-O3", "--expt-relaxed-constexpr", "-std=c++20", "-gencode=arch=compute_90,code=sm_90",
         "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
         "-D__CUDA_NO_HALF2_OPERATORS__", "-DLEARNEDOPT_WITH_CUDA", "--resource-usage", "-Xcompiler", "-fPIC"]


def nvcc_path() -> str:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.exists(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.path.join(os.environ[var], "bin", "nvcc")
    found = shutil.which("nvcc")
    if not found:
        sys.exit("resources.py: no nvcc (set CUDA_HOME)")
    return found


def include_dirs() -> list[str]:
    from torch.utils import cpp_extension

    dirs = [str(ROOT / "csrc")] + cpp_extension.include_paths()
    dirs += [sysconfig.get_paths()["include"]]
    for base in sys.path:  # pip's CUDA packages ship headers some toolkits lack (cusparse.h)
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    return dirs


LINE_FN = re.compile(r"ptxas info\s*: (?:Compiling entry function|Function properties for) '([^']+)'")
LINE_USED = re.compile(r"ptxas info\s*: Used (\d+) registers")
LINE_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
LINE_SMEM = re.compile(r"(\d+) bytes smem")


def demangle(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def parse(text: str) -> dict[str, dict]:
    """Per mangled kernel name: registers, spills, stack, static shared memory (global entry points)."""
    res: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        m = LINE_FN.search(line)
        if m:
            current = m.group(1)
            res.setdefault(current, {"registers": 0, "spill_stores": 0, "spill_loads": 0, "stack": 0, "static_smem": 0})
            continue
        if current is None:
            continue
        m = LINE_SPILL.search(line)
        if m:
            res[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = LINE_USED.search(line)
        if m:
            res[current]["registers"] = int(m.group(1))
            s = LINE_SMEM.search(line)
            if s:
                res[current]["static_smem"] = int(s.group(1))
    return res


PTX_ENTRY = re.compile(r"\.entry\s+([\w$]+)\s*\(")
PTX_MAXNTID = re.compile(r"\.maxntid\s+(\d+)\s*,\s*(\d+)\s*,\s*(\d+)")


def parse_ptx(text: str) -> dict[str, int]:
    """Per mangled entry name: the threads per block its ``.maxntid`` allows (0: no bound)."""
    bounds: dict[str, int] = {}
    matches = list(PTX_ENTRY.finditer(text))
    for i, m in enumerate(matches):
        # the directives of an entry stand between its parameter list and its body's first "{"
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        head = text[m.end():end].split("{", 1)[0]
        n = PTX_MAXNTID.search(head)
        bounds[m.group(1)] = int(n.group(1)) * int(n.group(2)) * int(n.group(3)) if n else 0
    return bounds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--markdown", action="store_true", help="print the per-instance table")
    a = ap.parse_args(argv)
    nvcc = nvcc_path()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    incs = [f"-I{d}" for d in include_dirs()]
    instances: list[tuple[str, str, dict]] = []  # (file, demangled, values)
    with tempfile.TemporaryDirectory() as tmp:
        for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
            keep = os.path.join(tmp, cu.stem)
            os.makedirs(keep)
            cmd = [nvcc, "-c", str(cu), "-o", os.path.join(tmp, cu.stem + ".o"), "--keep", "--keep-dir", keep] + FLAGS + incs
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                sys.stderr.write(r.stdout + r.stderr)
                return 1
            found = parse(r.stdout + r.stderr)
            ptx = glob.glob(os.path.join(keep, "*.ptx"))
            if not ptx:
                sys.stderr.write(f"resources.py: nvcc --keep left no PTX for {cu.name}\n")
                return 1
            bounds = parse_ptx("".join(Path(f).read_text() for f in ptx))
            for name, d in found.items():
                d["max_threads"] = bounds.get(name, 0)
            entries = {k: v for k, v in found.items() if k.startswith("_Z") or "kernel" in k}
            for name, d in zip(demangle(list(entries)), entries.values()):
                if "_kernel" in name:
                    instances.append((cu.name, name, d))
    kernels: dict[str, dict] = {}
    for _, name, d in instances:
        base = re.search(r"(\w+_kernel)", name).group(1)
        k = kernels.setdefault(base, {"registers": 0, "spill_stores": 0, "spill_loads": 0, "stack": 0,
                                      "static_smem": 0, "max_threads": d["max_threads"], "instances": 0})
        for key in ("registers", "spill_stores", "spill_loads", "stack", "static_smem"):
            k[key] = max(k[key], d[key])
        if d["max_threads"] and (not k["max_threads"] or d["max_threads"] < k["max_threads"]):
            k["max_threads"] = d["max_threads"]
        k["instances"] += 1
    Path(a.out).write_text(json.dumps({"nvcc": version, "arch": "sm_90", "kernels": kernels}, indent=1,
                                      sort_keys=True) + "\n")
    print(f"resources.py: {len(instances)} kernel instances of {len(kernels)} kernels ({version}) -> {a.out}")
    if a.markdown:
        print("| file | kernel instance | registers | spill stores / loads (B) | stack (B) | static smem (B) | "
              "launch bound |")
        print("|---|---|---|---|---|---|---|")
        for f, name, d in instances:
            short = re.sub(r"learnedopt::\(anonymous namespace\)::", "", name)
            short = re.sub(r"\(.*\)$", "", short)
            print(f"| {f} | `{short}` | {d['registers']} | {d['spill_stores']} / {d['spill_loads']} | {d['stack']} | "
                  f"{d['static_smem']} | {d['max_threads'] or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
