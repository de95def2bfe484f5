"""The emulated twins of the CUDA test cases: every test parametrised over ``DEVICES`` or
``DEVICE_DTYPES`` (conftest.py) also runs as ``cuda_emu``: on CPU tensors, in the CUDA dtypes, with
every call of a ``learnedopt`` op redirected to the same op of ``learnedopt_emu`` — the CUDA kernels
of csrc/cuda run by the CUDA emulation (csrc/cuda/emulation). The Python layer (wrappers, autograd,
the optimizers) is the one a GPU run goes through; below it the CUDA launchers and kernels run."""

from __future__ import annotations

import importlib.util
import os

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

LIBRARY = os.environ.get("LEARNEDOPT_CUDA_EMU_LIBRARY")  # another build (mutants.py)
if LIBRARY:
    torch.ops.load_library(LIBRARY)
    AVAILABLE = True
else:
    AVAILABLE = importlib.util.find_spec("learnedopt._cuda_emu") is not None
    if AVAILABLE:
        import learnedopt._cuda_emu  # noqa: F401  (registers torch.ops.learnedopt_emu)

# CI builds the emulation (.ci/run): there its tests must run, never skip.
MUST_RUN = os.environ.get("CI") == "true" and os.environ.get("LEARNEDOPT_CUDA_EMULATION") == "1"


class RedirectToEmulation(TorchDispatchMode):
    """Calls of ``torch.ops.learnedopt.<op>`` go to ``torch.ops.learnedopt_emu.<op>`` (same schemas)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # fake tensors (torch.compile, opcheck's fake-tensor test) take the op's own fake kernel
        fake = any(isinstance(t, FakeTensor) for t in pytree.tree_leaves((args, kwargs)))
        if func.namespace == "learnedopt" and not fake:
            target = getattr(getattr(torch.ops.learnedopt_emu, func._opname), func._overloadname)
            return target(*args, **kwargs)
        return func(*args, **kwargs)
