"""No silent loss (issue 17): load_state_dict of both learned optimizers checks every parameter's entry
(keys, shapes, dtypes), the network and the groups before anything changes; a refused state dict
raises ValueError naming the parameter index, the key, what was expected and what came, and leaves
the optimizer exactly as it was (its next step is the one it would have taken)."""

import copy

import pytest
import torch

from helpers import assert_tree_equal, save_load
from learnedopt.optim import HierarchicalOptimizer, L2LOptimizer
from learnedopt.rules.hierarchical import HierarchicalNet
from learnedopt.rules.l2l import CoordinateLSTMNet

SHAPES = [(6, 5), (7,)]


def make(kind, seed=0, params=None, **kw):
    torch.manual_seed(seed)
    params = params if params is not None else [torch.randn(s) for s in SHAPES]
    if kind == "hier":
        return HierarchicalOptimizer(params, lr=1e-3, net=kw.pop("net", None) or HierarchicalNet(), **kw), params
    return L2LOptimizer(params, net=kw.pop("net", None) or CoordinateLSTMNet(), lr=1e-3, **kw), params


def stepped(kind, steps=2, seed=0, **kw):
    opt, params = make(kind, seed, **kw)
    for k in range(steps):
        g = torch.Generator().manual_seed(50 + k)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return opt, params


def assert_refused_untouched(opt, params, bad, *fragments):
    """load_state_dict(bad) raises ValueError with every fragment in its message; the optimizer's
    state dict, network object and parameters are unchanged and so is its next step."""
    before = copy.deepcopy(opt.state_dict())
    net = opt.net
    twin = copy.deepcopy(opt)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    with pytest.raises(ValueError) as e:
        opt.load_state_dict(bad)
    for f in fragments:
        assert f in str(e.value), (f, str(e.value))
    assert opt.net is net
    assert_tree_equal(opt.state_dict(), before)
    for p, q in zip(params, twin_params):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    opt.step()
    twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
    return str(e.value)


KEYS = {"hier": "coord", "l2l": "lstm"}


@pytest.mark.parametrize("kind", ["hier", "l2l"])
def test_a_checkpoint_of_another_optimizer_is_refused(kind):
    opt, params = stepped(kind)
    other = torch.optim.Adam(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    other.step()
    msg = assert_refused_untouched(opt, params, other.state_dict(), "parameter 0", "exp_avg", KEYS[kind])
    assert "missing" in msg and "unknown" in msg


def test_missing_key():
    # (L2L has one key: its entry without it is empty, a parameter not stepped yet, which is valid)
    opt, params = stepped("hier")
    sd = save_load(opt.state_dict())
    del sd["state"][1]["tensor"]
    assert_refused_untouched(opt, params, sd, "parameter 1", "missing ['tensor']")


@pytest.mark.parametrize("kind", ["hier", "l2l"])
def test_unknown_key(kind):
    opt, params = stepped(kind)
    sd = save_load(opt.state_dict())
    sd["state"][0]["momentum_buffer"] = torch.zeros(3)
    assert_refused_untouched(opt, params, sd, "parameter 0", "unknown ['momentum_buffer']")


@pytest.mark.parametrize("kind", ["hier", "l2l"])
def test_wrong_shape(kind):
    opt, params = stepped(kind)
    sd = save_load(opt.state_dict())
    key = KEYS[kind]
    good = list(sd["state"][1][key].shape)
    sd["state"][1][key] = sd["state"][1][key][..., :3] if kind == "hier" else sd["state"][1][key][:3]
    assert_refused_untouched(opt, params, sd, "parameter 1", repr(key), f"expected shape {good}",
                             f"got {list(sd['state'][1][key].shape)}")


@pytest.mark.parametrize("kind", ["hier", "l2l"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_uncastable_dtype(kind, dtype):
    opt, params = stepped(kind)
    sd = save_load(opt.state_dict())
    key = KEYS[kind]
    sd["state"][0][key] = sd["state"][0][key].to(dtype)
    assert_refused_untouched(opt, params, sd, "parameter 0", repr(key), "floating-point", str(dtype))


@pytest.mark.parametrize("kind", ["hier", "l2l"])
def test_a_tensor_entry_that_is_not_a_tensor(kind):
    opt, params = stepped(kind)
    sd = save_load(opt.state_dict())
    sd["state"][0][KEYS[kind]] = [1.0, 2.0]
    assert_refused_untouched(opt, params, sd, "parameter 0", "expected a tensor, got list")


def test_hier_global_state_shape_and_tensor_state():
    opt, params = stepped("hier")
    sd = save_load(opt.state_dict())  # the global state is kept in param_groups[0] (as DCP keeps it)
    sd["param_groups"][0]["global_state"] = sd["param_groups"][0]["global_state"][:5]
    assert_refused_untouched(opt, params, sd, "'global_state'", "[20]", "[5]")
    sd = save_load(opt.state_dict())  # a state dict of 0.2 (the global state at the top level): checked alike
    sd["global_state"] = sd["param_groups"][0].pop("global_state")[:5]
    assert_refused_untouched(opt, params, sd, "'global_state'", "[20]", "[5]")
    sd = save_load(opt.state_dict())
    sd["state"][0]["log_lr_sum"] = torch.zeros(2)
    assert_refused_untouched(opt, params, sd, "parameter 0", "'log_lr_sum'", "expected shape []")


def test_state_of_another_network_configuration_is_refused():
    # The state of an optimizer with hidden = 8 (30 rows per coordinate), loaded without its network
    # into one with hidden = 10 (32 rows): the shapes say the network does not match.
    opt8, _ = stepped("hier", net=HierarchicalNet(hidden=8))
    sd = save_load(opt8.state_dict())
    del sd["net"]
    opt, params = stepped("hier")
    assert_refused_untouched(opt, params, sd, "parameter 0", "'coord'", "expected shape [32, 30]",
                             "got [28, 30]", "'hidden': 10")
    # With its network it loads: the checkpoint's network replaces the optimizer's (fused=False here,
    # or None: hidden = 8 has no fused kernel)
    opt.load_state_dict(save_load(opt8.state_dict()))
    assert opt.net.hidden == 8
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()


def test_network_that_the_optimizer_cannot_run_is_refused():
    opt8, _ = stepped("hier", net=HierarchicalNet(hidden=8))
    opt, params = stepped("hier", fused=True)
    assert_refused_untouched(opt, params, save_load(opt8.state_dict()), "fused=True", "hidden")
    sd = save_load(opt.state_dict())
    sd["net"]["config"]["tensor_hidden"] = 7  # the weights do not fit it
    assert_refused_untouched(opt, params, sd, "weights do not fit", "tensor_hidden")
    sd = save_load(opt.state_dict())
    sd["net"]["config"]["bogus"] = 1
    assert_refused_untouched(opt, params, sd, "not a HierarchicalNet's")


def test_l2l_network_mismatch():
    opt_small, _ = stepped("l2l", net=CoordinateLSTMNet(layers=(5,)))
    sd = save_load(opt_small.state_dict())
    del sd["net"]
    opt, params = stepped("l2l")
    assert_refused_untouched(opt, params, sd, "parameter 0", "'lstm'", "expected shape [30, 80]", "got [30, 10]")
    sd = save_load(opt.state_dict())
    sd["net"]["layers"] = [20, 7]
    assert_refused_untouched(opt, params, sd, "weights do not fit")


@pytest.mark.parametrize("kind", ["hier", "l2l"])
def test_group_mismatch_changes_nothing(kind):
    # torch.optim's own group checks, made before the network is touched
    opt, params = stepped(kind)
    sd = save_load(opt.state_dict())
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:1]
    assert_refused_untouched(opt, params, sd, "doesn't match the size")


@pytest.mark.parametrize("kind", ["hier", "l2l"])
def test_valid_state_dicts_still_load(kind):
    # an empty entry (a parameter not stepped yet), entries of another floating dtype (cast), state
    # that belongs to no parameter (copied as is)
    opt, params = stepped(kind)
    sd = save_load(opt.state_dict())
    sd["state"][1] = {}
    key = KEYS[kind]
    sd["state"][0][key] = sd["state"][0][key].double()
    sd["state"]["extra"] = 3
    opt2, params2 = make(kind, params=[p.clone() for p in params])
    opt2.load_state_dict(sd)
    assert opt2.state[params2[0]][key].dtype == opt.state[params[0]][key].dtype
    assert torch.equal(opt2.state[params2[0]][key], opt.state[params[0]][key])
    assert len(opt2.state[params2[1]]) == 0 and opt2.state["extra"] == 3
