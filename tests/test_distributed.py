"""The learned optimizers on PyTorch's distributed stack, with real processes (gloo, CPU, 2 and 3 ranks):
DDP, FSDP2 (fully_shard: DTensor parameters sharded on dim 0, uneven and empty shards), refused
placements, and torch.distributed.checkpoint with resharding. Each run is bounded by a timeout.
Select them with ``-m distributed``; they run in the default suite."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import learnedopt
import dist_workers
from dist_workers import KINDS, make_opt, mlp

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"),
              pytest.mark.skipif(not learnedopt.ops.extension_available(), reason="needs the compiled extension")]

TIMEOUT = 240  # seconds per run of N processes (2 cores shared by all of them)


def run_ranks(tmp_path, fn_name: str, world: int, timeout: float = TIMEOUT, **kwargs) -> list[dict]:
    """Runs dist_workers.<fn_name>(rank, world, **kwargs) in `world` spawned processes (gloo, a file
    store); returns their results by rank. A process that fails or outlives `timeout` fails the test
    with its traceback."""
    out = tmp_path / f"{fn_name}-{world}-{time.monotonic_ns()}"
    out.mkdir()
    store = str(out / "store")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=dist_workers.entry, args=(fn_name, r, world, store, str(out), kwargs))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = [(out / f"rank{r}.err").read_text() for r in range(world) if (out / f"rank{r}.err").exists()]
    if errors:
        pytest.fail(f"{fn_name} on {world} ranks failed:\n" + "\n".join(errors))
    if alive:
        pytest.fail(f"{fn_name} on {world} ranks: ranks {alive} still running after {timeout} s (killed)")
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"{fn_name}: exit codes {codes}"
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


# -- DDP -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    return run_ranks(tmp_path_factory.mktemp("ddp"), "each_kind", 2, fn="ddp", steps=6)


@pytest.mark.parametrize("kind", list(KINDS))
def test_ddp_ranks_bitwise_equal_and_equal_to_one_process(ddp_runs, kind):
    r0, r1 = (r[kind] for r in ddp_runs)
    # every rank holds bitwise the same parameters and optimizer state (the global RNN's included)
    assert _equal(r0["params"], r1["params"]) and _equal(r0["state"], r1["state"])
    assert not _equal(r0["init"], r0["params"])  # it moved
    # one process given the same averaged gradients lands on bitwise the same point
    torch.set_num_threads(1)
    model = mlp()
    for p, q in zip(model.parameters(), r0["init"]):
        assert torch.equal(p.detach(), q)
    opt = make_opt(kind, model.parameters())
    for grads in r0["grads"]:
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        opt.step()
    assert _equal([p.detach() for p in model.parameters()], r0["params"])
    assert _equal(dist_workers.state_tensors(opt), r0["state"])


# -- FSDP2 ---------------------------------------------------------------------------------------
def _close_states(state, ref, **tol):
    assert state.keys() == ref.keys()
    for k in state:
        torch.testing.assert_close(state[k].reshape(ref[k].shape), ref[k], **tol, msg=lambda m: f"state {k}: {m}")


STEPS = 5
# a NaN (2 ranks) / an inf (3 ranks) in the gradient of the first weight [13, 7], row 12: the last rank's shard
NONFINITE = dict(steps=4, bad_step=1, bad_param=0, bad_row=12)
CALLS = {"l2l": 1, "hier": 2}  # all-reduces per sharded step (see _sharding.nonfinite_flags)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """One start of 2 processes and one of 3 for every FSDP2 check."""
    base = tmp_path_factory.mktemp("fsdp")
    two = run_ranks(base, "several", 2, runs=[
        ("exact", "each_kind", dict(fn="fsdp_exact", steps=STEPS)),
        # bf16 state without the update-ratio safeguard: the safeguard's log s (from shard sums in
        # another order: last float bits) is added to the bf16 log-lr row after the op, and one bf16
        # ulp of a log-lr (~0.4 %) there moves the next steps by more than this test's tolerance
        ("bf16", "fsdp_exact", dict(kind="hier", steps=3, state_dtype=torch.bfloat16, max_update_ratio=0.0)),
        # the safeguard binding on every tensor (lr 1): its u² and θ² sums ride the one all-reduce
        ("ratio", "fsdp_exact", dict(kind="hier", steps=4, lr=1.0, max_update_ratio=0.003)),
        ("train", "each_kind", dict(fn="fsdp_train", steps=4)),
        ("refused", "placements_refused", {}),
        ("precision", "each_kind", dict(fn="fsdp_precision", steps=3)),
        ("nonfinite", "each_kind", dict(fn="fsdp_nonfinite", **NONFINITE, value="nan"))])
    three = run_ranks(base, "several", 3, runs=[
        ("exact", "each_kind", dict(fn="fsdp_exact", steps=STEPS)),
        ("nonfinite", "each_kind", dict(fn="fsdp_nonfinite", **NONFINITE, value="inf"))])
    return {2: two, 3: three}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind", list(KINDS))
def test_fsdp2_equals_unsharded(fsdp_runs, kind, world):
    """Sharded (uneven shards; on 3 ranks one empty) and unsharded optimizers given the same gradients
    agree to float tolerance (L2L, coordinatewise: bitwise); the hierarchical one reduces its
    per-tensor sums with one all-reduce per step (and both the per-tensor "non-finite gradient" flags with
    one more, before the kernel); its global state is bitwise the same on every rank."""
    steps = STEPS
    res = [r["exact"][kind] for r in fsdp_runs[world]]
    shapes = [r["local_shapes"] for r in res]
    assert [s[2][0] for s in shapes] == ([1, 1] if world == 2 else [1, 1, 0])  # the 2-row weight's shards
    assert [s[0][0] for s in shapes] == ([7, 6] if world == 2 else [5, 5, 3])
    _check_against_unsharded(res, kind)
    for r in res:
        assert r["calls"] == [CALLS[kind]] * steps


def _check_against_unsharded(res, kind):
    for r in res:
        if kind == "l2l":
            assert _equal(r["params"], r["ref_params"])
            _close_states(r["state"], r["ref_state"], atol=0, rtol=0)
        else:
            for p, q in zip(r["params"], r["ref_params"]):
                torch.testing.assert_close(p, q, atol=2e-6, rtol=2e-5)
            _close_states(r["state"], r["ref_state"], atol=2e-5, rtol=2e-5)
    for r in res[1:]:
        assert _equal(r["state"], res[0]["state"])  # the gathered state, the global RNN's included


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind", list(KINDS))
def test_fsdp2_nonfinite_gradient_in_one_shard(fsdp_runs, kind, world):
    """A NaN (2 ranks) or an inf (3 ranks) in ONE rank's shard of one gradient: as unsharded, that whole
    tensor is skipped on every rank: its parameter shards and per-coordinate state are bitwise unchanged
    on every rank (also on those whose shard is finite); the other tensors, the global RNN and the later
    steps follow the unsharded optimizer given the same gradient."""
    res = [r["nonfinite"][kind] for r in fsdp_runs[world]]
    assert [r["holds_bad"] for r in res] == [False] * (world - 1) + [True]
    for r in res:
        p0, s0, rp0, rs0 = r["bad_before"]
        p1, s1, rp1, rs1 = r["bad_after"]
        assert torch.equal(p0, p1) and torch.equal(s0, s1), f"rank {res.index(r)} stepped its shard"
        assert torch.equal(rp0, rp1) and torch.equal(rs0, rs1)  # what the unsharded optimizer does
        assert r["grads_restored"]
        assert not torch.equal(r["params"][0], rp0)  # ... and the steps after it moved the tensor again
        assert r["calls"] == [CALLS[kind]] * NONFINITE["steps"]
    _check_against_unsharded(res, kind)


def test_fsdp2_hierarchical_update_ratio_safeguard(fsdp_runs):
    """With the update-ratio safeguard binding (lr 1, tau 0.003), sharded = unsharded to float
    tolerance, the global state bitwise the same on every rank and still the same all-reduces per step
    (its sums ride the sums' one)."""
    res = [r["ratio"] for r in fsdp_runs[2]]
    _check_against_unsharded(res, "hier")
    for r in res:
        assert r["calls"] == [CALLS["hier"]] * 4


def test_fsdp2_hierarchical_bf16_state(fsdp_runs):
    res = [r["bf16"] for r in fsdp_runs[2]]
    for r in res:
        for p, q in zip(r["params"], r["ref_params"]):
            torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
    assert _equal(res[0]["state"], res[1]["state"])


@pytest.mark.parametrize("kind", list(KINDS))
def test_fsdp2_training_loop(fsdp_runs, kind):
    """fully_shard's own loop (each rank a part of the batch) follows the unsharded model on the whole
    batch over a few steps (another summation order of the gradients: float tolerance, which L2L
    amplifies over many steps, see README "Distributed")."""
    res = [r["train"][kind] for r in fsdp_runs[2]]
    for r in res:
        for p, q in zip(r["params"], r["ref_params"]):
            torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-3)
    assert res[0]["losses"][-1] < res[0]["losses"][0]


@pytest.mark.parametrize("kind", list(KINDS))
def test_fsdp2_mixed_precision_and_bf16_parameters(fsdp_runs, kind):
    """MixedPrecisionPolicy (bf16 compute; fp32 shards, gradients reduced in fp32) and bf16 parameters
    train as with torch.optim.Adam: the same on both ranks, moved, finite; bf16 shards follow the
    unsharded bf16 model to bf16 tolerance."""
    res = [r["precision"][kind] for r in fsdp_runs[2]]
    for name, dtype in (("mixed", torch.float32), ("bf16", torch.bfloat16)):
        r0, r1 = res[0][name], res[1][name]
        assert _equal(r0["params"], r1["params"])
        assert all(p.dtype == dtype and torch.isfinite(p).all() for p in r0["params"])
        assert not _equal(r0["params"], r0["init"])
    for p, q in zip(res[0]["bf16"]["params"], res[0]["bf16"]["ref_params"]):
        torch.testing.assert_close(p.float(), q.float(), atol=3e-2, rtol=3e-2)


def test_unsupported_placements_refused(fsdp_runs):
    res = [r["refused"] for r in fsdp_runs[2]]
    for kind in KINDS:
        msg = res[0][kind]
        assert msg is not None and "Shard(dim=1)" in msg and "tensor parallel" in msg and "param_groups[0]" in msg, msg
        assert res[0][kind + "_unchanged"]


# -- HSDP: a 2-D mesh (replicas, shards) -------------------------------------------------------------
HSDP = dict(mesh_shape=(2, 2))


@pytest.fixture(scope="module")
def hsdp_runs(tmp_path_factory):
    """4 processes, mesh (2, 2): fully_shard gives (Replicate(), Shard(0)); ranks 0, 2 and 1, 3 are replicas
    of the same shard. The model is tiny (2 cores for 4 processes)."""
    return run_ranks(tmp_path_factory.mktemp("hsdp"), "several", 4, runs=[
        ("exact", "each_kind", dict(fn="fsdp_nonfinite", steps=STEPS, bad_step=None, bad_param=0, bad_row=0,
                                    value="nan", **HSDP)),
        ("nonfinite", "each_kind", dict(fn="fsdp_nonfinite", **NONFINITE, value="nan", **HSDP)),
        ("train", "each_kind", dict(fn="fsdp_train", steps=3, **HSDP))])


REPLICAS = ((0, 2), (1, 3))


@pytest.mark.parametrize("kind", list(KINDS))
def test_hsdp_equals_unsharded(hsdp_runs, kind):
    """HSDP (placements (Replicate(), Shard(0))): the same gradients give what the unsharded optimizer
    computes (L2L bitwise, the hierarchical one to float tolerance), the same all-reduces per step (on
    the shard dimension's group), and bitwise the same state on the replicas of a shard."""
    res = [r["exact"][kind] for r in hsdp_runs]
    assert all(pl == "(Replicate(), Shard(dim=0))" for pl in res[0]["placements"]), res[0]["placements"]
    _check_against_unsharded(res, kind)
    for r in res:
        assert r["calls"] == [CALLS[kind]] * STEPS
        assert _equal(r["params"], res[0]["params"])
    for a, b in REPLICAS:
        assert _equal(res[a]["local_state"], res[b]["local_state"])
    assert not _equal(res[0]["local_state"], res[1]["local_state"])  # different shards


@pytest.mark.parametrize("kind", list(KINDS))
def test_hsdp_nonfinite_gradient_in_one_shard(hsdp_runs, kind):
    res = [r["nonfinite"][kind] for r in hsdp_runs]
    assert [r["holds_bad"] for r in res] == [False, True, False, True]  # row 12: the second shard (both replicas)
    for r in res:
        p0, s0, _, _ = r["bad_before"]
        p1, s1, _, _ = r["bad_after"]
        assert torch.equal(p0, p1) and torch.equal(s0, s1) and r["grads_restored"]
    _check_against_unsharded(res, kind)


@pytest.mark.parametrize("kind", list(KINDS))
def test_hsdp_training_loop(hsdp_runs, kind):
    """fully_shard's own HSDP loop (each rank a quarter of the batch; gradients reduce-scattered on the
    shard dimension, all-reduced across the replicas) follows the unsharded model on the whole batch;
    the replicas' state is bitwise the same."""
    res = [r["train"][kind] for r in hsdp_runs]
    for r in res:
        for p, q in zip(r["params"], r["ref_params"]):
            torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-3)
        assert _equal(r["state"], res[0]["state"])
    for a, b in REPLICAS:
        assert _equal(res[a]["local_state"], res[b]["local_state"])
    assert res[0]["losses"][-1] < res[0]["losses"][0]


# -- CPU offload -------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
                    reason="FSDP2's CPUOffloadPolicy runs the module on CUDA (even torch.optim.Adam fails without a "
                           "GPU) and nccl needs one GPU per rank: 2 GPUs")
def test_fsdp2_cpu_offload(tmp_path):
    """fully_shard(..., offload_policy=CPUOffloadPolicy()) on 2 GPUs (nccl only: the optimizers' few
    numbers reach the group through the GPU): both learned optimizers train as torch.optim.Adam does:
    shards and state on the CPU, finite, the loss falls, and the sharded model follows the unsharded
    one stepped on the CPU with the whole batch (another device and summation order: float tolerance)."""
    res = run_ranks(tmp_path, "fsdp_offload", 2, backend="nccl", steps=4)
    for name in (*KINDS, "adam"):
        r0, r1 = res[0][name], res[1][name]
        assert r0["devices"] == ["cpu"] and r1["devices"] == ["cpu"], (name, r0["devices"])
        whole = [torch.cat([a, b]) for a, b in zip(r0["local_params"], r1["local_params"])]
        for p, q in zip(whole, r0["ref_params"]):
            assert torch.isfinite(p).all()
            torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")
        assert r0["losses"] == r1["losses"] and r0["losses"][1] < r0["losses"][0], (name, r0["losses"])


# -- distributed checkpoints ---------------------------------------------------------------------
def test_dcp_reshard_2_to_3_and_1(tmp_path):
    """Saved on 2 ranks, loaded on 3 and on 1: the continued trajectory is the one without the reload."""
    steps = 3
    runs = lambda phase: [(k, "dcp", dict(kind=k, ckpt=str(tmp_path / k), phase=phase, steps=steps)) for k in KINDS]  # noqa: E731
    saved = run_ranks(tmp_path, "several", 2, runs=runs("save"))[0]
    for world in (3, 1):
        loaded = run_ranks(tmp_path, "several", world, runs=runs("load"))
        for r, kind in ((r[kind], kind) for r in loaded for kind in KINDS):
            tol = dict(atol=0, rtol=0) if kind == "l2l" else dict(atol=2e-6, rtol=2e-5)
            saved_k = saved[kind]
            for p, q in zip(r["params"], saved_k["params"]):
                torch.testing.assert_close(p, q, **tol)
            _close_states(r["state"], saved_k["state"], **tol)


# -- the non-finite flags agree with the kernels ------------------------------------------------------
def _nonfinite_cases():
    big = 3e38  # finite; over float32's range once divided by a grad_scale of 0.5
    gs = [torch.tensor([1.0, float("nan"), 2.0]), torch.tensor([[1.0, float("-inf")]]), torch.tensor([big, -big]),
          torch.randn(5, 3), torch.tensor([1.0, float("nan")], dtype=torch.bfloat16), torch.tensor(float("inf")),
          torch.tensor(0.5), torch.tensor([60000.0], dtype=torch.float16), torch.tensor([1e300, 2.0], dtype=torch.float64)]
    return gs


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("grad_scale", [None, 0.5, 2.0])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("how", ["sums", "norms"])
def test_nonfinite_flags_are_the_kernels_skips(kind, grad_scale, weight_decay, how, monkeypatch):
    """_sharding.nonfinite_flags (the sharded step's per-tensor test, made before the kernel) flags
    exactly the tensors the unsharded fused kernel skips: NaN, inf, a finite gradient that overflows
    once unscaled, bf16 / fp16 / float64, 0-d; for L2L also an inf parameter and weight decay. Both
    ways: the CPU's (sums) and the GPU's (norms, no host synchronisation), here on CPU tensors."""
    from learnedopt.optim import _sharding

    if how == "norms":
        monkeypatch.setattr(_sharding, "_flags_by_sums", _sharding._flags_by_norms)

    if kind == "hier" and weight_decay:
        pytest.skip("the hierarchical optimizer has no weight decay")
    torch.manual_seed(0)
    grads = _nonfinite_cases()
    params = [torch.nn.Parameter(torch.randn(g.shape).to(g.dtype)) for g in grads]
    if kind == "l2l":  # an inf parameter with a finite gradient: 0 * inf is NaN, the kernel skips it
        params.append(torch.nn.Parameter(torch.tensor([1.0, float("inf")])))
        grads.append(torch.tensor([0.1, 0.2]))
    for p, g in zip(params, grads):
        p.grad = g.clone()
    scale = None if grad_scale is None else torch.tensor(grad_scale)
    flags = _sharding.nonfinite_flags(grads, scale, None, params=params if kind == "l2l" else None,
                                      weight_decays=[weight_decay] * len(grads) if kind == "l2l" else None)
    kw = dict(weight_decay=weight_decay) if kind == "l2l" else {}
    # one tensor per optimizer: the hierarchical optimizer steps the ones left even if one is skipped
    skipped = []
    for p in params:
        before = p.detach().clone()
        opt = make_opt(kind, [p], **kw)
        if scale is not None:
            opt.grad_scale, opt.found_inf = scale, torch.tensor(0.0)
        opt.step()
        state = next(iter(opt.state[p].values()))
        skipped.append(bool(torch.equal(p.detach(), before) and not state.ne(0).any()) if kind == "l2l"
                       else bool(torch.equal(p.detach(), before)))
    assert flags.tolist() == [float(s) for s in skipped]
    assert any(skipped) and not all(skipped)
