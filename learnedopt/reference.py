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
