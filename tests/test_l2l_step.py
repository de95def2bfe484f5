"""The fused in-place L2L step op (learnedopt::l2l_step_) against its pure-PyTorch reference."""

import math

import pytest
import torch

from conftest import OPCHECK_NOT_EMULATED, DEVICES
from learnedopt import reference
from learnedopt.rules.l2l import CoordinateLSTMNet


def net_weights(net, device):
    w = [net.layer_weights(l) for l in range(len(net.layers))]
    return ([t[0].detach().to(device) for t in w], [t[1].detach().to(device) for t in w],
            [t[2].detach().to(device) for t in w], net.w_out.detach().to(device), net.b_out.detach().to(device))


def problem(device, dtypes=(torch.float32,), layers=(20, 20), seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (1000,), (3, 3), (0,), (6, 4), (1,)]
    params, grads, states = [], [], []
    for k, shape in enumerate(shapes):
        dt = dtypes[k % len(dtypes)]
        p = torch.randn(shape, generator=g).to(device=device, dtype=dt)
        if k == 4:
            p = p.t()  # non-contiguous parameter
        params.append(p)
        grads.append((torch.randn(p.shape, generator=g) * 10.0 ** torch.randint(-6, 1, p.shape, generator=g)).to(
            device=device, dtype=dt))
        sdt = torch.float64 if dt == torch.float64 else torch.float32
        states.append((torch.randn(p.numel(), 2 * sum(layers), generator=g) * 0.5).to(device=device, dtype=sdt))
    return params, grads, states


def run_both(device, net, params, grads, states, **kw):
    args = dict(lr=0.7, weight_decay=0.01, update_scale=net.output_scale, p=net.p, log_sign=net.preprocess == "log_sign")
    args.update(kw)
    w = net_weights(net, device)
    fused = ([p.clone() for p in params], [s.clone() for s in states])
    ref = ([p.clone() for p in params], [s.clone() for s in states])
    torch.ops.learnedopt.l2l_step_(fused[0], grads, fused[1], *w, **args)
    reference.l2l_step_(ref[0], grads, ref[1], *w, **args)
    return fused, ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layers,preprocess", [((20, 20), "log_sign"), ((5,), None), ((), "log_sign"), ((), None),
                                               ((8, 3, 4), "log_sign")])
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float64,), (torch.float32, torch.bfloat16, torch.float16),
                                    (torch.float64, torch.float32)])
def test_step_matches_reference(device, layers, preprocess, dtypes):
    torch.manual_seed(1)
    net = CoordinateLSTMNet(layers, preprocess=preprocess)
    params, grads, states = problem(device, dtypes, layers)
    (fp, fs), (rp, rs) = run_both(device, net, params, grads, states)
    for a, e, p0 in zip(fp, rp, params):
        assert a.dtype == p0.dtype and a.shape == p0.shape and a.stride() == p0.stride()
        tol = dict(atol=1e-12, rtol=1e-12) if a.dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
        if a.dtype in (torch.bfloat16, torch.float16):  # one rounding of p + update to 16 bits
            tol = dict(atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(a.double(), e.double(), **tol)
        if a.numel() and a.dtype == torch.float32:
            assert not torch.equal(a, p0)  # the step did something
    for a, e in zip(fs, rs):
        tol = dict(atol=1e-12, rtol=1e-12) if a.dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(a, e, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gradient_skips_that_parameter(device, bad):
    net = CoordinateLSTMNet()
    params, grads, states = problem(device)
    grads[1] = grads[1].clone()
    grads[1][17] = bad
    (fp, fs), (rp, rs) = run_both(device, net, params, grads, states)
    assert torch.equal(fp[1], params[1]) and torch.equal(fs[1], states[1])  # untouched
    assert not torch.equal(fp[0], params[0]) and not torch.equal(fs[0], states[0])  # others stepped
    torch.testing.assert_close(fp[0], rp[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_found_inf_skips_everything_and_grad_scale_unscales(device):
    net = CoordinateLSTMNet()
    params, grads, states = problem(device)
    (fp, fs), _ = run_both(device, net, params, grads, states, found_inf=torch.ones((), device=device))
    assert all(torch.equal(a, b) for a, b in zip(fp, params)) and all(torch.equal(a, b) for a, b in zip(fs, states))
    scale = torch.tensor(1024.0, device=device)
    (sp, ss), _ = run_both(device, net, params, [g * 1024.0 for g in grads], states, grad_scale=scale,
                           found_inf=torch.zeros((), device=device))
    (up, us), _ = run_both(device, net, params, grads, states)
    for a, b in zip(sp + ss, up + us):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.6, 1.2, 10.0])
def test_sign_part_scale_is_exp_p_rounded_once(device, p):
    """The sign part e^p g uses e^p computed in double and rounded once to float, as the reference's
    ``g * math.exp(p)`` does; exp of p rounded to float first differs by an ulp for most non-integer p
    (0.6, 1.2). With a read-out that passes the sign part alone (w_out = [0, 1], b_out = 0) and
    θ₀ = 0, lr = 1, the new θ is exactly that product, so fused and reference must agree bitwise."""
    g = (torch.linspace(-1, 1, 257, dtype=torch.float64) * math.exp(-p) * 0.9).float().to(device)
    w_out = torch.tensor([[0.0, 1.0]], device=device)
    b_out = torch.zeros(1, device=device)
    fused, ref = torch.zeros_like(g), torch.zeros_like(g)
    args = dict(lr=1.0, weight_decay=0.0, update_scale=1.0, p=p, log_sign=True)
    torch.ops.learnedopt.l2l_step_([fused], [g], [torch.empty(257, 0, device=device)], [], [], [], w_out, b_out, **args)
    reference.l2l_step_([ref], [g], [torch.empty(257, 0, device=device)], [], [], [], w_out, b_out, **args)
    assert torch.equal(fused, ref)
    assert torch.equal(ref, g * math.exp(p))


@pytest.mark.parametrize("device", DEVICES)
def test_lr_zero_changes_state_not_parameters(device):
    net = CoordinateLSTMNet()
    params, grads, states = problem(device)
    (fp, fs), _ = run_both(device, net, params, grads, states, lr=0.0)
    assert all(torch.equal(a, b) for a, b in zip(fp, params))
    assert not torch.equal(fs[0], states[0])


@pytest.mark.no_emu_twin(OPCHECK_NOT_EMULATED)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    net = CoordinateLSTMNet((4, 3))
    params, grads, states = problem(device, layers=(4, 3))
    w = net_weights(net, device)
    torch.library.opcheck(torch.ops.learnedopt.l2l_step_.default,
                          (params, grads, states, *w, 0.5, 0.0, 0.1, 10.0, True),
                          dict(grad_scale=None, found_inf=None))


def _args(**over):
    net = CoordinateLSTMNet((4,))
    params, grads, states = problem("cpu", layers=(4,))
    a = dict(params=params, grads=grads, states=states, w_ih=[net.w_ih0.detach()], w_hh=[net.w_hh0.detach()],
             b=[net.b0.detach()], w_out=net.w_out.detach(), b_out=net.b_out.detach(), lr=1.0, weight_decay=0.0,
             update_scale=0.1, p=10.0, log_sign=True)
    a.update(over)
    return a


BAD = [
    ("list lengths", lambda a: dict(grads=a["grads"][:-1]), r"params, grads and states must have one entry per parameter"),
    ("grad shape", lambda a: dict(grads=[a["grads"][0][:, :2]] + a["grads"][1:]),
     r"grads\[0\] must have the shape of params\[0\] \[7, 5\], got \[7, 2\]"),
    ("grad dtype", lambda a: dict(grads=[a["grads"][0].double()] + a["grads"][1:]), r"grads\[0\] must have the dtype"),
    ("state width", lambda a: dict(states=[a["states"][0][:, :3]] + a["states"][1:]),
     r"states\[0\] must have shape \[numel, 2 \* sum of hidden sizes\] = \[35, 8\], got \[35, 3\]"),
    ("state dtype", lambda a: dict(states=[a["states"][0].double()] + a["states"][1:]),
     r"states\[0\] must be Float for a Float parameter, got Double"),
    ("int param", lambda a: dict(params=[a["params"][0].long()] + a["params"][1:],
                                 grads=[a["grads"][0].long()] + a["grads"][1:]),
     r"params\[0\] must be a floating-point tensor, got Long"),
    # float8 is a floating type the kernels have no path for: refused, not silently left unstepped.
    ("float8 param", lambda a: dict(params=[a["params"][0].to(torch.float8_e4m3fn)] + a["params"][1:],
                                    grads=[a["grads"][0].to(torch.float8_e4m3fn)] + a["grads"][1:]),
     r"params\[0\] must be float32, float64, float16 or bfloat16, got Float8_e4m3fn"),
    ("w_ih input", lambda a: dict(w_ih=[a["w_ih"][0][:, :1]]), r"w_ih\[0\] must have shape \[4\*H, I\] = \[16, 2\]"),
    ("w_out", lambda a: dict(w_out=a["w_out"][:, :2]), r"w_out must have shape \[1, H_top\]"),
    ("p", lambda a: dict(p=0.0), r"p must be > 0"),
]


@pytest.mark.parametrize("name,mutate,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, mutate, match):
    a = _args()
    a.update(mutate(a))
    before = [p.clone() for p in a["params"]]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.learnedopt.l2l_step_(**a)
    assert all(torch.equal(x, y) for x, y in zip(a["params"], before))  # nothing was written


@pytest.mark.parametrize("device", DEVICES)
def test_composed_step_matches_fused_kernel(device):
    """learnedopt.ops._l2l_step_composed (the fused stack op plus torch ops, device-generic) against the
    fused step kernel of the device, with a NaN gradient, grad_scale and found_inf."""
    from learnedopt import ops

    net = CoordinateLSTMNet((6, 5))
    params, grads, states = problem(device, (torch.float32, torch.bfloat16), layers=(6, 5))
    grads[2] = grads[2].clone()
    grads[2][0, 0] = float("nan")
    w = net_weights(net, device)
    args = (0.7, 0.01, 0.1, 10.0, True, torch.tensor(2.0, device=device), torch.tensor(0.0, device=device))
    fused = ([p.clone() for p in params], [s.clone() for s in states])
    comp = ([p.clone() for p in params], [s.clone() for s in states])
    torch.ops.learnedopt.l2l_step_(fused[0], grads, fused[1], *w, *args)
    ops._l2l_step_composed(comp[0], grads, comp[1], *w, *args)
    for a, b in zip(fused[0] + fused[1], comp[0] + comp[1]):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-2 if a.dtype == torch.bfloat16 else 1e-5, rtol=1e-5)
    assert torch.equal(comp[0][2], params[2]) and torch.equal(comp[1][2], states[2])
