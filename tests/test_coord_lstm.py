"""The fused coordinatewise LSTM cell (learnedopt::coord_lstm and its backward) against the
pure-PyTorch reference (in float64), torch.nn.LSTMCell, gradcheck and opcheck."""

import pytest
import torch

import learnedopt
from conftest import OPCHECK_NOT_EMULATED, CUDA, DEVICE_DTYPES, DEVICES, TOL, requires_cuda
from helpers import assert_close, cell_inputs, f64, noncontig, ref_cell

SIZES_N = [1, 7, 1000, 65537]
SIZES_H = [1, 10, 20, 33]
SIZES_I = [1, 2, 12]



@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("N", SIZES_N)
@pytest.mark.parametrize("H", SIZES_H)
@pytest.mark.parametrize("I", SIZES_I)
def test_forward_matches_reference(device, dtype, N, H, I):
    args = cell_inputs(N, I, H, dtype, device, seed=N + 31 * H + 7 * I)
    h_new, c_new = learnedopt.coord_lstm(*args)
    rh, rc = ref_cell(*args)
    for out in (h_new, c_new):
        assert out.shape == (N, H) and out.dtype == dtype and out.device.type == device
    assert_close(h_new, rh, dtype)
    assert_close(c_new, rc, dtype)


def _grads(fn, args, gh, gc):
    args = [a.detach().requires_grad_() for a in args]
    h_new, c_new = fn(*args)
    torch.autograd.backward([h_new, c_new], [gh, gc])
    return [a.grad for a in args]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("N", SIZES_N)
@pytest.mark.parametrize("H", SIZES_H)
@pytest.mark.parametrize("I", SIZES_I)
def test_backward_matches_reference(device, dtype, N, H, I):
    args = cell_inputs(N, I, H, dtype, device, seed=N + 31 * H + 7 * I)
    g = torch.Generator().manual_seed(1)
    gh = torch.randn(N, H, generator=g, dtype=torch.float64).to(device)
    gc = torch.randn(N, H, generator=g, dtype=torch.float64).to(device)
    got = _grads(learnedopt.coord_lstm, args, gh.to(dtype), gc.to(dtype))
    want = _grads(learnedopt.reference.coord_lstm, f64(args), gh, gc)
    for k, (a, e, inp) in enumerate(zip(got, want, args)):
        assert a.shape == inp.shape and a.dtype == inp.dtype
        assert_close(a, e, dtype, reduction=k >= 3)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("N,I,H", [(7, 1, 10), (1000, 12, 33), (513, 2, 20)])
def test_noncontiguous_inputs(device, dtype, N, I, H):
    args = cell_inputs(N, I, H, dtype, device, seed=3)
    nc = [noncontig(a) for a in args[:3]] + [a.t().contiguous().t() for a in args[3:5]] + [noncontig(args[5])]
    assert not any(a.is_contiguous() for a in nc[:5] if a.shape[-1] > 1 and a.shape[0] > 1)
    for a, b in zip(learnedopt.coord_lstm(*nc), learnedopt.coord_lstm(*args)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    gh = torch.randn(N, H, device=device, dtype=dtype)
    gc = torch.randn(N, H, device=device, dtype=dtype)
    for a, b in zip(_grads(learnedopt.coord_lstm, nc, gh, gc), _grads(learnedopt.coord_lstm, args, gh, gc)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N,I,H", [(1, 1, 1), (300, 2, 20), (77, 12, 33)])
def test_matches_nn_lstmcell(device, dtype, N, I, H):
    torch.manual_seed(N + I + H)
    cell = torch.nn.LSTMCell(I, H, device=device, dtype=dtype)
    x = torch.randn(N, I, device=device, dtype=dtype)
    h = torch.randn(N, H, device=device, dtype=dtype)
    c = torch.randn(N, H, device=device, dtype=dtype)
    want = cell(x, (h, c))
    got = learnedopt.coord_lstm(x, h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih + cell.bias_hh)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_gradcheck(device, contiguous):
    args = cell_inputs(13, 3, 5, torch.float64, device, seed=5)
    if not contiguous:
        args = [noncontig(a) for a in args]
    args = [a.requires_grad_() for a in args]
    assert torch.autograd.gradcheck(learnedopt.coord_lstm, args)


@pytest.mark.no_emu_twin(OPCHECK_NOT_EMULATED)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("N,I,H", [(7, 2, 20), (0, 3, 4)])
def test_opcheck(device, dtype, N, I, H):
    args = cell_inputs(N, I, H, dtype, device, seed=7)
    torch.library.opcheck(torch.ops.learnedopt.coord_lstm.default, args)
    torch.library.opcheck(torch.ops.learnedopt.coord_lstm.default, [a.clone().requires_grad_() for a in args])
    gh = torch.randn(N, H, device=device, dtype=dtype)
    torch.library.opcheck(torch.ops.learnedopt.coord_lstm_backward.default, [gh, gh.clone(), *args])


def test_weight_grads_are_deterministic_and_thread_count_independent():
    N, I, H = 20000, 2, 20  # many blocks
    args = cell_inputs(N, I, H, torch.float32, "cpu", seed=11)
    gh, gc = torch.randn(N, H), torch.randn(N, H)
    threads = torch.get_num_threads()
    try:
        runs = []
        for t in (threads, threads, 1):
            torch.set_num_threads(t)
            runs.append(torch.ops.learnedopt.coord_lstm_backward(gh, gc, *args))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_empty_n(device, dtype):
    args = cell_inputs(0, 2, 20, dtype, device)
    h_new, c_new = learnedopt.coord_lstm(*args)
    assert h_new.shape == (0, 20) and c_new.shape == (0, 20)
    grads = torch.ops.learnedopt.coord_lstm_backward(h_new, c_new, *args)
    assert [g.shape for g in grads] == [a.shape for a in args]
    for g in grads[3:]:
        assert torch.count_nonzero(g) == 0


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_state_with_float32_weights(dtype):
    args = cell_inputs(1000, 2, 20, dtype, "cuda", wdtype=torch.float32, seed=2)
    h_new, c_new = learnedopt.coord_lstm(*args)
    assert h_new.dtype == dtype
    rh, rc = ref_cell(*args)
    assert_close(h_new, rh, dtype)
    assert_close(c_new, rc, dtype)
    grads = _grads(learnedopt.coord_lstm, args, torch.ones_like(h_new), torch.ones_like(c_new))
    assert [g.dtype for g in grads] == [a.dtype for a in args]


def _bad(i, value):
    def mutate(args):
        args = list(args)
        args[i] = value(args[i]) if callable(value) else value
        return args

    return mutate


BAD_INPUTS = [
    ("x 1-D", _bad(0, lambda x: x[:, 0]), r"x must be a 2-D tensor \[N, I\], got a 1-D tensor"),
    ("x 3-D", _bad(0, lambda x: x[None]), r"x must be a 2-D tensor"),
    ("h rows", _bad(1, lambda h: h[:-1]), r"h must have N = 7 rows"),
    ("c shape", _bad(2, lambda c: c[:, :-1]), r"c must have shape \[N, H\] = \[7, 20\], got \[7, 19\]"),
    ("w_ih I", _bad(3, lambda w: w[:, :1]), r"w_ih must have shape \[4\*H, I\] = \[80, 2\], got \[80, 1\]"),
    ("w_hh H", _bad(4, lambda w: w[:-4]), r"w_hh must have shape \[4\*H, H\] = \[80, 20\], got \[76, 20\]"),
    ("b size", _bad(5, lambda b: b[:-1]), r"b must have shape \[4\*H\] = \[80\], got \[79\]"),
    ("int x", _bad(0, lambda x: x.to(torch.int64)), r"x must be float32 or float64 on CPU, got Long"),
    ("bf16 on cpu", _bad(0, lambda x: x.to(torch.bfloat16)), r"x must be float32 or float64 on CPU, got BFloat16"),
    ("mixed state dtype", _bad(1, lambda h: h.double()), r"h must have the dtype of x \(Float\), got Double"),
    ("mixed weight dtype", _bad(4, lambda w: w.double()), r"w_hh must have the dtype of x \(Float\), got Double"),
    ("complex", _bad(0, lambda x: x.to(torch.complex64)), r"x must be float32 or float64 on CPU"),
]


@pytest.mark.parametrize("name,mutate,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_errors(name, mutate, match):
    args = cell_inputs(7, 2, 20)
    with pytest.raises((RuntimeError, NotImplementedError), match=match):
        learnedopt.coord_lstm(*mutate(args))
    gh = torch.zeros(7, 20)
    with pytest.raises((RuntimeError, NotImplementedError), match=match):
        torch.ops.learnedopt.coord_lstm_backward(gh, gh, *mutate(args))


def test_sparse_input_error():
    args = list(cell_inputs(7, 2, 20))
    args[1] = args[1].to_sparse()
    with pytest.raises(RuntimeError, match=r"h must be a dense \(strided\) tensor, got layout torch.sparse_coo"):
        learnedopt.coord_lstm(*args)


def test_bad_incoming_gradient():
    args = cell_inputs(7, 2, 20)
    with pytest.raises(RuntimeError, match=r"grad_c_new must have the shape of c \[7, 20\], got \[7, 3\]"):
        torch.ops.learnedopt.coord_lstm_backward(torch.zeros(7, 20), torch.zeros(7, 3), *args)


@requires_cuda
def test_mixed_devices_error():
    args = list(cell_inputs(7, 2, 20, device="cuda"))
    args[1] = args[1].cpu()
    with pytest.raises(RuntimeError, match=r"h must be on the same device as x"):
        learnedopt.coord_lstm(*args)


def test_nan_propagates():
    """A NaN input gives NaN outputs where it reaches (never a silently finite number)."""
    x, h, c, w_ih, w_hh, b = cell_inputs(5, 2, 20)
    x[2, 0] = float("nan")
    c[3, 4] = float("nan")
    h_new, c_new = learnedopt.coord_lstm(x, h, c, w_ih, w_hh, b)
    assert torch.isnan(h_new[2]).all() and torch.isnan(c_new[2]).all()
    assert torch.isnan(c_new[3, 4]) and torch.isnan(h_new[3, 4])
    assert torch.isfinite(h_new[[0, 1, 4]]).all()


def test_saturated_gates():
    """Huge pre-activations saturate the gates to exactly 0/1 (no inf/NaN from exp overflow)."""
    x, h, c, w_ih, w_hh, b = cell_inputs(64, 2, 20)
    b = torch.linspace(-500, 500, 80)
    h_new, c_new = learnedopt.coord_lstm(x, h, c, w_ih, w_hh, b)
    rh, rc = ref_cell(x, h, c, w_ih, w_hh, b)
    assert torch.isfinite(h_new).all()
    assert_close(h_new, rh, torch.float32)
    assert_close(c_new, rc, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gate", ["tanh", "sigmoid"])
def test_activation_accuracy(device, gate):
    """The float32 kernels' tanh and sigmoid (on CPU a rational tanh, and sigmoid(x) = (1 + tanh(x/2))/2,
    csrc/cpu/vec_math.h) against float64 over [-12, 12], tiny and huge arguments, read off c_new:
    with c = 0 and one unit, c_new = sigmoid(z_i) tanh(z_g); the other gate is held at 1 by a bias of 40."""
    z = torch.cat([torch.linspace(-12, 12, 48001, dtype=torch.float64), torch.logspace(-30, -2, 200, dtype=torch.float64)])
    z = torch.cat([z, -z[-200:], torch.tensor([0.0, 1e4, -1e4], dtype=torch.float64)])
    x = z.float().unsqueeze(1).to(device)
    row = 2 if gate == "tanh" else 0  # the gate z drives: g or i
    w_ih = torch.zeros(4, 1, device=device)
    w_ih[row, 0] = 1.0
    b = torch.zeros(4, device=device)
    b[0 if gate == "tanh" else 2] = 40.0
    zeros = torch.zeros(len(z), 1, device=device)
    _, c_new = learnedopt.coord_lstm(x, zeros, zeros, w_ih, torch.zeros(4, 1, device=device), b)
    zf = z.float().double()  # the argument as the kernel sees it
    want = torch.tanh(zf) if gate == "tanh" else torch.sigmoid(zf)
    got = c_new[:, 0].double().cpu()  # (a NaN in err fails the max below)
    err = (got - want).abs()
    assert err.max() <= 4e-7, f"{gate}: max abs error {err.max():.3g} at z = {zf[err.argmax()]:.6g}"
    if gate == "tanh":  # relative accuracy too, down to tiny arguments
        rel = err / want.abs().clamp_min(1e-38)
        assert rel.max() <= 5e-7, f"tanh: max rel error {rel.max():.3g} at z = {zf[rel.argmax()]:.6g}"
    assert got.abs().max() <= 1.0 + 3e-7
    nan = torch.full((3, 1), float("nan"), device=device)
    assert torch.isnan(learnedopt.coord_lstm(nan, zeros[:3], zeros[:3], w_ih, torch.zeros(4, 1, device=device), b)[1]).all()


def test_missing_extension_message(monkeypatch):
    monkeypatch.setattr(learnedopt.ops, "_C", None)
    monkeypatch.setattr(learnedopt.ops, "_IMPORT_ERROR", ImportError("simulated"))
    assert not learnedopt.extension_available() and not learnedopt.cuda_available()
    with pytest.raises(RuntimeError, match=r"extension learnedopt._C is not available \(simulated\).*pip install"):
        learnedopt.coord_lstm(*cell_inputs(3, 2, 4))


@pytest.mark.skipif(CUDA, reason="checks the message of a build without CUDA kernels")
def test_cuda_tensor_without_cuda_kernels_message():
    if learnedopt.ops.cuda_built():
        pytest.skip("this build has CUDA kernels")
    with pytest.raises(RuntimeError, match=r"built without CUDA kernels"):
        learnedopt.ops._require(torch.device("cuda"), "coord_lstm")


def test_compile_matches_eager():
    args = [a.requires_grad_() for a in cell_inputs(33, 2, 20, seed=9)]

    def step(x, h, c, w_ih, w_hh, b):
        h_new, c_new = learnedopt.coord_lstm(x, h, c, w_ih, w_hh, b)
        return (h_new * c_new).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_grads = torch.autograd.grad(step(*args), args)
    compiled_grads = torch.autograd.grad(compiled(*args), args)
    for a, b in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
