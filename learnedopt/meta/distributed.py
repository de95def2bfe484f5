"""Distributed meta-training on torch.distributed (launched by ``torchrun``): every rank runs its own
trajectories, and the meta-gradients are averaged over all trajectories of all ranks by one
all-reduce per meta-step (:func:`average_meta_grads`); rank 0 writes the files.

With one process (no process group) the same code averages over the process's own trajectories, so
N ranks of ``trajectories = t`` compute what one process of ``trajectories = N * t`` computes.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["rank_and_world", "init_from_env", "average_meta_grads", "broadcast_lengths", "barrier"]


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> bool:
    """Joins the process group that ``torchrun`` describes in the environment (WORLD_SIZE > 1; gloo:
    meta-training runs on the CPU), unless one exists. Returns whether a group is in use."""
    if dist.is_available() and dist.is_initialized():
        return True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0:
        dist.init_process_group("gloo")
        return True
    # Restarted by torchrun: the rendezvous store may still hold the killed attempt's keys (gloo's peer
    # addresses, seen refused on torch 2.14), so this attempt's keys get a prefix of their own.
    rank = int(os.environ["RANK"])
    master = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and rank == 0
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=master)
    dist.init_process_group("gloo", store=dist.PrefixStore(f"learnedopt/attempt_{attempt}", store), rank=rank,
                            world_size=world)
    return True


def average_meta_grads(params: list[Tensor], count: int, ok: bool, loss_sum: float) -> tuple[bool, float]:
    """The meta-gradient of a meta-step from the gradients summed in ``p.grad`` over this process's
    trajectories: summed over all ranks by ONE all-reduce (the gradients, which parameters have one,
    and how many trajectories failed), divided by the total number of trajectories ``count``.
    ``ok``: this process's trajectories all gave a finite meta-loss. Returns whether every trajectory
    of every rank did (if not, the gradients are left as they are and the caller skips the step), and
    the mean meta-loss over all trajectories (``loss_sum``: this process's sum; summed in the same
    all-reduce)."""
    _, world = rank_and_world()
    has = [p.grad is not None for p in params]
    if world > 1:
        flat = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                for p in params]
        flags = torch.tensor([float(h) for h in has] + [loss_sum, 0.0 if ok else 1.0], dtype=torch.float64)
        flags = flags.to(dtype=params[0].dtype, device=params[0].device)
        vec = torch.cat(flat + [flags])
        dist.all_reduce(vec)
        n = sum(p.numel() for p in params)
        tail = vec[n:].tolist()
        if tail[-1] != 0:
            return False, float("nan")
        loss_sum = tail[-2]
        for p, g, h in zip(params, vec[:n].split([p.numel() for p in params]), tail[:-2]):
            p.grad = g.view_as(p).clone() if h > 0 else None
    elif not ok:
        return False, float("nan")
    if count != 1:
        for p in params:
            if p.grad is not None:
                p.grad.div_(count)
    return True, loss_sum / count


def broadcast_lengths(lengths: list[int]) -> list[int]:
    """Rank 0's unroll lengths (drawn from its generator) on every rank."""
    _, world = rank_and_world()
    if world == 1:
        return lengths
    box = [lengths]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()
