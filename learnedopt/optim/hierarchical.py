"""The hierarchical learned optimizer (Wichrowska et al. 2017) as a ``torch.optim`` optimizer; its
network, reference step and meta-training rule are in :mod:`learnedopt.rules.hierarchical`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import ops
from ..rules.hierarchical import (DEFAULT_MAX_UPDATE_RATIO, K_STEPPED, HierarchicalNet, HierState, device_values, fused_step_,
                                  step_reference)
from . import _sharding
from ._base import _LearnedOptimizer, check_gradients, check_nonnegative, resolve_net

__all__ = ["HierarchicalOptimizer", "DEFAULT_HIERARCHICAL"]


DEFAULT_HIERARCHICAL = "hierarchical-ensemble"


class HierarchicalOptimizer(_LearnedOptimizer):
    r"""The hierarchical learned optimizer of Wichrowska et al. 2017 ("Learned Optimizers that Scale and
    Generalize"): a per-coordinate LSTM, a per-tensor GRU and a global GRU (see
    :mod:`learnedopt.rules.hierarchical` for the maths). Per coordinate it keeps momenta at 4 timescales
    with a learned decay, their running mean squares (gradient-scale normalisation) and a learned log
    learning rate; the update of a tensor is

    .. math::
        \theta \leftarrow \theta - \text{lr}\cdot e^{\ell + \text{offset}}\cdot \hat d,

    with :math:`\hat d` the network's direction normalised to unit RMS over the tensor and
    :math:`\ell` the coordinate's (learned, adapted every step) log learning rate, which starts at 0:
    ``lr`` is the initial learning rate, and then a plain multiplier (``lr = 0`` leaves the parameters
    unchanged; it may differ per group and follows ``torch.optim.lr_scheduler``).

    Each ``step()`` runs one fused in-place op (``torch.ops.learnedopt.hier_step_``) over all
    parameters for the per-coordinate part — momenta, mean squares, features, the LSTM cell, the
    read-outs, the new log learning rates and the update — and a handful of small tensor ops for the
    per-tensor and global RNNs. No host synchronisation on CUDA.

    Args:
        params: parameters or parameter groups, as any ``torch.optim`` optimizer (one device).
        lr: the initial learning rate (see above). The default, 1e-4, is the centre of the initial
            learning rates the shipped weights were meta-trained from (the original code's
            exp(U(ln 1e-6, ln 1e-2)) per coordinate); the network raises it where it can. Starting
            far above it (1e-2 and up) can overshoot: docs/hierarchical.md has the measurements.
        net: a :class:`~learnedopt.rules.hierarchical.HierarchicalNet`; default: the shipped pretrained
            weights ``pretrained``.
        pretrained: the name of shipped weights (``learnedopt.pretrained.available()``); default
            ``"hierarchical-ensemble"`` unless ``net`` is given.
        state_dtype: ``torch.float32`` (default) or ``torch.bfloat16`` (half the state's bytes; compute
            stays float32). Float64 parameters always keep float64 state. ``load_state_dict`` casts a
            checkpoint's per-coordinate state to this dtype (a bfloat16 run resumes in float32 exactly).
        fused: ``None`` (default: the fused op when it can run this network), ``True`` (require it) or
            ``False`` (the pure-PyTorch reference, :func:`learnedopt.rules.hierarchical.step_reference`).
        max_update_ratio: the update-ratio safeguard τ (default 0: off; per parameter group, like
            ``lr``): a tensor's update is held to at most τ × max(its RMS, 1e-2) per step by lowering
            that tensor's learning rates (the step's and the state's) just enough. The network
            proposes steps in absolute units, and the sizes it learned on small problems overshoot
            on wide BatchNorm networks (a ResNet-18 conv with fan-in 4,608 and RMS 0.02 took 40 % of
            itself per step and the loss spiked from 2.5 to 6.8); **use 0.01 for such networks**:
            the step becomes relative to the tensor's scale. It is off by default because on the
            small problems of docs/hierarchical.md (tiny initialisations that must grow, a ResNet
            without normalisation) it raises the final loss 160-15,000x. docs/resnet.md has the
            measurements.

    State: ``optimizer.state[p]["coord"]`` (``[32, numel]``: the rows of
    :class:`learnedopt.rules.hierarchical.Rows`), ``["tensor"]`` (the tensor GRU's state) and
    ``["log_lr_sum"]``; the global GRU's state is ``optimizer.global_state`` (saved in the state dict).
    The problem the network sees is all parameters that have a gradient in a step: its global RNN
    reads their mean tensor state, and the relative log learning rate is against their mean.

    Distributed: under DDP nothing changes. FSDP2 and HSDP (``fully_shard``: DTensor parameters sharded
    on dim 0) are stepped on the local shards, so that it computes what the unsharded optimizer computes
    (see :mod:`learnedopt.optim._sharding` and README "Distributed"), by **two** all-reduces per step on
    the process group of the shards' mesh dimension, each for all tensors: the per-tensor "non-finite
    gradient" flags before the kernel (a NaN/inf in any shard skips that whole tensor on every rank, as
    unsharded: it must be known before any state is written) and the per-tensor sums after it (needed
    by the update's RMS, the tensor and global RNNs). Other placements raise.

    Gradients: parameters without ``.grad`` are skipped; sparse or complex gradients raise. A
    parameter whose gradient holds a NaN or an inf is **skipped for that step** (neither it nor any of
    its state changes, and the global RNN does not see it). With ``torch.amp.GradScaler`` the gradients
    are unscaled inside the op and a step with inf/NaN found is skipped entirely.
    """

    _COPIED = {"net": None, "pretrained": None, "state_dtype": torch.float32, "fused": None, "global_state": None}
    _CACHES = ("_weights_cache", "_numels_cache")

    def __init__(self, params, lr: float = 1e-4, net=None, pretrained: str | None = None,
                 state_dtype: torch.dtype = torch.float32, fused: bool | None = None,
                 max_update_ratio: float = DEFAULT_MAX_UPDATE_RATIO):
        check_nonnegative("HierarchicalOptimizer", "lr", lr)
        check_nonnegative("HierarchicalOptimizer", "max_update_ratio", max_update_ratio)
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"HierarchicalOptimizer: state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
        if fused not in (None, True, False):
            raise ValueError(f"HierarchicalOptimizer: fused must be None, True or False, got {fused!r}")
        net, pretrained = resolve_net("HierarchicalOptimizer", net, pretrained, DEFAULT_HIERARCHICAL, HierarchicalNet)
        if net.attention:
            raise ValueError("HierarchicalOptimizer: attention=True (the look-ahead point) is supported by the "
                             "meta-training rule (learnedopt.rules.hierarchical.step_reference) only, not by the optimizer")
        if fused and not net.fusable:
            raise ValueError("HierarchicalOptimizer: fused=True needs a network with hidden=10 and scales=4 (the "
                             f"fused kernels' sizes), got {net.config()}")
        self.net = net
        self.pretrained = pretrained
        self.state_dtype = state_dtype
        self.fused = fused
        super().__init__(params, dict(lr=lr, max_update_ratio=float(max_update_ratio)))
        self._weights_cache: dict[Any, tuple] = {}
        self._numels_cache: dict[Any, Tensor] = {}
        # created here, only ever updated in place in step() (torch.compile keeps in-place updates)
        self.global_state = self._initial_global_state()

    def _initial_global_state(self) -> Tensor:
        device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
        return self.net.global0.detach().to(device=device, dtype=torch.float32).clone()

    def _use_fused(self, device: torch.device) -> bool:
        if self.fused is False or not self.net.fusable:
            return False
        if self.fused is True:
            ops._require(device, "HierarchicalOptimizer.step")
            return True
        return ops.extension_available() and (device.type == "cpu" or (device.type == "cuda" and ops.cuda_built()))

    def _packed(self, device: torch.device) -> Tensor:
        return self._net_cached(device, lambda d: self.net.packed_coord_weights().to(d))

    def _numels(self, params: list[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
        """The parameters' sizes as a tensor on their device, made there once (no host copy per step)."""

        sizes = [p.numel() for p in params]
        if torch.compiler.is_compiling():
            return device_values(sizes, dtype, device)
        key = (device, dtype, tuple(sizes))
        if key not in self._numels_cache:
            self._numels_cache.clear()
            self._numels_cache[key] = device_values(sizes, dtype, device)
        return self._numels_cache[key]

    def _state_dtypes(self, p: Tensor) -> dict[str, torch.dtype]:
        """The dtype of each state entry of parameter p: float64 for float64 parameters; otherwise
        state_dtype for the per-coordinate rows and float32 for the rest. Used when the state is
        created and when it is loaded (as torch.optim casts loaded state to its own policy)."""
        if p.dtype == torch.float64:
            return {"coord": torch.float64, "tensor": torch.float64, "log_lr_sum": torch.float64}
        return {"coord": self.state_dtype, "tensor": torch.float32, "log_lr_sum": torch.float32}

    def _init_state(self, p: Tensor, state: dict) -> None:
        dts = self._state_dtypes(p)
        n = _sharding.local(p).numel()  # a DTensor's rows are [32, *p.shape], sharded like p (see _sharding)
        state["coord"] = _sharding.state_like(
            p, self.net.initial_coord_state(n, 0.0, dtype=dts["coord"], device=p.device), rows_first=True)
        state["tensor"] = self.net.tensor0.detach().to(device=p.device, dtype=dts["tensor"]).clone()
        state["log_lr_sum"] = torch.zeros((), dtype=dts["log_lr_sum"], device=p.device)

    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step; ``closure`` (re-evaluating the loss) is optional."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Every parameter is checked before any state is created: a refused step leaves the
        # optimizer as it was.
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return loss
        check_gradients("HierarchicalOptimizer", params)
        device = params[0].device
        for p in params:
            if p.device != device:
                raise RuntimeError(f"HierarchicalOptimizer: every parameter must be on one device (its global RNN "
                                   f"couples them all), got {device} and {p.device}")
        if self.global_state.device != device and not any(isinstance(k, Tensor) for k in self.state):
            # The model moved (model.cuda()) or was materialised from the meta device after the
            # optimizer was built and before its first step: the global state follows it.
            self.global_state = (self._initial_global_state() if self.global_state.is_meta
                                 else self.global_state.to(device))
        if self.global_state.device != device:
            raise RuntimeError(f"HierarchicalOptimizer: the parameters are on {device}, its global state on "
                               f"{self.global_state.device}")
        specs = [_sharding.shard_spec("HierarchicalOptimizer", _sharding.param_name(self, p), p) for p in params]
        shard_group = _sharding.reduction_group("HierarchicalOptimizer", specs)
        if shard_group is not None and not self._use_fused(device):
            raise RuntimeError("HierarchicalOptimizer: sharded (FSDP2) parameters need the fused op (fused=None or "
                               "True and the compiled extension); the reference step (fused=False) runs on whole "
                               "tensors only")
        for gi, group in enumerate(self.param_groups):
            check_nonnegative("HierarchicalOptimizer", f"param_groups[{gi}]['max_update_ratio']",
                              group.get("max_update_ratio", self.defaults["max_update_ratio"]))
        grads, states, lrs, ratios = [], [], [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "coord" not in state:
                    self._init_state(p, state)
                grads.append(p.grad)
                states.append(state)
                lrs.append(float(group["lr"]))
                ratios.append(float(group.get("max_update_ratio", self.defaults["max_update_ratio"])))
        cdt = torch.float64 if all(p.dtype == torch.float64 for p in params) else torch.float32
        glob = self.global_state.to(cdt)
        tensor_prev = torch.stack([s["tensor"].to(cdt) for s in states])
        numels = self._numels(params, cdt, device)
        log_lr_sums = torch.stack([s["log_lr_sum"].to(cdt) for s in states])
        mean_log_lr = log_lr_sums.sum() / numels.sum().clamp_min(1)
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        net = self.net
        if grad_scale is not None:
            grad_scale = grad_scale.to(device)
        if found_inf is not None:
            found_inf = found_inf.to(device)
        if self._use_fused(device):
            local_params = [_sharding.local(p) for p in params]
            local_grads = [_sharding.local(g) for g in grads]
            coords = [_sharding.local_view(s["coord"], rows_first=True) for s in states]
            reduce = skipped = None
            if shard_group is not None:
                # A NaN/inf in any shard of a gradient skips that whole tensor on every rank, as unsharded:
                # the per-tensor flags are agreed on by an all-reduce BEFORE the kernel writes any state.
                agreed = _sharding.agree_nonfinite(_sharding.nonfinite_flags(local_grads, grad_scale, found_inf),
                                                   shard_group)
                skipped = _sharding.skipping(local_grads, agreed)
                # Sharded: the kernel steps the local shards with lr = 0 (the coordinates' state and
                # their partial sums; p - 0 * u leaves p as it is); the sums are reduced by one
                # collective, then p -= lr / rms(d) * u (fused_step_).
                def reduce(sums):
                    sums, stepped = _sharding.reduce_hier_sums(sums, params, specs, shard_group, K_STEPPED)
                    return sums.to(cdt), stepped
            args = (net, local_params, local_grads, coords, tensor_prev, glob, numels, mean_log_lr,
                    self._packed(device), lrs, grad_scale, found_inf)
            if skipped is None:  # (no context manager: a fullgraph torch.compile of step() stays one graph)
                stepped, new_t, new_g, new_log_lr_sums = fused_step_(*args, max_update_ratios=ratios)
            else:
                with skipped:
                    stepped, new_t, new_g, new_log_lr_sums = fused_step_(*args, reduce=reduce,
                                                                         max_update_ratios=ratios)
        else:
            stepped, new_t, new_g, new_log_lr_sums = self._reference_step(params, grads, states, lrs, ratios,
                                                                          tensor_prev, glob, grad_scale, found_inf)
        new_t = new_t.detach()
        torch._foreach_copy_([s["tensor"] for s in states], list(new_t.to(states[0]["tensor"].dtype).unbind(0)))
        new_sums = torch.where(stepped, new_log_lr_sums, log_lr_sums)
        torch._foreach_copy_([s["log_lr_sum"] for s in states], list(new_sums.unbind(0)))
        self.global_state.copy_(new_g.detach())
        return loss

    def _reference_step(self, params, grads, states, lrs, ratios, tensor_prev, glob, grad_scale, found_inf):
        """The whole step through learnedopt.rules.hierarchical.step_reference (the meta-training rule's step)
        on the nonempty parameters, written back in place. Returns (stepped [T], new tensor states
        [T, G], new global state, new per-tensor log-lr sums [T])."""

        R = self.net.rows
        cdt = tensor_prev.dtype
        device = params[0].device
        T = len(params)
        idx = [i for i, p in enumerate(params) if p.numel()]
        no = torch.zeros((), dtype=torch.bool, device=device)
        if not idx:
            return no.expand(T), tensor_prev, glob, torch.zeros(T, dtype=cdt, device=device)
        grads = [grads[i].to(cdt) for i in idx]
        if grad_scale is not None:
            grads = [g / grad_scale.to(device=device, dtype=cdt) for g in grads]
        ok = torch.stack([torch.isfinite(g).all() for g in grads])
        if found_inf is not None:
            ok = ok & (found_inf.to(device) == 0)
        rows = torch.cat([states[i]["coord"].to(cdt) for i in idx], 1)
        state = HierState(rows, torch.stack([tensor_prev[i] for i in idx]), glob, rows.new_zeros(0))
        lr = device_values([lrs[i] for i in idx], cdt, device)
        ratio = device_values([ratios[i] for i in idx], cdt, device) if any(ratios) else None
        new_params, new = step_reference(self.net, [params[i] for i in idx], grads, state, lr, stepped=ok,
                                         max_update_ratio=ratio)
        new_rows = new.coord.split([params[i].numel() for i in idx], 1)
        for i, p, r in zip(idx, new_params, new_rows):
            params[i].copy_(p)
            states[i]["coord"].copy_(r)
        # Back to all T parameters (the zero-size ones take no step), by stacking: indexing with a
        # list of positions would copy that list to the device.
        pos = {i: j for j, i in enumerate(idx)}
        log_lr_sums = [r[R.log_lr].sum() for r in new_rows]
        zero = torch.zeros((), dtype=cdt, device=device)
        stepped = torch.stack([ok[pos[i]] if i in pos else no for i in range(T)])
        new_t = torch.stack([new.tensor[pos[i]] if i in pos else tensor_prev[i] for i in range(T)])
        new_log_lr_sums = torch.stack([log_lr_sums[pos[i]] if i in pos else zero for i in range(T)])
        return stepped, new_t, new.glob, new_log_lr_sums

    # -- checkpoints (see _LearnedOptimizer) ----------------------------------------------------
    def _save_extra(self, state_dict: dict[str, Any]) -> None:
        state_dict["net"] = {"pretrained": self.pretrained, "config": self.net.config(),
                             "weights": {k: v.detach().clone() for k, v in self.net.state_dict().items()}}
        # The global RNN's state travels in the first parameter group, where
        # torch.distributed.checkpoint's get_/set_optimizer_state_dict (which keep only "state" and
        # "param_groups") carry it too. (Earlier checkpoints hold it at the top level.)
        state_dict["param_groups"][0]["global_state"] = self.global_state.detach().clone()

    def _load_extra(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        name = "HierarchicalOptimizer.load_state_dict"
        net_sd = state_dict.pop("net", None)
        glob = state_dict.pop("global_state", None)  # where state dicts before 0.3 kept it
        groups = [dict(g) for g in state_dict.get("param_groups", [])]
        for g in groups:  # where it is now (torch.distributed.checkpoint keeps state and param_groups only)
            if "global_state" in g:
                glob = g.pop("global_state")
        state_dict["param_groups"] = groups
        net = None
        if net_sd is not None:
            config = net_sd.get("config") if isinstance(net_sd, dict) else None
            if not isinstance(config, dict) or "weights" not in net_sd:
                raise ValueError(f"{name}: the 'net' entry must hold 'config' and 'weights', got "
                                 f"{sorted(net_sd) if isinstance(net_sd, dict) else type(net_sd).__name__}")
            try:
                net = self._loaded_net(net_sd, config, lambda c: HierarchicalNet(**c))
            except TypeError as e:
                raise ValueError(f"{name}: the 'net' entry's config {config} is not a HierarchicalNet's: {e}") from None
            if net.attention:
                raise ValueError(f"{name}: the checkpoint's network has attention=True, which the optimizer does "
                                 "not support (expected attention=False)")
            if self.fused and not net.fusable:
                raise ValueError(f"{name}: fused=True needs a network with hidden=10 and scales=4, the checkpoint's "
                                 f"is {net.config()}")
        check_net = net if net is not None else self.net
        if glob is not None:
            want = [check_net.global_hidden]
            if not isinstance(glob, Tensor) or not glob.is_floating_point() or list(glob.shape) != want:
                got = (f"a {glob.dtype} tensor of shape {list(glob.shape)}" if isinstance(glob, Tensor)
                       else type(glob).__name__)
                raise ValueError(f"{name}: key 'global_state': expected a floating-point tensor of shape {want}, "
                                 f"got {got}")
        return {"net": check_net, "loaded_net": net, "pretrained": (net_sd or {}).get("pretrained"), "global": glob}

    def _state_shapes(self, p: Tensor, net: HierarchicalNet) -> dict[str, tuple[int, ...]]:
        return {"coord": _sharding.state_shape(p, rows=net.rows.count), "tensor": (net.tensor_hidden,),
                "log_lr_sum": ()}

    def _apply_extra(self, pending: dict[str, Any]) -> None:
        self._install_net(pending["loaded_net"], pending["pretrained"])
        self.global_state = self._initial_global_state()
        if pending["global"] is not None:
            self.global_state.copy_(pending["global"])
