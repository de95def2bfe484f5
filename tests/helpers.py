"""Shared builders of the tests: random problems, non-contiguous copies, float64 references, state-dict
comparisons."""

import io

import torch

from conftest import TOL
from learnedopt import reference


def assert_close(actual, expected, dtype, reduction=False):
    """Kernel output vs float64 reference. Reductions over N (weight gradients) are compared relative
    to their largest entry, since their entries sum N terms of either sign."""
    tol = dict(TOL[dtype])
    if reduction and expected.numel():
        tol["atol"] = tol["atol"] * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected, **tol)


def noncontig(t: torch.Tensor) -> torch.Tensor:
    """The same values as t in a non-contiguous tensor (every other element of a wider buffer)."""
    if t.numel() == 0:
        return t
    buf = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    out = buf[..., ::2]
    out.copy_(t)
    assert not out.is_contiguous() or t.shape[-1] == 1
    return out


def cell_inputs(N, I, H, dtype=torch.float32, device="cpu", wdtype=None, seed=0, scale=1.0):
    """x, h, c, w_ih, w_hh, b of one cell; weights ~ U(-1/sqrt(H), 1/sqrt(H)) as nn.LSTMCell."""
    g = torch.Generator().manual_seed(seed)
    wdtype = wdtype or dtype
    k = H ** -0.5

    def r(*s, dt=dtype, a=scale):
        return (torch.rand(*s, generator=g, dtype=torch.float64) * 2 - 1).mul(a).to(device=device, dtype=dt)

    return (r(N, I, a=2 * scale), r(N, H), r(N, H, a=2 * scale), r(4 * H, I, dt=wdtype, a=k), r(4 * H, H, dt=wdtype, a=k),
            r(4 * H, dt=wdtype, a=k))


def stack_inputs(N, I, Hs, O, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, a=1.0):
        return (torch.rand(*s, generator=g, dtype=torch.float64) * 2 - 1).mul(a).to(device=device, dtype=dtype)

    x = r(N, I, a=2)
    h = [r(N, H) for H in Hs]
    c = [r(N, H, a=2) for H in Hs]
    ins = [I] + list(Hs[:-1])
    w_ih = [r(4 * H, i, a=H ** -0.5) for H, i in zip(Hs, ins)]
    w_hh = [r(4 * H, H, a=H ** -0.5) for H in Hs]
    b = [r(4 * H, a=H ** -0.5) for H in Hs]
    w_out = r(O, Hs[-1], a=Hs[-1] ** -0.5)
    b_out = r(O)
    return x, h, c, w_ih, w_hh, b, w_out, b_out


def f64(ts):
    if isinstance(ts, (list, tuple)):
        return type(ts)(f64(t) for t in ts)
    return ts.detach().to(torch.float64)


def ref_cell(*args):
    """float64 reference of coord_lstm on the (upcast) inputs."""
    return reference.coord_lstm(*f64(args))


def assert_tree_equal(a, b):
    """Nested dicts/lists of tensors and Python values: same keys, bitwise-equal tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            assert_tree_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_tree_equal(x, y)
    else:
        assert a == b


def save_load(obj, weights_only=True):
    """obj through torch.save and torch.load (weights_only by default, as a checkpoint is loaded)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=weights_only)
