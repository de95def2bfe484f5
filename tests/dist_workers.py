"""What the distributed tests run on each rank (real processes, gloo, CPU; started by
tests/test_distributed.py through ``run_ranks``). Each worker returns a dict of tensors and numbers,
saved per rank and compared by the test in the parent process."""

from __future__ import annotations

import copy
import os
import traceback

import torch
import torch.distributed as dist
from torch import nn

import learnedopt

KINDS = {"l2l": (learnedopt.L2LOptimizer, dict(lr=0.1)), "hier": (learnedopt.HierarchicalOptimizer, dict(lr=1e-3))}


def entry(fn_name: str, rank: int, world: int, store: str, out: str, kwargs: dict) -> None:
    """The process body: join the group, run worker ``fn_name``, save its result (or the traceback)."""
    try:
        torch.set_num_threads(1)
        backend = kwargs.pop("backend", "gloo")
        if "nccl" in backend:
            torch.cuda.set_device(rank)  # nccl: one GPU per rank
        dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
        result = globals()[fn_name](rank, world, **kwargs)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def mlp() -> nn.Module:
    """Odd sizes: on 2 and 3 ranks the shards of dim 0 are uneven, and 2 rows on 3 ranks leave one empty."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 2), nn.Tanh(), nn.Linear(2, 3))


def batch(seed: int, n: int = 12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 7, generator=g), torch.randn(n, 3, generator=g)


def make_opt(kind: str, params, **kw):
    cls, defaults = KINDS[kind]
    return cls(params, **{**defaults, **kw})


def make_mesh(world: int, shape=None, device: str = "cpu"):
    """A 1-D mesh of all ranks, or with ``shape`` = (replicas, shards) HSDP's 2-D one."""
    from torch.distributed.device_mesh import init_device_mesh

    if shape is None:
        return init_device_mesh(device, (world,))
    return init_device_mesh(device, tuple(shape), mesh_dim_names=("replicate", "shard"))


def fsdp(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def state_tensors(opt) -> dict[str, torch.Tensor]:
    """Every tensor of an optimizer's per-parameter state (DTensors gathered whole), by position."""
    out = {}
    for i, p in enumerate(q for g in opt.param_groups for q in g["params"]):
        for k, v in opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                out[f"{i}.{k}"] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
    if hasattr(opt, "global_state"):
        out["global"] = opt.global_state.detach().clone()
    return out


def full(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


class CountAllReduce:
    """Counts torch.distributed.all_reduce calls (the optimizers reach it as dist.all_reduce)."""

    def __enter__(self):
        self.calls = 0
        self._orig = dist.all_reduce

        def counted(*a, **k):
            self.calls += 1
            return self._orig(*a, **k)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def each_kind(rank, world, fn: str, **kwargs):
    """Worker ``fn`` once per optimizer ("l2l", "hier") in the same processes (one start-up for both)."""
    return {kind: globals()[fn](rank, world, kind=kind, **kwargs) for kind in KINDS}


def several(rank, world, runs: list):
    """Several workers in the same processes: ``runs`` = [(name, fn, kwargs)]; results by name."""
    return {name: globals()[fn](rank, world, **kw) for name, fn, kw in runs}


# -- DDP -----------------------------------------------------------------------------------------
def ddp(rank, world, kind, steps):
    """DDP training, each rank on its own batch; returns parameters, state and the averaged gradients
    (rank 0) of every step."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = mlp()
    init = [p.detach().clone() for p in model.parameters()]
    dmodel = DDP(model)
    opt = make_opt(kind, dmodel.parameters())
    grads = []
    for step in range(steps):
        x, y = batch(100 * step + rank)
        opt.zero_grad()
        nn.functional.mse_loss(dmodel(x), y).backward()
        grads.append([p.grad.detach().clone() for p in model.parameters()])
        opt.step()
    return {"init": init, "params": [full(p) for p in model.parameters()], "state": state_tensors(opt),
            "grads": grads}


# -- FSDP2 ---------------------------------------------------------------------------------------
def fsdp_exact(rank, world, kind, steps, **opt_kw):
    """FSDP2 parameters and an unsharded copy stepped with the same (whole-batch) gradients, handed to
    the sharded parameters as DTensors; plus one replicated DTensor parameter in both. Returns the
    sharded and unsharded parameters and states, and the all-reduce calls per step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    model = mlp()
    ref = copy.deepcopy(model)
    fsdp(model, mesh)
    torch.manual_seed(1)
    rep_ref = nn.Parameter(torch.randn(4, 3))
    rep = nn.Parameter(distribute_tensor(rep_ref.detach().clone(), mesh, [Replicate()]))
    opt = make_opt(kind, [*model.parameters(), rep], **opt_kw)
    ropt = make_opt(kind, [*ref.parameters(), rep_ref], **opt_kw)
    calls = []
    for step in range(steps):
        x, y = batch(step)
        ropt.zero_grad()
        (nn.functional.mse_loss(ref(x), y) + (rep_ref * x[:4, :3]).sum()).backward()
        for p, q in zip([*model.parameters(), rep], [*ref.parameters(), rep_ref]):
            p.grad = distribute_tensor(q.grad, mesh, p.placements)
        with CountAllReduce() as c:
            opt.step()
        calls.append(c.calls)
        ropt.step()
    local_shapes = [tuple(p.to_local().shape) for p in model.parameters()]
    return {"params": [full(p) for p in [*model.parameters(), rep]],
            "ref_params": [q.detach().clone() for q in [*ref.parameters(), rep_ref]],
            "state": state_tensors(opt), "ref_state": state_tensors(ropt), "calls": calls,
            "local_shapes": local_shapes}


def fsdp_train(rank, world, kind, steps, mesh_shape=None):
    """A plain FSDP2 training loop (each rank its part of the batch; FSDP averages the gradients)
    against the unsharded model on the whole batch; ``mesh_shape`` (replicas, shards): HSDP."""

    mesh = make_mesh(world, mesh_shape)
    model = mlp()
    ref = copy.deepcopy(model)
    fsdp(model, mesh)
    opt, ropt = make_opt(kind, model.parameters()), make_opt(kind, ref.parameters())
    losses = []
    for step in range(steps):
        x, y = batch(step, n=6 * world)
        ropt.zero_grad()
        loss = nn.functional.mse_loss(ref(x), y)
        loss.backward()
        ropt.step()
        losses.append(loss.item())
        opt.zero_grad()
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        nn.functional.mse_loss(model(xs), ys).backward()
        opt.step()
    return {"params": [full(p) for p in model.parameters()], "ref_params": [q.detach().clone() for q in ref.parameters()],
            "losses": losses, "state": state_tensors(opt),
            "local_state": {k: v.to_local().clone() for k, v in _local_states(opt).items()}}


def placements_refused(rank, world):
    """Tensor-parallel style placements get a clear error and leave the parameter and the optimizer
    unchanged; a Replicate()-only DTensor steps as a plain tensor does."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for kind in KINDS:
        torch.manual_seed(0)
        full_p = torch.randn(5, 6)
        p = nn.Parameter(distribute_tensor(full_p, mesh, [Shard(1)]))
        p.grad = distribute_tensor(torch.randn(5, 6), mesh, [Shard(1)])
        opt = make_opt(kind, [p])
        try:
            opt.step()
            out[kind] = None
        except RuntimeError as e:
            out[kind] = str(e)
        out[kind + "_unchanged"] = torch.equal(p.full_tensor(), full_p) and not opt.state
    return out


# -- distributed checkpoints ---------------------------------------------------------------------
def synthetic_grads(params, step: int):
    """A gradient that depends on the parameters, whole and the same on every rank, as DTensors."""
    from torch.distributed.tensor import distribute_tensor

    for i, p in enumerate(params):
        whole = p.detach().full_tensor()
        g = torch.Generator().manual_seed(1000 * step + i)
        p.grad = distribute_tensor(0.5 * whole + torch.randn(whole.shape, generator=g), p.device_mesh, p.placements)


def dcp(rank, world, kind, ckpt, phase, steps):
    """phase "save": `steps` steps, a checkpoint (torch.distributed.checkpoint, get_*_state_dict),
    `steps` more. phase "load": a fresh model and optimizer on this world size load the checkpoint
    (set_*_state_dict) and take the same `steps` more. Returns the parameters and the optimizer state
    at the end."""
    import torch.distributed.checkpoint as dcp_
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    model = fsdp(mlp(), mesh)
    opt = make_opt(kind, model.parameters())
    params = list(model.parameters())
    if phase == "save":
        for step in range(steps):
            synthetic_grads(params, step)
            opt.step()
        dcp_.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                  checkpoint_id=ckpt)
    else:
        with torch.no_grad():  # a model that is not the saved one: the load must bring the saved values
            for p in params:
                p.to_local().mul_(-1.0)
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp_.load(sd, checkpoint_id=ckpt)
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])
    for step in range(steps, 2 * steps):
        synthetic_grads(params, step)
        opt.step()
    return {"params": [full(p) for p in params], "state": state_tensors(opt)}


def fsdp_precision(rank, world, kind, steps):
    """fully_shard with MixedPrecisionPolicy (bf16 compute, fp32 parameters and reduction) and a model
    in bf16 (bf16 shards), trained as with torch.optim.Adam; the bf16 one against the unsharded bf16
    model on the whole batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for name in ("mixed", "bf16"):
        model = mlp()
        if name == "bf16":
            model = model.to(torch.bfloat16)
        ref = copy.deepcopy(model)
        pol = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if name == "mixed" else \
            MixedPrecisionPolicy()
        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m, mesh=mesh, mp_policy=pol)
        fully_shard(model, mesh=mesh, mp_policy=pol)
        opt, ropt = make_opt(kind, model.parameters()), make_opt(kind, ref.parameters())
        init = [full(p) for p in model.parameters()]
        for step in range(steps):
            x, y = batch(step, n=6 * world)
            x = x.to(torch.bfloat16)
            opt.zero_grad()
            nn.functional.mse_loss(model(x.chunk(world)[rank]).float(), y.chunk(world)[rank]).backward()
            opt.step()
            ropt.zero_grad()
            nn.functional.mse_loss(ref(x.to(next(ref.parameters()).dtype)).float(), y).backward()
            ropt.step()
        out[name] = {"init": init, "params": [full(p) for p in model.parameters()],
                     "ref_params": [q.detach().clone() for q in ref.parameters()]}
    return out


STATE_KEY = {"l2l": "lstm", "hier": "coord"}


def fsdp_nonfinite(rank, world, kind, steps, bad_step, bad_param, bad_row, value, mesh_shape=None):
    """fsdp_exact's setup with a non-finite ``value`` put into the whole gradient of parameter
    ``bad_param`` at row ``bad_row`` at step ``bad_step``, so into ONE rank's shard of it; the unsharded
    optimizer gets the same gradient. Returns what fsdp_exact returns, plus this rank's local shard of
    that parameter and of its per-coordinate state just before and just after that step (sharded and
    unsharded), and whether this rank's shard held the value."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = make_mesh(world, mesh_shape)
    model = mlp()
    ref = copy.deepcopy(model)
    fsdp(model, mesh)
    torch.manual_seed(1)
    rep_ref = nn.Parameter(torch.randn(4, 3))
    rep = nn.Parameter(distribute_tensor(rep_ref.detach().clone(), mesh, [Replicate()] * mesh.ndim))
    opt = make_opt(kind, [*model.parameters(), rep])
    ropt = make_opt(kind, [*ref.parameters(), rep_ref])
    params, rparams = [*model.parameters(), rep], [*ref.parameters(), rep_ref]
    key = STATE_KEY[kind]
    calls, out = [], {}
    for step in range(steps):
        x, y = batch(step)
        ropt.zero_grad()
        (nn.functional.mse_loss(ref(x), y) + (rep_ref * x[:4, :3]).sum()).backward()
        if step == bad_step:
            rparams[bad_param].grad[bad_row] = float(value)
        for p, q in zip(params, rparams):
            p.grad = distribute_tensor(q.grad, mesh, p.placements)
        if step == bad_step:
            bp, rq = params[bad_param], rparams[bad_param]
            out["holds_bad"] = bool((~torch.isfinite(bp.grad.to_local())).any())
            before = [bp.to_local().clone(), opt.state[bp][key].to_local().clone() if opt.state else None,
                      rq.detach().clone(), ropt.state[rq][key].clone() if ropt.state else None]
            grad_before = [p.grad.to_local().clone() for p in params]
        with CountAllReduce() as c:
            opt.step()
        calls.append(c.calls)
        ropt.step()
        if step == bad_step:
            out["bad_before"] = before
            # the gradients are the caller's again (NaN where they were NaN only)
            out["grads_restored"] = all(torch.allclose(p.grad.to_local(), g, rtol=0, atol=0, equal_nan=True)
                                        for p, g in zip(params, grad_before))
            out["bad_after"] = [bp.to_local().clone(), opt.state[bp][key].to_local().clone(), rq.detach().clone(),
                                ropt.state[rq][key].clone()]
    out.update({"params": [full(p) for p in params], "ref_params": [q.detach().clone() for q in rparams],
                "state": state_tensors(opt), "ref_state": state_tensors(ropt), "calls": calls,
                "placements": [str(tuple(p.placements)) for p in model.parameters()],
                "local_state": {k: v.to_local().clone() for k, v in _local_states(opt).items()}})
    return out


def _local_states(opt) -> dict:
    """The DTensor entries of an optimizer's per-parameter state, by position (their local shards)."""
    out = {}
    for i, p in enumerate(q for g in opt.param_groups for q in g["params"]):
        for k, v in opt.state.get(p, {}).items():
            if hasattr(v, "to_local"):
                out[f"{i}.{k}"] = v
    return out


# -- CPU offload (needs 2 GPUs) ---------------------------------------------------------------------
def fsdp_offload(rank, world, steps):
    """fully_shard with CPUOffloadPolicy on a CUDA mesh (nccl): the module runs on the GPU, the shards,
    their gradients and the optimizer state live on the CPU and the step runs there. Each optimizer
    (the learned ones and torch.optim.Adam) trains the sharded model, each rank on its part of the
    batch (the same batch every step), and an unsharded copy on the CPU on the whole batch. Returns, per
    optimizer, the local shards (the parent concatenates them), the unsharded parameters, where shards
    and state live, and the whole-batch loss of the sharded model before and after."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda", torch.cuda.current_device())
    mesh = init_device_mesh("cuda", (world,))
    out = {}
    for name in (*KINDS, "adam"):
        model = mlp()
        ref = copy.deepcopy(model)
        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m, mesh=mesh, offload_policy=CPUOffloadPolicy(pin_memory=False))
        fully_shard(model, mesh=mesh, offload_policy=CPUOffloadPolicy(pin_memory=False))
        make = (lambda ps: torch.optim.Adam(ps, lr=1e-2)) if name == "adam" else (lambda ps: make_opt(name, ps))
        opt, ropt = make(model.parameters()), make(ref.parameters())
        x, y = batch(0, n=6 * world)  # one batch, every step: the loss on it falls
        with torch.no_grad():
            loss0 = nn.functional.mse_loss(model(x.to(dev)), y.to(dev)).item()
        for step in range(steps):
            opt.zero_grad()
            xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
            nn.functional.mse_loss(model(xs.to(dev)), ys.to(dev)).backward()
            opt.step()
            ropt.zero_grad()
            nn.functional.mse_loss(ref(x), y).backward()
            ropt.step()
        with torch.no_grad():
            loss1 = nn.functional.mse_loss(model(x.to(dev)), y.to(dev)).item()
        params = list(model.parameters())
        state = [v for p in params for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        out[name] = {"local_params": [p.to_local().detach().clone() for p in params],
                     "ref_params": [q.detach().clone() for q in ref.parameters()],
                     "devices": sorted({t.to_local().device.type if hasattr(t, "to_local") else t.device.type
                                        for t in [*params, *state]}),
                     "losses": (loss0, loss1)}
    return out
