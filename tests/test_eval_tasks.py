"""The evaluation problems of the hierarchical optimizer (never in its meta-training ensemble)."""

import pytest
import torch

from conftest import requires_mnist
from learnedopt import tasks
from learnedopt.tasks import data


def _adam_decreases(task, steps=30, lr=1e-2):
    g = torch.Generator().manual_seed(0)
    params = [p.requires_grad_(True) for p in task.init_params(g)]
    opt = torch.optim.Adam(params, lr=lr)
    batch = task.sample_batch(g)
    first = task.loss(params, batch).item()
    for _ in range(steps):
        loss = task.loss(params, batch)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in params)
        opt.step()
    return first, task.loss(params, batch).item()


def test_digits_splits():
    x, y = data.digits("train")
    xt, yt = data.digits("test")
    assert x.shape == (1200, 1, 8, 8) and xt.shape == (597, 1, 8, 8)
    assert 0 <= x.min() and x.max() <= 1 and set(y.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="split"):
        data.digits("valid")


def test_digits_resnet_shapes_and_training():
    task = tasks.make_family("digits_resnet").sample(torch.Generator())
    params = task.init_params(torch.Generator().manual_seed(0))
    assert [tuple(p.shape) for p in params] == task.shapes and len(params) == 2 + 4 * 2 + 2
    first, last = _adam_decreases(task)
    assert abs(first - 2.3) < 0.5 and last < 0.5 * first


@requires_mnist
def test_mnist_conv_shapes_and_training():
    task = tasks.make_family("mnist_conv").sample(torch.Generator())
    x, y = task.sample_batch(torch.Generator().manual_seed(1))
    assert x.shape == (64, 1, 28, 28) and y.shape == (64,)
    first, last = _adam_decreases(task)
    assert last < 0.5 * first


# -- held-out metrics of the final parameters ------------------------------------------------------
def test_classification_metrics():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    y = torch.tensor([0, 1, 0, 0])
    m = tasks.classification_metrics(logits, y)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits.double(), y).item())
    # a non-finite row is no prediction, even where its argmax would hit the label; the loss is inf
    logits[0, 1] = float("nan")
    logits[3, 0] = float("inf")
    m = tasks.classification_metrics(logits, y)
    assert m["accuracy"] == pytest.approx(0.25) and m["loss"] == float("inf")


def _heldout_after_adam(task):
    g = torch.Generator().manual_seed(0)
    params = [p.requires_grad_(True) for p in task.init_params(g)]
    before = task.heldout_metrics([p.detach() for p in params])
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(60):
        loss = task.loss(params, task.sample_batch(g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, task.heldout_metrics([p.detach() for p in params])


def test_digits_resnet_heldout_is_the_other_split():
    task = tasks.DigitsResNetTask(split="test")
    assert task.heldout[0].shape[0] == 1200 and task.data[0].shape[0] == 597
    assert tasks.DigitsResNetTask(split="train").heldout[0].shape[0] == 597
    before, after = _heldout_after_adam(task)
    assert set(after) == {"loss", "accuracy"}
    assert before["accuracy"] < 0.3 and after["accuracy"] > 0.6 and after["loss"] < before["loss"]


@requires_mnist
def test_mnist_heldout_metrics():
    conv = tasks.MNISTConvTask(split="test")
    assert torch.equal(conv.heldout[1], data.mnist("valid")[1])
    assert torch.equal(tasks.MNISTConvTask(split="valid").heldout[1], data.mnist("test")[1])
    with pytest.raises(ValueError, match="heldout_split must differ from split"):
        tasks.MNISTConvTask(split="test", heldout_split="test")
    before, after = _heldout_after_adam(conv)
    assert before["accuracy"] < 0.3 and after["accuracy"] > 0.6
    mlp = tasks.MNISTTask(hidden=(20,), split="test")
    before, after = _heldout_after_adam(mlp)
    assert before["accuracy"] < 0.3 and after["accuracy"] > 0.6
    assert tasks.MNISTTask(split="valid", valid_split="valid").heldout_metrics(mlp.init_params(torch.Generator())) == {}
    assert tasks.QuadraticFamily(dim=3, num_functions=2).sample(torch.Generator()).heldout_metrics([]) == {}
