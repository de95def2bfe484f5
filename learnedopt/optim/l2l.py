"""The L2L learned optimizer (Andrychowicz et al. 2016) as a ``torch.optim`` optimizer; its network
and meta-training rule are in :mod:`learnedopt.rules.l2l`, its reference step is
:func:`learnedopt.reference.l2l_step_`."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from .. import ops
from ..rules.l2l import CoordinateLSTMNet
from . import _sharding
from ._base import _LearnedOptimizer, check_gradients, check_nonnegative, resolve_net, state_dtype_of

__all__ = ["L2LOptimizer", "DEFAULT_L2L"]

DEFAULT_L2L = "l2l-mnist"


class L2LOptimizer(_LearnedOptimizer):
    r"""The learned optimizer of Andrychowicz et al. 2016 ("Learning to learn by gradient descent by
    gradient descent"): a coordinatewise LSTM network reads each gradient coordinate (and its own
    per-coordinate hidden state) and proposes that coordinate's update.

    For every parameter :math:`\theta` with gradient :math:`g`:

    .. math::
        g' = g + \lambda\,\theta, \qquad (u, s') = m(g', s; \phi), \qquad
        \theta \leftarrow \theta + \text{lr}\cdot u

    where :math:`m` is ``net`` (see ``net``; :math:`u` includes its
    ``output_scale``), :math:`s` the LSTM state of each coordinate and :math:`\lambda` the weight decay.
    Each ``step()`` runs one fused in-place op per parameter group and device
    (``torch.ops.learnedopt.l2l_step_``): preprocessing, the LSTM layers, the read-out and the update,
    with the state kept in ``optimizer.state[p]["lstm"]`` (``[numel, 2 * sum(hidden)]``, float32 —
    float64 for float64 parameters — whatever the parameter's dtype).

    Args:
        params: parameters or parameter groups, as any ``torch.optim`` optimizer.
        net: the update rule, a :class:`~learnedopt.rules.l2l.CoordinateLSTMNet`; its parameters are
            the meta-parameters (not changed by ``step``). Default: the shipped weights
            ``pretrained``. ``net=CoordinateLSTMNet()`` gives a freshly initialised, *untrained* rule
            (for tests and meta-training experiments only: it makes a regression diverge).
        pretrained: the name of weights shipped in the package (``learnedopt.pretrained.available()``);
            default ``"l2l-mnist"`` (meta-trained on an MNIST MLP) unless ``net`` is given.
        lr: multiplies the update (``lr = 0`` leaves parameters unchanged). May differ per group and
            follows ``torch.optim.lr_scheduler``.
        weight_decay: L2 penalty added to the gradient before the network reads it.

    Distributed: under DDP nothing changes; FSDP2 and HSDP (``fully_shard``) parameters are stepped on
    their local shards (the step is coordinatewise), with state sharded like them, bitwise the
    unsharded result (README "Distributed"). One all-reduce per step (of one flag per sharded tensor)
    makes a NaN/inf in any shard of a gradient skip that whole tensor on every rank, as unsharded.

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
        check_nonnegative("L2LOptimizer", "lr", lr)
        check_nonnegative("L2LOptimizer", "weight_decay", weight_decay)
        net, pretrained = resolve_net("L2LOptimizer", net, pretrained, DEFAULT_L2L, CoordinateLSTMNet)
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
        """[numel, width] zeros; for a DTensor parameter a DTensor [*p.shape, width] sharded like it."""
        width = 2 * sum(self.net.layers)
        n = _sharding.local(p).numel()
        return _sharding.state_like(p, torch.zeros(n, width, dtype=self._state_dtypes(p)["lstm"], device=p.device),
                                    rows_first=False)

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
        check_gradients("L2LOptimizer", stepped)
        specs = []
        for p in stepped:
            ops._require(p.device, "L2LOptimizer.step")
            # L2L is coordinatewise: a DTensor (FSDP2) parameter is stepped on its local shard
            specs.append(_sharding.shard_spec("L2LOptimizer", _sharding.param_name(self, p), p))
        if any(s is not None and s.shard_dim is not None for s in specs):
            with self._skip_nonfinite_shards(stepped, specs, grad_scale, found_inf):
                self._step_groups(grad_scale, found_inf)
        else:  # (no context manager: a fullgraph torch.compile of step() stays one graph)
            self._step_groups(grad_scale, found_inf)
        return loss

    def _skip_nonfinite_shards(self, stepped, specs, grad_scale, found_inf):
        """Unsharded, a NaN/inf anywhere in a gradient skips that whole tensor; sharded, the same: the
        sharded tensors' per-tensor flags (:func:`learnedopt.optim._sharding.nonfinite_flags`) are agreed
        on by one all-reduce per process group of their mesh dimension (one in all for FSDP2 and HSDP) before
        the kernel, which then skips a flagged tensor on every rank. Plain and replicated parameters
        need nothing (each rank holds the whole tensor)."""
        by_group: dict = {}
        wds = {id(p): float(g["weight_decay"]) for g in self.param_groups for p in g["params"]}
        for p, spec in zip(stepped, specs):
            if spec is not None and spec.shard_dim is not None:
                by_group.setdefault((spec.mesh, spec.shard_dim), []).append(p)
        stack = contextlib.ExitStack()
        try:
            for (mesh, dim), ps in by_group.items():
                grads = [_sharding.local(p.grad) for p in ps]
                dev = grads[0].device
                flags = _sharding.nonfinite_flags(grads, None if grad_scale is None else grad_scale.to(dev),
                                                  None if found_inf is None else found_inf.to(dev),
                                                  params=[_sharding.local(p) for p in ps],
                                                  weight_decays=[wds[id(p)] for p in ps])
                stack.enter_context(_sharding.skipping(grads, _sharding.agree_nonfinite(flags, mesh.get_group(dim))))
        except BaseException:
            stack.close()  # the gradients already marked are restored
            raise
        return stack

    def _step_groups(self, grad_scale, found_inf) -> None:
        for group in self.param_groups:
            by_device: dict[torch.device, tuple[list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "lstm" not in state:
                    state["lstm"] = self._init_state(p)
                params, grads, states = by_device.setdefault(p.device, ([], [], []))
                params.append(_sharding.local(p))
                grads.append(_sharding.local(p.grad))
                states.append(_sharding.local_view(state["lstm"], rows_first=False))
            for device, (params, grads, states) in by_device.items():
                w_ih, w_hh, b, w_out, b_out = self._weights(device)
                torch.ops.learnedopt.l2l_step_(
                    params, grads, states, w_ih, w_hh, b, w_out, b_out,
                    float(group["lr"]), float(group["weight_decay"]), self.net.output_scale, self.net.p,
                    self.net.preprocess == "log_sign",
                    None if grad_scale is None else grad_scale.to(device),
                    None if found_inf is None else found_inf.to(device),
                )

    # -- checkpoints (see _LearnedOptimizer) ----------------------------------------------------
    def _state_dtypes(self, p: Tensor) -> dict[str, torch.dtype]:
        return {"lstm": state_dtype_of(p)}

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

    def _load_extra(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        name = "L2LOptimizer.load_state_dict"
        net_sd = state_dict.pop("net", None)
        net = None
        if net_sd is not None:
            keys = ("layers", "preprocess", "p", "output_scale", "weights")
            if not isinstance(net_sd, dict) or any(k not in net_sd for k in keys):
                raise ValueError(f"{name}: the 'net' entry must hold {list(keys)}, got "
                                 f"{sorted(net_sd) if isinstance(net_sd, dict) else type(net_sd).__name__}")
            try:
                cfg = (tuple(net_sd["layers"]), net_sd["preprocess"], float(net_sd["p"]), float(net_sd["output_scale"]))
                net = self._loaded_net(net_sd, cfg, lambda c: CoordinateLSTMNet(*c))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{name}: the 'net' entry's configuration is not a CoordinateLSTMNet's: {e}") from None
        return {"net": net if net is not None else self.net, "loaded_net": net,
                "pretrained": (net_sd or {}).get("pretrained")}

    def _state_shapes(self, p: Tensor, net: CoordinateLSTMNet) -> dict[str, tuple[int, ...]]:
        return {"lstm": _sharding.state_shape(p, width=2 * sum(net.layers))}

    def _apply_extra(self, pending: dict[str, Any]) -> None:
        self._install_net(pending["loaded_net"], pending["pretrained"])
