"""Finite in, finite out (issue 17): one finite gradient element of any magnitude up to the dtype's
maximum (or subnormal) never makes the hierarchical optimizer's parameters, per-coordinate state,
tensor states or global RNN state non-finite — fused CPU kernel, pure-PyTorch reference and the
emulated CUDA kernel alike (each is a case of DEVICES x fused) — and the step stays meaningful: the
gradient is saturated at GRAD_MAX = 1e18, which gives the inputs that exact (float64, unsaturated)
arithmetic gives."""

import math

import pytest
import torch

from conftest import DEVICES
from learnedopt.optim import HierarchicalOptimizer, L2LOptimizer
from learnedopt.rules import hierarchical as hier
from learnedopt.rules.hierarchical import GRAD_MAX, HierarchicalNet, initial_state, step_reference

SHAPES = [(37, 13), (5,), (300,)]
SPIKE = (0, 17)  # tensor 0, flat index 17


def make_net(seed=1):
    torch.manual_seed(seed)
    return HierarchicalNet()


def grads_for(step, shapes=SHAPES, scale=1e-2):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) * scale for s in shapes]


def finite_everywhere(opt, params):
    parts = [("param", p) for p in params]
    for i, p in enumerate(params):
        for k, v in opt.state[p].items():
            parts.append((f"state[{i}][{k}]", v))
    parts.append(("global_state", opt.global_state))
    return [name for name, t in parts if not torch.isfinite(t.float()).all()]


def run(device, fused, state_dtype, spike=None, steps=6, spike_step=3, lr=1e-3):
    """Parameters after each step, and the optimizer; `spike`: the value of one gradient element at
    step `spike_step` (the same element, sign as given)."""
    params = [torch.randn(s, generator=torch.Generator().manual_seed(7 + i)).to(device) for i, s in enumerate(SHAPES)]
    opt = HierarchicalOptimizer(params, lr=lr, net=make_net(), state_dtype=state_dtype, fused=fused)
    history = []
    for step in range(steps):
        for p, g in zip(params, grads_for(step)):
            p.grad = g.to(device)
        if spike is not None and step == spike_step:
            params[SPIKE[0]].grad.view(-1)[SPIKE[1]] = spike
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history, opt, params


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["fp32_state", "bf16_state"])
@pytest.mark.parametrize("spike", [1e20, -1e30, 3e38, torch.finfo(torch.float32).max], ids=["1e20", "-1e30", "3e38", "max"])
def test_huge_finite_gradient_keeps_everything_finite(device, fused, state_dtype, spike):
    history, opt, params = run(device, fused, state_dtype, spike)
    assert finite_everywhere(opt, params) == []
    base, _, _ = run(device, fused, state_dtype, None)
    # The step still makes sense: the other tensors' updates at and after the spike stay the size they
    # are without it (each update has RMS lr * exp(log-lr + offset), and the log-lrs move slowly), and
    # the spiked tensor's update too (its direction is normalised to unit RMS).
    for step in range(3, 6):
        for t in range(len(SHAPES)):
            up = (history[step][t] - history[step - 1][t]).pow(2).mean().sqrt()
            up0 = (base[step][t] - base[step - 1][t]).pow(2).mean().sqrt()
            assert 0.5 * up0 < up < 2 * up0, (step, t, up.item(), up0.item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_saturation_makes_every_huge_gradient_the_same(device, fused):
    # Every |g| >= GRAD_MAX gives bitwise the same step (fused and reference alike).
    runs = [run(device, fused, torch.float32, s)[0] for s in (2 * GRAD_MAX, 1e30, 3e38)]
    for other in runs[1:]:
        for a, b in zip(runs[0][-1], other[-1]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["fp32_state", "bf16_state"])
def test_subnormal_and_zero_gradients_keep_everything_finite(device, fused, state_dtype):
    params = [torch.randn(s).to(device) for s in SHAPES]
    opt = HierarchicalOptimizer(params, lr=1e-3, net=make_net(), state_dtype=state_dtype, fused=fused)
    tiny = torch.finfo(torch.float32).smallest_normal / 2 ** 22  # 1.4e-45, the smallest subnormal
    for step in range(4):
        for i, p in enumerate(params):
            g = torch.full_like(p, tiny)
            g.view(-1)[::3] = 0.0
            g.view(-1)[1::3] = -tiny * (step + 1)
            p.grad = g
        if step == 2:
            params[1].grad.zero_()
        opt.step()
        assert finite_everywhere(opt, params) == []


def test_saturation_equals_exact_arithmetic(monkeypatch):
    # The float32 step with a 1e20 gradient (saturated at 1e18) against the float64 step without the
    # saturation (1e40 is representable there): the cell's inputs are scale-free, so they agree to
    # float32 tolerance.
    net = make_net()
    params = [torch.randn(s, generator=torch.Generator().manual_seed(3)) for s in SHAPES]
    state32 = initial_state(net, params, math.log(1e-3))
    state64 = hier.HierState(*(t.double() for t in state32))
    p32, p64 = params, [p.double() for p in params]
    for step in range(5):
        gs = grads_for(step)
        if step == 2:
            gs[0].view(-1)[SPIKE[1]] = 1e20
        with torch.no_grad():
            p32, state32 = step_reference(net, p32, gs, state32)
            monkeypatch.setattr(hier, "GRAD_MAX", math.inf)
            p64, state64 = step_reference(net, p64, [g.double() for g in gs], state64)
            monkeypatch.setattr(hier, "GRAD_MAX", GRAD_MAX)
    ms32, ms64 = state32.coord[net.rows.ms].max().item(), state64.coord[net.rows.ms].max().item()
    assert math.isfinite(ms64) and ms64 > 1e3 * ms32  # the float64 run is not saturated
    for a, b in zip(p32, p64):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state32.glob.double(), state64.glob, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state32.tensor.double(), state64.tensor, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_huge_finite_gradient_l2l(device):
    # L2L's log preprocessing already maps any finite gradient to finite inputs: kept so by a test.
    torch.manual_seed(0)
    params = [torch.randn(s).to(device) for s in SHAPES]
    opt = L2LOptimizer(params, lr=1e-3)
    for step in range(3):
        for p, g in zip(params, grads_for(step)):
            p.grad = g.to(device)
        params[0].grad.view(-1)[:3] = torch.tensor([3e38, -torch.finfo(torch.float32).max, 1.4e-45])
        opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert all(torch.isfinite(opt.state[p]["lstm"]).all() for p in params)


# -- the meta-training unroll ------------------------------------------------------------------------
@pytest.mark.parametrize("rule_name", ["l2l", "hierarchical"])
@pytest.mark.parametrize("objective", ["log_ratio", "log_final"])
@pytest.mark.parametrize("x0", [1e15, 1e18, 1.8e19])  # losses 1e30 .. 3.2e38, gradients 2e15 .. 3.6e19
def test_unroll_with_huge_losses_is_finite_under_the_log_objectives(rule_name, objective, x0):
    from learnedopt import meta
    from learnedopt.rules import make_rule
    from learnedopt.tasks.classic import SimpleTask

    torch.manual_seed(0)
    kw = dict(layers=[5], preprocess="log_sign") if rule_name == "l2l" else {}
    rule = make_rule(rule_name, **kw)
    g = torch.Generator().manual_seed(0)
    carry = meta.start(rule, SimpleTask(x0=x0), g)
    meta_loss, carry, losses = meta.unroll(rule, carry, 4, g, objective)
    assert all(math.isfinite(v) for v in losses) and torch.isfinite(meta_loss)
    meta_loss.backward()
    for name, p in rule.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    assert all(torch.isfinite(p).all() for p in carry.params)


# -- coord_lstm with large cells and saturated gates -----------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stack", [False, True], ids=["cell", "stack"])
def test_coord_lstm_backward_with_a_saturated_forget_gate_and_huge_cells(device, stack):
    # c = 1e30, forget gate saturated (f == 1 exactly in float32), incoming gradients 1e10: d z_f is
    # c f (1 - f) dct = 0, where (dct * c) alone overflows; the float64 reference is finite.
    from learnedopt import ops, reference

    g = torch.Generator().manual_seed(0)
    N, I, H = 9, 3, 4
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, h, c, w_ih, w_hh, b = r(N, I), r(N, H), torch.full((N, H), 1e30, dtype=torch.float64), r(4 * H, I), \
        r(4 * H, H), r(4 * H)
    b[H:2 * H] = 200.0
    ins64 = [t.requires_grad_() for t in (x, h, c, w_ih, w_hh, b)]
    ins = [t.detach().float().to(device).requires_grad_() for t in ins64]
    if stack:
        w_out, b_out = r(2, H), r(2)
        y, hn, cn = ops.coord_lstm_stack(ins[0], [ins[1]], [ins[2]], [ins[3]], [ins[4]], [ins[5]],
                                         w_out.float().to(device), b_out.float().to(device))
        ry, rh, rc = reference.coord_lstm_stack(ins64[0], [ins64[1]], [ins64[2]], [ins64[3]], [ins64[4]], [ins64[5]],
                                                w_out, b_out)
        (y.sum() * 1e10 + cn[0].sum() * 1e10).backward()
        (ry.sum() * 1e10 + rc[0].sum() * 1e10).backward()
    else:
        hn, cn = ops.coord_lstm(*ins)
        rh, rc = reference.coord_lstm(*ins64)
        (hn.sum() * 1e10 + cn.sum() * 1e10).backward()
        (rh.sum() * 1e10 + rc.sum() * 1e10).backward()
    for k, (a, want) in enumerate(zip(ins, ins64)):
        assert torch.isfinite(want.grad).all()
        assert torch.isfinite(a.grad).all(), k
        scale = want.grad.abs().max().item()
        torch.testing.assert_close(a.grad.double() / scale, want.grad / scale, rtol=1e-4, atol=1e-4)
