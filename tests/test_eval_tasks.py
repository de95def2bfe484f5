"""The evaluation problems of the hierarchical optimizer (never in its meta-training ensemble)."""

import pytest
import torch

from conftest import requires_mnist
from learnedopt import data, tasks


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
