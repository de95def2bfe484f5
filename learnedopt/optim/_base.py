"""What the learned optimizers share as ``torch.optim`` optimizers (:class:`_LearnedOptimizer`) and
their argument checks."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import pretrained as _pretrained

__all__ = ["_LearnedOptimizer", "check_gradients", "check_nonnegative", "resolve_net", "state_dtype_of"]


def check_nonnegative(owner: str, name: str, value) -> None:
    """A hyper-parameter that must be a finite number >= 0 (``lr``, ``weight_decay``)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {value!r}")


def resolve_net(owner: str, net, pretrained: str | None, default: str, net_type: type):
    """The network an optimizer runs and the name of its shipped weights: ``net`` as given, or else
    the shipped weights ``pretrained`` (``default`` when None). Returns ``(net, pretrained)``."""
    if net is not None and pretrained is not None:
        raise ValueError(f"{owner}: pass net or pretrained, not both")
    if net is None:
        pretrained = pretrained or default
        net = _pretrained.load_net(pretrained)
    if not isinstance(net, net_type):
        raise TypeError(f"{owner}: net must be a {net_type.__module__}.{net_type.__qualname__}, got "
                        f"{type(net).__name__}")
    return net, pretrained


def check_gradients(name: str, params: list[Tensor]) -> None:
    """The gradients a learned optimizer cannot take, refused before anything changes."""
    for p in params:
        if p.grad.is_sparse:
            raise RuntimeError(f"{name} does not support sparse gradients")
        if p.is_complex() or p.grad.is_complex():
            raise RuntimeError(f"{name} does not support complex parameters or gradients")
        if p.device.type == "meta":
            raise RuntimeError(f"{name}.step: a parameter is on the meta device (it has no values yet); "
                               "materialise the model first, e.g. with module.to_empty(device=...)")


def state_dtype_of(p: Tensor) -> torch.dtype:
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
