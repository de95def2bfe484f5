"""The hierarchical learned optimizer of Wichrowska et al. 2017 ("Learned Optimizers that Scale and
Generalize"): its network, and the pure-PyTorch reference of one optimizer step.

Three levels of recurrent networks (reference papers.md §2.2):

* a **per-coordinate LSTM cell** (hidden ``H`` = 10; one state per coordinate, shared weights);
* a **per-tensor GRU** (hidden 20; one state per parameter tensor) that reads the mean over the
  tensor's coordinates of (new per-coordinate hidden state, per-coordinate inputs);
* a **global GRU** (hidden 20) that reads the mean of the new tensor states — of *all* tensors (the
  original code passes only the last tensor's state, a bug not copied here).

Each level's state enters the level below as a bias (tensor and global state → the coordinate
cell's gate pre-activations; global state → the tensor GRU's). The original code uses GRU cells at
every level; this project's per-coordinate cell is an LSTM (DESIGN.md: one fused per-coordinate
LSTM step), its forget-gate bias initialised at 2.2 like the GRU's update-gate bias (both keep ≈ 90 %
of the old state).

**One step**, for a parameter tensor with gradient g (per coordinate; s = 1 … S timescales, S = 4):

0. saturation: g ← clip(g, ±1e18) (``GRAD_MAX``). Every later quantity is then finite for any finite
   gradient, in float32 and bfloat16 alike (momenta ≤ 1e18, mean squares ≤ 1e36); since the cell's
   inputs are scale-free, a gradient above 1e18 gets the inputs exact arithmetic would give it.
   **Finite gradients never make parameters or state non-finite; a non-finite gradient skips its
   tensor** (the optimizer's and the fused op's rule);
1. momentum at S timescales: β₁ = β (a learned per-coordinate decay), β_{s+1} = √β_s;
   a_s ← (1 − β_s) g + β_s a_s;
2. gradient-scale normalisation: ms_s ← (1 − γ)(a_s² + 1e-12) + γ ms_s (γ: a second learned decay);
   x_s = asinh(a_s / √(ms_s + 1e-16));
3. the cell's F = 3S inputs: x_s; the products x_s x_{s+1}; log(ms_s + 1e-16) minus its mean over s;
   log_lr minus the mean log_lr over the whole problem (all coordinates of all tensors);
4. the LSTM cell (bias: tensor and global states through linear maps) gives the new h;
5. read-outs from h: direction d = h·w_d + Σ_s w_sc,s x_s (the gradient shortcut), normalised to
   unit RMS over the tensor: d̂ = d / √(mean(d²) + 1e-16); new decays γ = σ(h·w_γ + b_γ),
   β = σ(h·w_β + b_β); step log-lr ℓ = clip(log_lr + h·w_lr + b_lr, ±33) (the clip passes gradients
   straight through); log_lr ← m log_lr + (1 − m) ℓ with m = σ(learned logit);
6. θ ← θ − lr · exp(ℓ + offset) · d̂ (``offset`` learned, −1 at init; ``lr`` a plain multiplier: the
   optimizer's ``lr``, 1 in meta-training);
   **Update-ratio safeguard** (``max_update_ratio`` = τ; off by default in the optimizer and in
   meta-training; 0.01 for BatchNorm ResNets, docs/resnet.md): when a tensor's update would exceed τ of the tensor's
   own scale, rms(Δθ) > τ · max(rms(θ), 1e-2), the tensor's log learning rates — its step's ℓ and its
   state's log_lr alike — are lowered by the same amount, log s = log(τ · max(rms(θ), 1e-2) /
   rms(Δθ)) < 0, so that the update is exactly τ of the tensor (``update_ratio_log_scale``). The
   network's proposal is then a *relative* step, whatever the tensor's fan-in and scale (VeLO
   scales steps by the parameters' RMS; LARS/LAMB by a trust ratio); and since the state keeps the
   lowered learning rate, the next steps start from what was actually taken instead of growing
   past the bound unseen. It is not free: problems that need large relative steps (small
   initialisations that must grow, ReLU nets without normalisation) train far slower under it
   (docs/resnet.md);
7. the tensor GRU and the global GRU advance (their new states bias the next step).

Attention (the Nesterov-like look-ahead of the original, ``attention=True``): the gradient is taken at
θ_att = θ − lr · exp(ℓ + offset) · d̂_att, with d̂_att a second direction read-out (initialised as a
copy of the first); the true θ is kept in the rule's state.

State per coordinate, as rows of one ``[ROWS, N]`` tensor (one column per coordinate):
``h`` (H rows), ``c`` (H), ``a`` (S), ``ms`` (S), ``beta``, ``gamma``, ``log_lr`` and ``u`` = exp(ℓ +
offset)·d (the step's unnormalised update: scratch for the fused kernels, kept so that reference and
kernels share one layout). With H = 10 and S = 4 that is 32 rows.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

__all__ = ["HierarchicalNet", "HierState", "HierarchicalRule", "Rows", "step_reference", "coord_step_reference",
           "initial_state", "fused_step_", "apply_update_", "segment_mean", "update_ratio_log_scale", "MAX_LOG_LR", "GRAD_MAX",
           "INIT_LOG_LR_RANGE", "DEFAULT_MAX_UPDATE_RATIO", "UPDATE_RMS_FLOOR"]

# Per-tensor sums returned by the fused op learnedopt::hier_step_ (csrc/hier_math.h): sum of h' (H),
# of the features (F), of d², of the new log-lr, then a "stepped" flag (for H = 10, S = 4).
K_D2, K_LOG_LR, K_STEPPED = 22, 23, 24
K = K_STEPPED + 1  # the op's columns
MAX_LOG_LR = 33.0  # log learning rates are clipped to [-33, 33]
MS_EPS = 1e-12  # added to a_s² in the mean squares
RMS_EPS = 1e-16  # inside the square roots and logs of the mean squares and of the direction's RMS
# Gradients are saturated to [-GRAD_MAX, GRAD_MAX] before the momenta (csrc/hier_math.h): momenta stay
# <= 1e18 and (mean) squares <= 1e36, finite in float32 and bfloat16 for any finite gradient. The cell's
# inputs are scale-free, so this is what exact arithmetic gives for a gradient above 1e18.
GRAD_MAX = 1e18
# The update-ratio safeguard (see update_ratio_log_scale): a tensor's update RMS is held to at most
# max_update_ratio × max(RMS of the tensor, UPDATE_RMS_FLOOR); the floor lets zero-initialised tensors
# (biases) move. DEFAULT_MAX_UPDATE_RATIO is the optimizer's default: off (0), because on the small
# problems the shipped weights do well on it raises the final loss 160-15,000x (docs/resnet.md); 0.01 is what
# makes the shipped weights train a BatchNorm ResNet-18 without the spike.
DEFAULT_MAX_UPDATE_RATIO = 0.0
UPDATE_RMS_FLOOR = 1e-2
# The original code's initial log learning rate: per coordinate U(ln 1e-6 / 2, ln 1e-2 / 2) plus one
# per-tensor offset from the same range (so within [ln 1e-6, ln 1e-2]).
DEFAULT_INIT_LR_RANGE = (1e-6, 1e-2)
INIT_LOG_LR_RANGE = tuple(math.log(v) / 2 for v in DEFAULT_INIT_LR_RANGE)


class Rows:
    """Row indices of the per-coordinate state ``[ROWS, N]`` for hidden size H and S timescales."""

    def __init__(self, hidden: int, scales: int):
        H, S = hidden, scales
        self.H, self.S = H, S
        self.h = slice(0, H)
        self.c = slice(H, 2 * H)
        self.a = slice(2 * H, 2 * H + S)
        self.ms = slice(2 * H + S, 2 * H + 2 * S)
        self.beta = 2 * H + 2 * S
        self.gamma = self.beta + 1
        self.log_lr = self.beta + 2
        self.u = self.beta + 3
        self.count = self.beta + 4  # ROWS

    @property
    def features(self) -> int:
        """Inputs of the per-coordinate cell: S scaled momenta, S − 1 products, S log mean squares, 1 log-lr."""
        return 3 * self.S


class HierState(NamedTuple):
    """A rule's state: per-coordinate rows ``[ROWS, N]`` (all tensors' coordinates, concatenated),
    tensor-GRU states ``[T, tensor_hidden]``, the global-GRU state ``[global_hidden]`` and, with
    attention, the true parameters (flat, ``[N]``; else an empty tensor)."""

    coord: Tensor
    tensor: Tensor
    glob: Tensor
    theta: Tensor


def _affine_(w: Tensor, scale: float = 0.5) -> Tensor:
    # The original code's Affine: N(0, std = scale / sqrt(fan_in)).
    with torch.no_grad():
        return w.normal_(0.0, scale / math.sqrt(w.shape[1]))


def device_values(values: Sequence[float], dtype: torch.dtype, device: torch.device | str | None) -> Tensor:
    """A 1-D tensor of Python numbers made on ``device`` by fills, not copied from the host: on CUDA a
    copy from pageable host memory (``torch.tensor([...], device=...)``) synchronises the stream, and
    an optimizer step has no host synchronisation."""
    if not values:
        return torch.zeros(0, dtype=dtype, device=device)
    return torch.stack([torch.full((), v, dtype=dtype, device=device) for v in values])


def segment_sum(x: Tensor, seg: Tensor, T: int) -> Tensor:
    """Sum over each of the ``T`` segments of the columns of ``x`` [K, N] (``seg`` [N]: segment of each
    column): returns [T, K]. Differentiable."""
    return torch.zeros(T, x.shape[0], dtype=x.dtype, device=x.device).index_add(0, seg, x.t())


def segment_mean(x: Tensor, seg: Tensor, counts: Tensor) -> Tensor:
    """Mean over each segment of the columns of ``x`` [K, N] (``seg`` [N]: segment of each column,
    ``counts`` [T]): returns [T, K]. Differentiable."""
    return segment_sum(x, seg, counts.shape[0]) / counts.to(x.dtype)[:, None]


def bias_gru(x: Tensor, h: Tensor, w_ru: Tensor, b_ru: Tensor, w_c: Tensor, b_c: Tensor,
             injected: Tensor | None) -> Tensor:
    """The original code's BiasGRUCell: gates r, u = σ(W_ru [x, h] + b_ru + inj_ru); candidate
    c = tanh(W_c [x, r h] + b_c + inj_c); h' = u h + (1 − u) c. x [B, I], h [B, G], injected [B, 3G]."""
    G = h.shape[-1]
    ru = torch.cat([x, h], -1) @ w_ru.t() + b_ru
    if injected is not None:
        ru = ru + injected[..., : 2 * G]
    r, u = torch.sigmoid(ru).split(G, -1)
    cand = torch.cat([x, r * h], -1) @ w_c.t() + b_c
    if injected is not None:
        cand = cand + injected[..., 2 * G:]
    return u * h + (1 - u) * torch.tanh(cand)


class HierarchicalNet(nn.Module):
    """The network of the hierarchical learned optimizer (see the module docstring).

    Args:
        hidden: per-coordinate LSTM hidden size (10).
        tensor_hidden: per-tensor GRU hidden size (20).
        global_hidden: global GRU hidden size (20).
        scales: number of momentum timescales S (4).
        attention: the Nesterov-like look-ahead of the original code (off by default, as there).
        init: ``"default"`` (the original code's initialisation, with the LSTM forget-gate bias at 2.2)
            or ``"zeros"`` (every weight zero, the constants — decay logits 2.2 / 3.2, lr-momentum logit
            3.2, offset −1, shortcut 1/S — kept).

    Only ``hidden = 10`` and ``scales = 4`` have fused kernels; other sizes run the reference.
    """

    def __init__(self, hidden: int = 10, tensor_hidden: int = 20, global_hidden: int = 20, scales: int = 4,
                 attention: bool = False, init: str = "default"):
        super().__init__()
        for name, v in (("hidden", hidden), ("tensor_hidden", tensor_hidden), ("global_hidden", global_hidden)):
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"HierarchicalNet: {name} must be a positive int, got {v!r}")
        if not (isinstance(scales, int) and scales >= 2):
            raise ValueError(f"HierarchicalNet: scales must be an int >= 2, got {scales!r}")
        if init not in ("default", "zeros"):
            raise ValueError(f"HierarchicalNet: init must be 'default' or 'zeros', got {init!r}")
        self.hidden, self.tensor_hidden, self.global_hidden, self.scales = hidden, tensor_hidden, global_hidden, scales
        self.attention = bool(attention)
        self.init = init
        self.rows = Rows(hidden, scales)
        H, S, T, G, Fi = hidden, scales, tensor_hidden, global_hidden, self.rows.features
        P = nn.Parameter
        # per-coordinate LSTM cell (gate order i, f, g, o as nn.LSTMCell)
        self.w_ih = P(torch.empty(4 * H, Fi))
        self.w_hh = P(torch.empty(4 * H, H))
        self.b = P(torch.zeros(4 * H))
        self.tensor_to_coord = P(torch.empty(4 * H, T))
        self.global_to_coord = P(torch.empty(4 * H, G))
        self.h0 = P(torch.empty(H))  # initial per-coordinate hidden state (c starts at 0)
        # read-outs
        self.w_d = P(torch.empty(H))
        self.w_shortcut = P(torch.empty(S))
        self.w_gamma = P(torch.empty(H))
        self.b_gamma = P(torch.tensor(3.2))
        self.w_beta = P(torch.empty(H))
        self.b_beta = P(torch.tensor(2.2))
        self.w_lr = P(torch.zeros(H))
        self.b_lr = P(torch.tensor(0.0))
        self.lr_momentum_logit = P(torch.tensor(3.2))
        self.lr_offset = P(torch.tensor(-1.0))
        if self.attention:
            self.w_att = P(torch.empty(H))
            self.w_att_shortcut = P(torch.empty(S))
        # per-tensor GRU: input mean(h, features) [H + F]
        self.tensor_w_ru = P(torch.empty(2 * T, H + Fi + T))
        self.tensor_b_ru = P(torch.full((2 * T,), 2.2))
        self.tensor_w_c = P(torch.empty(T, H + Fi + T))
        self.tensor_b_c = P(torch.zeros(T))
        self.global_to_tensor = P(torch.empty(3 * T, G))
        self.tensor0 = P(torch.empty(T))
        # global GRU: input mean of the tensor states [T]
        self.global_w_ru = P(torch.empty(2 * G, T + G))
        self.global_b_ru = P(torch.full((2 * G,), 2.2))
        self.global_w_c = P(torch.empty(G, T + G))
        self.global_b_c = P(torch.zeros(G))
        self.global0 = P(torch.empty(G))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        H, S = self.hidden, self.scales
        with torch.no_grad():
            for w in (self.w_ih, self.w_hh, self.tensor_to_coord, self.global_to_coord, self.tensor_w_ru,
                      self.tensor_w_c, self.global_to_tensor, self.global_w_ru, self.global_w_c):
                _affine_(w)
            self.b.zero_()
            self.b[H:2 * H] = 2.2  # forget gate
            self.h0.uniform_(-1, 1)
            self.tensor0.uniform_(-1, 1)
            self.global0.uniform_(-1, 1)
            for w in (self.w_d, self.w_gamma, self.w_beta):
                w.normal_(0.0, 0.5 / math.sqrt(H))
            self.w_shortcut.normal_(1.0 / S, 0.1 / math.sqrt(S))
            self.w_lr.zero_()
            self.b_lr.zero_()
            self.b_gamma.fill_(3.2)
            self.b_beta.fill_(2.2)
            self.lr_momentum_logit.fill_(3.2)
            self.lr_offset.fill_(-1.0)
            if self.attention:
                self.w_att.copy_(self.w_d)
                self.w_att_shortcut.copy_(self.w_shortcut)
            if self.init == "zeros":
                for w in (self.w_ih, self.w_hh, self.b, self.tensor_to_coord, self.global_to_coord, self.h0,
                          self.w_d, self.w_gamma, self.w_beta, self.tensor_w_ru, self.tensor_w_c,
                          self.global_to_tensor, self.tensor0, self.global_w_ru, self.global_w_c, self.global0):
                    w.zero_()
                self.w_shortcut.fill_(1.0 / S)
                if self.attention:
                    self.w_att.zero_()
                    self.w_att_shortcut.fill_(1.0 / S)

    def config(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "tensor_hidden": self.tensor_hidden, "global_hidden": self.global_hidden,
                "scales": self.scales, "attention": self.attention, "init": self.init}

    @property
    def fusable(self) -> bool:
        """Whether the fused kernels implement this configuration (H = 10, S = 4, no attention)."""
        return self.hidden == 10 and self.scales == 4 and not self.attention

    # -- pieces of a step ----------------------------------------------------------------------
    def coord_bias(self, tensor_state: Tensor, global_state: Tensor) -> Tensor:
        """The per-tensor bias of the coordinate cell's gates: [T, 4H]."""
        dt = tensor_state.dtype
        return tensor_state @ self.tensor_to_coord.t().to(dt) + global_state @ self.global_to_coord.t().to(dt)

    def tensor_rnn(self, inputs: Tensor, tensor_state: Tensor, global_state: Tensor) -> Tensor:
        dt = tensor_state.dtype
        inj = (global_state @ self.global_to_tensor.t().to(dt)).expand(tensor_state.shape[0], -1)
        return bias_gru(inputs, tensor_state, self.tensor_w_ru.to(dt), self.tensor_b_ru.to(dt), self.tensor_w_c.to(dt),
                        self.tensor_b_c.to(dt), inj)

    def global_rnn(self, inputs: Tensor, global_state: Tensor) -> Tensor:
        dt = global_state.dtype
        return bias_gru(inputs, global_state, self.global_w_ru.to(dt), self.global_b_ru.to(dt), self.global_w_c.to(dt),
                        self.global_b_c.to(dt), None)

    def advance_rnns(self, tensor_inputs: Tensor, tensor_state: Tensor, global_state: Tensor,
                     stepped: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """New tensor and global states. ``stepped`` [T] (bool, optional): tensors that took this step;
        the others keep their state and are left out of the global RNN's mean (all skipped: the
        global state is kept too)."""
        new_t = self.tensor_rnn(tensor_inputs, tensor_state, global_state)
        if stepped is None:
            return new_t, self.global_rnn(new_t.mean(0), global_state)
        m = stepped.to(new_t.dtype)[:, None]
        new_t = torch.where(stepped[:, None], new_t, tensor_state)
        mean = (new_t * m).sum(0) / m.sum().clamp_min(1)
        new_g = torch.where(stepped.any(), self.global_rnn(mean, global_state), global_state)
        return new_t, new_g

    def packed_coord_weights(self) -> Tensor:
        """The per-coordinate weights in the order the fused kernels read them (see csrc/hier_math.h):
        w_ih [4H, F] row-major, w_hh [4H, H], b [4H], w_d [H], w_shortcut [S], w_gamma [H], b_gamma,
        w_beta [H], b_beta, w_lr [H], b_lr, lr momentum m = σ(logit), lr_offset."""
        m = torch.sigmoid(self.lr_momentum_logit)
        parts = [self.w_ih.reshape(-1), self.w_hh.reshape(-1), self.b, self.w_d, self.w_shortcut, self.w_gamma,
                 self.b_gamma.reshape(1), self.w_beta, self.b_beta.reshape(1), self.w_lr, self.b_lr.reshape(1),
                 m.reshape(1), self.lr_offset.reshape(1)]
        return torch.cat([p.detach().float() for p in parts])

    # -- state ---------------------------------------------------------------------------------
    def initial_coord_state(self, n: int, log_lr: Tensor | float = 0.0, dtype=torch.float32, device=None) -> Tensor:
        """Per-coordinate rows for ``n`` coordinates: h = h0, c = a = ms = 0, β = γ = 0, log_lr given
        (a number or ``[n]``), u = 0."""
        R = self.rows
        rows = torch.zeros(R.count, n, dtype=dtype, device=device)
        with torch.no_grad():
            rows[R.h] = self.h0.detach().to(dtype=dtype, device=device)[:, None]
            rows[R.log_lr] = log_lr if isinstance(log_lr, (int, float)) else log_lr.to(dtype)
        return rows


def update_ratio_log_scale(u2: Tensor, d2: Tensor, theta2: Tensor, numels: Tensor, lr: Tensor,
                           max_ratio: Tensor) -> Tensor:
    """The update-ratio safeguard (module docstring, item 6): per tensor, log s ≤ 0, the amount by which
    its log learning rates are lowered so that its update's RMS, lr · rms(u) / rms(d), is at most
    ``max_ratio`` · max(rms(θ), ``UPDATE_RMS_FLOOR``); 0 where it is within that bound, where ``lr`` is 0
    and where ``max_ratio`` is 0 (the safeguard off). All arguments are [T] (per-tensor sums of u², d²
    and θ² over the tensor's coordinates, its size, its lr multiplier and its bound), in one dtype.
    Differentiable (the meta-training rule's step). The fused path (``fused_step_``) and the reference
    (``step_reference``) both compute it here."""
    n = numels.clamp_min(1)
    step_rms = lr * torch.sqrt(u2 / n) / torch.sqrt(d2 / n + RMS_EPS)
    allowed = max_ratio * torch.sqrt(theta2 / n).clamp_min(UPDATE_RMS_FLOOR)
    over = (max_ratio > 0) & (step_rms > allowed)
    one = torch.ones((), dtype=step_rms.dtype, device=step_rms.device)
    # where() on the inputs, so that neither branch is inf/NaN (nor its gradient) where it is not taken
    return torch.where(over, torch.log(torch.where(over, allowed, one) / torch.where(over, step_rms, one)),
                       torch.zeros((), dtype=step_rms.dtype, device=step_rms.device))


def coord_step_reference(net: HierarchicalNet, g: Tensor, rows: Tensor, coord_bias: Tensor,
                         mean_log_lr: Tensor) -> "CoordOut":
    """The per-coordinate part of a step (items 1–5 of the module docstring, before the RMS
    normalisation), for N coordinates: ``g`` [N], ``rows`` [ROWS, N], ``coord_bias`` [4H, N] (each
    coordinate's tensor bias), ``mean_log_lr`` (a 0-dim tensor). Returns a :class:`CoordOut`: the new
    rows (their ``u`` row = exp(ℓ + offset)·d), the direction d [N] (unnormalised), the new hidden state
    [H, N], the cell's inputs [F, N] (the scaled momenta x are their first S rows) and ℓ [N].
    Differentiable in everything."""
    R = net.rows
    S = R.S
    g = g.to(rows.dtype).clamp(-GRAD_MAX, GRAD_MAX)  # 0. saturation: finite in, finite out (see GRAD_MAX)
    beta, gamma, log_lr = rows[R.beta], rows[R.gamma], rows[R.log_lr]
    # 1. momenta at S timescales: β_1 = β, β_{s+1} = √β_s
    betas = [beta]
    for _ in range(S - 1):
        betas.append(torch.sqrt(betas[-1]))
    betas = torch.stack(betas)  # [S, N]
    a = (1 - betas) * g + betas * rows[R.a]
    # 2. mean squares and scaled inputs
    ms = (1 - gamma) * (a * a + MS_EPS) + gamma * rows[R.ms]
    x = torch.asinh(a / torch.sqrt(ms + RMS_EPS))
    # 3. features
    log_ms = torch.log(ms + RMS_EPS)
    feats = torch.cat([x, x[:-1] * x[1:], log_ms - log_ms.mean(0, keepdim=True),
                       (log_lr - mean_log_lr)[None]])
    # 4. the LSTM cell
    h, c = rows[R.h], rows[R.c]
    z = net.w_ih.to(rows.dtype) @ feats + net.w_hh.to(rows.dtype) @ h + net.b.to(rows.dtype)[:, None] + coord_bias
    zi, zf, zg, zo = z.chunk(4, 0)
    c_new = torch.sigmoid(zf) * c + torch.sigmoid(zi) * torch.tanh(zg)
    h_new = torch.sigmoid(zo) * torch.tanh(c_new)
    # 5. read-outs
    d = net.w_d.to(rows.dtype) @ h_new + net.w_shortcut.to(rows.dtype) @ x
    gamma_new = torch.sigmoid(net.w_gamma.to(rows.dtype) @ h_new + net.b_gamma)
    beta_new = torch.sigmoid(net.w_beta.to(rows.dtype) @ h_new + net.b_beta)
    step_log_lr = log_lr + net.w_lr.to(rows.dtype) @ h_new + net.b_lr
    step_log_lr = step_log_lr + (step_log_lr.clamp(-MAX_LOG_LR, MAX_LOG_LR) - step_log_lr).detach()  # straight through
    m = torch.sigmoid(net.lr_momentum_logit)
    log_lr_new = m * log_lr + (1 - m) * step_log_lr
    u = torch.exp(step_log_lr + net.lr_offset) * d
    new_rows = torch.cat([h_new, c_new, a, ms, beta_new[None], gamma_new[None], log_lr_new[None], u[None]])
    return CoordOut(new_rows, d, h_new, feats, step_log_lr)


class CoordOut(NamedTuple):
    rows: Tensor
    d: Tensor
    h_new: Tensor
    features: Tensor
    step_log_lr: Tensor


def step_reference(net: HierarchicalNet, params: Sequence[Tensor], grads: Sequence[Tensor], state: HierState,
                   lr: Tensor | float = 1.0, stepped: Tensor | None = None,
                   max_update_ratio: Tensor | float | None = None) -> tuple[list[Tensor], HierState]:
    """One whole step of the hierarchical optimizer on a list of (nonempty) parameter tensors, in pure
    PyTorch (differentiable: the meta-training rule and the tests' oracle of the fused kernels).

    ``state.coord`` holds the rows of all tensors' coordinates, concatenated in order (``[ROWS, N]``);
    ``lr`` multiplies the step (a number, or a tensor [T] with one value per tensor). ``stepped`` [T]
    (bool, optional) marks the tensors that take this step; the others (and their rows, parameters and
    tensor states) stay as they are. ``max_update_ratio`` (a number or [T]; None or 0: off) is the
    update-ratio safeguard of item 6. Returns ``(new_params, new_state)``."""
    R = net.rows
    sizes = [p.numel() for p in params]
    T, N = len(sizes), sum(sizes)
    if T == 0:
        return list(params), state
    if min(sizes) == 0:
        raise ValueError("step_reference: every parameter must be nonempty")
    rows = state.coord
    if rows.shape != (R.count, N):
        raise ValueError(f"step_reference: state.coord must be [{R.count}, {N}], got {list(rows.shape)}")
    dev, dt = rows.device, rows.dtype
    counts = device_values(sizes, torch.long, dev)
    seg = torch.repeat_interleave(torch.arange(T, device=dev), counts, output_size=N)
    g = torch.cat([gr.reshape(-1) for gr in grads]).to(dt)
    if stepped is not None:
        g = torch.where(stepped[seg], g, torch.zeros((), dtype=dt, device=dev))
    mean_log_lr = rows[R.log_lr].mean()
    bias = net.coord_bias(state.tensor, state.glob).to(dt)  # [T, 4H]
    out = coord_step_reference(net, g, rows, bias.t()[:, seg], mean_log_lr)
    new_rows, d = out.rows, out.d
    # 6. RMS-normalised direction and the update
    rms = torch.sqrt(segment_mean((d * d)[None], seg, counts)[:, 0] + RMS_EPS)  # [T]
    lr_t = lr if isinstance(lr, Tensor) and lr.dim() == 1 else torch.as_tensor(lr, dtype=dt, device=dev).expand(T)
    lr_t = lr_t.to(dt)
    flat = torch.cat([p.reshape(-1) for p in params]).to(dt)
    theta = state.theta if net.attention else flat
    step_log_lr = out.step_log_lr
    if max_update_ratio is not None:
        ratio = torch.as_tensor(max_update_ratio, dtype=dt, device=dev).expand(T)
        u = new_rows[R.u]
        sq = segment_sum(torch.stack([u * u, d * d, theta * theta]), seg, T)  # [T, 3]
        log_s = update_ratio_log_scale(sq[:, 0], sq[:, 1], sq[:, 2], counts.to(dt), lr_t, ratio)[seg]
        # both log learning rates lowered by log s: the step's (u = exp(ℓ + offset) d) and the state's
        scaled = torch.stack([new_rows[R.log_lr] + log_s, new_rows[R.u] * torch.exp(log_s)])
        new_rows = torch.cat([new_rows[: R.log_lr], scaled, new_rows[R.u + 1:]])
        step_log_lr = step_log_lr + log_s
    theta_new = theta - (lr_t / rms)[seg] * new_rows[R.u]
    # 7. tensor and global RNNs
    tin = segment_mean(torch.cat([out.h_new, out.features]), seg, counts)  # [T, H + F]
    tensor_new, glob_new = net.advance_rnns(tin.to(state.tensor.dtype), state.tensor, state.glob, stepped)
    visible = theta_new
    if net.attention:  # the gradient is taken at a look-ahead point; the true θ stays in the state
        x = out.features[: R.S]
        d_att = net.w_att.to(dt) @ out.h_new + net.w_att_shortcut.to(dt) @ x
        rms_att = torch.sqrt(segment_mean((d_att * d_att)[None], seg, counts)[:, 0] + RMS_EPS)
        visible = theta_new - (lr_t / rms_att)[seg] * torch.exp(step_log_lr + net.lr_offset) * d_att
    if stepped is not None:
        keep = stepped[seg]
        new_rows = torch.where(keep[None], new_rows, rows)
        theta_new = torch.where(keep, theta_new, theta)
        visible = torch.where(keep, visible, flat)
    new_params = [v.view_as(p).to(p.dtype) for v, p in zip(visible.split(sizes), params)]
    return new_params, HierState(new_rows, tensor_new, glob_new, theta_new if net.attention else state.theta)


def fused_step_(net: HierarchicalNet, params: list[Tensor], grads: list[Tensor], coords: list[Tensor],
                tensor_prev: Tensor, glob: Tensor, numels: Tensor, mean_log_lr: Tensor, packed: Tensor,
                lrs: list[float], grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
                reduce: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
                max_update_ratios: list[float] | None = None):
    """One step through the fused in-place op ``learnedopt::hier_step_`` (parameters and per-tensor
    coordinate rows ``coords`` [ROWS, n_i] changed in place), then the tensor and global RNNs. ``packed``
    is ``net.packed_coord_weights()`` on the parameters' device, ``numels`` [T] the tensors' sizes and
    ``mean_log_lr`` the mean log-lr over all coordinates (both in the dtype of ``tensor_prev``).
    Returns ``(stepped [T], new tensor states [T, G], new global state, new per-tensor log-lr sums
    [T])`` (not written anywhere: the caller keeps them). Used by the optimizer and by meta-training's
    ES/PES estimators (:mod:`learnedopt.meta.estimators`).

    ``max_update_ratios`` (one per tensor; None, or all 0: off): the update-ratio safeguard (module
    docstring, item 6). ``reduce``: for tensors sharded across processes (FSDP2,
    :mod:`learnedopt.optim._sharding`), ``reduce(partial [T, C])`` returns the whole tensors' ``(sums
    [T, C] in the dtype of tensor_prev, stepped [T])`` from the local shards' (the op's K columns, its
    stepped flag at ``K_STEPPED``, then the safeguard's sums of u² and θ² when it is on), by one
    collective. With either, the op steps the coordinates with lr = 0 (their state and partial sums;
    the parameters stay as they are) and the update follows here (:func:`apply_update_`), with the
    whole tensors' sums."""
    from .. import ops

    ops._require(params[0].device, "hier_step_")
    cdt = tensor_prev.dtype
    clip = max_update_ratios is not None and any(r > 0 for r in max_update_ratios)
    coord_bias = net.coord_bias(tensor_prev.float(), glob.float()).detach()
    deferred = reduce is not None or clip
    sums = torch.ops.learnedopt.hier_step_(params, grads, coords, coord_bias.contiguous(), mean_log_lr.float(),
                                           packed, [0.0] * len(lrs) if deferred else lrs, grad_scale, found_inf)
    if not deferred:
        sums = sums.to(cdt)
        stepped = sums[:, K_STEPPED] > 0
    else:
        R = net.rows
        if clip:  # the safeguard's partial sums: u² (the op's new u rows) and θ² (θ untouched by lr 0)
            u2 = _sq_norms([c[R.u] for c in coords], sums.dtype)
            theta2 = _sq_norms(params, sums.dtype)
            sums = torch.cat([sums, u2[:, None], theta2[:, None]], 1)
        if reduce is None:
            stepped = sums[:, K_STEPPED] > 0
            sums = sums.to(cdt)
        else:
            sums, stepped = reduce(sums)
        log_s = None
        if clip:
            log_s = update_ratio_log_scale(sums[:, K], sums[:, K_D2], sums[:, K + 1], numels,
                                           device_values(lrs, cdt, numels.device),
                                           device_values(max_update_ratios, cdt, numels.device))
            log_s = torch.where(stepped, log_s, torch.zeros((), dtype=cdt, device=log_s.device))
            sums = sums.clone()
            sums[:, K_LOG_LR] += log_s * numels
        apply_update_(params, coords, sums[:, K_D2], numels, lrs, stepped, R, log_s)
    tin = sums[:, :K_D2] / numels.clamp_min(1)[:, None]
    new_t, new_g = net.advance_rnns(tin, tensor_prev, glob, stepped)
    return stepped, new_t, new_g, sums[:, K_LOG_LR]


def _sq_norms(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """[T]: the sum of squares of each tensor (0 for an empty one), by one batched foreach norm (in
    float32 at least: a bfloat16 state's norm would otherwise come back rounded to bfloat16)."""
    nonempty = [t for t in tensors if t.numel()]
    acc = torch.float64 if any(t.dtype == torch.float64 for t in nonempty) else torch.float32
    norms = iter(torch._foreach_norm(nonempty, 2, dtype=acc) if nonempty else [])
    zero = torch.zeros((), dtype=dtype, device=tensors[0].device)
    return torch.stack([next(norms).to(dtype) ** 2 if t.numel() else zero for t in tensors])


def apply_update_(params: list[Tensor], coords: list[Tensor], d2: Tensor, numels: Tensor, lrs: list[float],
                  stepped: Tensor, rows: Rows, log_s: Tensor | None = None) -> None:
    """The update of the fused op's last pass, done after it (on whole tensors or on local shards), with
    the whole tensors' sums of d²: p -= lr / sqrt(sum d² / numel + 1e-16) * u (u: the ``rows.u`` row of
    ``coords[i]``), computed as the kernels do (the scale in float64, the update in the parameter's
    compute type). With the update-ratio safeguard's ``log_s`` [T], first u *= exp(log s) and log_lr +=
    log s on the tensor's coordinates. Tensors not ``stepped`` are left as they are."""
    dev = d2.device
    lr = device_values(lrs, torch.float64, dev)
    scale = lr / torch.sqrt(d2.double() / numels.double().clamp_min(1) + RMS_EPS)
    scale = torch.where(stepped, scale, torch.zeros((), dtype=scale.dtype, device=dev))
    factors = None if log_s is None else torch.exp(log_s.double()).unbind(0)
    for i, (p, c, sc) in enumerate(zip(params, coords, scale.unbind(0))):
        if p.numel() == 0:
            continue
        acc = torch.float64 if p.dtype == torch.float64 else torch.float32
        if factors is not None:
            c[rows.u].copy_(c[rows.u].to(acc) * factors[i].to(acc))
            c[rows.log_lr].copy_(c[rows.log_lr].to(acc) + log_s[i].to(acc))
        u = c[rows.u].view(p.shape)
        p.copy_(p.to(acc) - sc.to(acc) * u.to(acc))


def initial_state(net: HierarchicalNet, params: Sequence[Tensor], log_lr: float = 0.0,
                  generator: torch.Generator | None = None,
                  lr_range: tuple[float, float] = DEFAULT_INIT_LR_RANGE) -> HierState:
    """The state before the first step. Per-coordinate log learning rates are ``log_lr`` or, with a
    ``generator``, random as in the original code: per coordinate U(ln lo / 2, ln hi / 2) plus one
    per-tensor draw from the same range, (lo, hi) = ``lr_range`` (the original's (1e-6, 1e-2)).
    Float32 (float64 for float64 parameters)."""
    sizes = [p.numel() for p in params]
    dt = torch.float64 if params and params[0].dtype == torch.float64 else torch.float32
    dev = params[0].device if params else None
    N, T = sum(sizes), len(sizes)
    if generator is None:
        lr0: Tensor | float = float(log_lr)
    else:
        lo, hi = math.log(lr_range[0]) / 2, math.log(lr_range[1]) / 2
        per_tensor = lo + (hi - lo) * torch.rand(T, generator=generator, dtype=dt)
        per_coord = lo + (hi - lo) * torch.rand(N, generator=generator, dtype=dt)
        lr0 = (per_coord + torch.repeat_interleave(per_tensor, torch.tensor(sizes, dtype=torch.long))).to(dev)
    coord = net.initial_coord_state(N, lr0, dtype=dt, device=dev)
    tensor = net.tensor0.detach().to(dtype=dt, device=dev).expand(T, -1).clone()
    glob = net.global0.detach().to(dtype=dt, device=dev).clone()
    theta = torch.cat([p.detach().reshape(-1) for p in params]).to(dt) if net.attention and params else \
        torch.zeros(0, dtype=dt, device=dev)
    return HierState(coord, tensor, glob, theta)


class HierarchicalRule(nn.Module):
    """The hierarchical optimizer as a meta-trainable update rule (:mod:`learnedopt.meta`), on the
    pure-PyTorch reference step. Zero-size tensors are passed through. ``init_state(params,
    generator)`` draws the original code's random initial learning rates when given a generator (as
    meta-training does; ``init_lr_range`` = (lo, hi): the range of the initial learning rates, the
    original's (1e-6, 1e-2) by default) and uses ``init_log_lr`` otherwise (evaluation).
    ``max_update_ratio`` (0: off, the default, as the shipped weights were trained): the update-ratio
    safeguard of the module docstring's item 6, in meta-training's steps."""

    kind = "hierarchical"
    random_init = True  # learnedopt.meta.start passes its generator to init_state

    def __init__(self, net: HierarchicalNet | None = None, init_log_lr: float = math.log(1e-3),
                 init_lr_range: Sequence[float] = DEFAULT_INIT_LR_RANGE, max_update_ratio: float = 0.0,
                 **net_kwargs):
        super().__init__()
        if net is not None and net_kwargs:
            raise TypeError("HierarchicalRule: pass either net or the HierarchicalNet keyword arguments, not both")
        lo, hi = (float(v) for v in init_lr_range)
        if not 0 < lo <= hi:
            raise ValueError(f"HierarchicalRule: init_lr_range must be (lo, hi) with 0 < lo <= hi, got {init_lr_range}")
        if not (isinstance(max_update_ratio, (int, float)) and math.isfinite(max_update_ratio)
                and max_update_ratio >= 0):
            raise ValueError(f"HierarchicalRule: max_update_ratio must be a finite number >= 0, got {max_update_ratio!r}")
        self.net = net if net is not None else HierarchicalNet(**net_kwargs)
        self.init_log_lr = float(init_log_lr)
        self.max_update_ratio = float(max_update_ratio)
        self.init_lr_range = (lo, hi)

    def config(self) -> dict[str, Any]:
        cfg = {**self.net.config(), "init_log_lr": self.init_log_lr}
        if self.init_lr_range != DEFAULT_INIT_LR_RANGE:
            cfg["init_lr_range"] = list(self.init_lr_range)
        if self.max_update_ratio:
            cfg["max_update_ratio"] = self.max_update_ratio
        return cfg

    def init_state(self, params: Sequence[Tensor], generator: torch.Generator | None = None) -> HierState:
        return initial_state(self.net, [p for p in params if p.numel()], self.init_log_lr, generator,
                             self.init_lr_range)

    def forward(self, params: Sequence[Tensor], grads: Sequence[Tensor], state: HierState):
        idx = [i for i, p in enumerate(params) if p.numel()]
        new, state = step_reference(self.net, [params[i] for i in idx], [grads[i] for i in idx], state,
                                    max_update_ratio=self.max_update_ratio or None)
        out = list(params)
        for i, p in zip(idx, new):
            out[i] = p
        return out, state
