"""Pure-PyTorch reference of every op: the tests' oracle and a readable statement of the maths.

Everything here is plain autograd over standard PyTorch operators, computed in the dtype of the
inputs (callers upcast 16-bit inputs to float32 to compare with the kernels, which compute in
float32).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def coord_lstm(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """One LSTM cell applied to each of the N rows (coordinates) with shared weights.

    x [N, I], h [N, H], c [N, H], w_ih [4H, I], w_hh [4H, H], b [4H]. Gate order (i, f, g, o) as
    torch.nn.LSTMCell, with a single bias b (nn.LSTMCell's b_ih + b_hh). Returns (h', c').
    """
    gates = x @ w_ih.t() + h @ w_hh.t() + b
    zi, zf, zg, zo = gates.chunk(4, dim=1)
    i, f, g, o = torch.sigmoid(zi), torch.sigmoid(zf), torch.tanh(zg), torch.sigmoid(zo)
    c_new = f * c + i * g
    h_new = o * torch.tanh(c_new)
    return h_new, c_new


def coord_lstm_stack(
    x: Tensor,
    h: Sequence[Tensor],
    c: Sequence[Tensor],
    w_ih: Sequence[Tensor],
    w_hh: Sequence[Tensor],
    b: Sequence[Tensor],
    w_out: Tensor,
    b_out: Tensor,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """A stack of coordinatewise LSTM cells and a linear read-out.

    Layer l > 0 takes the new h of layer l-1 as its input. y = h_new[-1] w_out^T + b_out, [N, O].
    Returns (y, [h_new per layer], [c_new per layer]).
    """
    z = x
    h_new, c_new = [], []
    for l in range(len(h)):
        hn, cn = coord_lstm(z, h[l], c[l], w_ih[l], w_hh[l], b[l])
        h_new.append(hn)
        c_new.append(cn)
        z = hn
    y = z @ w_out.t() + b_out
    return y, h_new, c_new


def log_sign_preprocess(g: Tensor, p: float = 10.0) -> Tensor:
    """Gradient preprocessing of Andrychowicz et al. 2016, Appendix A: each coordinate g becomes

        (log|g| / p, sign g)   if |g| >= e^-p
        (-1,         e^p g)    otherwise,

    written branch-free as (max(log|g| / p, -1), clamp(e^p g, -1, 1)) (the two agree exactly; the
    official code's LogAndSign). Returns [..., 2] in g's dtype; NaN stays NaN, g = 0 gives (-1, 0).
    """
    if p <= 0:
        raise ValueError(f"log_sign_preprocess: p must be > 0, got {p}")
    log_part = torch.clamp_min(torch.log(g.abs()) / p, -1.0)
    sign_part = torch.clamp(g * math.exp(p), -1.0, 1.0)
    return torch.stack([log_part, sign_part], dim=-1)


def split_state(state: Tensor, hidden: Sequence[int]) -> tuple[list[Tensor], list[Tensor]]:
    """Column views (h per layer, c per layer) of an L2L optimizer state [numel, 2 * sum(hidden)]
    (per coordinate h_0, c_0, h_1, c_1, ...)."""
    h, c, off = [], [], 0
    for H in hidden:
        h.append(state[:, off:off + H])
        c.append(state[:, off + H:off + 2 * H])
        off += 2 * H
    return h, c


@torch.no_grad()
def l2l_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[Tensor],
    w_ih: Sequence[Tensor],
    w_hh: Sequence[Tensor],
    b: Sequence[Tensor],
    w_out: Tensor,
    b_out: Tensor,
    lr: float,
    weight_decay: float,
    update_scale: float,
    p: float,
    log_sign: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    stack=coord_lstm_stack,
) -> None:
    """Pure-PyTorch L2L optimizer step, in place (the semantics of ``learnedopt::l2l_step_``).

    For each parameter p with gradient g and state s ([numel, 2 * sum(H)], float32, or float64
    for float64 parameters):

        g' = g / grad_scale + weight_decay * p
        x  = log_sign_preprocess(g', p) if log_sign else g'
        y, h', c' = stack(x, h, c, w_ih, w_hh, b, w_out, b_out)     (no layers: y = x w_out^T + b_out)
        p += lr * update_scale * y;   s <- (h', c')

    A parameter whose g' is not all finite keeps its value and its state; a nonzero ``found_inf``
    skips everything. Skips are applied with ``torch.where`` (no host synchronisation), so the
    function is also the CUDA implementation of the op (with ``stack`` the fused op).
    """
    hidden = [w.shape[1] for w in w_hh]
    for param, g, s in zip(params, grads, states):
        if param.numel() == 0:
            continue
        acc = torch.float64 if param.dtype == torch.float64 else torch.float32
        pv = param.detach().reshape(-1).to(acc)
        gv = g.reshape(-1).to(acc)
        if grad_scale is not None:
            gv = gv / grad_scale.to(acc)
        gv = gv + weight_decay * pv
        x = log_sign_preprocess(gv, p) if log_sign else gv.unsqueeze(1)
        wo, bo = w_out.to(acc), b_out.to(acc)
        if hidden:
            h, c = split_state(s, hidden)
            y, h_new, c_new = stack(x, h, c, [t.to(acc) for t in w_ih], [t.to(acc) for t in w_hh],
                                    [t.to(acc) for t in b], wo, bo)
        else:
            y, h_new, c_new = x @ wo.t() + bo, [], []
        ok = torch.isfinite(gv).all()
        if found_inf is not None:
            ok = ok & (found_inf == 0)
        new_p = pv + (lr * update_scale) * y[:, 0]
        param.copy_(torch.where(ok, new_p, pv).reshape(param.shape))
        if hidden:
            new_s = torch.cat([t for pair in zip(h_new, c_new) for t in pair], dim=1)
            s.copy_(torch.where(ok, new_s, s))
