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


def _net_config(net) -> dict[str, Any]:
    cfg = getattr(net, "config", None)
    return cfg() if callable(cfg) else {"layers": list(net.layers), "preprocess": net.preprocess, "p": net.p,
                                        "output_scale": net.output_scale}


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

    Subclasses implement ``_state_dtypes``, ``_save_extra`` (entries added to the state dict),
    ``_load_extra`` (takes them back out of a state dict being loaded, checks them and returns what
    ``_apply_extra`` installs once the load has succeeded), ``_state_shapes`` (the per-parameter
    entries a loaded state must have, for a given network) and list the attributes a copy must carry
    in ``_COPIED`` and their per-object caches in ``_CACHES``.

    ``load_state_dict`` checks the whole state dict before it changes anything (see
    :meth:`load_state_dict`): a refused checkpoint leaves the optimizer exactly as it was."""

    _step_supports_amp_scaling = True
    # attributes a copy carries (and their values for objects pickled before they existed)
    _COPIED: dict[str, Any] = {"net": None, "pretrained": None}
    # per-object caches (dicts), empty in a copy
    _CACHES: tuple[str, ...] = ("_weights_cache",)

    def _state_dtypes(self, p: Tensor) -> dict[str, torch.dtype]:
        raise NotImplementedError

    def _save_extra(self, state_dict: dict[str, Any]) -> None:
        raise NotImplementedError

    def _load_extra(self, state_dict: dict[str, Any]) -> Any:
        """Pops the optimizer's own entries out of ``state_dict`` (a copy), checks them and returns
        what :meth:`_apply_extra` installs after a successful load (``pending["net"]``: the network
        the per-parameter state is checked against). Changes nothing in the optimizer."""
        raise NotImplementedError

    def _state_shapes(self, p: Tensor, net) -> dict[str, tuple[int, ...]]:
        """The entries of a parameter's state (key -> shape) under network ``net``."""
        raise NotImplementedError

    def _apply_extra(self, pending: dict[str, Any]) -> None:
        """Installs what :meth:`_load_extra` returned; runs once the per-parameter state is restored
        (before user post-hooks)."""

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
        state dict (and what they return is loaded); post-hooks see the optimizer fully loaded.

        What is loaded is checked first, and nothing changes unless all of it passes: the groups
        (their number and sizes), the network (its configuration must be one this optimizer runs;
        the checkpoint's network replaces the optimizer's), and each parameter's entry against that
        network: exactly the optimizer's keys (an empty entry is a parameter not stepped yet),
        tensors of the right shape, of a floating dtype (cast to the optimizer's state dtype). A
        mismatch raises ``ValueError`` naming the parameter's index, the key, what was expected and
        what came: a wrong checkpoint is never silently replaced by a fresh state on the next step."""
        pre = self.register_load_state_dict_pre_hook(_LearnedOptimizer._take_extra)  # runs last
        post = self.register_load_state_dict_post_hook(_LearnedOptimizer._restore_state, prepend=True)  # first
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()
            self.__dict__.pop("_pending_load", None)

    def _check_groups(self, state_dict: dict[str, Any]) -> dict[Any, Tensor]:
        """torch.optim's group checks, done before anything changes; the saved index -> parameter map."""
        name = type(self).__name__
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"{name}.load_state_dict: the state dict has no {key!r} entry")
        groups, saved = self.param_groups, state_dict["param_groups"]
        if len(groups) != len(saved):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                             "optimizer's group")
        return {i: p for s, g in zip(saved, groups) for i, p in zip(s["params"], g["params"])}

    def _check_state(self, state_dict: dict[str, Any], net) -> None:
        """Each parameter's entry against :meth:`_state_shapes` under ``net``."""
        name = type(self).__name__
        id_map = self._check_groups(state_dict)
        for i, st in state_dict["state"].items():
            if i not in id_map:
                continue  # state that belongs to no parameter is copied as is (torch.optim)
            p = id_map[i]
            where = f"{name}.load_state_dict: parameter {i} (shape {list(p.shape)})"
            if not isinstance(st, dict):
                raise ValueError(f"{where}: its state must be a dict, got {type(st).__name__}")
            if not st:
                continue  # not stepped yet
            want = self._state_shapes(p, net)
            missing = sorted(set(want) - set(st), key=str)
            unknown = sorted(set(st) - set(want), key=str)
            if missing or unknown:
                raise ValueError(f"{where}: expected the keys {sorted(want)}, got {sorted(st, key=str)} "
                                 f"(missing {missing}, unknown {unknown}): a checkpoint of another optimizer?")
            for k, shape in want.items():
                v = st[k]
                if not isinstance(v, Tensor):
                    raise ValueError(f"{where}, key {k!r}: expected a tensor, got {type(v).__name__}")
                if not v.is_floating_point():
                    raise ValueError(f"{where}, key {k!r}: expected a floating-point tensor, got dtype {v.dtype}")
                if tuple(v.shape) != tuple(shape):
                    raise ValueError(f"{where}, key {k!r}: expected shape {list(shape)}, got {list(v.shape)} "
                                     f"(network {_net_config(net)})")

    @staticmethod
    def _take_extra(self: "_LearnedOptimizer", state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict = dict(state_dict)  # the caller's dict is not modified
        pending = self._load_extra(state_dict)
        self._check_state(state_dict, pending["net"])
        self._pending_load = pending
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
        self._weights_cache.clear()
        self._apply_extra(self.__dict__.pop("_pending_load"))

    def _loaded_net(self, net_sd: dict[str, Any] | None, config: dict[str, Any], build) -> Any:
        """The network a state dict carries, built and loaded apart from ``self.net`` (which does not
        change here): ``config`` its configuration, ``build(config)`` a new network of it. None: the
        state dict has no network (the optimizer's is kept)."""
        if net_sd is None:
            return None
        device = next(self.net.parameters()).device
        net = build(config).to(device)
        try:
            net.load_state_dict(net_sd["weights"])
        except (RuntimeError, KeyError) as e:
            raise ValueError(f"{type(self).__name__}.load_state_dict: the network's weights do not fit its "
                             f"configuration {config}: {e}") from None
        return net

    def _install_net(self, net, pretrained) -> None:
        """self.net takes the loaded network's weights (in place when the configuration is the same)."""
        if net is None:
            return
        if _net_config(net) == _net_config(self.net):
            with torch.no_grad():
                self.net.load_state_dict(net.state_dict())
        else:
            self.net = net
        self.pretrained = pretrained

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
