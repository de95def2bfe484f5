"""learnedopt.meta: unrolls, meta-objectives, the outer loop (checkpoints, resume, skips), tasks."""

import json
import math

import pytest
import torch
from conftest import requires_mnist
from torch import nn

import learnedopt
from learnedopt import meta, rules, tasks
from learnedopt.rules import make_rule
from learnedopt.meta import L2LRule, LearnedSGD, MetaConfig, MetaTrainer


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _sgd64(eta):
    rule = LearnedSGD(eta).double()
    with torch.no_grad():
        rule.lr.fill_(eta)  # exactly eta, not float32(eta)
    return rule


# -- the official tests of google-deepmind/learning-to-learn, through the engine ------------------
def test_official_meta_step_through_unroll():
    """meta_test.testResults: f(x) = x^2 from x = 1, linear zero-initialised rule, Adam(0.01),
    2 unrolls of 5: cost 0.7325327 and x 0.8559 (4 places)."""
    rule = L2LRule(layers=(), preprocess=None, output_scale=1.0, init="zeros")
    opt = torch.optim.Adam(rule.parameters(), lr=0.01)
    g = _gen()
    carry = meta.start(rule, tasks.SimpleTask(), g)
    for _ in range(2):
        opt.zero_grad()
        loss, carry, _ = meta.unroll(rule, carry, 5, g, objective="sum")
        loss.backward()
        opt.step()
    x = carry.params[0].item()
    assert x == pytest.approx(0.8559, abs=1e-4)
    assert x * x == pytest.approx(0.7325327, abs=1e-4)
    assert carry.step == 10


def test_official_convergence():
    """convergence_test: the same problem, unroll 20, meta-LR 1e-2, 500 epochs of 5 unrolls: final
    cost < 1e-5."""
    cfg = MetaConfig(task="simple", rule="l2l",
                     rule_kwargs=dict(layers=[], preprocess=None, output_scale=1.0, init="zeros"),
                     num_steps=100, unroll=20, epochs=500, meta_lr=1e-2, checkpoint_every=10**9)
    trainer = MetaTrainer.__new__(MetaTrainer)  # no files: drive train_epoch directly
    trainer.config, trainer.rule = cfg, L2LRule(**cfg.rule_kwargs)
    trainer.family = tasks.make_family("simple")
    trainer.meta_opt = torch.optim.Adam(trainer.rule.parameters(), lr=cfg.meta_lr)
    trainer.generator, trainer.epoch, trainer.skipped, trainer.meta_steps = _gen(), 0, 0, 0
    for _ in range(cfg.epochs):
        rec = trainer.train_epoch()
        trainer.epoch += 1
    assert rec["final_loss"] < 1e-5


# -- objectives ---------------------------------------------------------------------------------
class _Toy(tasks.Task):
    """f(θ; batch) = batch · Σθ² where the batch is 1 for training data and 3 for held-out data."""

    def init_params(self, generator):
        return [torch.tensor([1.0, -2.0], dtype=torch.float64)]

    def sample_batch(self, generator, split="train"):
        return 1.0 if split == "train" else 3.0

    def loss(self, params, batch):
        return batch * params[0].square().sum()


@pytest.mark.parametrize("objective", meta.OBJECTIVES)
@pytest.mark.parametrize("validation", [False, True])
def test_objectives(objective, validation):
    eta = 0.1
    rule = _sgd64(eta)
    carry = meta.start(rule, _Toy(), _gen())
    T = 4
    loss, nxt, losses = meta.unroll(rule, carry, T, _gen(), objective=objective, validation=validation)
    # closed form: θ_t = (1 - 2η)^t θ_0, f_train(θ_t) = 5 (1 - 2η)^{2t}
    f = [5.0 * (1 - 2 * eta) ** (2 * t) for t in range(T + 1)]
    o = [(3.0 if validation else 1.0) * v for v in f]
    want = {"sum": sum(o), "final": o[-1],
            "log_ratio": sum(math.log(v / f[0]) for v in o[1:]) / T, "log_final": math.log(o[-1]),
            "log_rate": math.log(o[-1]) / T}[objective]
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert losses == pytest.approx(f[:T], rel=1e-12)
    assert nxt.params[0].requires_grad is False and nxt.step == T and nxt.f0 == pytest.approx(5.0)


def test_log_ratio_uses_the_trajectory_start():
    rule = _sgd64(0.1)
    carry = meta.start(rule, _Toy(), _gen())
    _, carry, _ = meta.unroll(rule, carry, 2, _gen(), objective="log_ratio")
    loss, _, _ = meta.unroll(rule, carry, 2, _gen(), objective="log_ratio")
    want = (math.log(0.8 ** 6) + math.log(0.8 ** 8)) / 2  # f_t / f_0 = 0.64^t, t = 3, 4
    assert loss.item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("second_derivatives", [False, True])
def test_meta_gradient_second_derivatives(second_derivatives):
    """With second derivatives the meta-gradient is the exact derivative of the meta-loss (checked by
    central differences); without them the term through ∂∇f/∂θ is dropped, as the paper does."""
    torch.manual_seed(0)
    fam = tasks.QuadraticFamily(dim=3, num_functions=2, dtype=torch.float64, init_std=1.0)
    task = fam.sample(_gen(1))

    def meta_loss(eta, sd):
        rule = _sgd64(eta)
        loss, _, _ = meta.unroll(rule, meta.start(rule, task, _gen(2)), 3, _gen(), second_derivatives=sd)
        return rule, loss

    eta = 0.01
    rule, loss = meta_loss(eta, second_derivatives)
    (grad,) = torch.autograd.grad(loss, [rule.lr])
    eps = 1e-6
    fd = (meta_loss(eta + eps, False)[1].item() - meta_loss(eta - eps, False)[1].item()) / (2 * eps)
    if second_derivatives:
        assert grad.item() == pytest.approx(fd, rel=1e-6)
    else:
        assert abs(grad.item() - fd) > 1e-3 * abs(fd)


def test_fused_and_reference_unrolls_agree():
    torch.manual_seed(0)
    task = tasks.QuadraticFamily(dim=5, num_functions=7).sample(_gen(3))
    grads = {}
    for fused in (True, False):
        torch.manual_seed(1)
        rule = L2LRule(layers=(6, 5), preprocess="log_sign", fused=fused)
        loss, carry, _ = meta.unroll(rule, meta.start(rule, task, _gen(4)), 6, _gen())
        loss.backward()
        grads[fused] = (loss.detach(), carry.params[0], [p.grad.clone() for p in rule.parameters()])
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[True][1], grads[False][1], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[True][2], grads[False][2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@requires_mnist
def test_l2l_rule_one_op_call_per_step(monkeypatch):
    calls = []
    real = learnedopt.CoordinateLSTMNet.forward

    def spy(self, grad, state, fused=None):
        calls.append(grad.numel())
        return real(self, grad, state, fused)

    monkeypatch.setattr(learnedopt.CoordinateLSTMNet, "forward", spy)
    task = tasks.MNISTTask(hidden=(7,), batch_size=4)
    rule = L2LRule(layers=(3,))
    meta.unroll(rule, meta.start(rule, task, _gen()), 3, _gen())
    assert calls == [784 * 7 + 7 + 7 * 10 + 10] * 3


class _Diagonal(tasks.Task):
    """f(x) = Σ a_i x_i² from x = 1: gradient descent with step η contracts coordinate i by 1 - 2ηa_i."""

    a = (1.0, 4.0, 0.3)

    def init_params(self, generator):
        return [torch.ones(3)]

    def loss(self, params, batch):
        return (torch.tensor(self.a) * params[0].square()).sum()


def test_learned_sgd_meta_trains_to_the_optimal_step():
    """The one-parameter rule θ ← θ − η g meta-trained with the log-final objective (Wang et al.)
    reaches the η that minimises log f(θ_T), found here by a grid search of the closed form."""
    T = 5
    closed = lambda eta: math.log(sum(a * (1 - 2 * eta * a) ** (2 * T) for a in _Diagonal.a))  # noqa: E731
    best = min((i / 10000 for i in range(1, 5000)), key=closed)
    rule = LearnedSGD(0.01)
    opt = torch.optim.Adam(rule.parameters(), lr=0.01)
    for _ in range(200):
        opt.zero_grad()
        loss, _, _ = meta.unroll(rule, meta.start(rule, _Diagonal(), _gen()), T, _gen(), objective="log_final")
        loss.backward()
        opt.step()
    assert rule.lr.item() == pytest.approx(best, abs=2e-4)


def test_unroll_bad_arguments():
    rule = LearnedSGD()
    carry = meta.start(rule, tasks.SimpleTask(), _gen())
    with pytest.raises(ValueError, match="objective must be one of"):
        meta.unroll(rule, carry, 2, _gen(), objective="mean")
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        meta.unroll(rule, carry, 0, _gen())


# -- the outer loop -------------------------------------------------------------------------------
def _small_config(**kw):
    base = dict(task="quadratic", task_kwargs=dict(dim=4, num_functions=3),
                rule_kwargs=dict(layers=[5], preprocess=None, output_scale=0.1),
                num_steps=10, unroll=5, epochs=4, meta_lr=3e-3, eval_every=2, eval_tasks=2, checkpoint_every=1)
    base.update(kw)
    return MetaConfig(**base)


def test_resume_is_exact(tmp_path):
    cfg = _small_config()
    straight = MetaTrainer(cfg, tmp_path / "a").run()
    cfg2 = _small_config(epochs=2)
    MetaTrainer(cfg2, tmp_path / "b").run()
    # a stop after epoch 2 whose last records were lost: resume from the checkpoint
    with open(tmp_path / "b" / "log.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 99}) + "\n")
    # the checkpoint records the config it was written with; a resumed run must use the same one,
    # but may train for more epochs
    with pytest.raises(ValueError, match="another config"):
        MetaTrainer(_small_config(meta_lr=1e-3), tmp_path / "b", resume=True)
    resumed = MetaTrainer(_small_config(epochs=4), tmp_path / "b", resume=True).run()
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    strip = lambda recs: [{k: v for k, v in r.items() if k != "time"} for r in recs]  # noqa: E731
    assert strip(meta.read_log(tmp_path / "a" / "log.jsonl")) == strip(meta.read_log(tmp_path / "b" / "log.jsonl"))
    files = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert files == ["best.pt", "checkpoint.prev.pt", "checkpoint.pt", "config.json", "curves.png", "final.pt",
                     "log.jsonl"]


def test_resume_mid_run_gives_the_same_result(tmp_path):
    cfg = _small_config(epochs=3, checkpoint_every=2)
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


class _Exploding(nn.Module):
    kind = "sgd"

    def __init__(self):
        super().__init__()
        self.lr = nn.Parameter(torch.tensor(1e30))

    def config(self):
        return {"lr": 0.1}

    def init_state(self, params):
        return ()

    def forward(self, params, grads, state):
        return [p - self.lr * g for p, g in zip(params, grads)], state


def test_non_finite_meta_gradients_are_skipped(tmp_path):
    cfg = _small_config(epochs=2, eval_every=0)
    rule = _Exploding()
    t = MetaTrainer(cfg, tmp_path, rule=rule)
    before = rule.lr.item()
    t.run()
    assert rule.lr.item() == before  # never stepped
    assert t.skipped == 2
    recs = meta.read_log(tmp_path / "log.jsonl")
    assert [r["skipped"] for r in recs] == [1, 1] and all(r["meta_loss"] is None for r in recs)


def test_meta_gradient_clipping(tmp_path):
    cfg = _small_config(epochs=1, num_steps=5, eval_every=0, clip_grad_norm=1e-3, meta_optimizer="SGD", meta_lr=1.0)
    t = MetaTrainer(cfg, tmp_path)
    before = [p.detach().clone() for p in t.rule.parameters()]
    rec = t.run() and meta.read_log(tmp_path / "log.jsonl")[0]
    step = torch.linalg.vector_norm(torch.cat([(p.detach() - b).flatten() for p, b in zip(t.rule.parameters(), before)]))
    assert rec["grad_norm"] > 1e-3  # it was clipped ...
    assert step.item() == pytest.approx(1e-3, rel=1e-3)  # ... to norm 1e-3 (SGD, lr 1)


def test_fresh_run_clears_an_earlier_one(tmp_path):
    MetaTrainer(_small_config(epochs=2), tmp_path).run()
    assert (tmp_path / "best.pt").is_file()
    t = MetaTrainer(_small_config(epochs=1, eval_every=0), tmp_path)  # no evaluation: no best.pt
    t.run()
    assert not (tmp_path / "best.pt").exists()
    assert len(meta.read_log(tmp_path / "log.jsonl")) == 1


def test_config_file_errors(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"task": "mnist", "unrol": 20}))
    with pytest.raises(ValueError, match=r"unknown keys \['unrol'\]"):
        MetaConfig.from_file(p)
    with pytest.raises(ValueError, match="multiple of unroll"):
        MetaConfig(num_steps=100, unroll=30)
    with pytest.raises(ValueError, match="objective must be one of"):
        MetaConfig(objective="mse")
    with pytest.raises(ValueError, match="torch.optim class"):
        MetaConfig(meta_optimizer="Adamm")
    with pytest.raises(ValueError, match="eval_tasks >= 1 when evaluating"):
        MetaConfig(eval_every=5, eval_tasks=0)
    with pytest.raises(ValueError, match="checkpoint_every must be >= 1"):
        MetaConfig(checkpoint_every=0)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_and_load_rule(tmp_path, suffix):
    rule = L2LRule(layers=(3, 4), preprocess="log_sign", p=7.0, output_scale=0.5)
    meta.save_rule(rule, tmp_path / f"r{suffix}", extra={"note": "x", "epoch": 3})
    blob = rules.weights.read_rule_file(tmp_path / f"r{suffix}")
    assert blob["kind"] == "l2l" and blob["extra"] == {"note": "x", "epoch": 3}
    back = meta.load_rule(tmp_path / f"r{suffix}")
    assert back.net.layers == (3, 4) and back.net.p == 7.0 and back.net.output_scale == 0.5
    for a, b in zip(rule.parameters(), back.parameters()):
        assert torch.equal(a, b)
    s = LearnedSGD(0.25)
    meta.save_rule(s, tmp_path / f"s{suffix}")
    assert meta.load_rule(tmp_path / f"s{suffix}").lr.item() == 0.25
    with pytest.raises(ValueError, match="rule must be one of"):
        meta.save_rule(nn.Linear(2, 2), tmp_path / f"x{suffix}")
    assert not (tmp_path / f"x{suffix}").exists()


def test_rule_files_of_0_1_0_still_load(tmp_path):
    """A .pt written as 0.1.0's save_rule wrote it (torch.save of kind / config / state_dict / extra)."""
    rule = make_rule("hierarchical")
    torch.save({"kind": "hierarchical", "config": rule.config(), "state_dict": rule.state_dict(),
                "extra": {"epoch": 7}}, tmp_path / "old.pt")
    back = meta.load_rule(tmp_path / "old.pt")
    assert all(torch.equal(a, b) for a, b in zip(rule.state_dict().values(), back.state_dict().values()))
    torch.save({"kind": "sgd", "config": {"lr": 0.5}, "state_dict": LearnedSGD(0.5).state_dict()}, tmp_path / "nx.pt")
    assert meta.load_rule(tmp_path / "nx.pt").lr.item() == 0.5  # no "extra"


def test_safetensors_rule_files_are_read_without_unpickling(tmp_path, monkeypatch):
    meta.save_rule(L2LRule(layers=(3,)), tmp_path / "r.safetensors")

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called on a safetensors file")

    monkeypatch.setattr(torch, "load", no_pickle)
    assert meta.load_rule(tmp_path / "r.safetensors").net.layers == (3,)
    for name in learnedopt.pretrained.available():  # the shipped weights too
        assert all(torch.isfinite(t).all() for t in learnedopt.pretrained.load(name).parameters())


def test_files_that_are_not_rules_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a learnedopt rule"):
        meta.load_rule(tmp_path / "other.safetensors")
    torch.save({"state": {}}, tmp_path / "optimizer.pt")
    with pytest.raises(ValueError, match="not a rule file.*got \\['state'\\]"):
        meta.load_rule(tmp_path / "optimizer.pt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        meta.load_rule(tmp_path / "missing.safetensors")


def test_export_command_converts_a_run_to_safetensors(tmp_path, capsys):
    from learnedopt.cli import main

    rule = make_rule("l2l", layers=(4,))
    meta.save_rule(rule, tmp_path / "best.pt", extra={"epoch": 12, "eval_final_loss": 0.5})
    assert main(["export", str(tmp_path / "best.pt"), str(tmp_path / "w.safetensors")]) == 0
    assert "wrote" in capsys.readouterr().out
    blob = rules.weights.read_rule_file(tmp_path / "w.safetensors")
    assert blob["extra"] == {"epoch": 12, "eval_final_loss": 0.5} and blob["config"] == rule.config()
    assert blob["state_dict"].keys() == rule.state_dict().keys()
    assert all(torch.equal(v, blob["state_dict"][k]) for k, v in rule.state_dict().items())
    with pytest.raises(SystemExit, match="must end in .safetensors"):
        main(["export", str(tmp_path / "best.pt"), str(tmp_path / "w.pt")])
    with pytest.raises(SystemExit, match="no such file"):
        main(["export", str(tmp_path / "nope.pt"), str(tmp_path / "x.safetensors")])
    assert not (tmp_path / "x.safetensors").exists()


# -- tasks ----------------------------------------------------------------------------------------
@requires_mnist
def test_mnist_task():
    from learnedopt.tasks import data

    x, y = data.mnist("train")
    assert x.shape == (3000, 784) and y.shape == (3000,) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and set(y.unique().tolist()) == set(range(10))
    test = data.mnist("test")[0]
    assert test.shape == (1000, 784)
    # the splits are disjoint images
    assert not (torch.cdist(test[:50], x).min(dim=1).values == 0).all()
    task = tasks.MNISTTask()
    params = task.init_params(_gen())
    assert [tuple(p.shape) for p in params] == [(784, 20), (20,), (20, 10), (10,)]
    loss = task.loss(params, task.sample_batch(_gen()))
    assert loss.item() == pytest.approx(math.log(10), abs=0.01)  # tiny weights: uniform predictions
    with pytest.raises(ValueError, match="split must be one of"):
        data.mnist("validation")
    with pytest.raises(ValueError, match="activation must be one of"):
        tasks.MNISTTask(activation="gelu")


def test_task_families_are_seeded():
    fam = tasks.make_family("quadratic", dim=3, num_functions=2)
    a, b = fam.sample(_gen(5)), fam.sample(_gen(5))
    assert torch.equal(a.W, b.W) and torch.equal(a.y, b.y)
    assert not torch.equal(a.W, fam.sample(_gen(6)).W)
    with pytest.raises(ValueError, match="unknown task family"):
        tasks.make_family("cifar")


# -- progress bars ------------------------------------------------------------------------------
class _Terminal:
    """A stderr that says it is a terminal and keeps what is written to it."""

    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return True


def test_progress_bar_is_quiet_off_a_terminal_and_shown_on_one(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.delenv("LEARNEDOPT_PROGRESS", raising=False)
    MetaTrainer(_small_config(epochs=2), tmp_path / "a").run()
    assert capsys.readouterr().err == ""  # pytest's captured stderr is not a terminal
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    MetaTrainer(_small_config(epochs=2), tmp_path / "b").run()
    assert "meta-train" in term.text and "2/2" in term.text and "meta-loss" in term.text
    monkeypatch.setenv("LEARNEDOPT_PROGRESS", "0")  # forced off, even on a terminal
    term.text = ""
    MetaTrainer(_small_config(epochs=1), tmp_path / "c").run()
    assert term.text == ""
