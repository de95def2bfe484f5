"""Build of learnedopt and its extension learnedopt._C.

The CPU kernels are always built. The CUDA kernels are built whenever CUDA code can be compiled
(torch was built with CUDA and a CUDA toolkit is found), even on a machine with no GPU, so that CI
compiles and links them. Environment variables:

  LEARNEDOPT_CUDA=0|1        force the CUDA kernels off / on (on: fail if they cannot be built)
  TORCH_CUDA_ARCH_LIST       GPU architectures (default "9.0": Hopper, sm_90)
  CUDA_HOME                  CUDA toolkit root (default: found from nvcc, see find_cuda_home)
  LEARNEDOPT_CPU_ISA=avx2|default
                             SIMD level of the CPU kernels on x86-64 (default avx2, with FMA)
  LEARNEDOPT_DEBUG=1         -O0 -g
  LEARNEDOPT_PTXAS_VERBOSE=1 print registers / spills of every CUDA kernel (-Xptxas -v)
  LEARNEDOPT_CUDA_EMULATION=1
                             also build learnedopt._cuda_emu: the CUDA kernels of csrc/cuda compiled by
                             the host compiler against the CUDA emulation (csrc/cuda/emulation), run on
                             CPU tensors by the tests marked cuda_emu (test infrastructure)
  MAX_JOBS                   parallel compile jobs (ninja)

Install with `pip install --no-build-isolation -e .` (see README): the extension must be built
against the torch it runs with.
"""

import glob
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolkit_root_from_nvcc(nvcc):
    """The toolkit root of an nvcc, even when `nvcc` on PATH is a wrapper script outside it."""
    try:
        out = subprocess.run(
            [nvcc, "-dryrun", "-x", "cu", "-c", "-", "-o", "-"],
            input="", capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(m.group(1).strip()) if m else None


def find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _toolkit_root_from_nvcc(nvcc)
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    for cand in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return os.path.realpath(cand)
    return None


def pip_cuda_include_dirs():
    """Header folders of pip's CUDA packages (nvidia/*/include), for headers the toolkit lacks."""
    dirs = []
    for base in sys.path:
        dirs += glob.glob(os.path.join(base, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    seen, out = set(), []
    for d in dirs:
        d = os.path.realpath(d)
        if d not in seen and os.path.isdir(d):
            seen.add(d)
            out.append(d)
    return out


import torch  # noqa: E402  (after the helpers: CUDA_HOME must be set before cpp_extension loads)

want = os.environ.get("LEARNEDOPT_CUDA", "").strip()
cuda_home = find_cuda_home() if torch.version.cuda else None
if want == "0":
    use_cuda = False
elif want == "1":
    if torch.version.cuda is None:
        sys.exit("LEARNEDOPT_CUDA=1 but this torch (%s) was built without CUDA" % torch.__version__)
    if cuda_home is None:
        sys.exit("LEARNEDOPT_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME")
    use_cuda = True
else:
    use_cuda = torch.version.cuda is not None and cuda_home is not None

if use_cuda:
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

from torch.utils import cpp_extension  # noqa: E402

if use_cuda:
    cpp_extension.CUDA_HOME = cuda_home

debug = os.environ.get("LEARNEDOPT_DEBUG", "0") == "1"
opt = ["-O0", "-g"] if debug else ["-O3"]
# -fopenmp: at::parallel_for is an inline OpenMP loop (torch builds with AT_PARALLEL_OPENMP); without
# it the CPU kernels silently run on one thread. The library resolves to torch's own libgomp.so.1.
cxx_flags = opt + ["-fdiagnostics-color=always", "-Wall", "-Wno-unknown-pragmas", "-fopenmp"]
isa = os.environ.get("LEARNEDOPT_CPU_ISA", "avx2")
if platform.machine() in ("x86_64", "AMD64") and isa == "avx2":
    # at::vec picks its implementation from CPU_CAPABILITY; AVX2 + FMA is on every x86-64 server
    # CPU since 2013. LEARNEDOPT_CPU_ISA=default builds portable (slower) kernels.
    cxx_flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
include_dirs = [os.path.join(ROOT, "csrc")]
sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
define_macros = []
nvcc_flags = opt + ["--expt-relaxed-constexpr", "-lineinfo", "-Xcompiler", "-Wall"]
if os.environ.get("LEARNEDOPT_PTXAS_VERBOSE", "0") == "1":
    nvcc_flags += ["-Xptxas", "-v"]

if use_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    define_macros.append(("LEARNEDOPT_WITH_CUDA", None))
    # Some CUDA toolkits lack library headers (cusparse.h, ...) that torch's CUDA headers include;
    # pip's CUDA packages ship them.
    if not os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        include_dirs += [d for d in pip_cuda_include_dirs() if os.path.exists(os.path.join(d, "cusparse.h"))]
    Extension = cpp_extension.CUDAExtension
    print(f"learnedopt: building CPU and CUDA kernels (CUDA_HOME={cuda_home}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
else:
    Extension = cpp_extension.CppExtension
    print("learnedopt: building CPU kernels only (no CUDA toolkit, a CPU-only torch, or LEARNEDOPT_CUDA=0)")

ext = Extension(
    "learnedopt._C",
    sources,
    include_dirs=include_dirs,
    define_macros=define_macros,
    extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    extra_link_args=["-fopenmp"],
)

ext_modules = [ext]
if os.environ.get("LEARNEDOPT_CUDA_EMULATION", "0") == "1":
    # The .cu files through one wrapper each (*_emu.cpp), the emulation's runtime and its op library.
    # Its include folder comes first: it stands in for c10/cuda and ATen/cuda headers.
    ext_modules.append(cpp_extension.CppExtension(
        "learnedopt._cuda_emu",
        sorted(glob.glob("csrc/cuda/emulation/*.cpp")),
        include_dirs=[os.path.join(ROOT, "csrc", "cuda", "emulation", "include"), os.path.join(ROOT, "csrc")],
        define_macros=[("LEARNEDOPT_CUDA_EMULATION", None)],
        # hidden: the emulated kernels' symbols never meet learnedopt._C's in the process
        extra_compile_args={"cxx": (["-O0", "-g"] if debug else ["-O2"]) + [
            "-fdiagnostics-color=always", "-Wall", "-Wno-unknown-pragmas", "-fvisibility=hidden",
            # the .cu files' `extern __shared__` arrays (thread_local here) need no dynamic initialisation
            "-fno-extern-tls-init",
            # every load and store reaches the emulation's memory checker (memcheck.cpp defines the
            # instrumentation's callbacks itself: no ThreadSanitizer runtime is linked)
            "-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0"]},
    ))
    print("learnedopt: also building the CUDA emulation (learnedopt._cuda_emu)")

setup(
    packages=find_packages(include=["learnedopt", "learnedopt.*"]),
    package_data={"learnedopt.pretrained": ["*.safetensors", "*.json"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
