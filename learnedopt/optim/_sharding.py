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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["is_dtensor", "local", "param_name", "ShardSpec", "shard_spec", "state_like", "local_view", "reduction_group"]


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


# -- the hierarchical optimizer on shards ----------------------------------------------------------
def reduce_hier_sums(sums: Tensor, params: list[Tensor], specs: list[ShardSpec | None], group,
                     k_stepped: int) -> tuple[Tensor, Tensor]:
    """The per-tensor sums of the whole tensors from those of the local shards (``sums`` [T, C]: the
    fused op's output on the shards, column ``k_stepped`` its stepped flag, and any further columns of
    per-tensor sums), by ONE all-reduce over ``group`` for all tensors. A tensor takes the step when no
    nonempty shard of it was skipped (a NaN/inf in its gradient there) and it is nonempty; a replicated
    parameter's sums count once (from the group's rank 0). Returns (sums [T, C] as for whole tensors,
    stepped [T])."""
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
    dist.all_reduce(vec, group=group)
    whole_nonempty = device_values([float(p.numel() > 0) for p in params], sums.dtype, dev) > 0
    stepped = (vec[:, k_stepped] == 0) & whole_nonempty
    vec[:, k_stepped] = stepped.to(sums.dtype)
    return vec, stepped
