"""Property-based robustness suite (issue 17; hypothesis, profiles in tests/strategies.py): random
shapes (0, 1, odd, > one CPU work item), contiguity, param groups, learning rates, steps and gradient
magnitudes from 1.4e-45 to 3.4e38 with mixed signs and exact zeros, for the ops and both optimizers,
on CPU and (cuda_emu twins) the emulated CUDA kernels. Invariants:

* parameters and every state finite after any finite gradients;
* the fused hierarchical step equals the pure-PyTorch reference (float32 state) within its
  documented tolerance (tests/test_hierarchical.py: 1e-4 relative and absolute);
* a step skipped for a non-finite gradient leaves that tensor and its state bitwise unchanged, and
  a GradScaler step with inf found leaves everything bitwise unchanged;
* a state-dict round trip (torch.save / torch.load) continues bitwise like the optimizer never
  saved;
* coord_lstm (forward and backward) is finite wherever the float64 reference is, for large inputs,
  hidden and cell states, incoming gradients and saturated gates, and matches it (relative to each
  output's scale) where float32 can (x and h of order 1, no saturating gate bias).
"""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import strategies as S
from conftest import DEVICES
from helpers import save_load
from learnedopt import ops, reference
from learnedopt.optim import HierarchicalOptimizer, L2LOptimizer
from learnedopt.rules.hierarchical import HierarchicalNet
from learnedopt.rules.l2l import CoordinateLSTMNet

TOL = dict(rtol=1e-4, atol=1e-4)  # the fused-vs-reference tolerance of tests/test_hierarchical.py
NET_H = None
NET_L = None


def hier_net():
    global NET_H
    if NET_H is None:
        torch.manual_seed(1)
        NET_H = HierarchicalNet()
    return NET_H


def l2l_net():
    global NET_L
    if NET_L is None:
        torch.manual_seed(2)
        NET_L = CoordinateLSTMNet()
    return NET_L


def make_opt(kind, groups, **kw):
    if kind == "hier":
        return HierarchicalOptimizer(groups, net=hier_net(), **kw)
    return L2LOptimizer(groups, net=l2l_net(), **kw)


def draw_grads(data, params, step):
    return [data.draw(S.gradient(tuple(p.shape), seed=1000 * step + i), label=f"grad{step}.{i}")
            for i, p in enumerate(params)]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.to(p.device).clone()


def state_tensors(opt):
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            out.extend(v for v in opt.state[p].values() if isinstance(v, torch.Tensor))
    if isinstance(opt, HierarchicalOptimizer):
        out.append(opt.global_state)
    return out


def assert_all_finite(opt, params):
    for i, p in enumerate(params):
        assert torch.isfinite(p).all(), f"parameter {i}"
    for t in state_tensors(opt):
        assert torch.isfinite(t.float()).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["hier", "l2l"])
@given(problem=S.problems(), data=st.data(), bf16=st.booleans())
def test_finite_gradients_keep_everything_finite(device, kind, problem, data, bf16):
    params, groups = S.make_params(problem, device=device)
    kw = {"state_dtype": torch.bfloat16 if bf16 else torch.float32} if kind == "hier" else {}
    opt = make_opt(kind, groups, **kw)
    for step in range(problem["steps"]):
        set_grads(params, draw_grads(data, params, step))
        opt.step()
        assert_all_finite(opt, params)


@pytest.mark.parametrize("device", DEVICES)
@given(problem=S.problems(), data=st.data())
def test_fused_matches_the_reference(device, problem, data):
    params, groups = S.make_params(problem, device=device)
    params2 = [p.clone() for p in params]
    pos = {id(p): i for i, p in enumerate(params)}
    groups2 = [{"params": [params2[pos[id(p)]] for p in g["params"]], "lr": g["lr"]} for g in groups]
    fused = make_opt("hier", groups, fused=True)
    ref = make_opt("hier", groups2, fused=False)
    for step in range(problem["steps"]):
        grads = draw_grads(data, params, step)
        set_grads(params, grads)
        set_grads(params2, grads)
        fused.step()
        ref.step()
    for p, q in zip(params, params2):
        torch.testing.assert_close(p, q, **TOL)
    for p, q in zip(params, params2):
        for k in fused.state[p]:
            a, b = fused.state[p][k], ref.state[q][k]
            if k == "coord":  # rows of very different scales (momenta and mean squares of huge gradients
                # cancel: an absolute error of rounding size relative to the row's largest entry)
                for r in range(a.shape[0]):
                    atol = TOL["atol"] * max(1.0, b[r].abs().max().item() if b.numel() else 1.0)
                    torch.testing.assert_close(a[r], b[r], rtol=TOL["rtol"], atol=atol, msg=f"{k} row {r}")
            else:
                torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(fused.global_state, ref.global_state, **TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["hier", "l2l"])
@given(problem=S.problems(), data=st.data(), bad=st.sampled_from([float("nan"), float("inf"), -float("inf")]))
def test_a_skipped_step_changes_nothing_of_that_tensor(device, kind, problem, data, bad):
    params, groups = S.make_params(problem, device=device)
    opt = make_opt(kind, groups)
    set_grads(params, draw_grads(data, params, 0))
    opt.step()
    nonempty = [i for i, p in enumerate(params) if p.numel()]
    if not nonempty:
        return
    i = data.draw(st.sampled_from(nonempty), label="bad tensor")
    grads = draw_grads(data, params, 1)
    grads[i].view(-1)[data.draw(st.integers(0, params[i].numel() - 1), label="bad element")] = bad
    before_p = params[i].clone()
    before_s = {k: v.clone() for k, v in opt.state[params[i]].items()}
    set_grads(params, grads)
    opt.step()
    assert torch.equal(params[i], before_p)
    for k, v in opt.state[params[i]].items():
        assert torch.equal(v, before_s[k]), k
    assert_all_finite(opt, params)


@pytest.mark.parametrize("kind", ["hier", "l2l"])
@given(problem=S.problems(), data=st.data())
def test_found_inf_changes_nothing(kind, problem, data):
    params, groups = S.make_params(problem)
    opt = make_opt(kind, groups)
    set_grads(params, draw_grads(data, params, 0))
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    before_p = [p.clone() for p in params]
    set_grads(params, draw_grads(data, params, 1))
    opt.grad_scale = torch.tensor(1024.0)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    for p, q in zip(params, before_p):
        assert torch.equal(p, q)
    sd = opt.state_dict()
    for k, v in before["state"].items():
        for kk, vv in v.items():
            assert torch.equal(sd["state"][k][kk], vv), (k, kk)
    if kind == "hier":
        assert torch.equal(sd["param_groups"][0]["global_state"], before["param_groups"][0]["global_state"])


@pytest.mark.parametrize("kind", ["hier", "l2l"])
@given(problem=S.problems(), data=st.data(), bf16=st.booleans())
def test_state_dict_round_trip_continues_bitwise(kind, problem, data, bf16):
    params, groups = S.make_params(problem)
    kw = {"state_dtype": torch.bfloat16 if bf16 else torch.float32} if kind == "hier" else {}
    opt = make_opt(kind, groups, **kw)
    for step in range(problem["steps"]):
        set_grads(params, draw_grads(data, params, step))
        opt.step()
    params2 = [p.clone() for p in params]
    pos = {id(p): i for i, p in enumerate(params)}
    groups2 = [{"params": [params2[pos[id(p)]] for p in g["params"]], "lr": 0.5} for g in opt.param_groups]
    opt2 = make_opt(kind, groups2, **kw)
    opt2.load_state_dict(save_load(opt.state_dict()))
    for step in range(problem["steps"], problem["steps"] + 2):
        grads = draw_grads(data, params, step)
        set_grads(params, grads)
        set_grads(params2, grads)
        opt.step()
        opt2.step()
    for p, q in zip(params, params2):
        assert torch.equal(p, q)
    for a, b in zip(state_tensors(opt), state_tensors(opt2)):
        assert torch.equal(a, b)


# -- the coord_lstm op -----------------------------------------------------------------------------
@st.composite
def lstm_inputs(draw):
    N = draw(st.sampled_from([0, 1, 5, 33]))
    I, H = draw(st.integers(1, 6)), draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    hs, cs, xs = (draw(st.sampled_from([1.0, 1e3, 1e10, 1e30])) for _ in range(3))
    bias = draw(st.sampled_from([0.0, 30.0, 200.0, -200.0]))  # saturating gate biases
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, h, c = r(N, I) * xs, r(N, H) * hs, r(N, H) * cs
    w_ih, w_hh, b = r(4 * H, I) / H, r(4 * H, H) / H, r(4 * H)
    which = draw(st.sampled_from(["i", "f", "g", "o", "all"]))
    for k, name in enumerate("ifgo"):
        if which in (name, "all"):
            b[k * H:(k + 1) * H] += bias
    noncontig = draw(st.booleans())
    grad_scale = draw(st.sampled_from([1.0, 1e10]))
    # well conditioned: x and h of order 1 (the pre-activations do not cancel) and no saturating bias
    # (float32's sigmoid rounds to 1 from z ~ 17 on, so f (1 - f) is 0 where float64 still has e.g.
    # 1e-13, which a cell of 1e30 turns into a large gradient): finiteness only otherwise
    return (x, h, c, w_ih, w_hh, b), noncontig, grad_scale, seed, xs == hs == 1.0 and bias == 0.0


@pytest.mark.parametrize("device", DEVICES)
@given(case=lstm_inputs())
def test_coord_lstm_finite_where_the_maths_is(device, case):
    ins64, noncontig, gscale, seed, well_conditioned = case
    from helpers import noncontig as nc

    ins = [t.float().to(device) for t in ins64]
    if noncontig:
        ins = [nc(t) for t in ins]
    ins = [t.requires_grad_() for t in ins]
    g = torch.Generator().manual_seed(seed + 1)
    N, H = ins64[1].shape
    gh = (torch.randn(N, H, generator=g) * gscale).to(device)
    gc = (torch.randn(N, H, generator=g) * gscale).to(device)
    h_new, c_new = ops.coord_lstm(*ins)
    torch.autograd.backward([h_new, c_new], [gh, gc])
    ref_in = [t.detach().double().requires_grad_() for t in ins]
    rh, rc = reference.coord_lstm(*ref_in)
    torch.autograd.backward([rh, rc], [gh.double(), gc.double()])
    outs = [(h_new, rh), (c_new, rc)] + [(a.grad, b.grad) for a, b in zip(ins, ref_in)]
    for k, (got, want) in enumerate(outs):
        fin = torch.isfinite(want) & (want.abs() < S.F32_MAX)
        assert torch.isfinite(got[fin]).all(), k
        if not well_conditioned:
            # large x or h: the gate pre-activations are sums of large terms that cancel, so float32
            # and float64 gates may differ entirely; saturated gates: see lstm_inputs. Finiteness is
            # the property there.
            continue
        # close to the float64 values relative to the output's scale (large cells and gradients)
        scale = max(1.0, want[fin].abs().max().item()) if fin.any() else 1.0
        torch.testing.assert_close(got[fin].double() / scale, want[fin] / scale, rtol=1e-4, atol=1e-4)
