"""learnedopt.tasks.ensemble: the problems of Wichrowska et al.'s meta-training ensemble."""

import math

import pytest
import torch

from learnedopt import meta
from learnedopt.tasks import ensemble


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# Known minima of the 2-D test functions: (point, value).
MINIMA = {
    "ackley": ((0.0, 0.0), 0.0),
    "beale": ((3.0, 0.5), 0.0),
    "booth": ((1.0, 3.0), 0.0),
    "branin": ((math.pi, 2.275), 0.397887),
    "matyas": ((0.0, 0.0), 0.0),
    "michalewicz": ((2.20290552, 1.57079633), 2 - 1.8013034),  # the textbook m = 10 (the ensemble uses m = 5), + 2
    "rosenbrock": ((1.0, 1.0), 0.0),
    "styblinski_tang": ((-2.903534, -2.903534), 80 - 39.16617 * 2),  # -39.166 per coordinate, + 80
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
    torch.testing.assert_close(p1[0], p0[0] * 10.0)  # the optimizer sees scale * θ
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


def _grads(task, params, batch):
    params = [p.detach().clone().requires_grad_() for p in params]
    loss = task.loss(params, batch)
    return loss, torch.autograd.grad(loss, params)


def _descend(task, params, batch, lr, steps):
    """Plain gradient descent on a fixed batch; the losses before and after."""
    first = task.loss(params, batch).item()
    for _ in range(steps):
        _, grads = _grads(task, params, batch)
        params = [p - lr * g for p, g in zip(params, grads)]
    return first, task.loss(params, batch).item()


def _check_finite(task, params, batch):
    loss, grads = _grads(task, params, batch)
    assert math.isfinite(loss.item())
    assert len(grads) == len(params) and all(g.shape == p.shape for g, p in zip(grads, params))
    assert all(torch.isfinite(g).all() for g in grads)


NEW_FAMILIES = {
    "mlp": lambda: ensemble.RandomMLP(12, (8, 5, 3), 200),
    "mlp-noisy": lambda: ensemble.RandomMLP(8, (8, 5), 10, noise=0.1),
    "norm": lambda: ensemble.Norm(18, 2.5),
    "norm-noisy": lambda: ensemble.Norm(19, 1.0, noise=0.1),
    "matmul2": lambda: ensemble.MatMulAlgorithm(2, 7),
    "matmul3": lambda: ensemble.MatMulAlgorithm(3, 23),
}


@pytest.mark.parametrize("name", sorted(NEW_FAMILIES))
def test_new_families_are_seeded_and_differentiable(name):
    fam = NEW_FAMILIES[name]()
    draws = []
    for _ in range(2):
        g = _gen(11)
        task = fam.sample(g)
        params = task.init_params(g)
        batch = task.sample_batch(g)
        draws.append((task, params, batch))
    (t0, p0, b0), (t1, p1, b1) = draws
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    if b0 is not None:
        assert all(torch.equal(a, b) for a, b in zip(b0, b1))
    assert t0.loss(p0, b0).item() == t1.loss(p1, b1).item()
    other = fam.sample(_gen(12))
    assert any(not torch.equal(a, b) for a, b in zip(p0, other.init_params(_gen(12))))
    _check_finite(t0, p0, b0)
    # noisy variants add noise to what the optimizer sees, from the generator
    grads = [torch.zeros_like(p) for p in p0]
    seen = t0.transform_grads(grads, _gen(3))
    assert any(torch.count_nonzero(s) for s in seen) == name.endswith("-noisy")


def test_random_mlp():
    fam = ensemble.RandomMLP(8, (8, 5), 10)
    # the data: 1,000 points, fixed by its own seed (the same for every instance), both classes present
    x, y = fam.x, fam.y
    assert x.shape == (1000, 8) and y.shape == (1000,) and y.dtype == torch.long
    assert torch.equal(ensemble.RandomMLP(8, (32, 64), 10).x, x)
    assert 0.2 <= y.float().mean().item() <= 0.8
    for input_dim, hidden, batch_size in ensemble.MLP_SPECS:
        frac = ensemble.RandomMLP(input_dim, hidden, batch_size).y.float().mean().item()
        assert 0.2 <= frac <= 0.8
    task = fam.sample(_gen())
    params = task.init_params(_gen(1))
    assert [tuple(p.shape) for p in params] == [(8, 8), (8,), (8, 5), (5,), (5, 2), (2,)]
    assert all(torch.equal(b, torch.zeros_like(b)) for b in params[1::2])
    bx, by = task.sample_batch(_gen(2))
    assert bx.shape == (10, 8) and by.shape == (10,)
    # full-data gradient descent lowers the loss
    before, after = _descend(task, params, (x, y), lr=0.3, steps=15)
    assert after < before - 0.01


def test_norm():
    fam = ensemble.Norm(5, 3.0)
    task = fam.sample(_gen())
    (x0,) = task.init_params(_gen(1))
    # the loss is the p-norm of the residual Wx − y, with 1e-6 added to each |residual|
    r = (task.W @ x0 - task.y).abs() + 1e-6
    assert task.loss([x0], None).item() == pytest.approx(r.pow(3).sum().pow(1 / 3).item(), rel=1e-6)
    assert fam.sample(_gen()).W.equal(task.W) and not fam.sample(_gen(1)).W.equal(task.W)
    before, after = _descend(task, [x0], None, lr=0.01, steps=20)
    assert after < 0.9 * before
    # the rescaled "Norm18" problems of the ensemble
    rescaled = ensemble.Rescale(ensemble.Norm(18, 2.5), 0.123).sample(_gen())
    assert rescaled.init_params(_gen())[0].shape == (18,)
    with pytest.raises(ValueError, match="p > 0"):
        ensemble.Norm(3, 0.0)


def test_matmul_algorithm_naive_solution_has_zero_residual():
    """U, V encoding the naive algorithm (k = n³ products A_ij B_jl) multiply exactly: residual 0."""
    n, k = 2, 8
    task = ensemble.MatMulAlgorithm(n, k).sample(_gen())
    U, V = torch.zeros(n * n, k), torch.zeros(n * n, k)
    for r, (i, j, l) in enumerate((i, j, l) for i in range(n) for j in range(n) for l in range(n)):
        U[i * n + j, r] = 1.0
        V[j * n + l, r] = 1.0
    assert task.loss([U, V], None).item() < 1e-9
    # its read-out sums the products A_ij B_jl into C_il
    _, W = task.readout([U, V])
    want = torch.zeros(k, n * n, dtype=torch.float64)
    for r, (i, j, l) in enumerate((i, j, l) for i in range(n) for j in range(n) for l in range(n)):
        want[r, i * n + l] = 1.0
    torch.testing.assert_close(W, want, atol=1e-5, rtol=0)
    # on random matrices too: C = Wᵀ((Uᵀ vec A) ⊙ (Vᵀ vec B))
    A, B = torch.randn(2, n, n, generator=_gen(1), dtype=torch.float64)
    m = (A.reshape(-1) @ U.double()) * (B.reshape(-1) @ V.double())
    torch.testing.assert_close((m @ W).reshape(n, n), A @ B, atol=1e-5, rtol=0)
    # a random (U, V) does not multiply; a few gradient steps reduce the residual
    params = task.init_params(_gen(2))
    assert [p.shape for p in params] == [(4, 8), (4, 8)]
    before, after = _descend(task, params, None, lr=0.01, steps=20)
    assert before > 0.1 and after < 0.8 * before
    with pytest.raises(ValueError, match="n² <= k <= n³"):
        ensemble.MatMulAlgorithm(2, 9)


def test_default_ensemble_every_family_gives_finite_losses_and_gradients():
    try:
        import sklearn  # noqa: F401
        with_sklearn = True
    except ImportError:
        with_sklearn = False
    fams = ensemble.default_ensemble(with_sklearn=with_sklearn).families
    assert len(fams) == (101 if with_sklearn else 93)
    assert len(ensemble.default_ensemble(with_sklearn=False).families) == 93
    kinds = {"RandomMLP": 12 + 3, "MatMulAlgorithm": 10, "Norm": 3 + 3 + 5 + 1}
    names = [f.name for f in fams]
    assert sum(n.startswith("mlp") or n.startswith("sparse0.99(mlp") for n in names) == kinds["RandomMLP"]
    assert sum(n.startswith("matmul") for n in names) == kinds["MatMulAlgorithm"]
    assert sum(n.count("norm") for n in names) == kinds["Norm"]
    g = _gen(5)
    for fam in fams:
        task = fam.sample(g)
        params = task.init_params(g)
        batch = task.sample_batch(g)
        loss, grads = _grads(task, params, batch)
        seen = task.transform_grads(list(grads), g)
        assert math.isfinite(loss.item()), fam.name
        assert all(torch.isfinite(s).all() and s.shape == p.shape for s, p in zip(seen, params)), fam.name
