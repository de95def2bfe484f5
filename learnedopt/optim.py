"""Learned optimizers as ``torch.optim.Optimizer`` classes."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import ops
from .nets import CoordinateLSTMNet

__all__ = ["L2LOptimizer"]


def _state_dtype(p: Tensor) -> torch.dtype:
    """LSTM state and compute dtype of a parameter: float64 for float64, float32 otherwise."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


class L2LOptimizer(Optimizer):
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

    _step_supports_amp_scaling = True

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
        net = self.net
        if torch.compiler.is_compiling():  # the cache key (data pointers) cannot be traced
            return self._detached_weights(device)
        key = (device, tuple(t._version for t in net.parameters()), tuple(t.data_ptr() for t in net.parameters()))
        cached = self._weights_cache.get(device)
        if cached is not None and cached[0] == key:
            return cached[1]
        weights = self._detached_weights(device)
        self._weights_cache[device] = (key, weights)
        return weights

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
        return torch.zeros(p.numel(), width, dtype=_state_dtype(p), device=p.device)

    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step; ``closure`` (re-evaluating the loss) is optional."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            by_device: dict[torch.device, tuple[list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("L2LOptimizer does not support sparse gradients")
                if p.is_complex() or p.grad.is_complex():
                    raise RuntimeError("L2LOptimizer does not support complex parameters or gradients")
                state = self.state[p]
                if "lstm" not in state:
                    state["lstm"] = self._init_state(p)
                params, grads, states = by_device.setdefault(p.device, ([], [], []))
                params.append(p)
                grads.append(p.grad)
                states.append(state["lstm"])
            for device, (params, grads, states) in by_device.items():
                ops._require(device, "L2LOptimizer.step")
                w_ih, w_hh, b, w_out, b_out = self._weights(device)
                torch.ops.learnedopt.l2l_step_(
                    params, grads, states, w_ih, w_hh, b, w_out, b_out,
                    float(group["lr"]), float(group["weight_decay"]), self.net.output_scale, self.net.p,
                    self.net.preprocess == "log_sign",
                    None if grad_scale is None else grad_scale.to(device),
                    None if found_inf is None else found_inf.to(device),
                )
        return loss

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict plus ``"net"``: the network's configuration and weights. The
        entry is added before any user ``state_dict`` post-hook runs."""
        handle = self.register_state_dict_post_hook(L2LOptimizer._add_net, prepend=True)
        try:
            return super().state_dict()
        finally:
            handle.remove()

    @staticmethod
    def _add_net(self: "L2LOptimizer", state_dict: dict[str, Any]) -> dict[str, Any]:
        net = self.net
        state_dict["net"] = {
            "pretrained": self.pretrained,
            "layers": list(net.layers),
            "preprocess": net.preprocess,
            "p": net.p,
            "output_scale": net.output_scale,
            "weights": {k: v.detach().clone() for k, v in net.state_dict().items()},
        }
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the LSTM states, the groups and (from ``"net"``) the network. User pre-hooks
        see the whole state dict; post-hooks see the optimizer fully loaded."""
        pre = self.register_load_state_dict_pre_hook(L2LOptimizer._take_net_and_keep_lstm_dtype)  # runs last
        post = self.register_load_state_dict_post_hook(L2LOptimizer._restore_lstm, prepend=True)  # runs first
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()

    @staticmethod
    def _take_net_and_keep_lstm_dtype(self: "L2LOptimizer", state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict = dict(state_dict)
        net_sd = state_dict.pop("net", None)
        if net_sd is not None:
            cfg = (tuple(net_sd["layers"]), net_sd["preprocess"], float(net_sd["p"]), float(net_sd["output_scale"]))
            if cfg != (self.net.layers, self.net.preprocess, self.net.p, self.net.output_scale):
                self.net = CoordinateLSTMNet(*cfg).to(next(self.net.parameters()).device)
            self.net.load_state_dict(net_sd["weights"])
            self.pretrained = net_sd.get("pretrained")
            self._weights_cache.clear()
        # torch.optim casts floating state to the parameter's dtype; the LSTM state keeps its own
        # (float32, or float64). Wrapped in a _Keep, it passes through that cast untouched.
        state_dict["state"] = {
            k: ({**v, "lstm": _Keep(v["lstm"])} if isinstance(v, dict) and isinstance(v.get("lstm"), Tensor) else v)
            for k, v in state_dict["state"].items()
        }
        return state_dict

    @staticmethod
    def _restore_lstm(self: "L2LOptimizer") -> None:
        for p, st in self.state.items():
            if isinstance(p, Tensor) and isinstance(st, dict) and isinstance(st.get("lstm"), _Keep):
                st["lstm"] = st["lstm"].value.to(device=p.device, dtype=_state_dtype(p), copy=True)

    # -- copies ------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["net"] = self.net
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_weights_cache", {})
        self.__dict__.setdefault("pretrained", None)


class _Keep:
    """A tensor hidden from torch.optim's dtype casting in load_state_dict."""

    __slots__ = ("value",)

    def __init__(self, value: Tensor):
        self.value = value
