"""learnedopt.L2LOptimizer: the fused step against its pure-PyTorch reference, and the parts of the
torch.optim.Optimizer contract that are specific to it (the generic TestOptimRenewed-style tests run
for every optimizer in test_optim_compat.py).

Where a generic TestOptimRenewed test does not apply to a learned optimizer (a zero gradient need
not give a zero update) the test here states the behaviour that does hold instead.
"""

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import DEVICES
from helpers import assert_tree_equal, save_load
import learnedopt
from learnedopt import CoordinateLSTMNet, L2LOptimizer, reference

# Fused CPU kernel vs the reference, same gradient stream, 100 steps (test_fused_matches_reference_100_steps).
# Observed on CPU: float32 parameters (|p| <= 2.8) max |diff| 3e-7 .. 1.7e-6 (the larger with weight
# decay, where parameter differences feed back into g'), LSTM states max |diff| 5e-7 .. 1.4e-6; a
# purely relative bound does not work for entries near zero (|diff| / |p| up to 7e-5 there). These
# come from the kernel's <= 20-ulp exp (csrc/cpu/vec_math.h) and summation order. float64: <= 2e-15.
# rtol = atol = 1e-5 leaves a ~6-10x margin and still catches a wrong formula (checked: an lr off by
# 1 %, or a dropped weight decay, moves parameters by > 0.5 over these 100 steps); float64 gets 1e-12.
TOL32 = dict(rtol=1e-5, atol=1e-5)
TOL64 = dict(rtol=1e-12, atol=1e-12)


def tol_for(dtype):
    return TOL64 if dtype == torch.float64 else TOL32


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def make_net(layers=(20, 20), preprocess="log_sign", seed=1, **kw):
    torch.manual_seed(seed)
    return CoordinateLSTMNet(layers, preprocess=preprocess, **kw)


def state_dtype(p):
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def ref_step(net, params, grads, states, lr, weight_decay=0.0, grad_scale=None, found_inf=None):
    """One reference step (learnedopt.reference.l2l_step_) with net's weights, in place."""
    device = params[0].device if params else torch.device("cpu")
    L = len(net.layers)
    w = [net.layer_weights(l) for l in range(L)]
    reference.l2l_step_(
        params, grads, states,
        [t[0].detach().to(device) for t in w], [t[1].detach().to(device) for t in w],
        [t[2].detach().to(device) for t in w], net.w_out.detach().to(device), net.b_out.detach().to(device),
        lr, weight_decay, net.output_scale, net.p, net.preprocess == "log_sign", grad_scale, found_inf,
    )


class RefTwin:
    """The reference's own copy of a list of parameters: cloned values and zero LSTM states."""

    def __init__(self, net, params):
        self.net = net
        self.params = [p.detach().clone() for p in params]
        width = 2 * sum(net.layers)
        self.states = [torch.zeros(p.numel(), width, dtype=state_dtype(p), device=p.device) for p in params]

    def step(self, grads, lr, weight_decay=0.0, **kw):
        idx = [i for i, g in enumerate(grads) if g is not None]
        ref_step(self.net, [self.params[i] for i in idx], [grads[i] for i in idx], [self.states[i] for i in idx],
                 lr, weight_decay, **kw)


def lstm_states(opt, params):
    return [opt.state[p]["lstm"] for p in params]


def assert_matches(actual, expected, dtype=None):
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        torch.testing.assert_close(a, e, **tol_for(dtype or a.dtype))


class MLP(nn.Module):
    """A few Linear layers (one without bias), a zero-size parameter and a float64 parameter.
    l1.weight has 320 > 304 coordinates: several work items (row blocks) of the CPU kernel."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(8, 40)
        self.l2 = nn.Linear(40, 6)
        self.l3 = nn.Linear(6, 1, bias=False)
        self.empty = nn.Parameter(torch.empty(0, 3))
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 6, dtype=torch.float64))

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        h = torch.tanh(self.l2(h)) * self.scale.to(h.dtype)
        return self.l3(h).squeeze(-1) + self.empty.sum()


def make_mlp(device, seed=0):
    torch.manual_seed(seed)
    model = MLP().to(device)
    x = torch.randn(32, 8, device=device)
    y = torch.randn(32, device=device)
    return model, x, y


def backward(model, x, y):
    for p in model.parameters():
        p.grad = None
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    return loss.detach()


class CountL2LCalls(TorchDispatchMode):
    """Records, for every call of the fused op, how many parameters it got."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.learnedopt.l2l_step_.default:
            self.calls.append(len(args[0]))
        return func(*args, **(kwargs or {}))


# --------------------------------------------------------------------------------------------
# the fused step against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("layers,preprocess", [((20, 20), "log_sign"), ((5, 3), None), ((), "log_sign")],
                         ids=["20-20-logsign", "5-3-raw", "nolayers"])
def test_fused_matches_reference_100_steps(device, weight_decay, layers, preprocess):
    model, x, y = make_mlp(device)
    net = make_net(layers, preprocess).to(device)
    params = list(model.parameters())
    lr = 0.5
    opt = L2LOptimizer(params, net=net, lr=lr, weight_decay=weight_decay)
    twin = RefTwin(net, params)
    for _ in range(100):
        backward(model, x, y)
        grads = [p.grad.clone() for p in params]
        opt.step()
        twin.step(grads, lr, weight_decay)  # the same gradients
        for p, q in zip(params, twin.params):
            torch.testing.assert_close(p.detach(), q, **tol_for(p.dtype))
        assert_matches(lstm_states(opt, params), twin.states)
        # As TestOptimRenewed's TensorTracker: the reference continues from the fused values, so
        # rounding differences do not compound. With weight decay they would: g' = g + wd * theta
        # feeds a parameter's difference back through the log preprocessing, whose slope
        # 1 / (p |g'|) reaches ~2e3 near |g'| = e^-p, and the twins drift apart by ~1e-4 over 100
        # steps depending on the reference's float rounding (it did with OMP_NUM_THREADS=1).
        for p, q, s, t in zip(params, twin.params, lstm_states(opt, params), twin.states):
            q.copy_(p.detach())
            t.copy_(s)
    # State layout: [numel, 2 * sum(hidden)], float64 for the float64 parameter, float32 otherwise.
    for p in params:
        s = opt.state[p]["lstm"]
        assert s.shape == (p.numel(), 2 * sum(layers)) and s.dtype == state_dtype(p)
    # The run is not trivial: parameters moved.
    assert not torch.equal(model.l1.weight.detach(), make_mlp(device)[0].l1.weight.detach())


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_params_and_grads_match_reference(device):
    torch.manual_seed(3)
    # Leaves with non-contiguous strides (as TestOptimRenewed's non-contiguous weight/bias).
    w = torch.randn(20, 40, device=device).t().requires_grad_()
    b = torch.randn(80, device=device)[::2].detach().requires_grad_()
    assert not w.is_contiguous() and not b.is_contiguous()
    net = make_net().to(device)
    opt = L2LOptimizer([w, b], net=net, lr=0.3, weight_decay=0.01)
    twin = RefTwin(net, [w, b])
    for _ in range(10):
        w.grad = torch.randn(20, 40, device=device).t()
        b.grad = torch.randn(80, device=device)[::2]
        grads = [w.grad.clone(), b.grad.clone()]
        opt.step()
        twin.step(grads, 0.3, 0.01)
    torch.testing.assert_close(w.detach(), twin.params[0], **TOL32)
    torch.testing.assert_close(b.detach(), twin.params[1], **TOL32)
    assert_matches(lstm_states(opt, [w, b]), twin.states)


# --------------------------------------------------------------------------------------------
# lr, weight decay and hyper-parameter errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_lr_zero_keeps_params_but_advances_state(device):
    # lr multiplies the update only: with lr = 0 the parameters stay bitwise the same, but the
    # LSTM still reads the gradient, so its state advances exactly as the reference says.
    model, x, y = make_mlp(device)
    net = make_net().to(device)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    opt = L2LOptimizer(params, net=net, lr=0.0)
    twin = RefTwin(net, params)
    for _ in range(3):
        backward(model, x, y)
        grads = [p.grad.clone() for p in params]
        opt.step()
        twin.step(grads, 0.0)
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    states = lstm_states(opt, params)
    assert any(s.abs().sum() > 0 for s in states)  # the state did advance
    assert_matches(states, twin.states)


@pytest.mark.parametrize("device", DEVICES)
def test_update_proportional_to_group_lr(device):
    # Two groups, identical parameters and gradients, different lr. With zero initial values and no
    # weight decay the parameter is the sum of lr * 0.1 * y_k, and the LSTM state (hence y_k) does not
    # depend on lr, so the ratio of the parameters is the ratio of the lrs.
    torch.manual_seed(0)
    a = torch.zeros(50, device=device, requires_grad=True)
    b = torch.zeros(50, device=device, requires_grad=True)
    c = torch.randn(50, device=device, requires_grad=True)  # the "irrelevant" group of test_param_groups_lr
    c0 = c.detach().clone()
    opt = L2LOptimizer([{"params": [a]}, {"params": [b], "lr": 0.3}, {"params": [c], "lr": 1e-28}],
                       net=make_net().to(device), lr=1.0)
    for _ in range(5):
        g = torch.randn(50, device=device)
        a.grad, b.grad, c.grad = g.clone(), g.clone(), g.clone()
        opt.step()
    assert a.abs().min() > 0
    torch.testing.assert_close(b.detach(), 0.3 * a.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(opt.state[a]["lstm"], opt.state[b]["lstm"], rtol=0, atol=0)
    assert torch.equal(c.detach(), c0)  # lr = 1e-28: bitwise unchanged in float32


@pytest.mark.parametrize("device", DEVICES)
def test_steplr_changes_lr_and_update_follows(device):
    model, x, y = make_mlp(device)
    net = make_net().to(device)
    params = list(model.parameters())
    opt = L2LOptimizer([{"params": params[:3]}, {"params": params[3:], "lr": 0.2}], net=net, lr=0.8)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    twin = RefTwin(net, params)
    for k in range(6):
        lrs = (0.8 * 0.5 ** (k // 2), 0.2 * 0.5 ** (k // 2))
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(lrs)
        backward(model, x, y)
        grads = [p.grad.clone() for p in params]
        opt.step()
        sched.step()
        twin.step(grads[:3] + [None] * (len(params) - 3), lrs[0])
        twin.step([None] * 3 + grads[3:], lrs[1])
    for p, q in zip(params, twin.params):
        torch.testing.assert_close(p.detach(), q, **tol_for(p.dtype))
    assert_matches(lstm_states(opt, params), twin.states)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_decay_matches_reference_and_matters(device):
    torch.manual_seed(0)
    p0 = torch.randn(30, device=device) * 3
    grads = [torch.randn(30, device=device) * 1e-2 for _ in range(5)]
    out = {}
    for wd in (0.0, 0.5):
        p = p0.clone().requires_grad_()
        net = make_net().to(device)
        opt = L2LOptimizer([p], net=net, lr=0.5, weight_decay=wd)
        twin = RefTwin(net, [p])
        for g in grads:
            p.grad = g.clone()
            opt.step()
            twin.step([g.clone()], 0.5, wd)
        torch.testing.assert_close(p.detach(), twin.params[0], **TOL32)
        assert_matches(lstm_states(opt, [p]), twin.states)
        out[wd] = p.detach()
    assert (out[0.0] - out[0.5]).abs().max() > 1e-3  # weight decay is not ignored


@pytest.mark.parametrize("kwargs", [
    dict(lr=-1e-3), dict(lr=float("nan")), dict(lr=float("inf")), dict(lr="0.1"), dict(lr=torch.tensor(0.1)),
    dict(weight_decay=-0.1), dict(weight_decay=float("nan")), dict(weight_decay=float("inf")),
])
def test_invalid_hyperparameters_raise_value_error(kwargs):
    with pytest.raises(ValueError, match="lr|weight_decay"):
        L2LOptimizer([torch.zeros(3, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("net", [nn.LSTM(2, 20), nn.Linear(2, 1), "CoordinateLSTMNet"])
def test_net_of_wrong_type_raises_type_error(net):
    with pytest.raises(TypeError, match="CoordinateLSTMNet"):
        L2LOptimizer([torch.zeros(3, requires_grad=True)], net=net)


def test_default_is_the_shipped_l2l_mnist_weights_and_repr():
    opt = L2LOptimizer([torch.zeros(3, requires_grad=True)])
    assert opt.pretrained == "l2l-mnist" and isinstance(opt.net, CoordinateLSTMNet)
    shipped = learnedopt.pretrained.load_net("l2l-mnist")
    for (k, a), (_, b) in zip(opt.net.state_dict().items(), shipped.state_dict().items()):
        assert torch.equal(a, b), k
    assert opt.defaults["lr"] == 1.0 and opt.defaults["weight_decay"] == 0.0
    assert "L2LOptimizer" in repr(opt)
    assert opt.state_dict()["net"]["pretrained"] == "l2l-mnist"


def test_an_explicit_net_is_used_as_given():
    net = CoordinateLSTMNet(layers=(5,))
    opt = L2LOptimizer([torch.zeros(3, requires_grad=True)], net=net)
    assert opt.net is net and opt.pretrained is None
    with pytest.raises(ValueError, match="net or pretrained, not both"):
        L2LOptimizer([torch.zeros(3, requires_grad=True)], net=net, pretrained="l2l-mnist")
    with pytest.raises(ValueError, match="unknown weights 'nope'"):
        L2LOptimizer([torch.zeros(3, requires_grad=True)], pretrained="nope")


@pytest.mark.parametrize("seed", [0, 1])
def test_default_optimizer_trains_a_regression(seed):
    """L2LOptimizer(params) with nothing else: a linear regression (not MNIST, not its meta-training
    problem) goes down by two orders of magnitude in 100 steps. (With the untrained
    ``CoordinateLSTMNet()`` that 0.1.0 used by default, the same two runs diverge: 4.5 -> 34 and 3.5 -> 151.)"""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, 10, generator=g)
    y = X @ torch.randn(10, 1, generator=g) + 0.1 * torch.randn(256, 1, generator=g)
    torch.manual_seed(seed)
    model = nn.Linear(10, 1)
    opt = L2LOptimizer(model.parameters())
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.01 * losses[0] and losses[-1] < 0.05, (losses[0], losses[-1])


# --------------------------------------------------------------------------------------------
# state_dict / load_state_dict
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fresh_layers", [(20, 20), (5,)], ids=["same-layers", "other-layers"])
def test_state_dict_round_trip_is_bitwise(fresh_layers):
    model, x, y = make_mlp("cpu")
    net = make_net((20, 20), seed=1)
    opt = L2LOptimizer(model.parameters(), net=net, lr=0.5, weight_decay=0.01)
    for _ in range(5):
        backward(model, x, y)
        opt.step()
    sd = save_load(opt.state_dict())
    model2 = copy.deepcopy(model)
    # A different, freshly initialised net (other weights, possibly other layers) and other hyper-parameters.
    fresh = make_net(fresh_layers, seed=99, p=5.0, output_scale=0.3)
    opt2 = L2LOptimizer(model2.parameters(), net=fresh, lr=0.01)
    opt2.load_state_dict(sd)
    # The checkpoint's net (configuration and weights) and groups are restored.
    assert (opt2.net.layers, opt2.net.preprocess, opt2.net.p, opt2.net.output_scale) == (
        net.layers, net.preprocess, net.p, net.output_scale)
    for (k, a), (k2, b) in zip(net.state_dict().items(), opt2.net.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    assert opt2.param_groups[0]["lr"] == 0.5 and opt2.param_groups[0]["weight_decay"] == 0.01
    # The input dict is not mutated by loading.
    assert "net" in sd and all("lstm" in v for v in sd["state"].values())
    for _ in range(5):
        backward(model, x, y)
        backward(model2, x, y)
        opt.step()
        opt2.step()
        for p, q in zip(model.parameters(), model2.parameters()):
            assert torch.equal(p, q)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(opt.state[p]["lstm"], opt2.state[q]["lstm"])
    # ... and the two optimizers' state_dicts agree (test_state_dict_deterministic).
    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd1["param_groups"] == sd2["param_groups"]
    assert_tree_equal(sd1["state"], sd2["state"])
    assert_tree_equal(sd1["net"], sd2["net"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_load_state_dict_keeps_lstm_state_dtype(dtype):
    # torch.optim casts floating state to the parameter's dtype on load; the LSTM state must stay
    # float32 (float64 for float64 parameters) and keep its exact values.
    torch.manual_seed(0)
    p = torch.randn(40, dtype=dtype, requires_grad=True)
    opt = L2LOptimizer([p], net=make_net())
    for _ in range(3):
        p.grad = torch.randn(40).to(dtype)
        opt.step()
    saved = opt.state[p]["lstm"].clone()
    assert saved.dtype == state_dtype(p)
    q = p.detach().clone().requires_grad_()
    opt2 = L2LOptimizer([q], net=make_net(seed=5))
    opt2.load_state_dict(save_load(opt.state_dict()))
    s = opt2.state[q]["lstm"]
    assert s.dtype == state_dtype(p)
    assert torch.equal(s, saved)
    assert s.data_ptr() != opt.state[p]["lstm"].data_ptr()  # a copy, not an alias
    g = torch.randn(40).to(dtype)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(p, q)


def test_load_state_dict_with_named_parameters():
    # test_can_load_from_to_named_state_dict, for the optimizer's own state_dict.
    model, x, y = make_mlp("cpu")
    opt = L2LOptimizer(model.named_parameters(), net=make_net())
    backward(model, x, y)
    opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == [n for n, _ in model.named_parameters()]
    model2 = copy.deepcopy(model)
    opt2 = L2LOptimizer(model2.named_parameters(), net=make_net(seed=7))
    opt2.load_state_dict(save_load(sd))
    assert opt2.state_dict()["param_groups"][0]["param_names"] == sd["param_groups"][0]["param_names"]
    backward(model, x, y)
    backward(model2, x, y)
    opt.step()
    opt2.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_loads_across_devices(device):
    # test_state_dict_with_cuda_params: a CPU optimizer's state_dict loads into an optimizer of
    # `device`; the state follows the parameters' device and the trajectories agree.
    torch.manual_seed(0)
    p = torch.randn(30, requires_grad=True)
    opt = L2LOptimizer([p], net=make_net(), lr=0.5)
    grads = [torch.randn(30) for _ in range(6)]
    for g in grads[:3]:
        p.grad = g.clone()
        opt.step()
    q = p.detach().to(device).requires_grad_()
    opt2 = L2LOptimizer([q], net=make_net(seed=3).to(device))
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[q]["lstm"].device == q.device
    for g in grads[3:]:
        p.grad, q.grad = g.clone(), g.to(device)
        opt.step()
        opt2.step()
    torch.testing.assert_close(q.detach().cpu(), p.detach(), **TOL32)


# --------------------------------------------------------------------------------------------
# hooks (these and deepcopy, generic, run for every optimizer in test_optim_compat.py)
# --------------------------------------------------------------------------------------------


def _opt_with_grad(seed=0):
    torch.manual_seed(seed)
    p = torch.randn(6, requires_grad=True)
    p.grad = torch.randn(6)
    return p, L2LOptimizer([p], net=make_net())


def test_load_state_dict_pre_hook_sees_and_edits_the_whole_state_dict():
    # The pre-hook gets the state_dict that is loaded, the LSTM states and the network included, and
    # what it changes is what gets loaded (e.g. resetting the LSTM state, or upgrading an old
    # checkpoint).
    p, opt = _opt_with_grad()
    opt.step()
    sd = opt.state_dict()
    seen = {}

    def pre(o, sd):
        seen["net"] = "net" in sd
        seen["lstm"] = "lstm" in sd["state"][0]
        new = copy.deepcopy(sd)
        new["state"][0]["lstm"] = torch.zeros_like(sd["state"][0]["lstm"])
        new["net"]["output_scale"] = 0.25
        return new

    q = p.detach().clone().requires_grad_()
    opt2 = L2LOptimizer([q], net=make_net(seed=4))
    opt2.register_load_state_dict_pre_hook(pre)
    opt2.load_state_dict(sd)
    assert seen == {"net": True, "lstm": True}
    assert torch.count_nonzero(opt2.state[q]["lstm"]) == 0
    assert opt2.net.output_scale == 0.25


# --------------------------------------------------------------------------------------------
# gradients: None, zero-size, closure, sparse, complex, non-finite
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_params_without_grad_are_skipped(device):
    # test_step_is_noop_when_params_have_no_grad
    torch.manual_seed(0)
    a = torch.randn(5, device=device, requires_grad=True)
    b = torch.randn(5, device=device, requires_grad=True)
    frozen = torch.randn(5, device=device, requires_grad=False)
    b0, f0 = b.detach().clone(), frozen.clone()
    opt = L2LOptimizer([a, b, frozen], net=make_net().to(device))
    a.grad = torch.randn(5, device=device)
    with CountL2LCalls() as calls:
        opt.step()
    assert calls.calls == [1]  # only a goes to the op
    assert torch.equal(b.detach(), b0) and torch.equal(frozen, f0)
    assert b not in opt.state and frozen not in opt.state
    assert "lstm" in opt.state[a]  # test_non_empty_state


@pytest.mark.parametrize("device", DEVICES)
def test_zero_grad_set_to_none_then_step_does_nothing(device):
    model, x, y = make_mlp(device)
    opt = L2LOptimizer(model.parameters(), net=make_net().to(device))
    for _ in range(2):
        backward(model, x, y)
        opt.step()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    states = [s.clone() for s in lstm_states(opt, params)]
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in params)
    assert opt.step() is None
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    for s, s0 in zip(lstm_states(opt, params), states):
        assert torch.equal(s, s0)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_size_parameters(device):
    e1 = torch.empty(0, device=device, requires_grad=True)
    e2 = torch.empty(3, 0, dtype=torch.float64, device=device, requires_grad=True)
    p = torch.randn(4, device=device, requires_grad=True)
    net = make_net().to(device)
    opt = L2LOptimizer([e1, e2, p], net=net, lr=0.5)
    twin = RefTwin(net, [e1, e2, p])
    for _ in range(2):
        grads = [torch.empty(0, device=device), torch.empty(3, 0, dtype=torch.float64, device=device),
                 torch.randn(4, device=device)]
        e1.grad, e2.grad, p.grad = (g.clone() for g in grads)
        opt.step()
        twin.step(grads, 0.5)
    assert opt.state[e1]["lstm"].shape == (0, 80) and opt.state[e2]["lstm"].dtype == torch.float64
    torch.testing.assert_close(p.detach(), twin.params[2], **TOL32)
    # Only zero-size parameters.
    opt0 = L2LOptimizer([e1], net=net)
    opt0.step()
    assert e1.shape == (0,)


def test_closure_is_called_and_its_loss_returned():
    model, x, y = make_mlp("cpu")
    opt = L2LOptimizer(model.parameters(), net=make_net())
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    w0 = model.l1.weight.detach().clone()
    loss = opt.step(closure)
    assert calls == [True]  # called once, with grad enabled although step runs under no_grad
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    assert not torch.equal(model.l1.weight.detach(), w0)  # the closure's gradients were used


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_gradient_raises(device):
    p = torch.randn(10, 3, device=device, requires_grad=True)
    p.grad = torch.randn(10, 3, device=device).to_sparse()
    opt = L2LOptimizer([p], net=make_net().to(device))
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    # A real sparse-gradient producer (nn.Embedding(sparse=True)).
    emb = nn.Embedding(10, 3, sparse=True).to(device)
    emb(torch.tensor([1, 2], device=device)).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        L2LOptimizer(emb.parameters(), net=make_net().to(device)).step()


@pytest.mark.parametrize("device", DEVICES)
def test_complex_parameter_raises(device):
    p = torch.randn(4, dtype=torch.complex64, device=device, requires_grad=True)
    p.grad = torch.randn(4, dtype=torch.complex64, device=device)
    opt = L2LOptimizer([p], net=make_net().to(device))
    with pytest.raises(RuntimeError, match="complex"):
        opt.step()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_gradient_skips_that_parameter(device, bad):
    # A parameter whose gradient holds a NaN/inf keeps its value AND its LSTM state for that step;
    # the others are updated normally; later finite steps continue (also for the skipped one).
    torch.manual_seed(0)
    a = torch.randn(700, device=device, requires_grad=True)  # several row blocks of the CPU kernel
    b = torch.randn(10, device=device, requires_grad=True)
    c = torch.randn(5, dtype=torch.float64, device=device, requires_grad=True)
    net = make_net().to(device)
    opt = L2LOptimizer([a, b, c], net=net, lr=0.5, weight_decay=0.01)
    twin = RefTwin(net, [a, b, c])
    for k in range(8):
        grads = [torch.randn(700, device=device), torch.randn(10, device=device),
                 torch.randn(5, dtype=torch.float64, device=device)]
        if k == 2:
            grads[0][650] = bad  # in the last block only
        if k == 4:
            grads[1][0] = bad
            grads[2][3] = bad
        a.grad, b.grad, c.grad = (g.clone() for g in grads)
        before = [t.detach().clone() for t in (a, b, c)]
        sbefore = [s.clone() for s in lstm_states(opt, [a, b, c])] if k else None
        opt.step()
        twin.step(grads, 0.5, 0.01)
        if k == 2:
            assert torch.equal(a.detach(), before[0]) and torch.equal(opt.state[a]["lstm"], sbefore[0])
            assert not torch.equal(b.detach(), before[1]) and not torch.equal(opt.state[b]["lstm"], sbefore[1])
            assert not torch.equal(c.detach(), before[2])
        if k == 4:
            assert not torch.equal(a.detach(), before[0])
            for i in (1, 2):
                assert torch.equal((a, b, c)[i].detach(), before[i])
                assert torch.equal(lstm_states(opt, [a, b, c])[i], sbefore[i])
        for t in (a, b, c):
            assert torch.isfinite(t).all() and torch.isfinite(opt.state[t]["lstm"]).all()
    for t, r in zip((a, b, c), twin.params):
        torch.testing.assert_close(t.detach(), r, **tol_for(t.dtype))
    assert_matches(lstm_states(opt, [a, b, c]), twin.states)


# --------------------------------------------------------------------------------------------
# mixed precision and torch.amp.GradScaler
# --------------------------------------------------------------------------------------------

# One rounding to the storage dtype: a per-step difference from the reference of at most one ulp
# (when the float32 result lies next to a rounding boundary and the kernel's y differs in the last
# float32 bits).
ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_16bit_params_match_float32_reference(device, weight_decay):
    # bf16 and fp16 parameters (with fp32 and fp64 ones in the same group, one op call): the state is
    # float32 and each step equals the reference computed in float32 from the same 16-bit values.
    torch.manual_seed(0)
    dtypes = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    params = [torch.randn(n, device=device).to(dt).requires_grad_() for n, dt in zip((700, 40, 20, 10), dtypes)]
    net = make_net().to(device)
    opt = L2LOptimizer(params, net=net, lr=0.5, weight_decay=weight_decay)
    mismatches = 0
    for k in range(10):
        grads = [(torch.randn(p.shape, device=device) * 10.0 ** (k % 3 - 2)).to(p.dtype) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        # The reference starts each step from the optimizer's current values (TensorTracker style),
        # so that one-ulp differences do not compound.
        twin = RefTwin(net, params)
        if k:
            twin.states = [s.clone() for s in lstm_states(opt, params)]
        with CountL2LCalls() as calls:
            opt.step()
        assert calls.calls == [4]
        twin.step(grads, 0.5, weight_decay)
        for p, r in zip(params, twin.params):
            assert opt.state[p]["lstm"].dtype == state_dtype(p)
            if p.dtype in ULP:
                diff = (p.detach().float() - r.float()).abs()
                assert (diff <= ULP[p.dtype] * r.float().abs() + 1e-6).all()
                mismatches += int((diff > 0).sum())
            else:
                torch.testing.assert_close(p.detach(), r, **tol_for(p.dtype))
        assert_matches(lstm_states(opt, params), twin.states)
    # Off-by-one-ulp results are rare, not the rule.
    assert mismatches <= 0.01 * 10 * 740


def _scaler(**kw):
    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler is not available")
    try:
        return torch.amp.GradScaler("cpu", **kw)
    except (RuntimeError, TypeError) as e:  # pragma: no cover
        pytest.skip(f"CPU GradScaler not available: {e}")


class SmallModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(8, 40)
        self.l2 = nn.Linear(40, 1)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x))).squeeze(-1)


def _two_small_models():
    torch.manual_seed(0)
    m1 = SmallModel()
    m2 = copy.deepcopy(m1)
    x, y = torch.randn(32, 8), torch.randn(32)
    return m1, m2, x, y


def test_grad_scaler_step_equals_unscaled_step():
    # GradScaler sees _step_supports_amp_scaling, only checks the (scaled) gradients for infs, sets
    # optimizer.grad_scale / optimizer.found_inf and calls step(): the op unscales internally. Scales
    # are powers of two, so the result is bitwise that of an unscaled step.
    assert L2LOptimizer._step_supports_amp_scaling
    scaler = _scaler(init_scale=2.0 ** 12, growth_interval=3)
    m1, m2, x, y = _two_small_models()
    o1 = L2LOptimizer(m1.parameters(), net=make_net(), lr=0.5, weight_decay=0.01)
    o2 = L2LOptimizer(m2.parameters(), net=make_net(), lr=0.5, weight_decay=0.01)
    scales = []
    for _ in range(6):
        o1.zero_grad()
        o2.zero_grad()
        (m1(x) - y).pow(2).mean().backward()
        scaler.scale((m2(x) - y).pow(2).mean()).backward()
        scales.append(scaler.get_scale())
        grads = [p.grad.clone() for p in m2.parameters()]
        o1.step()
        scaler.step(o2)
        scaler.update()
        # The step does not touch .grad (they stay scaled) and GradScaler removed its attributes.
        for p, g in zip(m2.parameters(), grads):
            assert torch.equal(p.grad, g)
        assert not hasattr(o2, "grad_scale") and not hasattr(o2, "found_inf")
        for p, q in zip(m1.parameters(), m2.parameters()):
            assert torch.equal(p, q)
    assert scales[0] == 2.0 ** 12 and scales[-1] > scales[0]  # the scale grew (growth_interval=3), no skips


def test_grad_scaler_after_unscale_equals_unscaled_step():
    # unscale_() first (e.g. for gradient clipping): GradScaler then passes grad_scale=None.
    scaler = _scaler(init_scale=2.0 ** 10)
    m1, m2, x, y = _two_small_models()
    o1 = L2LOptimizer(m1.parameters(), net=make_net(), lr=0.5)
    o2 = L2LOptimizer(m2.parameters(), net=make_net(), lr=0.5)
    for _ in range(3):
        o1.zero_grad()
        o2.zero_grad()
        (m1(x) - y).pow(2).mean().backward()
        scaler.scale((m2(x) - y).pow(2).mean()).backward()
        scaler.unscale_(o2)
        o1.step()
        scaler.step(o2)
        scaler.update()
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_grad_scaler_inf_skips_the_whole_step():
    scaler = _scaler(init_scale=2.0 ** 10)
    m1, m2, x, y = _two_small_models()
    o1 = L2LOptimizer(m1.parameters(), net=make_net(), lr=0.5)
    o2 = L2LOptimizer(m2.parameters(), net=make_net(), lr=0.5)

    def scaled_step(inject_inf):
        o2.zero_grad()
        scaler.scale((m2(x) - y).pow(2).mean()).backward()
        if inject_inf:
            m2.l2.bias.grad[0] = float("inf")  # one coordinate of one parameter
        scaler.step(o2)
        scaler.update()

    def plain_step():
        o1.zero_grad()
        (m1(x) - y).pow(2).mean().backward()
        o1.step()

    plain_step()
    scaled_step(False)
    params2 = list(m2.parameters())
    before = [p.detach().clone() for p in params2]
    states = [s.clone() for s in lstm_states(o2, params2)]
    scaled_step(True)
    # Every parameter and every LSTM state unchanged, and the scale backed off.
    for p, b in zip(params2, before):
        assert torch.equal(p.detach(), b)
    for s, s0 in zip(lstm_states(o2, params2), states):
        assert torch.equal(s, s0)
    assert scaler.get_scale() == 2.0 ** 9
    # The next finite step continues as if the bad one never happened.
    plain_step()
    scaled_step(False)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("device", DEVICES)
def test_found_inf_and_grad_scale_attributes(device):
    # test_fused_does_not_step_if_foundinf, with the attributes GradScaler sets.
    torch.manual_seed(0)
    p = torch.randn(20, device=device, requires_grad=True)
    net = make_net().to(device)
    opt = L2LOptimizer([p], net=net, lr=0.5)
    p.grad = torch.randn(20, device=device) * 8.0
    p0 = p.detach().clone()
    opt.found_inf = torch.ones((), device=device)
    opt.grad_scale = torch.full((), 8.0, device=device)
    opt.step()
    assert torch.equal(p.detach(), p0) and torch.count_nonzero(opt.state[p]["lstm"]) == 0
    opt.found_inf = torch.zeros((), device=device)
    twin = RefTwin(net, [p])
    opt.step()
    twin.step([p.grad / 8.0], 0.5)
    torch.testing.assert_close(p.detach(), twin.params[0], **TOL32)
    assert_matches(lstm_states(opt, [p]), twin.states)


# --------------------------------------------------------------------------------------------
# zero gradients: the generic "zero grad => no step" does not hold for a learned optimizer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_zero_gradient_behaviour(device):
    # TestOptimRenewed.test_step_is_noop_for_zero_grads assumes that a zero gradient gives a zero
    # update. For L2L the update is the network's output for the preprocessed zero gradient
    # (log/sign: (-1, 0)) and the LSTM state: with biases this is in general NOT zero. What holds:
    # (1) a net whose read-out is zero (w_out = 0, b_out = 0) gives a zero update for any gradient,
    #     while the LSTM state still advances;
    # (2) with a general net a zero gradient moves the parameter deterministically, by the
    #     reference's amount, and equally for every coordinate (same input, same state).
    torch.manual_seed(0)
    net = make_net().to(device)
    with torch.no_grad():
        net.w_out.zero_()
        net.b_out.zero_()
    p = torch.randn(30, device=device, requires_grad=True)
    p0 = p.detach().clone()
    opt = L2LOptimizer([p], net=net, lr=1.0)
    for g in (torch.zeros(30, device=device), torch.randn(30, device=device)):
        p.grad = g
        opt.step()
        assert torch.equal(p.detach(), p0)
    assert torch.count_nonzero(opt.state[p]["lstm"]) > 0

    net = make_net().to(device)
    moved = []
    for _ in range(2):
        p = p0.clone().requires_grad_()
        opt = L2LOptimizer([p], net=net, lr=1.0)
        twin = RefTwin(net, [p])
        for _ in range(3):
            p.grad = torch.zeros(30, device=device)
            opt.step()
            twin.step([torch.zeros(30, device=device)], 1.0)
        torch.testing.assert_close(p.detach(), twin.params[0], **TOL32)
        moved.append(p.detach() - p0)
    assert torch.equal(moved[0], moved[1])  # deterministic
    assert moved[0].abs().min() > 0  # the parameter did move
    torch.testing.assert_close(moved[0], moved[0][:1].expand(30), rtol=1e-6, atol=1e-6)  # same for all coordinates


# (torch.compile of a training step, aot_eager and inductor, and a fullgraph step(): test_optim_compat.py)


# --------------------------------------------------------------------------------------------
# param groups
# --------------------------------------------------------------------------------------------


def test_add_param_group_and_one_op_call_per_group_and_device():
    model, x, y = make_mlp("cpu")
    net = make_net()
    params = list(model.parameters())
    opt = L2LOptimizer(params[:4], net=net, lr=0.5)
    twin = RefTwin(net, params)
    n_with_grad = 4
    for k in range(4):
        if k == 2:
            # A new group, with its own lr, after some steps; its state starts fresh.
            opt.add_param_group({"params": params[4:], "lr": 0.2, "weight_decay": 0.1})
            assert opt.param_groups[1]["lr"] == 0.2 and opt.param_groups[1]["weight_decay"] == 0.1
            n_with_grad = len(params)
        backward(model, x, y)
        grads = [p.grad.clone() for p in params]
        with CountL2LCalls() as calls:
            opt.step()
        # One fused call per group (all parameters of a group are on one device), whatever their dtypes.
        assert calls.calls == ([4] if n_with_grad == 4 else [4, len(params) - 4])
        twin.step(grads[:4] + [None] * (len(params) - 4), 0.5)
        if n_with_grad > 4:
            twin.step([None] * 4 + grads[4:], 0.2, 0.1)
    for p, q in zip(params, twin.params):
        torch.testing.assert_close(p.detach(), q, **tol_for(p.dtype))
    assert_matches(lstm_states(opt, params), twin.states)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": params[:1]})
