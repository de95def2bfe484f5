"""learnedopt.rules.l2l.CoordinateLSTMNet and the log/sign gradient preprocessing."""

import math

import pytest
import torch

from conftest import DEVICES
from learnedopt.rules.l2l import CoordinateLSTMNet
from learnedopt.reference import log_sign_preprocess


def test_log_sign_official_targets():
    # google-deepmind/learning-to-learn preprocess_test: LogAndSign(k=10) on 1.0 gives log channel 0;
    # the sign channel keeps the input's sign; one pair per coordinate.
    g = torch.tensor([1.0, -3.0, 2e-6, -1e-9])
    out = log_sign_preprocess(g, 10.0)
    assert out.shape == (4, 2)
    assert out[0, 0] == 0.0
    assert torch.equal(torch.sign(out[:, 1]), torch.sign(g))


def test_log_sign_matches_paper_definition():
    p = 10.0
    g = torch.cat([torch.randn(1000, dtype=torch.float64) * 10.0 ** torch.randint(-8, 3, (1000,)),
                   torch.tensor([math.exp(-p), -math.exp(-p), 0.0], dtype=torch.float64)])
    big = g.abs() >= math.exp(-p)
    want0 = torch.where(big, torch.log(g.abs()) / p, torch.full_like(g, -1.0))
    want1 = torch.where(big, torch.sign(g), g * math.exp(p))
    out = log_sign_preprocess(g, p)
    torch.testing.assert_close(out[:, 0], want0)
    torch.testing.assert_close(out[:, 1], want1)


def test_log_sign_nan_stays_nan():
    out = log_sign_preprocess(torch.tensor([float("nan"), 1.0]), 10.0)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layers,preprocess", [((20, 20), "log_sign"), ((7,), None), ((5, 3, 4), "log_sign")])
def test_fused_matches_reference(device, layers, preprocess):
    torch.manual_seed(0)
    net = CoordinateLSTMNet(layers, preprocess=preprocess).to(device)
    g = (torch.randn(13, 17, device=device) * 1e-3)
    state = net.initial_state(g.numel(), device=device)
    outs = {}
    for fused in (True, False):
        net.zero_grad()
        u1, s1 = net(g, state, fused=fused)
        u2, s2 = net(g * 0.5, s1, fused=fused)  # the state carries over
        (u1.square().sum() + u2.sum() + sum(t.sum() for t in s2[0] + s2[1])).backward()
        outs[fused] = [u1, u2, *s2[0], *s2[1]], [p.grad.clone() for p in net.parameters()]
    for a, b in zip(outs[True][0], outs[False][0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(outs[True][1], outs[False][1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert u1.shape == g.shape


def test_every_meta_parameter_gets_a_gradient():
    net = CoordinateLSTMNet()
    _, state = net(torch.randn(50), net.initial_state(50))  # from a zero state w_hh gets no gradient
    u, _ = net(torch.randn(50), state)
    u.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_zeros_init_gives_zero_update():
    net = CoordinateLSTMNet(init="zeros")
    u, _ = net(torch.randn(10), net.initial_state(10))
    assert torch.count_nonzero(u) == 0


def test_default_init():
    torch.manual_seed(0)
    net = CoordinateLSTMNet(layers=(20, 20))
    std = 1 / math.sqrt(2 + 20)
    w = net.w_ih0.detach()
    assert w.abs().max() <= 2 * std + 1e-6 and 0.5 * std < w.std() < std
    b = net.b0.detach()
    assert 0.9 < b[20:40].mean() < 1.1 and abs(b[:20].mean()) < 0.1  # forget bias +1
    assert torch.count_nonzero(net.b_out) == 0


def test_no_lstm_is_a_linear_map():
    net = CoordinateLSTMNet(layers=(), preprocess=None, output_scale=0.5)
    with torch.no_grad():
        net.w_out.fill_(2.0)
        net.b_out.fill_(0.25)
    g = torch.tensor([1.0, -2.0, 0.0])
    u, state = net(g, net.initial_state(3))
    torch.testing.assert_close(u, 0.5 * (2.0 * g + 0.25))
    assert state == ([], [])


def test_official_simple_problem_meta_step():
    """google-deepmind/learning-to-learn meta_test.testResults: f(x) = x^2 from x = 1; a linear rule
    (layers=(), zero init, identity preprocessing, scale 1); loss = sum of f over the unroll including
    its start; gradients of f detached; Adam(lr=0.01) on the rule; 2 unrolls of 5 steps with x carried.
    Expected: final cost 0.7325327 and final x 0.8559 (4 places)."""
    net = CoordinateLSTMNet(layers=(), preprocess=None, output_scale=1.0, init="zeros")
    meta = torch.optim.Adam(net.parameters(), lr=0.01)
    x = torch.tensor([1.0])
    for _ in range(2):
        meta.zero_grad()
        theta = x.clone()
        loss = theta.square().sum()
        for _ in range(5):
            update, _ = net((2 * theta).detach(), ([], []))
            theta = theta + update
            loss = loss + theta.square().sum()
        cost = theta.square().item()
        loss.backward()
        meta.step()
        x = theta.detach()
    assert cost == pytest.approx(0.7325327, abs=1e-4)
    assert x.item() == pytest.approx(0.8559, abs=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(layers=(20, 0)), "positive hidden sizes"),
    (dict(preprocess="log"), "preprocess must be 'log_sign' or None"),
    (dict(p=0.0), "p must be a finite number > 0"),
    (dict(init="normal"), "init must be 'default' or 'zeros'"),
    (dict(output_scale=float("inf")), "output_scale must be finite"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CoordinateLSTMNet(**kwargs)


def test_wrong_state_length():
    net = CoordinateLSTMNet(layers=(4, 4))
    h, c = net.initial_state(3)
    with pytest.raises(ValueError, match=r"one h and one c per layer \(2\), got 1 and 2"):
        net(torch.randn(3), (h[:1], c))
