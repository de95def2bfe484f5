"""The hierarchical learned optimizer (Wichrowska et al. 2017): the reference maths against the
original code's algebra (reference papers.md §2.6), the fused op against the reference, and the
torch.optim contract of HierarchicalOptimizer (in the spirit of PyTorch's TestOptimRenewed).

Where a generic optimizer test does not fit (a zero gradient need not give a zero update: the
momenta and the network's state move) the test states the behaviour that does hold."""

import copy
import math

import pytest
import torch
from torch import nn

from conftest import DEVICES
from helpers import save_load
from learnedopt import meta
from learnedopt.rules.hierarchical import (INIT_LOG_LR_RANGE, HierarchicalNet, HierarchicalRule, HierState,
                                     initial_state, step_reference)
from learnedopt.optim import HierarchicalOptimizer

# Fused vs reference over 100 steps of random gradients (test_fused_matches_reference_100_steps).
# Observed on CPU (float32): parameters max |diff| ~4e-6 (|p| ~ 3), states ~4e-5 on entries of
# magnitude ~10 (mean squares, log learning rates): the kernel's <= 20-ulp exp and its summation
# order. rtol = atol = 1e-4 leaves a margin and still catches a wrong formula (an lr off by 1 %
# moves parameters by > 1e-3 over these steps). float64: the per-tensor gate bias and the mean log-lr
# enter the op in float32 (its schema), which shows as relative differences ~3e-8: 1e-7.
TOL32 = dict(rtol=1e-4, atol=1e-4)
TOL64 = dict(rtol=1e-7, atol=1e-7)


def make_net(seed=1, **kw):
    torch.manual_seed(seed)
    return HierarchicalNet(**kw)


def params_like(shapes, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]


SHAPES = [(37, 13), (5,), (2000,), (1,), (3, 1, 7)]


# --------------------------------------------------------------------------------------------
# the reference maths
# --------------------------------------------------------------------------------------------
def test_first_steps_algebra_with_zero_weights():
    """papers.md §2.6: with all projection weights 0 and β = γ = 0, step 1 gives a_s = g,
    ms_s = g² + 1e-12, x_s = asinh(±~1) ≈ ±0.881; the new decays are σ(2.2) and σ(3.2); the update
    RMS per tensor is lr·e^{-1} (the direction has unit RMS, the offset is −1); step 2 uses
    β_s = σ(2.2)^(2^-(s-1))."""
    net = HierarchicalNet(init="zeros")
    R = net.rows
    ps = params_like([(40,), (7, 3)])
    gs = params_like([(40,), (7, 3)], seed=1)
    lr = 1e-3
    state = initial_state(net, ps, math.log(lr))
    new, st = step_reference(net, ps, gs, state)
    g = torch.cat([x.reshape(-1) for x in gs])
    for s in range(4):
        torch.testing.assert_close(st.coord[R.a][s], g)
        torch.testing.assert_close(st.coord[R.ms][s], g * g + 1e-12)
    x = torch.asinh(st.coord[R.a] / torch.sqrt(st.coord[R.ms] + 1e-16))
    torch.testing.assert_close(x.abs(), torch.full_like(x, math.asinh(1.0)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.coord[R.beta], torch.full_like(g, 1 / (1 + math.exp(-2.2))))
    torch.testing.assert_close(st.coord[R.gamma], torch.full_like(g, 1 / (1 + math.exp(-3.2))))
    for p, q in zip(ps, new):
        rms = (q - p).pow(2).mean().sqrt().item()
        assert rms == pytest.approx(lr * math.exp(-1), rel=1e-4)
    # step 2: the momentum decays are β, √β, β^(1/4), β^(1/8)
    b = 1 / (1 + math.exp(-2.2))
    g2 = params_like([(40,), (7, 3)], seed=2)
    _, st2 = step_reference(net, new, g2, st)
    g2f = torch.cat([x.reshape(-1) for x in g2])
    for s, want in enumerate([0.9002, 0.9488, 0.9741, 0.9870]):
        bs = b ** (0.5 ** s)
        assert bs == pytest.approx(want, abs=1e-4)
        torch.testing.assert_close(st2.coord[R.a][s], (1 - bs) * g2f + bs * g)


def test_log_lr_clip_passes_gradients_straight_through():
    net = HierarchicalNet(init="zeros")
    R = net.rows
    ps = params_like([(6,)])
    gs = params_like([(6,)], seed=1)
    state = initial_state(net, ps, 40.0)  # beyond the clip
    state = HierState(state.coord.clone().requires_grad_(True), state.tensor, state.glob, state.theta)
    new, st = step_reference(net, ps, gs, state)
    rms = (new[0] - ps[0]).pow(2).mean().sqrt()
    assert rms.item() == pytest.approx(math.exp(33 - 1), rel=1e-4)  # the step uses the clipped value
    (new[0].sum()).backward()
    assert state.coord.grad[R.log_lr].abs().sum() > 0  # ... and the gradient flows as if unclipped


def test_global_rnn_reads_every_tensor():
    """The original code fed only the last tensor's state to the global RNN; here it is the mean of
    all: changing the first tensor's gradient changes the global state."""
    net = make_net()
    ps = params_like([(10,), (4,)])
    state = initial_state(net, ps, -5.0)
    g_a = params_like([(10,), (4,)], seed=1)
    g_b = [g_a[0] * 3 + 1, g_a[1].clone()]
    _, s1 = step_reference(net, ps, g_a, state)
    _, s2 = step_reference(net, ps, g_b, state)
    assert not torch.allclose(s1.glob, s2.glob)
    assert not torch.allclose(s1.tensor[0], s2.tensor[0])
    assert torch.equal(s1.tensor[1], s2.tensor[1])  # the second tensor's own GRU input did not change
    assert torch.equal(s1.coord[:, 10:], s2.coord[:, 10:])  # nor its coordinates' state


def test_random_initial_log_lr_in_the_original_range():
    net = make_net()
    ps = params_like([(500,), (300,)])
    st = initial_state(net, ps, generator=torch.Generator().manual_seed(0))
    ll = st.coord[net.rows.log_lr]
    lo, hi = INIT_LOG_LR_RANGE
    assert ll.min() >= 2 * lo - 1e-6 and ll.max() <= 2 * hi + 1e-6
    assert ll[:500].std() > 0.5  # per-coordinate draws, not one value


def test_attention_takes_gradients_at_a_look_ahead_point():
    net = make_net(attention=True)
    ps = params_like([(8,), (3,)])
    gs = params_like([(8,), (3,)], seed=1)
    state = initial_state(net, ps, math.log(1e-2))
    visible, st = step_reference(net, ps, gs, state)
    theta = st.theta.split([8, 3])
    assert all(not torch.allclose(v.reshape(-1), t) for v, t in zip(visible, theta))
    # with the attention read-out zeroed, the look-ahead point is the true θ
    with torch.no_grad():
        net.w_att.zero_()
        net.w_att_shortcut.zero_()
    visible, st = step_reference(net, ps, gs, state)
    torch.testing.assert_close(torch.cat([v.reshape(-1) for v in visible]), st.theta)


# --------------------------------------------------------------------------------------------
# the fused op against the reference
# --------------------------------------------------------------------------------------------
def _pair(shapes, device, dtype=torch.float32, state_dtype=torch.float32, lr=1e-2, seed=0):
    net = make_net().to(device)
    p1 = params_like(shapes, device, dtype, seed)
    p2 = [p.clone() for p in p1]
    o1 = HierarchicalOptimizer(p1, lr=lr, net=net, fused=True, state_dtype=state_dtype)
    o2 = HierarchicalOptimizer(p2, lr=lr, net=net, fused=False, state_dtype=state_dtype)
    return p1, p2, o1, o2


def _same_grads(p1, p2, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    for a, b in zip(p1, p2):
        gr = (torch.randn(a.shape, generator=g, dtype=torch.float64) * scale).to(device=a.device, dtype=a.dtype)
        a.grad, b.grad = gr.clone(), gr.clone()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_fused_matches_reference_100_steps(device, dtype):
    p1, p2, o1, o2 = _pair(SHAPES, device, dtype)
    for k in range(100):
        _same_grads(p1, p2, k, scale=10.0 ** ((k % 5) - 2))  # gradients over 5 orders of magnitude
        o1.step()
        o2.step()
    tol = TOL64 if dtype == torch.float64 else TOL32
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, **tol)
        torch.testing.assert_close(o1.state[a]["coord"], o2.state[b]["coord"], **tol)
        torch.testing.assert_close(o1.state[a]["tensor"], o2.state[b]["tensor"], **tol)
    torch.testing.assert_close(o1.global_state, o2.global_state, **tol)
    assert all(not torch.equal(a, b0) for a, b0 in zip(p1, params_like(SHAPES, device, dtype)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_16bit_params_match_reference(device, dtype):
    p1, p2, o1, o2 = _pair(SHAPES[:3], device, dtype)
    for k in range(20):
        _same_grads(p1, p2, k)
        o1.step()
        o2.step()
    for a, b in zip(p1, p2):
        assert a.dtype == dtype and o1.state[a]["coord"].dtype == torch.float32
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_state_matches_reference_and_halves_bytes(device):
    p1, p2, o1, o2 = _pair(SHAPES[:3], device, state_dtype=torch.bfloat16)
    _, p3, _, o3 = _pair(SHAPES[:3], device)  # float32 state, reference
    for k in range(30):
        _same_grads(p1, p2, k)
        _same_grads(p3, p3, k)
        o1.step()
        o2.step()
        o3.step()
    for a, b, c in zip(p1, p2, p3):
        assert o1.state[a]["coord"].dtype == torch.bfloat16
        assert o1.state[a]["coord"].nbytes * 2 == o3.state[c]["coord"].nbytes
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)  # fused vs reference, both with bf16 state
        # bf16 state vs float32 state: the same optimizer within bf16 precision of the state
        torch.testing.assert_close(a, c, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_params_and_grads(device):
    net = make_net().to(device)
    base = params_like([(9, 14), (6, 10)], device)
    nc = [torch.empty(s[0], 2 * s[1], device=device)[:, ::2].copy_(b) for s, b in zip([(9, 14), (6, 10)], base)]
    ref = [b.clone() for b in base]
    o1 = HierarchicalOptimizer(nc, lr=1e-2, net=net, fused=True)
    o2 = HierarchicalOptimizer(ref, lr=1e-2, net=net, fused=False)
    for k in range(5):
        g = params_like([(9, 14), (6, 10)], device, seed=k + 10)
        for a, b, gr in zip(nc, ref, g):
            a.grad = torch.empty(gr.shape[0], 2 * gr.shape[1], device=device)[:, ::2].copy_(gr)
            b.grad = gr.clone()
        o1.step()
        o2.step()
    for a, b in zip(nc, ref):
        assert not a.is_contiguous()
        torch.testing.assert_close(a, b, **TOL32)


@pytest.mark.parametrize("ratio", [0.0, 0.003], ids=["no-safeguard", "safeguard"])
def test_optimizer_equals_meta_rule(ratio):
    """HierarchicalOptimizer(lr) and the meta-training rule (the reference step on all tensors at
    once, initial log-lr = log(lr)) are the same optimizer: what is meta-trained is what ships; with
    the update-ratio safeguard too (0.003 binds on these tensors)."""
    net = make_net()
    ps = params_like(SHAPES)
    rule = HierarchicalRule(net, init_log_lr=math.log(1e-2), max_update_ratio=ratio)
    params = [p.clone() for p in ps]
    state = rule.init_state(params)
    opt = HierarchicalOptimizer(ps, lr=1e-2, net=net, max_update_ratio=ratio)
    with torch.no_grad():
        for k in range(50):
            gs = params_like(SHAPES, seed=100 + k)
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
            params, state = rule(params, gs, state)
    for a, b in zip(ps, params):
        torch.testing.assert_close(a, b, **TOL32)


def test_opcheck():
    net = make_net()
    ps = params_like([(7,), (3, 5)])
    gs = params_like([(7,), (3, 5)], seed=1)
    states = [net.initial_coord_state(p.numel(), -3.0) for p in ps]
    bias = torch.randn(2, 40)
    args = (ps, gs, states, bias, torch.tensor(-3.0), net.packed_coord_weights(), [0.1, 0.2])
    torch.library.opcheck(torch.ops.learnedopt.hier_step_.default, args)
    torch.library.opcheck(torch.ops.learnedopt.hier_step_.default, args,
                          {"grad_scale": torch.tensor(4.0), "found_inf": torch.tensor(0.0)})


def test_op_argument_errors_name_the_argument():
    net = make_net()
    ps = params_like([(7,)])
    gs = params_like([(7,)])
    st = [net.initial_coord_state(7, 0.0)]
    w = net.packed_coord_weights()
    op = torch.ops.learnedopt.hier_step_
    with pytest.raises(RuntimeError, match=r"states\[0\] must have shape"):
        op(ps, gs, [torch.zeros(31, 7)], torch.zeros(1, 40), torch.tensor(0.0), w, [1.0])
    with pytest.raises(RuntimeError, match="weights must have shape"):
        op(ps, gs, st, torch.zeros(1, 40), torch.tensor(0.0), w[:-1], [1.0])
    with pytest.raises(RuntimeError, match="coord_bias must have shape"):
        op(ps, gs, st, torch.zeros(2, 40), torch.tensor(0.0), w, [1.0])
    with pytest.raises(RuntimeError, match="one entry per parameter"):
        op(ps, gs, st, torch.zeros(1, 40), torch.tensor(0.0), w, [1.0, 2.0])
    with pytest.raises(RuntimeError, match=r"states\[0\] must be float32 or bfloat16"):
        op(ps, gs, [st[0].half()], torch.zeros(1, 40), torch.tensor(0.0), w, [1.0])
    f8 = [p.to(torch.float8_e4m3fn) for p in ps]
    with pytest.raises(RuntimeError, match=r"params\[0\] must be float32, float64, float16 or bfloat16"):
        op(f8, f8, st, torch.zeros(1, 40), torch.tensor(0.0), w, [1.0])
    with pytest.raises(RuntimeError, match="found_inf must be a one-element tensor"):
        op(ps, gs, st, torch.zeros(1, 40), torch.tensor(0.0), w, [1.0], found_inf=torch.zeros(2))


# --------------------------------------------------------------------------------------------
# the torch.optim contract
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_lr_zero_keeps_params_but_advances_state(device, fused):
    net = make_net().to(device)
    ps = params_like([(20,), (4, 4)], device)
    before = [p.clone() for p in ps]
    opt = HierarchicalOptimizer(ps, lr=0.0, net=net, fused=fused)
    _same_grads(ps, [p.clone() for p in ps], 0)
    opt.step()
    for p, b in zip(ps, before):
        assert torch.equal(p, b)
        assert opt.state[p]["coord"][net.rows.a].abs().sum() > 0


def _step_rms_and_log_lr(opt, ps, g):
    before = [p.clone() for p in ps]
    for p, gr in zip(ps, g):
        p.grad = gr.clone()
    opt.step()
    return ([(p - b).double().pow(2).mean().sqrt().item() for p, b in zip(ps, before)],
            [opt.state[p]["coord"][opt.net.rows.log_lr].double() for p in ps],
            [b.double().pow(2).mean().sqrt().item() for b in before])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_update_ratio_safeguard_holds_the_update_at_its_bound(device, fused):
    """A tensor whose update would exceed τ · max(rms θ, 1e-2) takes exactly that much, its log
    learning rates lowered by log s = log(bound / unclipped update RMS) (the step's and the state's);
    a tensor within its bound takes the step it takes without the safeguard, bitwise."""
    from learnedopt.rules.hierarchical import UPDATE_RMS_FLOOR

    net = make_net().to(device)
    shapes = [(50, 7), (40,), (9,), (300,)]
    base = params_like(shapes, device)
    base[0].mul_(0.05)   # small weights: the update of lr 1 binds
    base[1].zero_()      # a zero-initialised bias: the floor 1e-2 is its scale
    base[3].mul_(1e4)    # large: within the bound
    g = params_like(shapes, device, seed=7)
    tau = 0.01
    p_off, p_on = [p.clone() for p in base], [p.clone() for p in base]
    off = HierarchicalOptimizer(p_off, lr=1.0, net=net, fused=fused, max_update_ratio=0.0)
    on = HierarchicalOptimizer(p_on, lr=1.0, net=net, fused=fused, max_update_ratio=tau)
    rms_off, ll_off, theta_rms = _step_rms_and_log_lr(off, p_off, g)
    rms_on, ll_on, _ = _step_rms_and_log_lr(on, p_on, g)
    for i in range(3):
        bound = tau * max(theta_rms[i], UPDATE_RMS_FLOOR)
        assert rms_off[i] > 1.5 * bound, (i, rms_off[i], bound)  # the case binds
        assert rms_on[i] == pytest.approx(bound, rel=1e-4), i
        log_s = math.log(bound / rms_off[i])
        torch.testing.assert_close(ll_on[i], ll_off[i] + log_s, rtol=1e-5, atol=1e-5)
    assert rms_off[3] < tau * theta_rms[3]
    assert torch.equal(ll_on[3], ll_off[3]) and rms_on[3] == rms_off[3]


@pytest.mark.parametrize("device", DEVICES)
def test_fused_matches_reference_with_the_safeguard_binding(device):
    p1, p2, o1, o2 = _pair([(37, 13), (5,), (200,), (3, 1, 7)], device, lr=1.0)
    for o in (o1, o2):
        o.param_groups[0]["max_update_ratio"] = 0.002
    before = [p.clone() for p in p1]
    for k in range(30):
        _same_grads(p1, p2, k, scale=10.0 ** ((k % 5) - 2))
        o1.step()
        o2.step()
        if k == 0:
            ratios = [((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-2)).item()
                      for a, b in zip(p1, before)]
            assert ratios == pytest.approx([0.002] * 4, rel=1e-3)  # every tensor at its bound
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, **TOL32)
        torch.testing.assert_close(o1.state[a]["coord"], o2.state[b]["coord"], **TOL32)
    torch.testing.assert_close(o1.global_state, o2.global_state, **TOL32)


def test_update_ratio_argument_errors():
    p = torch.zeros(3, requires_grad=True)
    for bad in (-0.1, float("nan"), "0.01"):
        with pytest.raises(ValueError, match="max_update_ratio"):
            HierarchicalOptimizer([p], max_update_ratio=bad)
        with pytest.raises(ValueError, match="max_update_ratio"):
            HierarchicalRule(max_update_ratio=bad)
    opt = HierarchicalOptimizer([p])
    opt.param_groups[0]["max_update_ratio"] = -1.0
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['max_update_ratio'\]"):
        opt.step()
    assert not opt.state[p]  # refused before any state was made


@pytest.mark.parametrize("device", DEVICES)
def test_update_proportional_to_group_lr_and_scheduler(device):
    net = make_net().to(device)
    a, b = params_like([(30,), (30,)], device)
    b.copy_(a)
    opt = HierarchicalOptimizer([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 4e-3}], net=net)
    g = torch.randn(30, device=device)
    a.grad, b.grad = g.clone(), g.clone()
    a0, b0 = a.clone(), b.clone()
    opt.step()
    torch.testing.assert_close((b - b0), 4 * (a - a0), rtol=1e-4, atol=1e-6)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4) and opt.param_groups[1]["lr"] == pytest.approx(2e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_gradient_skips_that_parameter(device, bad):
    net = make_net().to(device)
    a, b = params_like([(10,), (6,)], device)
    opt = HierarchicalOptimizer([a, b], lr=1e-2, net=net)
    _same_grads([a, b], [a.clone(), b.clone()], 0)
    opt.step()
    sa, sb = copy.deepcopy(opt.state[a]), copy.deepcopy(opt.state[b])
    a0, b0 = a.clone(), b.clone()
    a.grad = torch.randn(10, device=device)
    a.grad[3] = bad
    b.grad = torch.randn(6, device=device)
    opt.step()
    assert torch.equal(a, a0)
    for k in ("coord", "tensor", "log_lr_sum"):
        assert torch.equal(opt.state[a][k], sa[k])
        assert torch.isfinite(opt.state[b][k]).all()
    assert not torch.equal(b, b0) and not torch.equal(opt.state[b]["coord"], sb["coord"])
    assert torch.isfinite(opt.global_state).all()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_grad_scale_and_found_inf(fused):
    net = make_net()
    p1, p2 = params_like([(12,)]), params_like([(12,)])
    o1 = HierarchicalOptimizer(p1, lr=1e-2, net=net, fused=fused)
    o2 = HierarchicalOptimizer(p2, lr=1e-2, net=net, fused=fused)
    g = torch.randn(12)
    p1[0].grad, p2[0].grad = g * 1024, g.clone()
    o1.grad_scale, o1.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
    o1.step()
    o2.step()
    torch.testing.assert_close(p1[0], p2[0], rtol=1e-6, atol=1e-7)
    before = p1[0].clone()
    st = o1.state[p1[0]]["coord"].clone()
    o1.found_inf = torch.tensor(1.0)
    o1.step()
    assert torch.equal(p1[0], before) and torch.equal(o1.state[p1[0]]["coord"], st)


def test_grad_scaler_integration():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    opt = HierarchicalOptimizer(model.parameters(), lr=1e-2, net=make_net())
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    w0 = model.weight.detach().clone()
    loss = (model(x) - y).pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(model.weight, w0) and torch.isfinite(model.weight).all()


@pytest.mark.parametrize("device", DEVICES)
def test_params_without_grad_and_zero_size(device):
    net = make_net().to(device)
    a, b, e = params_like([(10,), (4,), (0, 3)], device)
    opt = HierarchicalOptimizer([a, b, e], lr=1e-2, net=net)
    a.grad = torch.randn(10, device=device)
    e.grad = torch.zeros(0, 3, device=device)
    b0 = b.clone()
    opt.step()
    assert torch.equal(b, b0) and b not in opt.state
    assert opt.state[e]["coord"].shape == (32, 0)
    opt.zero_grad(set_to_none=True)
    a0 = a.clone()
    opt.step()  # no gradients at all: nothing happens
    assert torch.equal(a, a0)


def test_sparse_and_complex_raise():
    net = make_net()
    p = torch.zeros(5, requires_grad=True)
    opt = HierarchicalOptimizer([p], net=net)
    p.grad = torch.zeros(5).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    c = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    opt = HierarchicalOptimizer([c], net=net)
    c.grad = torch.zeros(3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex"):
        opt.step()


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "lr must be"), (dict(lr=float("nan")), "lr must be"),
    (dict(state_dtype=torch.float16), "state_dtype"), (dict(fused="yes"), "fused must be"),
])
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HierarchicalOptimizer([torch.zeros(2, requires_grad=True)], net=make_net(), **kwargs)


def test_wrong_net_type_and_fused_size():
    with pytest.raises(TypeError, match="HierarchicalNet"):
        HierarchicalOptimizer([torch.zeros(2, requires_grad=True)], net=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="fused=True"):
        HierarchicalOptimizer([torch.zeros(2, requires_grad=True)], net=make_net(hidden=6), fused=True)
    with pytest.raises(ValueError, match="attention"):
        HierarchicalOptimizer([torch.zeros(2, requires_grad=True)], net=make_net(attention=True))
    # other sizes run the reference
    p = torch.zeros(4, requires_grad=True)
    opt = HierarchicalOptimizer([p], net=make_net(hidden=6, scales=3), lr=1e-2)
    p.grad = torch.randn(4)
    opt.step()
    assert p.abs().sum() > 0


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_is_bitwise(state_dtype):
    net = make_net()
    ps = params_like(SHAPES[:3])
    opt = HierarchicalOptimizer(ps, lr=1e-2, net=net, state_dtype=state_dtype)
    for k in range(3):
        _same_grads(ps, [p.clone() for p in ps], k)
        opt.step()
    sd = save_load(opt.state_dict())
    qs = [p.detach().clone() for p in ps]
    opt2 = HierarchicalOptimizer(qs, lr=5.0, net=make_net(seed=7), state_dtype=state_dtype)  # other weights
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == 1e-2
    for k in range(3, 6):
        _same_grads(ps, qs, k)
        opt.step()
        opt2.step()
    for a, b in zip(ps, qs):
        assert torch.equal(a, b)
        assert opt2.state[b]["coord"].dtype == state_dtype
        assert torch.equal(opt.state[a]["coord"], opt2.state[b]["coord"])
    assert torch.equal(opt.global_state, opt2.global_state)


@pytest.mark.parametrize("saved,loaded", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_load_state_dict_follows_the_optimizers_state_dtype(saved, loaded):
    # As torch.optim casts loaded state to the parameters' dtype, a checkpoint's per-coordinate state
    # takes the loading optimizer's state_dtype (bfloat16 -> float32 is exact; float32 -> bfloat16
    # rounds, which is what state_dtype=torch.bfloat16 asks for). Float64 parameters keep float64.
    net = make_net()
    ps = params_like(SHAPES[:2]) + params_like([(6,)], dtype=torch.float64)
    opt = HierarchicalOptimizer(ps, lr=1e-2, net=net, state_dtype=saved)
    for k in range(2):
        _same_grads(ps, [p.clone() for p in ps], k)
        opt.step()
    opt2 = HierarchicalOptimizer([p.detach().clone() for p in ps], net=make_net(seed=3), state_dtype=loaded)
    opt2.load_state_dict(save_load(opt.state_dict()))
    for p, q in zip(ps, opt2.param_groups[0]["params"]):
        want = torch.float64 if p.dtype == torch.float64 else loaded
        assert opt2.state[q]["coord"].dtype == want
        assert torch.equal(opt2.state[q]["coord"], opt.state[p]["coord"].to(want))
    for p in opt2.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    opt2.step()


def test_trains_a_small_model():
    """Sanity of the untrained default-initialised network is not promised; the test is that the
    step runs end to end on an nn.Module with a few parameter tensors and stays finite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Sigmoid(), nn.Linear(16, 2))
    opt = HierarchicalOptimizer(model.parameters(), lr=1e-2, net=make_net())
    x, y = torch.randn(64, 6), torch.randint(0, 2, (64,))
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# meta-training
# --------------------------------------------------------------------------------------------
def test_meta_gradient_reaches_the_per_coordinate_and_tensor_weights():
    from learnedopt.tasks.ensemble import NoisyQuadratic, SumOf

    rule = HierarchicalRule(make_net())
    task = SumOf([NoisyQuadratic(5), NoisyQuadratic(3)]).sample(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    carry = meta.start(rule, task, g)
    loss, carry, _ = meta.unroll(rule, carry, 5, g, "log_ratio")
    loss.backward()
    net = rule.net
    for name in ("w_ih", "w_hh", "b", "w_d", "w_shortcut", "w_lr", "b_lr", "lr_offset",
                 "tensor_to_coord", "global_to_coord", "tensor_w_ru", "global_w_ru"):
        grad = getattr(net, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_heavy_tailed_schedule(tmp_path):
    cfg = meta.MetaConfig(task="quadratic", rule="hierarchical", objective="log_ratio", unroll_schedule="heavy_tailed",
                          num_unrolls_scale=3, unroll_min=4, unroll_scale=5, max_trajectory_steps=40, epochs=0)
    tr = meta.MetaTrainer(cfg, tmp_path)
    lengths = [tr.schedule() for _ in range(200)]
    assert all(1 <= len(ls) and all(l >= 1 for l in ls) and sum(ls) <= 40 for ls in lengths)
    assert all(l >= 4 for ls in lengths for l in ls[:-1])
    assert len({len(ls) for ls in lengths}) > 3  # the number of unrolls varies
    tr2 = meta.MetaTrainer(cfg, tmp_path / "b")
    assert [tr2.schedule() for _ in range(200)] == lengths  # drawn from the seeded generator
    with pytest.raises(ValueError, match="unroll_schedule"):
        meta.MetaConfig(unroll_schedule="poisson")


def test_meta_train_on_the_ensemble_runs_and_saves_a_loadable_rule(tmp_path):
    cfg = meta.MetaConfig(task="ensemble", task_kwargs={"with_sklearn": False}, rule="hierarchical",
                          objective="log_ratio", unroll_schedule="heavy_tailed", num_unrolls_scale=1, unroll_min=3,
                          unroll_scale=2, max_trajectory_steps=12, epochs=4, eval_every=2, eval_tasks=2,
                          eval_steps=5, eval_metric="log_ratio", clip_grad_value=1e4, clip_grad_norm=1.0)
    rule = meta.MetaTrainer(cfg, tmp_path).run()
    log = meta.read_log(tmp_path / "log.jsonl")
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    assert all("eval_log_ratio" in r for r in log if r["epoch"] % 2 == 0)
    loaded = meta.load_rule(tmp_path / "final.pt")
    assert isinstance(loaded, HierarchicalRule)
    for a, b in zip(rule.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    opt = HierarchicalOptimizer([torch.zeros(3, requires_grad=True)], net=loaded.net)
    assert opt.net is loaded.net


def test_default_is_the_shipped_pretrained_network():
    from learnedopt import pretrained

    assert "hierarchical-ensemble" in pretrained.available()
    p = torch.zeros(5, requires_grad=True)
    opt = HierarchicalOptimizer([p])
    assert opt.pretrained == "hierarchical-ensemble" and opt.param_groups[0]["lr"] == 1e-4
    shipped = pretrained.load("hierarchical-ensemble")
    assert isinstance(shipped, HierarchicalRule)
    for a, b in zip(opt.net.state_dict().values(), shipped.net.state_dict().values()):
        assert torch.equal(a, b)
    sd = save_load(opt.state_dict())
    assert sd["net"]["pretrained"] == "hierarchical-ensemble"
    info = pretrained.info("hierarchical-ensemble")
    assert info["kind"] == "hierarchical" and "meta-train" in info["command"]


def test_shipped_network_trains_an_unseen_problem_better_than_default_adam():
    """The shipped weights were meta-trained on small problems only; on a logistic regression of
    scikit-learn's 8x8 digits (not in the ensemble) 200 steps at the default lr 1e-4 must beat Adam
    at its default lr 1e-3 (measured with the shipped weights: 1.3e-4 vs 1.2)."""
    from learnedopt.tasks import data

    x, y = data.digits("train")
    x = x.reshape(len(x), -1)

    def run(make):
        torch.manual_seed(0)
        model = nn.Linear(64, 10)
        opt = make(model.parameters())
        for _ in range(200):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return nn.functional.cross_entropy(model(x), y).item()

    learned = run(lambda ps: HierarchicalOptimizer(ps))
    adam = run(lambda ps: torch.optim.Adam(ps, lr=1e-3))
    assert learned < adam, (learned, adam)


def test_init_from_and_init_lr_range(tmp_path):
    rule = HierarchicalRule(make_net(), init_lr_range=(1e-4, 1e-1))
    st = rule.init_state(params_like([(400,), (300,)]), torch.Generator().manual_seed(0))
    ll = st.coord[rule.net.rows.log_lr]
    assert math.log(1e-4) - 1e-5 <= ll.min() and ll.max() <= math.log(1e-1) + 1e-5 and ll.max() > math.log(1e-2)
    meta.save_rule(rule, tmp_path / "r.pt")
    assert meta.load_rule(tmp_path / "r.pt").init_lr_range == (1e-4, 1e-1)
    with pytest.raises(ValueError, match="init_lr_range"):
        HierarchicalRule(make_net(), init_lr_range=(1e-2, 1e-4))
    cfg = meta.MetaConfig(task="quadratic", rule="hierarchical", init_from="hierarchical-ensemble", epochs=0)
    tr = meta.MetaTrainer(cfg, tmp_path / "run")
    from learnedopt import pretrained

    for a, b in zip(tr.rule.state_dict().values(), pretrained.load("hierarchical-ensemble").state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="init_from"):
        meta.MetaTrainer(meta.MetaConfig(rule="hierarchical", init_from="nope.pt", epochs=0), tmp_path / "x")


def test_closure_hooks_and_add_param_group():
    net = make_net()
    a, b = params_like([(6,), (4,)])
    opt = HierarchicalOptimizer([a], lr=1e-2, net=net)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))

    def closure():
        calls.append("closure")
        a.grad = torch.ones_like(a)
        return torch.tensor(3.0)

    assert opt.step(closure).item() == 3.0
    assert calls == ["pre", "closure", "post"]
    opt.add_param_group({"params": [b], "lr": 0.0})
    b0 = b.clone()
    a.grad, b.grad = torch.randn(6), torch.randn(4)
    opt.step()
    assert torch.equal(b, b0) and "coord" in opt.state[b]  # lr 0: stepped state, unchanged parameter
    opt.zero_grad()
    assert a.grad is None and b.grad is None


def test_load_state_dict_rejects_a_mismatched_state_dict():
    net = make_net()
    ps = params_like([(6,), (4,)])
    opt = HierarchicalOptimizer(ps, net=net)
    other = HierarchicalOptimizer(params_like([(6,)]), net=net)
    with pytest.raises(ValueError):
        other.load_state_dict(opt.state_dict())
