"""learnedopt.evaluate, learnedopt.pretrained and the command line (meta-train, evaluate, demo)."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from conftest import requires_mnist

import learnedopt
from learnedopt import evaluate, meta, pretrained, tasks
from learnedopt.cli import main


def _family():
    return tasks.make_family("quadratic", dim=4, num_functions=3)


@requires_mnist
def test_rules_and_baselines_see_the_same_trajectories():
    """The learned rule θ ← θ − η g and torch.optim.SGD with lr η are the same optimizer: on the same
    trajectories (θ₀, batches) their curves must be identical."""
    fam = tasks.make_family("mnist", hidden=(5,), batch_size=16, split="test")
    res = evaluate.evaluate({"rule": meta.LearnedSGD(0.3)}, fam, steps=6, runs=2, baselines=("sgd",), lrs={"sgd": 0.3})
    a, b = res["methods"]["rule"], res["methods"]["sgd"]
    assert a["curve"] == pytest.approx(b["curve"], rel=1e-6)
    assert a["finals"] == pytest.approx(b["finals"], rel=1e-6)
    assert len(a["curve"]) == 7
    # the held-out metrics of the final parameters: the same parameters, the same numbers
    assert set(a["heldout"]) == {"loss", "accuracy"}
    for k in ("loss", "accuracy"):
        assert a["heldout"][k]["values"] == pytest.approx(b["heldout"][k]["values"], rel=1e-6)
        assert len(a["heldout"][k]["values"]) == 2
    g = evaluate._generator(0, 1)
    task = fam.sample(g)
    _, params = evaluate.run_optimizer(lambda ps: torch.optim.SGD(ps, lr=0.3), task, 6, g)
    assert a["heldout"]["accuracy"]["values"][1] == pytest.approx(task.heldout_metrics(params)["accuracy"])
    table = evaluate.format_table(res)
    assert "held-out loss" in table and "held-out accuracy" in table and table.count("|---") == 5


def test_tune_lr_picks_the_lowest_final_loss():
    fam = _family()
    best, scores = evaluate.tune_lr("sgd", fam, steps=5, runs=2, grid=(1e-3, 1e-2, 3e-2))
    assert best == min(scores, key=scores.get)
    assert set(scores) == {1e-3, 1e-2, 3e-2}


def test_diverging_baseline_is_inf_not_nan():
    losses, _ = evaluate.run_optimizer(lambda ps: torch.optim.SGD(ps, lr=1e3), _family().sample(torch.Generator()), 30,
                                       torch.Generator())
    assert losses[-1] == math.inf


def test_evaluate_table_and_plot(tmp_path):
    res = evaluate.evaluate({"learned": meta.LearnedSGD(0.01)}, _family(), steps=4, runs=2,
                            baselines=("adam", "nag"), tune_runs=1, grid=(1e-3, 1e-2))
    table = evaluate.format_table(res, "t")
    assert "| learned | learned |" in table and "(tuned)" in table
    assert "held-out" not in table and res["methods"]["learned"]["heldout"] == {}  # quadratics have none
    evaluate.plot_curves(res, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="unknown baseline 'adagrad'"):
        evaluate.evaluate({}, _family(), steps=2, runs=1, baselines=("adagrad",))


# -- the optimizer runs the rule it was meta-trained as -------------------------------------------
@requires_mnist
def test_l2l_optimizer_follows_the_meta_trained_rule():
    """L2LOptimizer (fused in-place step, state in optimizer.state) and L2LRule (the meta-training
    path) apply the same update rule: the same trajectory on an MNIST MLP."""
    torch.manual_seed(0)
    rule = meta.L2LRule(layers=(6, 5))
    task = tasks.MNISTTask(hidden=(8,), batch_size=32, split="test")
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    want, p_rule = meta.run_rule(rule, task, 10, g1)
    got, p_opt = evaluate.run_optimizer(lambda ps: learnedopt.L2LOptimizer(ps, net=rule.net), task, 10, g2)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    for a, b in zip(p_rule, p_opt):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# -- shipped weights ------------------------------------------------------------------------------
def test_shipped_weights():
    names = pretrained.available()
    assert names == sorted(pretrained.WEIGHTS)  # every registered file is installed
    from learnedopt.rules.hierarchical import HierarchicalRule

    for name in names:
        assert pretrained.path(name).suffix == ".safetensors"
        with safe_open(str(pretrained.path(name)), framework="pt") as f:  # safetensors: no code unpickled
            blob = {"kind": f.metadata()["kind"]}
        rule = pretrained.load(name)
        if name.startswith("l2l"):
            assert blob["kind"] == "l2l"
            assert isinstance(rule, meta.L2LRule) and rule.net.layers == (20, 20)
        else:
            assert blob["kind"] == "hierarchical" and isinstance(rule, HierarchicalRule)
            assert rule.net.fusable  # the fused kernels' sizes
        info = pretrained.info(name)
        assert info["command"].startswith("python -m learnedopt meta-train --config configs/")
        assert all(torch.isfinite(p).all() for p in rule.parameters())
        assert pretrained.path(name).stat().st_size < 500_000


def test_pretrained_optimizer_and_its_state_dict():
    model = torch.nn.Linear(4, 3)
    opt = learnedopt.L2LOptimizer(model.parameters(), pretrained="l2l-mnist")
    want = pretrained.load_net("l2l-mnist")
    for a, b in zip(opt.net.parameters(), want.parameters()):
        assert torch.equal(a, b)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    assert sd["net"]["pretrained"] == "l2l-mnist"
    other = learnedopt.L2LOptimizer(model.parameters())
    other.load_state_dict(sd)
    assert other.pretrained == "l2l-mnist"
    for a, b in zip(other.net.parameters(), want.parameters()):
        assert torch.equal(a, b)


def test_pretrained_errors():
    with pytest.raises(ValueError, match="unknown weights 'l2l-cifar'"):
        pretrained.load("l2l-cifar")
    with pytest.raises(ValueError, match="net or pretrained, not both"):
        learnedopt.L2LOptimizer([torch.zeros(2, requires_grad=True)], net=learnedopt.CoordinateLSTMNet(),
                                pretrained="l2l-mnist")


# -- command line ---------------------------------------------------------------------------------
def test_cli_meta_train_resume_and_evaluate(tmp_path, capsys):
    cfg = dict(task="quadratic", task_kwargs=dict(dim=3, num_functions=2), rule_kwargs=dict(layers=[4], preprocess=None),
               num_steps=4, unroll=2, epochs=2, eval_every=1, eval_tasks=1, checkpoint_every=1)
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    assert main(["meta-train", "--config", str(tmp_path / "c.json"), "--out", str(out), "--epochs", "2"]) == 0
    assert main(["meta-train", "--config", str(tmp_path / "c.json"), "--out", str(out), "--resume"]) == 0
    assert len(meta.read_log(out / "log.jsonl")) == 2  # nothing left to do after the resume
    capsys.readouterr()
    assert main(["evaluate", "--task", "quadratic", "--task-kwargs", '{"dim": 3, "num_functions": 2}',
                 "--rule", f"mine={out}/best.pt", "--steps", "3", "--runs", "2", "--tune-runs", "1",
                 "--baselines", "adam", "--out", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    assert "| mine | learned |" in printed and "| adam |" in printed
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert set(res["methods"]) == {"mine", "adam"} and res["task"]["family"] == "quadratic"


@requires_mnist
def test_cli_demo_small(tmp_path, capsys):
    assert main(["demo", "--steps", "3", "--runs", "1", "--tune-runs", "1", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "L2LOptimizer (l2l-mnist)" in printed and "| adam |" in printed
    assert (tmp_path / "demo.png").is_file() and (tmp_path / "demo.json").is_file()


def test_cli_unknown_rule(tmp_path):
    with pytest.raises(SystemExit, match="neither shipped weights"):
        main(["evaluate", "--task", "simple", "--rule", str(tmp_path / "missing.pt")])
