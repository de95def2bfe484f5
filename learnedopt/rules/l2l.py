"""The L2L rule of Andrychowicz et al. 2016 ("Learning to learn by gradient descent by gradient
descent"): its network and its meta-training adapter. (Its reference step is the op oracle
:func:`learnedopt.reference.l2l_step_`; its ``torch.optim`` class is
:class:`learnedopt.optim.L2LOptimizer`.)

``CoordinateLSTMNet`` is the coordinatewise deep LSTM: one
small network shared by every coordinate of the optimizee, one hidden state per coordinate. A
gradient coordinate g is preprocessed (``"log_sign"``: (log|g|/p, sign g), paper Appendix A; or
``None``: g itself), goes through a stack of LSTM cells and a linear read-out to one number, and the
update of that coordinate is ``output_scale`` times that number (the optimizer adds it to θ).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .. import ops, reference

__all__ = ["CoordinateLSTMNet", "L2LRule", "PREPROCESS"]

PREPROCESS = {"log_sign": 2, None: 1}  # preprocessing -> input size of the first layer

State = tuple[list[Tensor], list[Tensor]]  # (h per layer, c per layer), each [N, H_l]


def _trunc_normal_(t: Tensor, std: float) -> Tensor:
    # Sonnet's default: a normal truncated at two standard deviations.
    return nn.init.trunc_normal_(t, mean=0.0, std=std, a=-2 * std, b=2 * std)


class CoordinateLSTMNet(nn.Module):
    """Coordinatewise deep LSTM with shared weights and a linear read-out.

    Args:
        layers: hidden sizes of the LSTM layers, bottom to top; ``()`` means no LSTM at all (a
            linear map of the preprocessed gradient).
        preprocess: ``"log_sign"`` (paper Appendix A, with ``p``) or ``None`` (identity).
        p: the log/sign preprocessing parameter (> 0); gradients below e^-p are treated linearly.
        output_scale: multiplies the read-out (paper: 0.1).
        init: ``"default"`` — as the official code (Sonnet defaults): LSTM weights and biases from a
            normal truncated at 2 std, std = 1/sqrt(input + hidden), plus 1 on the forget-gate bias;
            read-out weights truncated normal with std = 1/sqrt(fan_in), read-out bias zero; or
            ``"zeros"`` — every meta-parameter zero (the official code's "simple" configuration).

    Parameters (meta-parameters): ``w_ih{l}`` [4H, I], ``w_hh{l}`` [4H, H], ``b{l}`` [4H] per layer
    (gate order i, f, g, o as ``torch.nn.LSTMCell``, one bias), ``w_out`` [1, H_top], ``b_out`` [1].
    """

    def __init__(
        self,
        layers: Sequence[int] = (20, 20),
        preprocess: str | None = "log_sign",
        p: float = 10.0,
        output_scale: float = 0.1,
        init: str = "default",
    ):
        super().__init__()
        layers = tuple(int(h) for h in layers)
        if any(h < 1 for h in layers):
            raise ValueError(f"CoordinateLSTMNet: layers must be positive hidden sizes, got {layers}")
        if preprocess not in PREPROCESS:
            raise ValueError(f"CoordinateLSTMNet: preprocess must be 'log_sign' or None, got {preprocess!r}")
        if not (isinstance(p, (int, float)) and p > 0 and math.isfinite(p)):
            raise ValueError(f"CoordinateLSTMNet: p must be a finite number > 0, got {p!r}")
        if not math.isfinite(output_scale):
            raise ValueError(f"CoordinateLSTMNet: output_scale must be finite, got {output_scale!r}")
        if init not in ("default", "zeros"):
            raise ValueError(f"CoordinateLSTMNet: init must be 'default' or 'zeros', got {init!r}")
        self.layers = layers
        self.preprocess = preprocess
        self.p = float(p)
        self.output_scale = float(output_scale)
        self.input_size = PREPROCESS[preprocess]
        sizes_in = (self.input_size,) + layers[:-1]
        for l, (H, I) in enumerate(zip(layers, sizes_in)):
            self.register_parameter(f"w_ih{l}", nn.Parameter(torch.empty(4 * H, I)))
            self.register_parameter(f"w_hh{l}", nn.Parameter(torch.empty(4 * H, H)))
            self.register_parameter(f"b{l}", nn.Parameter(torch.empty(4 * H)))
        top = layers[-1] if layers else self.input_size
        self.w_out = nn.Parameter(torch.empty(1, top))
        self.b_out = nn.Parameter(torch.empty(1))
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str = "default") -> None:
        if init == "zeros":
            for t in self.parameters():
                t.zero_()
            return
        for l, H in enumerate(self.layers):
            w_ih, w_hh, b = self.layer_weights(l)
            std = 1.0 / math.sqrt(w_ih.shape[1] + H)
            for t in (w_ih, w_hh, b):
                _trunc_normal_(t, std)
            b[H:2 * H] += 1.0  # forget bias
        _trunc_normal_(self.w_out, 1.0 / math.sqrt(self.w_out.shape[1]))
        self.b_out.zero_()

    def layer_weights(self, l: int) -> tuple[Tensor, Tensor, Tensor]:
        return getattr(self, f"w_ih{l}"), getattr(self, f"w_hh{l}"), getattr(self, f"b{l}")

    def initial_state(self, n: int, device=None, dtype: torch.dtype = torch.float32) -> State:
        """Zero LSTM state for n coordinates: ([h per layer], [c per layer]), each [n, H_l]."""
        h = [torch.zeros(n, H, device=device, dtype=dtype) for H in self.layers]
        c = [torch.zeros(n, H, device=device, dtype=dtype) for H in self.layers]
        return h, c

    def preprocess_input(self, grad: Tensor) -> Tensor:
        """[N] gradient coordinates -> [N, input_size] network input."""
        if self.preprocess == "log_sign":
            return reference.log_sign_preprocess(grad, self.p)
        return grad.unsqueeze(-1)

    def forward(self, grad: Tensor, state: State, fused: bool | None = None) -> tuple[Tensor, State]:
        """One step for N coordinates.

        Args:
            grad: the gradient coordinates, any shape (flattened to [N]).
            state: ([h per layer], [c per layer]) from :meth:`initial_state` or a previous call.
            fused: use the fused op ``coord_lstm_stack`` (default: when the extension can run on
                grad's device) or the pure-PyTorch reference of the same maths.

        Returns:
            ``(update, new_state)``: ``update`` has grad's shape (add it to the parameters);
            differentiable in the meta-parameters and the state.
        """
        shape = grad.shape
        x = self.preprocess_input(grad.reshape(-1)).to(self.w_out.dtype)
        h, c = state
        if len(h) != len(self.layers) or len(c) != len(self.layers):
            raise ValueError(
                f"CoordinateLSTMNet: state must hold one h and one c per layer ({len(self.layers)}), "
                f"got {len(h)} and {len(c)}"
            )
        if not self.layers:
            y = x @ self.w_out.t() + self.b_out
            return (self.output_scale * y).reshape(shape), ([], [])
        weights = [self.layer_weights(l) for l in range(len(self.layers))]
        w_ih, w_hh, b = (list(ws) for ws in zip(*weights))
        if fused is None:
            fused = ops.extension_available() and (x.device.type == "cpu" or ops.cuda_available())
        fn = ops.coord_lstm_stack if fused else reference.coord_lstm_stack
        y, h_new, c_new = fn(x, h, c, w_ih, w_hh, b, self.w_out, self.b_out)
        return (self.output_scale * y).reshape(shape), (h_new, c_new)

    def extra_repr(self) -> str:
        return (f"layers={self.layers}, preprocess={self.preprocess!r}, p={self.p}, "
                f"output_scale={self.output_scale}")


class L2LRule(nn.Module):
    """The L2L update rule θ ← θ + net(∇f) with a :class:`CoordinateLSTMNet`.

    All gradient coordinates of a step are concatenated and go through one fused op call.
    ``fused`` picks the fused op (default: whenever it can run) or the pure-PyTorch reference.
    The rule's state is the LSTM state ``([h per layer], [c per layer])``, float32 (float64 when the
    parameters are float64).
    """

    kind = "l2l"

    def __init__(self, net: CoordinateLSTMNet | None = None, fused: bool | None = None, **net_kwargs):
        super().__init__()
        if net is not None and net_kwargs:
            raise TypeError("L2LRule: pass either net or the CoordinateLSTMNet keyword arguments, not both")
        self.net = net if net is not None else CoordinateLSTMNet(**net_kwargs)
        self.fused = fused

    def config(self) -> dict[str, Any]:
        n = self.net
        return {"layers": list(n.layers), "preprocess": n.preprocess, "p": n.p, "output_scale": n.output_scale}

    def init_state(self, params: Sequence[Tensor]):
        n = sum(p.numel() for p in params)
        dtype = torch.float64 if params and params[0].dtype == torch.float64 else torch.float32
        device = params[0].device if params else None
        return self.net.initial_state(n, device=device, dtype=dtype)

    def forward(self, params: Sequence[Tensor], grads: Sequence[Tensor], state):
        flat = torch.cat([g.reshape(-1) for g in grads])
        update, state = self.net(flat, state, fused=self.fused)
        update = update.split([p.numel() for p in params])
        return [p + u.view_as(p).to(p.dtype) for p, u in zip(params, update)], state
