"""learnedopt.meta.estimators: the maths of ES and PES against exact gradients on a small quadratic, the
fused particle steps against the rules' own steps, and the estimators in the trainer (config, resume).

The oracle of the smoothed gradients: for the L2L rule with no LSTM layer and no preprocessing (update
= 0.1 (w g + b): two meta-parameters φ = (w, b)) the trajectory is written out here in plain torch and
differentiated by full back-propagation *with* second derivatives (ES and PES estimate the gradient of
the loss the rule really has, in which g_t depends on φ through θ_t). The Gaussian-smoothed gradient
∇E_ε L(φ + ε) = E_ε ∇L(φ + ε) is then a Monte-Carlo mean of exact gradients at perturbed points (its
standard error enters the tolerance): no assumption that σ is small enough for the smoothing to vanish.
"""

import math

import pytest
import torch

from learnedopt import meta, tasks
from learnedopt.meta import estimators as E
from learnedopt.meta import MetaConfig, MetaTrainer
from learnedopt.rules import make_rule

Z = 4.5  # tolerance in standard errors (per coordinate)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _task():
    """θ₀ = 0 (init_std 0): every trajectory starts at the same point, whatever the generator."""
    return tasks.QuadraticFamily(dim=3, num_functions=2, init_std=0.0).sample(_gen(3))


def _linear_rule(w=-0.3, b=0.05):
    rule = make_rule("l2l", layers=[], preprocess=None, output_scale=0.1)
    with torch.no_grad():
        rule.net.w_out.fill_(w)
        rule.net.b_out.fill_(b)
    return rule


def _oracle_loss(task, theta0, phis, lengths):
    """Σ_k L_k with truncation k run with φ_k = phis[k] (rows (w, b)); L_k = Σ_t f(θ_t) + f(θ_end) ("sum");
    differentiable in phis, second derivatives included."""
    theta = theta0.clone().requires_grad_(True)
    total = 0.0
    for phi, n in zip(phis, lengths):
        for _ in range(n):
            f = task.loss([theta], None)
            total = total + f
            g, = torch.autograd.grad(f, theta, create_graph=True)
            theta = theta + 0.1 * (phi[0] * g + phi[1])
        total = total + task.loss([theta], None)
    return total


def _smoothed_grad(task, theta0, phi, lengths, sigma, samples, seed=5):
    """Monte-Carlo mean and standard error of ∇_φ Σ_k L_k(φ + ε_1, …, φ + ε_k), ε_k ~ N(0, σ²I) independent."""
    g = _gen(seed)
    out = []
    for _ in range(samples):
        eps = torch.randn(len(lengths), 2, generator=g) * sigma
        p = phi.clone().requires_grad_(True)
        loss = _oracle_loss(task, theta0, p[None] + eps, lengths)
        out.append(torch.autograd.grad(loss, p)[0])
    out = torch.stack(out)
    return out.mean(0), out.std(0) / math.sqrt(samples)


def _estimates(est, rule, task, lengths, repeats, seed=11):
    """``repeats`` independent estimates of the whole trajectory's meta-gradient (Σ over truncations)."""
    out = []
    g = _gen(seed)
    for _ in range(repeats):
        traj = est.start(rule, task, g)
        total = torch.zeros(2)
        for k, n in enumerate(lengths):
            rule.zero_grad(set_to_none=True)
            r = est.estimate(rule, traj, n, g, "sum", last=k == len(lengths) - 1)
            traj = r.traj
            total += torch.cat([rule.net.w_out.grad.reshape(-1), rule.net.b_out.grad.reshape(-1)])
        out.append(total)
    return torch.stack(out)


def test_oracle_is_the_estimators_loss():
    """The written-out trajectory is the one the particles run: same meta-objective at φ."""
    task, rule = _task(), _linear_rule()
    theta0 = task.init_params(_gen(1))[0]
    lengths = [3, 2]
    est = E.PES(pairs=1, sigma=1e-30)  # perturbations far below float32 resolution of φ: the particles run φ
    traj = est.start(rule, task, _gen(1))
    ours = [float(est.estimate(rule, traj, n, _gen(2), "sum").per_particle[0]) for n in lengths]
    phi = torch.tensor([-0.3, 0.05])
    first, both = (float(_oracle_loss(task, theta0, phi[None].expand(len(n), 2), n).detach()) for n in ([3], lengths))
    exact = [first, both - first]
    assert ours == pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize("sigma", [0.02, 0.1])
def test_antithetic_es_matches_the_smoothed_full_horizon_gradient(sigma):
    task, rule = _task(), _linear_rule()
    theta0 = task.init_params(_gen(0))[0]
    lengths = [6]
    ref, ref_se = _smoothed_grad(task, theta0, torch.tensor([-0.3, 0.05]), lengths, sigma, 300)
    est = _estimates(E.ES(pairs=4, sigma=sigma), rule, task, lengths, 300)
    mean, se = est.mean(0), est.std(0) / math.sqrt(len(est))
    assert torch.all((mean - ref).abs() <= Z * torch.sqrt(se ** 2 + ref_se ** 2)), (mean, ref, se, ref_se)
    # the test can tell: its tolerance is well below the gradient itself
    assert float(torch.linalg.vector_norm(Z * torch.sqrt(se ** 2 + ref_se ** 2))) < 0.3 * float(ref.norm())


def test_pes_matches_the_smoothed_full_horizon_gradient_over_truncations():
    """Three truncations: PES's Σ_k ĝ_k is unbiased for the full horizon; truncated ES is not (it ignores
    how φ moved the state each truncation starts from) and the test tells them apart."""
    task, rule = _task(), _linear_rule()
    theta0 = task.init_params(_gen(0))[0]
    lengths, sigma = [2, 2, 2], 0.05
    ref, ref_se = _smoothed_grad(task, theta0, torch.tensor([-0.3, 0.05]), lengths, sigma, 300)
    pes = _estimates(E.PES(pairs=4, sigma=sigma), rule, task, lengths, 400)
    mean, se = pes.mean(0), pes.std(0) / math.sqrt(len(pes))
    tol = Z * torch.sqrt(se ** 2 + ref_se ** 2)
    assert torch.all((mean - ref).abs() <= tol), (mean, ref, se, ref_se)
    tes = _estimates(E.ES(pairs=4, sigma=sigma), rule, task, lengths, 200)
    t_mean, t_se = tes.mean(0), tes.std(0) / math.sqrt(len(tes))
    assert torch.any((t_mean - ref).abs() > Z * torch.sqrt(t_se ** 2 + ref_se ** 2)), (t_mean, ref)


def test_pes_with_one_truncation_is_es():
    for kw in (dict(layers=[], preprocess=None), dict(layers=[3], preprocess="log_sign")):
        task, rule = _task(), make_rule("l2l", **kw)
        grads = []
        for est in (E.ES(pairs=3, sigma=0.05), E.PES(pairs=3, sigma=0.05)):
            g = _gen(4)
            rule.zero_grad(set_to_none=True)
            r = est.estimate(rule, est.start(rule, task, g), 5, g, "sum", last=True)
            grads.append(([p.grad.clone() for p in rule.parameters()], r.meta_loss))
        for a, b in zip(grads[0][0], grads[1][0]):
            assert torch.equal(a, b)
        assert grads[0][1] == grads[1][1]


def test_es_variance_falls_as_one_over_pairs():
    task, rule = _task(), _linear_rule()
    lengths = [4]
    v1 = _estimates(E.ES(pairs=1, sigma=0.05), rule, task, lengths, 400).var(0).sum()
    v8 = _estimates(E.ES(pairs=8, sigma=0.05), rule, task, lengths, 400, seed=12).var(0).sum()
    # 8x fewer; each variance is estimated from 400 draws (relative error ~ 7 %, more for heavy tails)
    assert 5.0 < float(v1 / v8) < 12.0, float(v1 / v8)


# -- the fused particle steps ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind,kw", [("l2l", dict(layers=[4, 3], preprocess="log_sign")),
                                     ("l2l", dict(layers=[], preprocess=None)),
                                     ("hierarchical", dict(init_lr_range=(0.01, 0.1))), ("sgd", {})])
def test_particles_run_what_the_rule_runs(kind, kw):
    """Each particle (its own weights, through the fused ops where they cover the rule) follows the
    trajectory of :func:`meta.unroll` with the rule set to that particle's weights."""
    task = tasks.QuadraticFamily(dim=5, num_functions=3).sample(_gen(0))
    torch.manual_seed(1)
    rule = make_rule(kind, **kw)
    stepper = E.make_stepper(rule, 3)
    expected = {"l2l": E._L2LStepper, "hierarchical": E._HierStepper, "sgd": E._Stepper}[kind]
    assert type(stepper) is expected
    phi = E.flat_params(rule)
    weights = phi + 0.05 * torch.randn(3, phi.numel(), generator=_gen(2))
    stepper.load(weights)
    carry = meta.start(rule, task, _gen(3))
    swarm = E.Swarm.replicate(task, carry.params, carry.state, 3, stepper)
    per, _ = E.run_swarm(stepper, swarm, 7, _gen(4), "sum")
    for i in range(3):
        clone = make_rule(kind, **kw)
        with torch.no_grad():
            off = 0
            for p in clone.parameters():
                p.copy_(weights[i, off:off + p.numel()].view_as(p))
                off += p.numel()
        # the particle's initial state is its own (hierarchical: h0, tensor0, global0 are meta-parameters)
        loss, nxt, _ = meta.unroll(clone, meta.start(clone, task, _gen(3)), 7, _gen(4), "sum")
        assert float(per[i]) == pytest.approx(float(loss), rel=2e-5)
        # the displacements θ_7 − θ_0 (the hierarchical rule's steps are small: θ itself would hide them)
        for a, b, p0 in zip(swarm.particle(i), nxt.params, carry.params):
            d_ref = b - p0
            assert float((a - p0 - d_ref).abs().max()) <= 2e-3 * float(d_ref.abs().max()), (float((a - p0 - d_ref).abs().max()), float(d_ref.abs().max()))


def test_vmap_and_loop_gradients_agree():
    task = tasks.QuadraticFamily(dim=4, num_functions=2).sample(_gen(0))
    params = [torch.randn(5, 2, 4, generator=_gen(1))]
    a = E._batched_loss_and_grads(task, params, None, [True])
    b = E._batched_loss_and_grads(task, params, None, [False])
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1][0], b[1][0])


def test_estimator_arguments_are_checked():
    with pytest.raises(ValueError, match="pairs must be an integer >= 1, got 0"):
        E.ES(pairs=0)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0, got -1"):
        E.PES(sigma=-1)
    with pytest.raises(ValueError, match="unknown estimator 'adam'"):
        E.make_estimator("adam")
    rule, task = _linear_rule(), _task()
    est = E.PES(pairs=1)
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        est.estimate(rule, est.start(rule, task, _gen()), 0, _gen())
    with pytest.raises(ValueError, match="fused=True but the fused ops do not implement LearnedSGD"):
        E.make_stepper(make_rule("sgd"), 2, fused=True)


# -- in the trainer -------------------------------------------------------------------------------------

def _config(**kw):
    base = dict(task="quadratic", task_kwargs=dict(dim=4, num_functions=3),
                rule_kwargs=dict(layers=[5], preprocess=None, output_scale=0.1), estimator="pes", es_pairs=2,
                es_sigma=0.01, num_steps=10, unroll=5, epochs=3, meta_lr=3e-3, eval_every=1, eval_tasks=2,
                checkpoint_every=2)
    base.update(kw)
    return MetaConfig(**base)


@pytest.mark.parametrize("estimator", ["es", "pes"])
def test_trainer_with_es_and_pes_resumes_exactly(tmp_path, estimator):
    cfg = _config(estimator=estimator)
    a = MetaTrainer(cfg, tmp_path / "a").run()
    t = MetaTrainer(cfg, tmp_path / "b")
    for _ in range(3):  # "killed" during epoch 3, after the checkpoint of epoch 2
        rec = t.train_epoch()
        t.epoch += 1
        t._log(rec)
        if t.epoch % 2 == 0:
            t._checkpoint()
    b = MetaTrainer(cfg, tmp_path / "b", resume=True).run()
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)
    recs = meta.read_log(tmp_path / "a" / "log.jsonl")
    assert all(math.isfinite(r["meta_loss"]) and r["steps"] == 10 for r in recs)
    with pytest.raises(ValueError, match="another config"):
        MetaTrainer(_config(estimator=estimator, es_sigma=0.02), tmp_path / "b", resume=True)


def test_trainer_estimators_change_the_run_and_bptt_is_unchanged(tmp_path):
    rules = {}
    for est in ("bptt", "es", "pes"):
        rules[est] = MetaTrainer(_config(estimator=est, epochs=2, eval_every=0), tmp_path / est).run()
    flat = {k: torch.cat([p.detach().reshape(-1) for p in r.parameters()]) for k, r in rules.items()}
    assert not torch.equal(flat["bptt"], flat["es"]) and not torch.equal(flat["es"], flat["pes"])
    # an old config (no estimator keys) is the same run as estimator="bptt", and writes the same checkpoint record
    old = _config(epochs=2, eval_every=0)
    old.estimator, old.es_pairs, old.es_sigma = "bptt", 8, 0.01
    t = MetaTrainer(old, tmp_path / "old")
    assert "estimator" not in t._trajectory_config() and "es_pairs" not in t._trajectory_config()
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in t.run().parameters()]), flat["bptt"])


def test_config_errors():
    with pytest.raises(ValueError, match="estimator must be one of"):
        _config(estimator="sgd")
    with pytest.raises(ValueError, match="second_derivatives applies to estimator 'bptt' only"):
        _config(second_derivatives=True)
    with pytest.raises(ValueError, match="es_pairs must be an integer >= 1, got 0"):
        _config(es_pairs=0)
    with pytest.raises(ValueError, match="es_sigma must be a finite number > 0"):
        _config(es_sigma=float("nan"))


@pytest.mark.parametrize("estimator", ["bptt", "es"])
def test_trajectories_per_process_average_the_estimators_gradients(tmp_path, estimator):
    """MetaConfig.trajectories > 1: each trajectory's meta-gradient is its own (ES/PES assign .grad,
    BPTT accumulates into it) and the meta-step takes their mean. Checked against the same estimates
    made one trajectory at a time, from the same generators."""
    cfg = _config(estimator=estimator, trajectories=2, epochs=1, eval_every=0, num_steps=5, unroll=5,
                  meta_optimizer="SGD", meta_lr=1.0)
    t = MetaTrainer(cfg, tmp_path / "two")
    before = [p.detach().clone() for p in t.rule.parameters()]
    # the same two trajectories, estimated by hand from copies of the trainer's generators
    gens = [t._generator_of(k) for k in range(2)]
    gens = [torch.Generator().set_state(g.get_state()) for g in gens]
    rule = t.rule
    want = [torch.zeros_like(p) for p in rule.parameters()]
    for g in gens:
        traj = t.estimator.start(rule, t.family.sample(g), g)
        for p in rule.parameters():
            p.grad = None
        t.estimator.estimate(rule, traj, 5, g, cfg.objective, cfg.validation, last=True)
        for w, p in zip(want, rule.parameters()):
            w += p.grad
    for p in rule.parameters():
        p.grad = None
    t.train_epoch()
    for b, p, w in zip(before, t.rule.parameters(), want):
        torch.testing.assert_close(b - p.detach(), w / 2, rtol=1e-5, atol=1e-7)
