"""Hypothesis strategies and profiles of the property-based robustness suite (tests/test_robustness.py).

Profiles (``LEARNEDOPT_HYPOTHESIS_PROFILE``):

* ``ci`` (the default): derandomised (the same examples on every run), 12 examples per property, no
  example database, no deadline, no shrinking (a failure shows the example as drawn): a few minutes
  on 2 cores for the whole suite;
* ``long``: 300 random examples per property (a new draw each run; failures are shrunk, kept in
  ``.hypothesis/`` and replayed first): ``LEARNEDOPT_HYPOTHESIS_PROFILE=long python -m pytest
  tests/test_robustness.py``.
"""

from __future__ import annotations

import math
import os

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                        HealthCheck.function_scoped_fixture])
# ci: no shrinking (on 2 cores it can take many minutes); the failing example is printed as drawn
settings.register_profile("ci", max_examples=12, derandomize=True, database=None, print_blob=True,
                          phases=[Phase.explicit, Phase.generate], **_COMMON)
settings.register_profile("long", max_examples=300, print_blob=True, **_COMMON)
PROFILE = os.environ.get("LEARNEDOPT_HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)

F32_MAX = torch.finfo(torch.float32).max
F32_TINY = 2.0 ** -149  # the smallest float32 subnormal, ~1.4e-45

# Tensor shapes: empty, one element, odd sizes, a few larger ones (kept cheap: the reference and the
# emulated kernels run on them too).
shapes = st.one_of(
    st.just((0,)), st.just((1,)), st.just((3, 0)),
    st.tuples(st.integers(1, 40)),
    st.tuples(st.integers(1, 9), st.integers(1, 13)),
    st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 7)),
    st.just((1100,)),  # more than one work item of the CPU kernel (1024 coordinates)
)


@st.composite
def magnitudes(draw) -> float:
    """A gradient element's magnitude, log-uniform over [1.4e-45, 3.4e38], or an exact zero, or an
    edge value (the smallest subnormal, the smallest normal, the float32 maximum)."""
    kind = draw(st.sampled_from(["log", "log", "log", "zero", "edge"]))
    if kind == "zero":
        return 0.0
    if kind == "edge":
        return draw(st.sampled_from([F32_TINY, torch.finfo(torch.float32).smallest_normal, F32_MAX, 1e18, 1e20]))
    e = draw(st.floats(math.log10(F32_TINY), math.log10(F32_MAX)))
    return min(10.0 ** e, F32_MAX)


@st.composite
def gradient(draw, shape, seed) -> torch.Tensor:
    """A float32 gradient of ``shape``: N(0, 1) times one of 3 drawn scales (per element), with mixed
    signs, exact zeros and, with some probability, a few elements of extreme magnitude."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    scales = [draw(magnitudes()) for _ in range(3)]
    which = torch.randint(0, 3, (n,), generator=g)
    base = torch.randn(n, generator=g, dtype=torch.float64).clamp(-4, 4)
    x = base * torch.tensor(scales, dtype=torch.float64)[which]
    x = x.clamp(-F32_MAX, F32_MAX).float()
    if n and draw(st.booleans()):
        for _ in range(draw(st.integers(1, 3))):
            x[draw(st.integers(0, n - 1))] = draw(st.sampled_from([1.0, -1.0])) * draw(magnitudes())
    return x.reshape(shape)


@st.composite
def problems(draw, max_tensors=4):
    """A list of parameter shapes, their split into one or two param groups with learning rates,
    whether each parameter is a non-contiguous view, a number of steps and a seed."""
    ts = draw(st.lists(shapes, min_size=1, max_size=max_tensors))
    groups = draw(st.integers(1, min(2, len(ts))))
    lrs = [draw(st.sampled_from([0.0, 1e-4, 1e-3, 0.1, 1.0])) for _ in range(groups)]
    noncontig = [draw(st.booleans()) for _ in ts]
    steps = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return dict(shapes=ts, groups=groups, lrs=lrs, noncontig=noncontig, steps=steps, seed=seed)


def make_params(problem, dtype=torch.float32, device="cpu"):
    """The problem's parameters (N(0, 1); a non-contiguous one is a transposed or strided view of a
    larger buffer) and their param groups."""
    g = torch.Generator().manual_seed(problem["seed"])
    params = []
    for shape, nc in zip(problem["shapes"], problem["noncontig"]):
        if nc and len(shape) >= 1 and math.prod(shape) > 0:
            buf = torch.randn(*shape[:-1], 2 * shape[-1], generator=g, dtype=torch.float64)
            p = buf[..., ::2].to(dtype=dtype, device=device)
            p = torch.empty(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device)[..., ::2].copy_(p)
        else:
            p = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
        params.append(p)
    k = problem["groups"]
    split = [params[i::k] for i in range(k)]
    groups = [{"params": ps, "lr": lr} for ps, lr in zip(split, problem["lrs"]) if ps]
    return params, groups
