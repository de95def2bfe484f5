"""learnedopt.ensemble: the problems of Wichrowska et al.'s meta-training ensemble."""

import math

import pytest
import torch

from learnedopt import ensemble, meta


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# Known minima of the 2-D test functions: (point, value).
MINIMA = {
    "ackley": ((0.0, 0.0), 0.0),
    "beale": ((3.0, 0.5), 0.0),
    "booth": ((1.0, 3.0), 0.0),
    "branin": ((math.pi, 2.275), 0.397887),
    "matyas": ((0.0, 0.0), 0.0),
    "michalewicz": ((2.20290552, 1.57079633), -1.8013034),  # the textbook m = 10 (the ensemble uses m = 5)
    "rosenbrock": ((1.0, 1.0), 0.0),
    "styblinski_tang": ((-2.903534, -2.903534), -39.16617 * 2),  # -39.166 per coordinate
}


@pytest.mark.parametrize("name", sorted(MINIMA))
def test_2d_functions_known_minima(name):
    (x, y), want = MINIMA[name]
    fn = ensemble.FUNCTIONS_2D[name][0]
    if name == "michalewicz":
        fn = lambda x, y, f=fn: f(x, y, m=10)  # noqa: E731
    got = fn(torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)).item()
    assert got == pytest.approx(want, abs=1e-5)
    # and it is a local minimum: small moves do not go lower
    for dx, dy in ((1e-3, 0), (-1e-3, 0), (0, 1e-3), (0, -1e-3)):
        moved = fn(torch.tensor(x + dx, dtype=torch.float64), torch.tensor(y + dy, dtype=torch.float64)).item()
        assert moved >= got - 1e-9


def test_2d_initial_ranges():
    for name, (_, rx, ry) in ensemble.FUNCTIONS_2D.items():
        fam = ensemble.Function2D(name)
        for s in range(20):
            (x, y) = fam.sample(_gen(s)).init_params(_gen(s))[0].tolist()
            if rx is not None:
                assert rx[0] <= x <= rx[1] and ry[0] <= y <= ry[1]
    with pytest.raises(ValueError, match="unknown function 'sphere'"):
        ensemble.Function2D("sphere")


def test_bowl_and_quadratic():
    bowl = ensemble.Bowl(5.0).sample(_gen())
    assert bowl.loss([torch.tensor([1.0, 0.0])], None).item() == pytest.approx(2.5)  # ½ κ x²
    assert bowl.loss([torch.tensor([0.0, 1.0])], None).item() == pytest.approx(0.5)
    q = ensemble.NoisyQuadratic(7).sample(_gen(1))
    (x0,) = q.init_params(_gen(2))
    assert x0.shape == (7,) and q.loss([x0], None).item() > 0


def test_gradient_noise_and_sparsity_are_seeded():
    fam = ensemble.GradientNoise(ensemble.NoisyQuadratic(50), 0.5)
    task = fam.sample(_gen())
    g = [torch.zeros(50)]
    a, b = task.transform_grads(g, _gen(3)), task.transform_grads(g, _gen(3))
    assert torch.equal(a[0], b[0]) and 0.3 < a[0].std().item() < 0.7
    sparse = ensemble.SparseGradients(ensemble.NoisyQuadratic(50), 0.99).sample(_gen())
    kept = sum(int(torch.count_nonzero(sparse.transform_grads([torch.ones(1000)], _gen(s))[0])) for s in range(5))
    assert 20 <= kept <= 90  # 1 % of 5000


def test_rescale_and_log_objective():
    base = ensemble.NoisyQuadratic(5)
    t0, t1 = base.sample(_gen(4)), ensemble.Rescale(base, 10.0).sample(_gen(4))
    p0 = t0.init_params(_gen(5))
    p1 = t1.init_params(_gen(5))
    torch.testing.assert_close(p1[0] * 10.0, p0[0])
    assert t1.loss(p1, None).item() == pytest.approx(t0.loss(p0, None).item(), rel=1e-6)
    tl = ensemble.LogObjective(base).sample(_gen(4))
    assert tl.loss(p0, None).item() == pytest.approx(math.log(t0.loss(p0, None).item() + 1e-6) - math.log(1e-6),
                                                     rel=1e-6)


def test_sum_task_splits_parameters():
    fam = ensemble.SumOf([ensemble.NoisyQuadratic(3), ensemble.Function2D("booth"), ensemble.Bowl(1.0)])
    task = fam.sample(_gen())
    params = task.init_params(_gen(1))
    assert [p.shape for p in params] == [(3,), (2,), (2,)]
    parts = task.tasks
    want = sum(t.loss([p], None) for t, p in zip(parts, params))
    assert task.loss(params, task.sample_batch(_gen())).item() == pytest.approx(want.item())


def test_logistic_regression():
    pytest.importorskip("sklearn")
    task = ensemble.LogisticRegression(10, 2.0, 100).sample(_gen())
    params = task.init_params(_gen())
    loss = task.loss(params, task.sample_batch(_gen()))
    assert 0.1 < loss.item() < 3.0


def test_meta_training_on_the_ensemble_runs():
    """A tiny L2L rule, a few unrolls over draws of the ensemble, with the log-ratio objective:
    finite meta-losses, and the rule changes."""
    fam = ensemble.default_ensemble(with_sklearn=False)
    torch.manual_seed(0)
    rule = meta.L2LRule(layers=(4,), output_scale=0.01)
    before = [p.detach().clone() for p in rule.parameters()]
    opt = torch.optim.Adam(rule.parameters(), lr=1e-3)
    g = _gen(7)
    names = set()
    for _ in range(6):
        task = fam.sample(g)
        names.add(task.name)
        carry = meta.start(rule, task, g)
        opt.zero_grad()
        loss, carry, _ = meta.unroll(rule, carry, 5, g, objective="log_ratio")
        assert math.isfinite(loss.item())
        loss.backward()
        opt.step()
    assert len(names) > 1
    assert any(not torch.equal(a, b) for a, b in zip(before, rule.parameters()))
