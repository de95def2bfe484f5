"""What meta-training needs for Wang et al. 2021 (docs/wang.md): the ½ wᵀHw quadratic and the least
squares tasks, the log_rate objective, LearnedSGD's projection and truncation, the 1/√k meta-step."""

import math

import pytest
import torch

from learnedopt import meta, tasks
from learnedopt.meta import LearnedSGD, MetaConfig, MetaTrainer


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _sgd64(eta, **kw):
    rule = LearnedSGD(eta, **kw).double()
    with torch.no_grad():
        rule.lr.fill_(eta)
    return rule


def _closed_form(task, eta, t):
    """f(w_t) and d f(w_t)/dη for GD with step η from w₀: f = ½ Σ c_i² λ_i (1 − ηλ_i)^{2t}."""
    lam, c = task.eigen()
    f = 0.5 * (c ** 2 * lam * (1 - eta * lam) ** (2 * t)).sum()
    df = -t * (c ** 2 * lam ** 2 * (1 - eta * lam) ** (2 * t - 1)).sum()
    return f.item(), df.item()


def _meta_grad(task, eta, t, objective, dtype=torch.float64):
    rule = LearnedSGD(eta).to(dtype)
    with torch.no_grad():
        rule.lr.fill_(eta)
    t_ = tasks.HessianQuadraticTask(task.H.to(dtype), task.w0.to(dtype))
    loss, _, _ = meta.unroll(rule, meta.start(rule, t_, _gen()), t, _gen(), objective=objective, second_derivatives=True)
    (g,) = torch.autograd.grad(loss, [rule.lr])
    return loss.item(), g.item()


# -- the quadratic of §3 ---------------------------------------------------------------------------
def test_hessian_quadratic_task():
    task = tasks.wang_quadratic(7, _gen(3))
    H, w0 = task.H, task.w0
    assert H.shape == (7, 7) and H.dtype == torch.float64 and torch.equal(H, H.T)
    assert torch.linalg.eigvalsh(H).min() > 0 and torch.linalg.vector_norm(w0).item() == pytest.approx(1.0, rel=1e-12)
    w = torch.randn(7, generator=_gen(1), dtype=torch.float64)
    assert task.loss([w], None).item() == pytest.approx(0.5 * float(w @ H @ w), rel=1e-12)
    assert torch.equal(task.init_params(_gen(5))[0], w0) and task.init_params(_gen(5))[0] is not w0
    # H = XᵀX and w₀ in that order from the generator; unit_w0=False leaves w₀ as drawn
    g = _gen(3)
    X = torch.randn(7, 7, generator=g, dtype=torch.float64)
    raw = tasks.wang_quadratic(7, _gen(3), unit_w0=False)
    torch.testing.assert_close(raw.H, X.T @ X, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(raw.w0, torch.randn(7, generator=g, dtype=torch.float64))
    assert tasks.wang_quadratic(5, _gen(0), dtype=torch.float32).H.dtype == torch.float32
    fam = tasks.make_family("wang_quadratic", seed=3, dim=7)
    assert torch.equal(fam.sample(_gen(9)).H, H)


def test_hessian_quadratic_task_bad_input():
    H = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"H must be \[d, d\] and w0 \[d\], got \(3, 3\) and \(4,\)"):
        tasks.HessianQuadraticTask(H, torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="same floating dtype, got torch.float64 and torch.float32"):
        tasks.HessianQuadraticTask(H, torch.ones(3))
    with pytest.raises(ValueError, match="symmetric"):
        tasks.HessianQuadraticTask(torch.triu(torch.ones(3, 3, dtype=torch.float64)), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="dim must be >= 1, got 0"):
        tasks.wang_quadratic(0)


@pytest.mark.parametrize("objective", ["final", "log_rate"])
@pytest.mark.parametrize("eta_times_L", [0.3, 1.9, 2.2, 6.0])
def test_meta_gradient_matches_the_closed_form(objective, eta_times_L):
    """Through the unroll with second derivatives, the meta-gradient of f(w_t) (naive) and of
    (1/t) log f(w_t) (log_rate) is the paper's closed form, on both sides of η = 2/L."""
    task = tasks.wang_quadratic(6, _gen(1))
    L = torch.linalg.eigvalsh(task.H).max().item()
    eta, t = eta_times_L / L, 9
    f, df = _closed_form(task, eta, t)
    loss, g = _meta_grad(task, eta, t, objective)
    want_loss, want_g = (f, df) if objective == "final" else (math.log(f) / t, df / f / t)
    assert loss == pytest.approx(want_loss, rel=1e-9)
    assert g == pytest.approx(want_g, rel=1e-8)


def test_naive_meta_gradient_explodes_where_the_log_one_stays_bounded():
    """The paper's d = 20, t = 80: beyond η = 2/L the naive meta-gradient grows like (ηL − 1)^{2t−1}
    (Theorem 3) while the log objective's stays polynomial (Theorem 4: O(L³ / (c_min² α (L − α))));
    float32 back-propagation overflows (Corollary 1)."""
    task = tasks.wang_quadratic(20, _gen(0))
    lam, c = task.eigen()
    alpha, L = lam[0].item(), lam[-1].item()
    c_min = min(abs(c[0].item()), abs(c[-1].item()))
    bound = L ** 3 / (c_min ** 2 * alpha * (L - alpha))
    for eta in (2.5 / L, 0.1):  # Theorem 3's lower bound (to rounding: both sides are ~1e32 and ~1e129)
        lower = c[-1].item() ** 2 * L ** 2 * 80 * (eta * L - 1) ** 159 - L ** 2 * 80
        assert abs(_meta_grad(task, eta, 80, "final")[1]) >= lower * (1 - 1e-9)
    for eta in (0.5 / L, 1.2 / L, 2.5 / L, 0.1):
        assert abs(_meta_grad(task, eta, 80, "log_rate")[1]) < bound
    assert abs(_meta_grad(task, 0.1, 80, "final")[1]) > 1e100
    for eta in (0.5 / L, 1.9 / L):  # below 2/L: Theorem 3's upper bound
        upper = 80 * (c ** 2 * lam ** 2 * (1 - eta * lam).abs() ** 159).sum().item()
        assert abs(_meta_grad(task, eta, 80, "final")[1]) <= upper * (1 + 1e-9)
    _, g32 = _meta_grad(task, 0.1, 80, "log_rate", dtype=torch.float32)
    assert not math.isfinite(g32)


def test_log_rate_objective_and_its_errors():
    vals = [torch.tensor(4.0), torch.tensor(2.0), torch.tensor(0.5)]
    assert meta.objective("log_rate", vals, 4.0).item() == pytest.approx(math.log(0.5) / 2)
    with pytest.raises(ValueError, match="at least one step"):
        meta.objective("log_rate", vals[:1], 4.0)


def _wang_trainer(tmp_path, epochs, resume=False):
    cfg = MetaConfig(task="wang_quadratic", rule="sgd", objective="log_rate", second_derivatives=True, num_steps=80,
                     unroll=80, epochs=epochs, meta_optimizer="SGD", meta_lr=0.01, meta_lr_schedule="inv_sqrt",
                     checkpoint_every=10 ** 6)
    family = tasks.FixedFamily(tasks.wang_quadratic(20, _gen(0)))
    return MetaTrainer(cfg, tmp_path, rule=_sgd64(0.1, min_lr=0.0), family=family, resume=resume)


def test_meta_trainer_runs_the_papers_meta_gradient_descent(tmp_path):
    """The paper's Fig. 1 procedure through MetaTrainer: η_{k+1} = max(0, η_k − (0.01/√k) F̂'(η_k)) on the
    log objective from η₀ = 0.1 (beyond 2/L), F̂' the closed form — the trainer's logged η's follow this
    recursion (to rounding) for 100 meta-steps, including the reset to 0 at the first one."""
    task = tasks.wang_quadratic(20, _gen(0))
    lam, c = task.eigen()
    eta, want = 0.1, []
    for k in range(1, 101):
        f, df = _closed_form(task, torch.tensor(eta, dtype=torch.float64), 80)
        eta = max(0.0, eta - 0.01 / math.sqrt(k) * df / f / 80)
        want.append(eta)
    t = _wang_trainer(tmp_path, 100)
    t.run()
    lrs = [r["rule_lr"] for r in meta.read_log(tmp_path / "log.jsonl")]
    assert lrs[0] == 0.0 and want[0] == 0.0  # the first meta-step overshot below 0: reset to 0
    assert lrs == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert max(want) > 0.5 and min(want[1:]) >= 0.0
    assert t.meta_steps == 100 and t.meta_opt.param_groups[0]["lr"] == pytest.approx(0.01 / math.sqrt(100), rel=1e-12)


def test_inv_sqrt_schedule_resumes_exactly(tmp_path):
    a = _wang_trainer(tmp_path / "a", 6)
    a.run()
    _wang_trainer(tmp_path / "b", 3).run()  # stopped after 3 meta-steps (a checkpoint at the end)
    b = _wang_trainer(tmp_path / "b", 6, resume=True)
    assert b.meta_steps == 3
    b.run()
    assert b.meta_steps == 6 and b.rule.lr.item() == a.rule.lr.item()


def test_meta_lr_schedule_is_checked():
    with pytest.raises(ValueError, match="meta_lr_schedule must be 'constant' or 'inv_sqrt', got 'cosine'"):
        MetaConfig(meta_lr_schedule="cosine")


# -- LearnedSGD's options ------------------------------------------------------------------------
def test_learned_sgd_projection_and_config():
    rule = LearnedSGD(0.3, min_lr=0.0)
    with torch.no_grad():
        rule.lr.fill_(-0.2)
    rule.project_()
    assert rule.lr.item() == 0.0
    assert rule.config() == {"lr": 0.0, "min_lr": 0.0} and LearnedSGD(0.5).config() == {"lr": 0.5}
    plain = LearnedSGD(0.5)
    with torch.no_grad():
        plain.lr.fill_(-1.0)
    plain.project_()
    assert plain.lr.item() == -1.0  # no min_lr: no projection
    assert rule.log_values() == {"lr": 0.0}
    back = meta.make_rule("sgd", **LearnedSGD(0.25, min_lr=0.1, max_norm=3.0).config())
    assert (back.lr.item(), back.min_lr, back.max_norm) == (0.25, 0.1, 3.0)
    with pytest.raises(ValueError, match="lr must be >= min_lr, got lr 0.1 and min_lr 0.2"):
        LearnedSGD(0.1, min_lr=0.2)
    with pytest.raises(ValueError, match="max_norm must be > 0 or None, got 0"):
        LearnedSGD(0.1, max_norm=0)


def test_learned_sgd_truncation_freezes_the_trajectory():
    """§4's truncated GD: the first step reaching ‖w‖ >= max_norm lands on norm max_norm and the
    trajectory stays there; below it the rule is plain GD."""
    a = torch.tensor([1.0, 3.0], dtype=torch.float64)
    task = tasks.HessianQuadraticTask(torch.diag(a), torch.tensor([1.0, 1.0], dtype=torch.float64))
    rule = _sgd64(1.0, max_norm=20.0)  # |1 − 3η| = 2: the second coordinate doubles each step
    params, state = task.init_params(_gen()), rule.init_state(task.init_params(_gen()))
    norms = []
    for _ in range(8):
        g = [task.H @ params[0]]
        params, state = rule(params, g, state)
        norms.append(torch.linalg.vector_norm(params[0]).item())
    assert norms[:4] == pytest.approx([2.0, 4.0, 8.0, 16.0])  # w = (0, ±2^t)
    assert norms[4:] == pytest.approx([20.0] * 4, rel=1e-12) and bool(state[0])
    # without max_norm: plain GD, no state
    plain = _sgd64(1.0)
    assert plain.init_state(params) == ()
    # the meta-gradient is finite at w = 0 (norm 0) and through a truncated trajectory
    ls = tasks.LeastSquaresFamily(dim=6, n_train=4, sigma=1.0, dtype=torch.float64).sample(_gen(2))
    for eta in (0.0, 10.0):
        r = _sgd64(eta, max_norm=40.0)
        loss, carry, _ = meta.unroll(r, meta.start(r, ls, _gen()), 5, _gen(), objective="final")
        (g,) = torch.autograd.grad(loss, [r.lr])
        assert math.isfinite(g.item())
        assert torch.linalg.vector_norm(carry.params[0]).item() <= 40.0 * (1 + 1e-12)


# -- the least squares of §4 ---------------------------------------------------------------------
def test_least_squares_family():
    fam = tasks.LeastSquaresFamily(dim=30, n_train=20, n_valid=12, n_test=9, sigma=2.0, dtype=torch.float64)
    task = fam.sample(_gen(4))
    assert torch.linalg.vector_norm(task.w_star).item() == pytest.approx(1.0, rel=1e-12)
    (x, y), (xv, yv), (xt, yt) = task.train, task.valid, task.test
    assert x.shape == (20, 30) and xv.shape == (12, 30) and xt.shape == (9, 30) and y.dtype == torch.float64
    assert task.sample_batch(_gen(), "train") is task.train and task.sample_batch(_gen(), "valid") is task.valid
    w = task.init_params(_gen())[0]
    assert torch.equal(w, torch.zeros(30, dtype=torch.float64))
    v = torch.randn(30, generator=_gen(8), dtype=torch.float64)
    assert task.loss([v], task.train).item() == pytest.approx(0.5 * ((y - x @ v) ** 2).mean().item(), rel=1e-12)
    assert task.rmse([v], "valid") == pytest.approx(((yv - xv @ v) ** 2).mean().sqrt().item(), rel=1e-12)
    m = task.heldout_metrics([v])
    assert m["rmse"] == pytest.approx(((yt - xt @ v) ** 2).mean().sqrt().item(), rel=1e-12)
    assert m["zero_rmse"] == pytest.approx(yt.square().mean().sqrt().item(), rel=1e-12)
    assert m["param_error"] == pytest.approx((v - task.w_star).square().sum().item(), rel=1e-12)
    # train-by-train's 32 samples are train-by-validation's 20 + 12 (same generator state)
    tbt = tasks.LeastSquaresFamily(dim=30, n_train=32, sigma=2.0, dtype=torch.float64).sample(_gen(4))
    assert torch.equal(tbt.w_star, task.w_star) and torch.equal(tbt.train[0], torch.cat([x, xv]))
    assert torch.equal(tbt.train[1], torch.cat([y, yv])) and tbt.valid is None and tbt.heldout_metrics([v]) == {}
    # the noise: y − ⟨w*, x⟩ has standard deviation σ
    big = tasks.LeastSquaresFamily(dim=5, n_train=20000, sigma=2.0, dtype=torch.float64).sample(_gen(1))
    noise = big.train[1] - big.train[0] @ big.w_star
    assert noise.std().item() == pytest.approx(2.0, rel=0.03) and abs(noise.mean().item()) < 0.05
    assert tasks.make_family("least_squares", dim=4, n_train=3).sample(_gen()).train[0].dtype == torch.float32


def test_least_squares_bad_input():
    with pytest.raises(ValueError, match="need dim >= 1, n_train >= 1, n_valid >= 0 and n_test >= 0, got 5, 0, 0 and 0"):
        tasks.LeastSquaresFamily(dim=5, n_train=0)
    with pytest.raises(ValueError, match="sigma must be >= 0, got -1"):
        tasks.LeastSquaresFamily(sigma=-1)
    task = tasks.LeastSquaresFamily(dim=4, n_train=3).sample(_gen())
    with pytest.raises(ValueError, match="no validation samples.*n_valid > 0"):
        task.sample_batch(_gen(), "valid")
    with pytest.raises(ValueError, match="split must be 'train' or 'valid', got 'test'"):
        task.sample_batch(_gen(), "test")
    with pytest.raises(ValueError, match="has no 'test' samples"):
        task.rmse(task.init_params(_gen()), "test")
    with pytest.raises(ValueError, match=r"split must be one of \['test', 'train', 'valid'\], got 'all'"):
        task.rmse(task.init_params(_gen()), "all")
    with pytest.raises(ValueError, match=r"train must be \(x \[n >= 1, 4\], y \[n\]\), got \(3, 5\) and \(3,\)"):
        tasks.LeastSquaresTask(torch.zeros(4), (torch.zeros(3, 5), torch.zeros(3)))


def test_train_by_validation_meta_loss_is_the_validation_loss():
    """unroll(validation=True) with the "final" objective is TbV's Δ: ½ mean over the held-out samples
    of the trajectory's end point; without it, TbT's Δ on the training samples."""
    task = tasks.LeastSquaresFamily(dim=8, n_train=5, n_valid=6, sigma=1.0, dtype=torch.float64).sample(_gen(3))
    rule = _sgd64(0.05)
    x, y = task.train
    w = torch.zeros(8, dtype=torch.float64)
    for _ in range(7):
        w = w - 0.05 * x.T @ (x @ w - y) / 5
    for validation, data in ((False, task.train), (True, task.valid)):
        loss, _, _ = meta.unroll(rule, meta.start(rule, task, _gen()), 7, _gen(), objective="final", validation=validation)
        assert loss.item() == pytest.approx(task.loss([w], data).item(), rel=1e-10)
