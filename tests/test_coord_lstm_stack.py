"""The fused multi-layer coordinatewise LSTM with linear read-out (learnedopt::coord_lstm_stack)
against the pure-PyTorch reference, gradcheck and opcheck."""

import pytest
import torch

import learnedopt
from conftest import OPCHECK_NOT_EMULATED, DEVICE_DTYPES, DEVICES, TOL
from helpers import assert_close, f64, noncontig, stack_inputs

CONFIGS = [((20,), 1), ((20, 20), 1), ((5, 8, 3), 2), ((1,), 1), ((33, 10), 3)]


def flat(x, h, c, w_ih, w_hh, b, w_out, b_out):
    return [x, *h, *c, *w_ih, *w_hh, *b, w_out, b_out]


def unflat(args, L):
    x, rest = args[0], args[1:]
    h, c, w_ih, w_hh, b = (list(rest[k * L:(k + 1) * L]) for k in range(5))
    return x, h, c, w_ih, w_hh, b, rest[5 * L], rest[5 * L + 1]


def run(fn, args, L):
    """The op's outputs as one flat list (y, h_new..., c_new...)."""
    y, hn, cn = fn(*unflat(args, L))
    return [y, *hn, *cn]



@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("Hs,O", CONFIGS)
@pytest.mark.parametrize("N", [1, 7, 1000])
def test_stack_matches_reference(device, dtype, Hs, O, N):
    L = len(Hs)
    args = flat(*stack_inputs(N, 2, Hs, O, dtype, device, seed=N + len(Hs)))
    got = run(learnedopt.coord_lstm_stack, args, L)
    want = run(learnedopt.reference.coord_lstm_stack, f64(args), L)
    assert got[0].shape == (N, O)
    for a, e in zip(got, want):
        assert a.dtype == dtype
        assert_close(a, e, dtype)
    # backward
    g = torch.Generator().manual_seed(3)
    grads_out = [torch.randn(e.shape, generator=g, dtype=torch.float64).to(device) for e in want]
    ins = [a.detach().requires_grad_() for a in args]
    torch.autograd.backward(run(learnedopt.coord_lstm_stack, ins, L), [t.to(dtype) for t in grads_out])
    ref_ins = [a.detach().double().requires_grad_() for a in args]
    torch.autograd.backward(run(learnedopt.reference.coord_lstm_stack, ref_ins, L), grads_out)
    n_state = 1 + 2 * L  # x, h..., c...: per-coordinate gradients; the rest are reductions over N
    for k, (a, e) in enumerate(zip(ins, ref_ins)):
        assert a.grad.shape == a.shape and a.grad.dtype == a.dtype
        assert_close(a.grad, e.grad, dtype, reduction=k >= n_state)


@pytest.mark.parametrize("device", DEVICES)
def test_stack_gradcheck(device):
    Hs = (3, 4)
    args = [a.requires_grad_() for a in flat(*stack_inputs(9, 2, Hs, 2, torch.float64, device, seed=1))]
    assert torch.autograd.gradcheck(lambda *a: tuple(run(learnedopt.coord_lstm_stack, a, 2)), args)


@pytest.mark.parametrize("device", DEVICES)
def test_stack_noncontiguous(device):
    Hs = (5, 8)
    args = flat(*stack_inputs(33, 3, Hs, 2, torch.float32, device, seed=2))
    nc = [noncontig(a) for a in args]
    for a, b in zip(run(learnedopt.coord_lstm_stack, nc, 2), run(learnedopt.coord_lstm_stack, args, 2)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.no_emu_twin(OPCHECK_NOT_EMULATED)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("N", [7, 0])
def test_stack_opcheck(device, dtype, N):
    x, h, c, w_ih, w_hh, b, w_out, b_out = stack_inputs(N, 2, (4, 3), 2, dtype, device, seed=4)
    torch.library.opcheck(torch.ops.learnedopt.coord_lstm_stack.default, (x, h, c, w_ih, w_hh, b, w_out, b_out))
    rg = [t.clone().requires_grad_() for t in flat(x, h, c, w_ih, w_hh, b, w_out, b_out)]
    torch.library.opcheck(torch.ops.learnedopt.coord_lstm_stack.default, unflat(rg, 2))
    gy = torch.randn(N, 2, device=device, dtype=dtype)
    torch.library.opcheck(
        torch.ops.learnedopt.coord_lstm_stack_backward.default,
        (gy, [torch.ones_like(t) for t in h], [torch.ones_like(t) for t in c], x, h, c, w_ih, w_hh, b, w_out, b_out),
    )


def test_stack_single_layer_equals_cell():
    x, h, c, w_ih, w_hh, b, w_out, b_out = stack_inputs(100, 2, (20,), 1, seed=6)
    y, hn, cn = learnedopt.coord_lstm_stack(x, h, c, w_ih, w_hh, b, w_out, b_out)
    h1, c1 = learnedopt.coord_lstm(x, h[0], c[0], w_ih[0], w_hh[0], b[0])
    torch.testing.assert_close(hn[0], h1, atol=0, rtol=0)
    torch.testing.assert_close(cn[0], c1, atol=0, rtol=0)
    torch.testing.assert_close(y, h1 @ w_out.t() + b_out)


def test_stack_weight_grads_deterministic():
    args = [a.requires_grad_() for a in flat(*stack_inputs(5000, 2, (20, 20), 1, seed=8))]
    runs = []
    for _ in range(2):
        for a in args:
            a.grad = None
        y, *_ = run(learnedopt.coord_lstm_stack, args, 2)
        y.sum().backward()
        runs.append([a.grad.clone() for a in args])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


STACK_ERRORS = [
    ("no layers", lambda a: {**a, "h": [], "c": [], "w_ih": [], "w_hh": [], "b": []}, r"at least one layer"),
    ("list lengths", lambda a: {**a, "c": a["c"][:1]}, r"must all hold one tensor per layer, got lengths 2, 1"),
    ("w_ih[1] shape", lambda a: {**a, "w_ih": [a["w_ih"][0], a["w_ih"][1][:, :3]]},
     r"w_ih\[1\] must have shape \[4\*H, I\] = \[12, 4\], got \[12, 3\]"),
    ("h[1] rows", lambda a: {**a, "h": [a["h"][0], a["h"][1][:-1]]}, r"h\[1\] must have N = 7 rows"),
    ("w_out shape", lambda a: {**a, "w_out": a["w_out"][:, :2]}, r"w_out must have shape \[O, H_last\]"),
    ("b_out shape", lambda a: {**a, "b_out": a["b_out"][:1]}, r"b_out must have shape \[O\] = \[2\], got \[1\]"),
    ("b_out dtype", lambda a: {**a, "b_out": a["b_out"].double()}, r"b_out must have the dtype of w_out"),
]


@pytest.mark.parametrize("name,mutate,match", STACK_ERRORS, ids=[e[0] for e in STACK_ERRORS])
def test_stack_bad_input_errors(name, mutate, match):
    x, h, c, w_ih, w_hh, b, w_out, b_out = stack_inputs(7, 2, (4, 3), 2)
    a = mutate(dict(x=x, h=h, c=c, w_ih=w_ih, w_hh=w_hh, b=b, w_out=w_out, b_out=b_out))
    with pytest.raises(RuntimeError, match=match):
        learnedopt.coord_lstm_stack(**a)
