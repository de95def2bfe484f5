"""Learned optimizers as ``torch.optim.Optimizer`` classes."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import ops
from .nets import CoordinateLSTMNet

__all__ = ["L2LOptimizer", "HierarchicalOptimizer"]


def _check_gradients(name: str, params: list[Tensor]) -> None:
    """The gradients a learned optimizer cannot take, refused before anything changes."""
    for p in params:
        if p.grad.is_sparse:
            raise RuntimeError(f"{name} does not support sparse gradients")
        if p.is_complex() or p.grad.is_complex():
            raise RuntimeError(f"{name} does not support complex parameters or gradients")
        if p.device.type == "meta":
            raise RuntimeError(f"{name}.step: a parameter is on the meta device (it has no values yet); "
                               "materialise the model first, e.g. with module.to_empty(device=...)")


def _state_dtype(p: Tensor) -> torch.dtype:
    """LSTM state and compute dtype of a parameter: float64 for float64, float32 otherwise."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


class _Keep:
    """A tensor hidden from torch.optim's dtype casting in load_state_dict."""

    __slots__ = ("value",)

    def __init__(self, value: Tensor):
        self.value = value


class _LearnedOptimizer(Optimizer):
    """What the learned optimizers share as ``torch.optim`` optimizers: their network (``self.net``)
    travels in the state dict and in copies, the network's weights are prepared once per device and
    version, and loaded per-parameter state takes the optimizer's own dtype policy
    (:meth:`_state_dtypes`) instead of torch.optim's cast to the parameter's dtype.

    Subclasses implement ``_state_dtypes``, ``_save_extra`` (entries added to the state dict) and
    ``_load_extra`` (takes them back out of a state dict being loaded), and list the attributes a
    copy must carry in ``_COPIED`` and their per-object caches in ``_CACHES``."""

    _step_supports_amp_scaling = True
    # attributes a copy carries (and their values for objects pickled before they existed)
    _COPIED: dict[str, Any] = {"net": None, "pretrained": None}
    # per-object caches (dicts), empty in a copy
    _CACHES: tuple[str, ...] = ("_weights_cache",)

    def _state_dtypes(self, p: Tensor) -> dict[str, torch.dtype]:
        raise NotImplementedError

    def _save_extra(self, state_dict: dict[str, Any]) -> None:
        raise NotImplementedError

    def _load_extra(self, state_dict: dict[str, Any]) -> None:
        raise NotImplementedError

    def _after_load(self) -> None:
        """Runs once the per-parameter state is restored (before user post-hooks)."""

    # -- the network's weights, prepared per device -----------------------------------------------
    def _net_cached(self, device: torch.device, build):
        """build(device), cached until the network's weights change (version or storage)."""
        if torch.compiler.is_compiling():  # the cache key (data pointers) cannot be traced
            return build(device)
        params = list(self.net.parameters())
        key = (device, tuple(t._version for t in params), tuple(t.data_ptr() for t in params))
        cached = self._weights_cache.get(device)
        if cached is not None and cached[0] == key:
            return cached[1]
        value = build(device)
        self._weights_cache[device] = (key, value)
        return value

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict plus the network (its configuration, weights and pretrained
        name) and whatever else the optimizer keeps; added before any user post-hook runs."""
        handle = self.register_state_dict_post_hook(_LearnedOptimizer._add_extra, prepend=True)
        try:
            return super().state_dict()
        finally:
            handle.remove()

    @staticmethod
    def _add_extra(self: "_LearnedOptimizer", state_dict: dict[str, Any]) -> dict[str, Any]:
        self._save_extra(state_dict)
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the per-parameter states, the groups and the network. User pre-hooks see the whole
        state dict (and what they return is loaded); post-hooks see the optimizer fully loaded."""
        pre = self.register_load_state_dict_pre_hook(_LearnedOptimizer._take_extra)  # runs last
        post = self.register_load_state_dict_post_hook(_LearnedOptimizer._restore_state, prepend=True)  # first
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()

    @staticmethod
    def _take_extra(self: "_LearnedOptimizer", state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict = dict(state_dict)  # the caller's dict is not modified
        self._load_extra(state_dict)
        self._weights_cache.clear()
        # torch.optim casts floating state to the parameter's dtype; wrapped in a _Keep, a state
        # tensor passes through that cast untouched and _restore_state applies the optimizer's policy.
        state_dict["state"] = {
            k: ({kk: (_Keep(vv) if isinstance(vv, Tensor) else vv) for kk, vv in v.items()} if isinstance(v, dict) else v)
            for k, v in state_dict["state"].items()
        }
        return state_dict

    @staticmethod
    def _restore_state(self: "_LearnedOptimizer") -> None:
        for p, st in self.state.items():
            if not (isinstance(p, Tensor) and isinstance(st, dict)):
                continue
            dts = self._state_dtypes(p)
            for k, v in list(st.items()):
                if isinstance(v, _Keep):
                    dt = dts.get(k, v.value.dtype) if v.value.is_floating_point() else v.value.dtype
                    st[k] = v.value.to(device=p.device, dtype=dt, copy=True)
        self._after_load()

    # -- copies ------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for k in self._COPIED:
            state[k] = getattr(self, k)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for k in self._CACHES:
            self.__dict__.setdefault(k, {})
        for k, v in self._COPIED.items():
            self.__dict__.setdefault(k, v)


class L2LOptimizer(_LearnedOptimizer):
    r"""The learned optimizer of Andrychowicz et al. 2016 ("Learning to learn by gradient descent by
    gradient descent"): a coordinatewise LSTM network reads each gradient coordinate (and its own
    per-coordinate hidden state) and proposes that coordinate's update.

    For every parameter :math:`\theta` with gradient :math:`g`:

    .. math::
        g' = g + \lambda\,\theta, \qquad (u, s') = m(g', s; \phi), \qquad
        \theta \leftarrow \theta + \text{lr}\cdot u

    where :math:`m` is ``net`` (a :class:`~learnedopt.nets.CoordinateLSTMNet`; :math:`u` includes its
    ``output_scale``), :math:`s` the LSTM state of each coordinate and :math:`\lambda` the weight decay.
    Each ``step()`` runs one fused in-place op per parameter group and device
    (``torch.ops.learnedopt.l2l_step_``): preprocessing, the LSTM layers, the read-out and the update,
    with the state kept in ``optimizer.state[p]["lstm"]`` (``[numel, 2 * sum(hidden)]``, float32 —
    float64 for float64 parameters — whatever the parameter's dtype).

    Args:
        params: parameters or parameter groups, as any ``torch.optim`` optimizer.
        net: the update rule; its parameters are the meta-parameters (not changed by ``step``).
            Default: ``CoordinateLSTMNet()`` freshly initialised — an *untrained* rule, which is only
            useful for testing; pass a meta-trained net or ``pretrained``.
        pretrained: the name of weights shipped in the package (``learnedopt.pretrained.available()``,
            e.g. ``"l2l-mnist"``) instead of ``net``.
        lr: multiplies the update (``lr = 0`` leaves parameters unchanged). May differ per group and
            follows ``torch.optim.lr_scheduler``.
        weight_decay: L2 penalty added to the gradient before the network reads it.

    Gradients: parameters without ``.grad`` are skipped; sparse or complex gradients raise. A
    parameter whose gradient holds a NaN or an inf is **skipped for that step**: neither it nor its
    LSTM state changes. With ``torch.amp.GradScaler`` the gradients are unscaled inside the op and a
    step with inf/NaN found is skipped entirely (``_step_supports_amp_scaling``). No host
    synchronisation.

    ``state_dict()`` holds the LSTM states and the network (its configuration and weights), so
    ``load_state_dict`` restores the same optimizer; it loads with ``torch.load(weights_only=True)``.
    """

    def __init__(self, params, net: CoordinateLSTMNet | None = None, lr: float = 1.0, weight_decay: float = 0.0,
                 pretrained: str | None = None):
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"L2LOptimizer: lr must be a finite number >= 0, got {lr!r}")
        if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"L2LOptimizer: weight_decay must be a finite number >= 0, got {weight_decay!r}")
        if pretrained is not None:
            if net is not None:
                raise ValueError("L2LOptimizer: pass net or pretrained, not both")
            from . import pretrained as _pretrained

            net = _pretrained.load_net(pretrained)
        if net is None:
            net = CoordinateLSTMNet()
        if not isinstance(net, CoordinateLSTMNet):
            raise TypeError(f"L2LOptimizer: net must be a learnedopt.nets.CoordinateLSTMNet, got {type(net).__name__}")
        self.net = net
        self.pretrained = pretrained
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self._weights_cache: dict[Any, tuple] = {}

    # -- the network's weights on each device, detached ------------------------------------------
    def _weights(self, device: torch.device):
        return self._net_cached(device, self._detached_weights)

    def _detached_weights(self, device: torch.device):
        net = self.net
        L = len(net.layers)
        w = [net.layer_weights(l) for l in range(L)]
        weights = (
            [t[0].detach().to(device) for t in w],
            [t[1].detach().to(device) for t in w],
            [t[2].detach().to(device) for t in w],
            net.w_out.detach().to(device),
            net.b_out.detach().to(device),
        )
        return weights

    def _init_state(self, p: Tensor) -> Tensor:
        width = 2 * sum(self.net.layers)
        return torch.zeros(p.numel(), width, dtype=self._state_dtypes(p)["lstm"], device=p.device)

    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step; ``closure`` (re-evaluating the loss) is optional."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # Every parameter is checked before any state is created: a refused step leaves the
        # optimizer as it was (no state on a device it cannot step on).
        stepped = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        _check_gradients("L2LOptimizer", stepped)
        for p in stepped:
            ops._require(p.device, "L2LOptimizer.step")
        for group in self.param_groups:
            by_device: dict[torch.device, tuple[list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "lstm" not in state:
                    state["lstm"] = self._init_state(p)
                params, grads, states = by_device.setdefault(p.device, ([], [], []))
                params.append(p)
                grads.append(p.grad)
                states.append(state["lstm"])
            for device, (params, grads, states) in by_device.items():
                w_ih, w_hh, b, w_out, b_out = self._weights(device)
                torch.ops.learnedopt.l2l_step_(
                    params, grads, states, w_ih, w_hh, b, w_out, b_out,
                    float(group["lr"]), float(group["weight_decay"]), self.net.output_scale, self.net.p,
                    self.net.preprocess == "log_sign",
                    None if grad_scale is None else grad_scale.to(device),
                    None if found_inf is None else found_inf.to(device),
                )
        return loss

    # -- checkpoints (see _LearnedOptimizer) ----------------------------------------------------
    def _state_dtypes(self, p: Tensor) -> dict[str, torch.dtype]:
        return {"lstm": _state_dtype(p)}

    def _save_extra(self, state_dict: dict[str, Any]) -> None:
        net = self.net
        state_dict["net"] = {
            "pretrained": self.pretrained,
            "layers": list(net.layers),
            "preprocess": net.preprocess,
            "p": net.p,
            "output_scale": net.output_scale,
            "weights": {k: v.detach().clone() for k, v in net.state_dict().items()},
        }

    def _load_extra(self, state_dict: dict[str, Any]) -> None:
        net_sd = state_dict.pop("net", None)
        if net_sd is not None:
            cfg = (tuple(net_sd["layers"]), net_sd["preprocess"], float(net_sd["p"]), float(net_sd["output_scale"]))
            if cfg != (self.net.layers, self.net.preprocess, self.net.p, self.net.output_scale):
                self.net = CoordinateLSTMNet(*cfg).to(next(self.net.parameters()).device)
            self.net.load_state_dict(net_sd["weights"])
            self.pretrained = net_sd.get("pretrained")


DEFAULT_HIERARCHICAL = "hierarchical-ensemble"


class HierarchicalOptimizer(_LearnedOptimizer):
    r"""The hierarchical learned optimizer of Wichrowska et al. 2017 ("Learned Optimizers that Scale and
    Generalize"): a per-coordinate LSTM, a per-tensor GRU and a global GRU (see
    :mod:`learnedopt.hierarchical` for the maths). Per coordinate it keeps momenta at 4 timescales
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
        net: a :class:`~learnedopt.hierarchical.HierarchicalNet`; default: the shipped pretrained
            weights ``pretrained``.
        pretrained: the name of shipped weights (``learnedopt.pretrained.available()``); default
            ``"hierarchical-ensemble"`` unless ``net`` is given.
        state_dtype: ``torch.float32`` (default) or ``torch.bfloat16`` (half the state's bytes; compute
            stays float32). Float64 parameters always keep float64 state. ``load_state_dict`` casts a
            checkpoint's per-coordinate state to this dtype (a bfloat16 run resumes in float32 exactly).
        fused: ``None`` (default: the fused op when it can run this network), ``True`` (require it) or
            ``False`` (the pure-PyTorch reference, :func:`learnedopt.hierarchical.step_reference`).

    State: ``optimizer.state[p]["coord"]`` (``[32, numel]``: the rows of
    :class:`learnedopt.hierarchical.Rows`), ``["tensor"]`` (the tensor GRU's state) and
    ``["log_lr_sum"]``; the global GRU's state is ``optimizer.global_state`` (saved in the state dict).
    The problem the network sees is all parameters that have a gradient in a step: its global RNN
    reads their mean tensor state, and the relative log learning rate is against their mean.

    Gradients: parameters without ``.grad`` are skipped; sparse or complex gradients raise. A
    parameter whose gradient holds a NaN or an inf is **skipped for that step** (neither it nor any of
    its state changes, and the global RNN does not see it). With ``torch.amp.GradScaler`` the gradients
    are unscaled inside the op and a step with inf/NaN found is skipped entirely.
    """

    _COPIED = {"net": None, "pretrained": None, "state_dtype": torch.float32, "fused": None, "global_state": None}
    _CACHES = ("_weights_cache", "_numels_cache")

    def __init__(self, params, lr: float = 1e-4, net=None, pretrained: str | None = None,
                 state_dtype: torch.dtype = torch.float32, fused: bool | None = None):
        from .hierarchical import HierarchicalNet

        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"HierarchicalOptimizer: lr must be a finite number >= 0, got {lr!r}")
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"HierarchicalOptimizer: state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
        if fused not in (None, True, False):
            raise ValueError(f"HierarchicalOptimizer: fused must be None, True or False, got {fused!r}")
        if net is not None and pretrained is not None:
            raise ValueError("HierarchicalOptimizer: pass net or pretrained, not both")
        if net is None:
            from . import pretrained as _pretrained

            pretrained = pretrained or DEFAULT_HIERARCHICAL
            net = _pretrained.load_net(pretrained)
        if not isinstance(net, HierarchicalNet):
            raise TypeError(f"HierarchicalOptimizer: net must be a learnedopt.hierarchical.HierarchicalNet, got "
                            f"{type(net).__name__}")
        if net.attention:
            raise ValueError("HierarchicalOptimizer: attention=True (the look-ahead point) is supported by the "
                             "meta-training rule (learnedopt.hierarchical.step_reference) only, not by the optimizer")
        if fused and not net.fusable:
            raise ValueError("HierarchicalOptimizer: fused=True needs a network with hidden=10 and scales=4 (the "
                             f"fused kernels' sizes), got {net.config()}")
        self.net = net
        self.pretrained = pretrained
        self.state_dtype = state_dtype
        self.fused = fused
        super().__init__(params, dict(lr=lr))
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
        from .hierarchical import device_values

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
        state["coord"] = self.net.initial_coord_state(p.numel(), 0.0, dtype=dts["coord"], device=p.device)
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
        _check_gradients("HierarchicalOptimizer", params)
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
        grads, states, lrs = [], [], []
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
        cdt = torch.float64 if all(p.dtype == torch.float64 for p in params) else torch.float32
        glob = self.global_state.to(cdt)
        tensor_prev = torch.stack([s["tensor"].to(cdt) for s in states])
        numels = self._numels(params, cdt, device)
        log_lr_sums = torch.stack([s["log_lr_sum"].to(cdt) for s in states])
        mean_log_lr = log_lr_sums.sum() / numels.sum().clamp_min(1)
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        net = self.net
        if self._use_fused(device):
            coord_bias = net.coord_bias(tensor_prev.float(), glob.float()).detach()
            sums = torch.ops.learnedopt.hier_step_(
                params, grads, [s["coord"] for s in states], coord_bias.contiguous(), mean_log_lr.float(),
                self._packed(device), lrs,
                None if grad_scale is None else grad_scale.to(device),
                None if found_inf is None else found_inf.to(device))
            from .hierarchical import K_D2, K_LOG_LR, K_STEPPED

            sums = sums.to(cdt)
            stepped = sums[:, K_STEPPED] > 0
            tin = sums[:, :K_D2] / numels.clamp_min(1)[:, None]
            new_log_lr_sums = sums[:, K_LOG_LR]
            new_t, new_g = net.advance_rnns(tin, tensor_prev, glob, stepped)
        else:
            stepped, new_t, new_g, new_log_lr_sums = self._reference_step(params, grads, states, lrs, tensor_prev,
                                                                          glob, grad_scale, found_inf)
        new_t = new_t.detach()
        torch._foreach_copy_([s["tensor"] for s in states], list(new_t.to(states[0]["tensor"].dtype).unbind(0)))
        new_sums = torch.where(stepped, new_log_lr_sums, log_lr_sums)
        torch._foreach_copy_([s["log_lr_sum"] for s in states], list(new_sums.unbind(0)))
        self.global_state.copy_(new_g.detach())
        return loss

    def _reference_step(self, params, grads, states, lrs, tensor_prev, glob, grad_scale, found_inf):
        """The whole step through learnedopt.hierarchical.step_reference (the meta-training rule's step)
        on the nonempty parameters, written back in place. Returns (stepped [T], new tensor states
        [T, G], new global state, new per-tensor log-lr sums [T])."""
        from .hierarchical import HierState, device_values, step_reference

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
        new_params, new = step_reference(self.net, [params[i] for i in idx], grads, state, lr, stepped=ok)
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
        state_dict["global_state"] = self.global_state.detach().clone()

    def _load_extra(self, state_dict: dict[str, Any]) -> None:
        from .hierarchical import HierarchicalNet

        net_sd = state_dict.pop("net", None)
        glob = state_dict.pop("global_state", None)
        if net_sd is not None:
            if net_sd["config"] != self.net.config():
                self.net = HierarchicalNet(**net_sd["config"]).to(next(self.net.parameters()).device)
            self.net.load_state_dict(net_sd["weights"])
            self.pretrained = net_sd.get("pretrained")
        self._loaded_global = glob

    def _after_load(self) -> None:
        glob = self.__dict__.pop("_loaded_global", None)
        self.global_state = self._initial_global_state()
        if glob is not None:
            self.global_state.copy_(glob)
