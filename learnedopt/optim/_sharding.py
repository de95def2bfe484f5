"""Parameters that are DTensors (FSDP2's ``fully_shard``, HSDP, replicated DTensors): what the learned
optimizers need to step them on their local shards.

Supported placements, on each mesh dimension: ``Replicate()`` and ``Shard(0)`` (what FSDP2 and HSDP
give). Anything else (``Shard(d)`` with d != 0, as tensor parallelism gives, ``Partial``, or a
parameter sharded on more than one mesh dimension) is refused with an error naming the parameter.

The per-coordinate state of a sharded parameter is a DTensor sharded like the parameter: its global
shape is the parameter's shape with the state's rows in front (``[rows, *p.shape]``, the parameter's
``Shard(0)`` becoming ``Shard(1)``) or its columns behind (``[*p.shape, width]``, ``Shard(0)``), so that
``torch.distributed.checkpoint`` saves, loads and reshards it as it does torch.optim's state. Its local
tensor, viewed as ``[rows, n]`` or ``[n, width]`` (n: the local shard's size), is what the kernels take.

Collectives per sharded step, on the process group of the shards' mesh dimension, each for all tensors
at once: L2L one (the per-tensor non-finite flags, :func:`agree_nonfinite`, before the kernel), the
hierarchical optimizer two (those flags, then the per-tensor sums after the kernel,
:func:`reduce_hier_sums`). Why the flags need their own: see "a non-finite gradient in one shard" below.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["is_dtensor", "local", "param_name", "ShardSpec", "shard_spec", "state_like", "local_view", "reduction_group",
           "nonfinite_flags", "agree_nonfinite", "skipping"]


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def local(t: Tensor) -> Tensor:
    """The local tensor of a DTensor; a plain tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


@dataclass(frozen=True)
class ShardSpec:
    """Where a DTensor parameter lives: its mesh, its placements, and the mesh dimension along which
    it is sharded on dim 0 (None: replicated on every mesh dimension)."""

    mesh: object
    placements: tuple
    shard_dim: int | None


def param_name(opt, p: Tensor) -> str:
    """How an error names parameter ``p`` of optimizer ``opt``: ``param_groups[g]['params'][i]``."""
    for g, group in enumerate(opt.param_groups):
        for i, q in enumerate(group["params"]):
            if q is p:
                return f"param_groups[{g}]['params'][{i}]"
    return "?"


def shard_spec(owner: str, name: str, p: Tensor) -> ShardSpec | None:
    """The ShardSpec of parameter ``p`` (None for a plain tensor); a clear error for what the learned
    optimizers cannot step (tensor parallel and other placements), and for a gradient placed otherwise
    than its parameter."""
    if not is_dtensor(p):
        if p.grad is not None and is_dtensor(p.grad):
            raise RuntimeError(f"{owner}: parameter {name} is a plain tensor but its gradient is a DTensor")
        return None
    from torch.distributed.tensor import Replicate, Shard

    shard_dim = None
    for d, pl in enumerate(p.placements):
        if isinstance(pl, Replicate):
            continue
        if type(pl) is Shard and pl.dim == 0 and shard_dim is None:
            shard_dim = d
            continue
        raise RuntimeError(
            f"{owner}: parameter {name} is a DTensor with placements {tuple(p.placements)} on a mesh of shape "
            f"{tuple(p.device_mesh.shape)}; supported are Replicate() and Shard(0) on one mesh dimension (FSDP2's "
            "fully_shard, HSDP), not tensor parallel (Shard(d) with d != 0), Partial or sharding on several mesh "
            "dimensions")
    g = p.grad
    if g is not None:
        if not is_dtensor(g):
            raise RuntimeError(f"{owner}: parameter {name} is a DTensor but its gradient is a plain tensor")
        if tuple(g.placements) != tuple(p.placements) or g.device_mesh != p.device_mesh:
            raise RuntimeError(f"{owner}: the gradient of parameter {name} has placements {tuple(g.placements)}, "
                               f"its parameter {tuple(p.placements)} (they must be the same)")
    return ShardSpec(p.device_mesh, tuple(p.placements), shard_dim)


def state_like(p: Tensor, local_state: Tensor, rows_first: bool) -> Tensor:
    """Per-coordinate state of parameter ``p`` from its local part (``[rows, n]`` when ``rows_first``,
    else ``[n, width]``): for a DTensor parameter a DTensor sharded like it (see the module docstring),
    for a plain one the local tensor as it is."""
    if not is_dtensor(p):
        return local_state
    from torch.distributed.tensor import DTensor, Shard

    loc = local(p)
    if rows_first:
        rows = local_state.shape[0]
        data = local_state.view(rows, *loc.shape)
        shape = (rows, *p.shape)
        placements = tuple(Shard(1) if isinstance(pl, Shard) else pl for pl in p.placements)
    else:
        width = local_state.shape[1]
        data = local_state.view(*loc.shape, width)
        shape = (*p.shape, width)
        placements = tuple(p.placements)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(data, p.device_mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=stride)


def state_shape(p: Tensor, rows: int | None = None, width: int | None = None) -> tuple[int, ...]:
    """The shape of parameter ``p``'s per-coordinate state as :func:`state_like` makes it: ``rows`` in
    front (``[rows, n]``; a DTensor's ``[rows, *p.shape]``) or ``width`` behind (``[n, width]``; a
    DTensor's ``[*p.shape, width]``)."""
    if rows is not None:
        return (rows, *p.shape) if is_dtensor(p) else (rows, p.numel())
    return (*p.shape, width) if is_dtensor(p) else (p.numel(), width)


def local_view(state: Tensor, rows_first: bool) -> Tensor:
    """The 2-D local tensor a kernel takes from a per-coordinate state (a DTensor or a plain tensor)."""
    if not is_dtensor(state):
        return state
    t = state.to_local()
    return t.view(t.shape[0], -1) if rows_first else t.view(-1, t.shape[-1])


def reduction_group(owner: str, specs: list[ShardSpec | None]):
    """The one process group over which the shards of the sharded parameters are summed, or None when
    no parameter is sharded. All sharded parameters must share it (one mesh, one mesh dimension)."""
    sharded = [s for s in specs if s is not None and s.shard_dim is not None]
    if not sharded:
        return None
    first = sharded[0]
    for s in sharded[1:]:
        if s.mesh != first.mesh or s.shard_dim != first.shard_dim:
            raise RuntimeError(f"{owner}: the sharded parameters must share one device mesh and mesh dimension "
                               f"(its global RNN couples them all), got meshes {first.mesh} (dim {first.shard_dim}) "
                               f"and {s.mesh} (dim {s.shard_dim})")
    return first.mesh.get_group(first.shard_dim)


# -- a non-finite gradient in one shard -------------------------------------------------------------
# Unsharded, a tensor whose gradient holds a NaN or an inf is skipped whole: neither it nor its
# per-coordinate state changes (the fused kernels' first pass). Sharded, each rank sees its shard only,
# and the kernels write the state of a finite shard in place; so which tensors are non-finite anywhere
# must be known BEFORE the kernel: every rank flags its shards (nonfinite_flags), one all-reduce (MAX)
# of those [T] flags (agree_nonfinite) tells every rank, and the kernel then skips the flagged tensors
# on every rank (skipping). This is a collective of its own: the hierarchical optimizer's sums can only
# be reduced after the kernel, and undoing a step after it would need a copy of the whole
# per-coordinate state every step (its size again in memory, about twice the step's memory traffic).


def nonfinite_flags(grads: list[Tensor], grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
                    params: list[Tensor] | None = None, weight_decays: list[float] | None = None) -> Tensor:
    """[T] float32 on the gradients' device: 1 where the local gradient ``grads[i]`` holds a value the
    fused kernels judge non-finite, else 0; all 1 where ``found_inf`` is nonzero (the kernels then skip
    every tensor). The kernels' test: g / grad_scale (the hierarchical op); with ``params`` (L2L),
    g / grad_scale + weight_decay * p. On the CPU: a sum per tensor (finite: every element is), the
    kernels' formula elementwise only where it is not (or where g / grad_scale may overflow); on a GPU
    (no host synchronisation): two batched ``torch._foreach_norm`` (the largest |g| decides whether
    g / grad_scale overflows, the sum of |g| whether a NaN is there)."""
    dev = grads[0].device
    inv = None if grad_scale is None else 1.0 / grad_scale.to(device=dev, dtype=torch.float64)
    wd = weight_decays or [0.0] * len(grads)
    flags = (_flags_by_sums if dev.type == "cpu" else _flags_by_norms)(grads, inv, params, wd)
    if found_inf is not None:
        flags = flags | (found_inf.to(dev) != 0)
    return flags.to(torch.float32)


def _acc(t: Tensor) -> torch.dtype:
    """The kernels' compute type for a tensor of this dtype."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _nonfinite_exact(g: Tensor, inv: Tensor | None, p: Tensor | None, wd: float) -> Tensor:
    """The kernels' test, elementwise: is some g / grad_scale (+ wd * p) not finite? (0-dim bool)"""
    a = _acc(g)
    v = g.to(a) if inv is None else g.to(a) * inv.to(a)
    if p is not None:
        v = v + wd * p.to(a)
    return ~torch.isfinite(v).all()


def _flags_by_sums(grads, inv, params, wd) -> Tensor:
    # A finite sum means finite elements (an inf or a NaN never sums to a finite value); g / grad_scale
    # cannot overflow for a finite g when grad_scale >= 1, nor g + 0 * p for a finite p.
    dev = grads[0].device
    may_overflow = inv is not None and float(inv) > 1.0
    bad = []
    for i, g in enumerate(grads):
        p = None if params is None else params[i]
        if g.numel() == 0:
            bad.append(torch.zeros((), dtype=torch.bool, device=dev))
            continue
        quick = wd[i] == 0.0 and not may_overflow and bool(torch.isfinite(g.sum())) and (
            p is None or bool(torch.isfinite(p.sum())))
        bad.append(torch.zeros((), dtype=torch.bool, device=dev) if quick else _nonfinite_exact(g, inv, p, wd[i]))
    return torch.stack(bad)


def _flags_by_norms(grads, inv, params, wd) -> Tensor:
    dev = grads[0].device
    no = torch.zeros((), dtype=torch.bool, device=dev)
    bad = [no] * len(grads)
    # weight decay 0: the largest |g| and the sum of |g| (of p too: 0 * p is NaN for an inf p)
    idx = [i for i, g in enumerate(grads) if g.numel() > 0 and wd[i] == 0.0]
    if idx:
        ts = [grads[i] for i in idx]
        if params is not None:
            ts += [params[i] for i in idx]
        big = torch._foreach_norm(ts, float("inf"), dtype=torch.float64)
        tot = torch._foreach_norm(ts, 1, dtype=torch.float64)
        n = len(idx)
        for j, i in enumerate(idx):
            a = _acc(grads[i])
            g_big = big[j] if inv is None else big[j].to(a) * inv.to(a)
            b = torch.isnan(tot[j]) | ~torch.isfinite(g_big)
            if params is not None:
                b = b | torch.isnan(tot[n + j]) | torch.isinf(big[n + j])
            bad[i] = b
    for i, g in enumerate(grads):  # a weight decay: the kernels' formula, elementwise
        if g.numel() > 0 and wd[i] != 0.0:
            bad[i] = _nonfinite_exact(g, inv, params[i], wd[i])
    return torch.stack(bad)


def _reaches_cpu(group) -> bool:
    """Whether ``group`` has a backend for CPU tensors (gloo; "cpu:gloo,cuda:nccl"); an NCCL-only group
    has none."""
    try:
        group._get_backend(torch.device("cpu"))
        return True
    except RuntimeError:
        return False
    except AttributeError:  # another torch: assume it can
        return True


def all_reduce(t: Tensor, group, op=None) -> None:
    """``dist.all_reduce(t)`` in place over ``group``. The optimizers' few numbers are on the parameters'
    device; under FSDP2's ``CPUOffloadPolicy`` that is the CPU while the group may be NCCL only: then
    they go through the current CUDA device (a copy there and back: the offloaded step runs on the
    CPU and waits for its results anyway)."""
    import torch.distributed as dist

    op = dist.ReduceOp.SUM if op is None else op
    if t.device.type == "cpu" and torch.cuda.is_available() and not _reaches_cpu(group):
        on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=op, group=group)
        t.copy_(on_gpu)
    else:
        dist.all_reduce(t, op=op, group=group)


def agree_nonfinite(flags: Tensor, group) -> Tensor:
    """Every rank's ``flags`` [T] combined by one all-reduce (MAX) over ``group``: [T] bool, True where
    some shard of tensor i is non-finite."""
    import torch.distributed as dist

    flags = flags.contiguous()
    all_reduce(flags, group, dist.ReduceOp.MAX)
    return flags > 0


@contextlib.contextmanager
def skipping(grads: list[Tensor], skip: Tensor):
    """While the block runs, the local gradient of every tensor flagged in ``skip`` [T] holds a NaN (its
    first element), so that the fused kernels skip that tensor here too, as on the rank whose shard is
    non-finite; the gradients are restored after. On CUDA by ``torch.where`` on every tensor (no host
    synchronisation), on the CPU only on the flagged ones."""
    idx = [i for i, g in enumerate(grads) if g.numel() > 0]
    if not idx:
        yield
        return
    dev = grads[idx[0]].device
    flags = skip.unbind(0)
    if dev.type == "cpu":
        idx = [i for i in idx if bool(flags[i])]
    firsts = [grads[i][(0,) * grads[i].dim()] for i in idx]
    saved = [f.clone() for f in firsts]
    if firsts:
        nan = torch.full((), float("nan"), device=dev)
        if dev.type == "cpu":
            torch._foreach_copy_(firsts, [nan] * len(firsts))
        else:
            torch._foreach_copy_(firsts, [torch.where(flags[i], nan, v) for i, v in zip(idx, saved)])
    try:
        yield
    finally:
        if firsts:
            torch._foreach_copy_(firsts, saved)


# -- the hierarchical optimizer on shards ----------------------------------------------------------
def reduce_hier_sums(sums: Tensor, params: list[Tensor], specs: list[ShardSpec | None], group,
                     k_stepped: int) -> tuple[Tensor, Tensor]:
    """The per-tensor sums of the whole tensors from those of the local shards (``sums`` [T, C]: the
    fused op's output on the shards, column ``k_stepped`` its stepped flag, and any further columns of
    per-tensor sums), by ONE all-reduce over ``group`` for all tensors. A tensor takes the step when no
    nonempty shard of it was skipped (a NaN/inf in its gradient there: the kernel skipped it on every
    rank, see :func:`skipping`) and it is nonempty; a replicated parameter's sums count once (from the
    group's rank 0). Returns (sums [T, C] as for whole tensors, stepped [T])."""
    import torch.distributed as dist

    from ..rules.hierarchical import device_values

    dev = sums.device
    nonempty = device_values([float(local(p).numel() > 0) for p in params], sums.dtype, dev) > 0
    first = dist.get_rank(group) == 0
    counts = device_values([float(first or (s is not None and s.shard_dim is not None)) for s in specs],
                           sums.dtype, dev) > 0
    zero = torch.zeros((), dtype=sums.dtype, device=dev)
    bad = (nonempty & (sums[:, k_stepped] == 0)).to(sums.dtype)
    vec = torch.where(counts[:, None], sums, zero)
    vec[:, k_stepped] = bad
    all_reduce(vec, group)
    whole_nonempty = device_values([float(p.numel() > 0) for p in params], sums.dtype, dev) > 0
    stepped = (vec[:, k_stepped] == 0) & whole_nonempty
    vec[:, k_stepped] = stepped.to(sums.dtype)
    return vec, stepped
