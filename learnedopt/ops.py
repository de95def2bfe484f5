"""Python face of the custom ops in the extension learnedopt._C.

The ops live in the dispatcher as ``torch.ops.learnedopt.*`` (CPU kernels always; CUDA kernels when
the extension was built with CUDA). This module adds what PyTorch needs around them: fake (meta)
implementations for ``torch.compile``, autograd (the backward of each op is itself an op), and the
public wrappers ``coord_lstm`` and ``coord_lstm_stack``.

The package imports without the extension; calling a fused op then raises an error that says what
is missing. ``extension_available()``, ``cuda_built()`` and ``cuda_available()`` tell.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

try:
    from . import _C  # noqa: F401  (loading the library registers the ops)

    _IMPORT_ERROR: BaseException | None = None
except ImportError as e:  # built without the extension, or built against another torch
    _C = None
    _IMPORT_ERROR = e

_BUILD_HINT = "build it with `pip install --no-build-isolation -e .` in the repository (see README)"


def extension_available() -> bool:
    """True when the compiled extension learnedopt._C is loaded (the CPU kernels always are then)."""
    return _C is not None


def cuda_built() -> bool:
    """True when the extension holds CUDA kernels (it was built with a CUDA toolkit)."""
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key("learnedopt::coord_lstm", "CUDA")


def cuda_available() -> bool:
    """True when the CUDA kernels are built and a GPU is present: the fused ops can run on CUDA."""
    return cuda_built() and torch.cuda.is_available()


def _require(device: torch.device, op: str) -> None:
    if _C is None:
        raise RuntimeError(
            f"learnedopt.{op}: the compiled extension learnedopt._C is not available "
            f"({_IMPORT_ERROR}); {_BUILD_HINT}"
        )
    if device.type == "cuda" and not cuda_built():
        raise RuntimeError(
            f"learnedopt.{op}: the extension was built without CUDA kernels, so it cannot run on "
            f"{device}; rebuild with a CUDA toolkit present (LEARNEDOPT_CUDA=1 makes the build fail "
            "loudly if it cannot compile them)"
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"learnedopt.{op}: tensors on {device} are not supported (CPU and CUDA only)")


def _check_dense(op: str, **tensors) -> None:
    """Sparse (or other non-strided) tensors would reach the dispatcher's generic 'could not run'
    error; name the argument instead."""
    for name, t in tensors.items():
        ts = t if isinstance(t, (list, tuple)) else [t]
        for k, u in enumerate(ts):
            if isinstance(u, Tensor) and u.layout != torch.strided:
                where = f"{name}[{k}]" if isinstance(t, (list, tuple)) else name
                raise RuntimeError(f"learnedopt.{op}: {where} must be a dense (strided) tensor, got layout {u.layout}")


def coord_lstm(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """One LSTM cell applied independently to each of N coordinates, with shared weights.

    Args:
        x: inputs ``[N, I]``.
        h, c: hidden and cell state ``[N, H]`` (dtype of ``x``).
        w_ih: ``[4H, I]``, w_hh: ``[4H, H]``, b: ``[4H]``: gate order (i, f, g, o) exactly as
            ``torch.nn.LSTMCell``, with ONE bias ``b`` (``LSTMCell``'s ``bias_ih + bias_hh``).
            Weights have the dtype of ``x``, or float32 when ``x`` is bfloat16/float16 (CUDA).

    Returns:
        ``(h_new, c_new)``, each ``[N, H]`` in the dtype of ``x``. Differentiable in every input
        (first derivatives; the backward is the fused op ``coord_lstm_backward``).

    dtypes: float32/float64 on CPU; float32/float64/bfloat16/float16 on CUDA; compute in float32
    (float64 for float64).
    """
    _require(x.device, "coord_lstm")
    _check_dense("coord_lstm", x=x, h=h, c=c, w_ih=w_ih, w_hh=w_hh, b=b)
    return torch.ops.learnedopt.coord_lstm(x, h, c, w_ih, w_hh, b)


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
    """A stack of L coordinatewise LSTM cells and a linear read-out, fused.

    Layer 0 takes ``x [N, I]``; layer l > 0 takes the new h of layer l-1. ``h[l], c[l]`` are
    ``[N, H_l]``; ``w_ih[l]`` is ``[4H_l, I_l]``, ``w_hh[l]`` ``[4H_l, H_l]``, ``b[l]`` ``[4H_l]``
    (as in :func:`coord_lstm`). The read-out is ``y = h_new[L-1] @ w_out.T + b_out`` with
    ``w_out [O, H_{L-1}]``, ``b_out [O]``.

    Returns ``(y [N, O], h_new list, c_new list)``; differentiable in every input.
    """
    _require(x.device, "coord_lstm_stack")
    _check_dense("coord_lstm_stack", x=x, h=h, c=c, w_ih=w_ih, w_hh=w_hh, b=b, w_out=w_out, b_out=b_out)
    return torch.ops.learnedopt.coord_lstm_stack(x, list(h), list(c), list(w_ih), list(w_hh), list(b), w_out, b_out)


def _new(like: Tensor, *shape: int) -> Tensor:
    """A new contiguous tensor of the given shape, with like's dtype and device (fake kernels)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


if _C is not None:

    def _check_cell_shapes(x, h, c, w_ih, w_hh, b):
        torch._check(x.dim() == 2 and h.dim() == 2, lambda: "coord_lstm: x and h must be 2-D")
        N, I = x.shape
        H = h.shape[1]
        torch._check(h.shape[0] == N and tuple(c.shape) == (N, H), lambda: "coord_lstm: h, c must be [N, H]")
        torch._check(tuple(w_ih.shape) == (4 * H, I), lambda: "coord_lstm: w_ih must be [4H, I]")
        torch._check(tuple(w_hh.shape) == (4 * H, H), lambda: "coord_lstm: w_hh must be [4H, H]")
        torch._check(tuple(b.shape) == (4 * H,), lambda: "coord_lstm: b must be [4H]")
        return N, I, H

    @torch.library.register_fake("learnedopt::coord_lstm")
    def _coord_lstm_fake(x, h, c, w_ih, w_hh, b):
        N, _, H = _check_cell_shapes(x, h, c, w_ih, w_hh, b)
        return _new(x, N, H), _new(x, N, H)

    @torch.library.register_fake("learnedopt::coord_lstm_backward")
    def _coord_lstm_backward_fake(grad_h_new, grad_c_new, x, h, c, w_ih, w_hh, b):
        N, I, H = _check_cell_shapes(x, h, c, w_ih, w_hh, b)
        return (_new(x, N, I), _new(x, N, H), _new(x, N, H), _new(w_ih, *w_ih.shape), _new(w_hh, *w_hh.shape),
                _new(b, *b.shape))

    def _coord_lstm_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _coord_lstm_backward(ctx, grad_h_new, grad_c_new):
        x, h, c, w_ih, w_hh, b = ctx.saved_tensors
        return torch.ops.learnedopt.coord_lstm_backward(grad_h_new, grad_c_new, x, h, c, w_ih, w_hh, b)

    torch.library.register_autograd(
        "learnedopt::coord_lstm", _coord_lstm_backward, setup_context=_coord_lstm_setup_context
    )

    @torch.library.register_fake("learnedopt::coord_lstm_stack")
    def _coord_lstm_stack_fake(x, h, c, w_ih, w_hh, b, w_out, b_out):
        N = x.shape[0]
        torch._check(len(h) >= 1, lambda: "coord_lstm_stack: at least one layer")
        return (_new(x, N, w_out.shape[0]), [_new(x, N, t.shape[1]) for t in h], [_new(x, N, t.shape[1]) for t in c])

    @torch.library.register_fake("learnedopt::coord_lstm_stack_backward")
    def _coord_lstm_stack_backward_fake(grad_y, grad_h_new, grad_c_new, x, h, c, w_ih, w_hh, b, w_out, b_out):
        like = lambda ts: [_new(t, *t.shape) for t in ts]  # noqa: E731
        return (_new(x, *x.shape), like(h), like(c), like(w_ih), like(w_hh), like(b), _new(w_out, *w_out.shape),
                _new(b_out, *b_out.shape))

    def _coord_lstm_stack_setup_context(ctx, inputs, output):
        x, h, c, w_ih, w_hh, b, w_out, b_out = inputs
        ctx.num_layers = len(h)
        ctx.save_for_backward(x, w_out, b_out, *h, *c, *w_ih, *w_hh, *b)

    def _coord_lstm_stack_backward(ctx, grad_y, grad_h_new, grad_c_new):
        x, w_out, b_out, *rest = ctx.saved_tensors
        L = ctx.num_layers
        h, c, w_ih, w_hh, b = (rest[k * L:(k + 1) * L] for k in range(5))
        return torch.ops.learnedopt.coord_lstm_stack_backward(
            grad_y, grad_h_new, grad_c_new, x, h, c, w_ih, w_hh, b, w_out, b_out
        )

    torch.library.register_autograd(
        "learnedopt::coord_lstm_stack", _coord_lstm_stack_backward, setup_context=_coord_lstm_stack_setup_context
    )

    @torch.library.register_fake("learnedopt::l2l_step_")
    def _l2l_step_fake(params, grads, states, w_ih, w_hh, b, w_out, b_out, lr, weight_decay, update_scale, p,
                       log_sign, grad_scale=None, found_inf=None):
        return None

    @torch.library.register_fake("learnedopt::hier_step_")
    def _hier_step_fake(params, grads, states, coord_bias, mean_log_lr, weights, lrs, grad_scale=None,
                        found_inf=None):
        return weights.new_empty(len(params), 25)



def _l2l_step_composed(params, grads, states, w_ih, w_hh, b, w_out, b_out, lr, weight_decay, update_scale, p,
                       log_sign, grad_scale=None, found_inf=None):
    """The L2L step composed from the fused ``coord_lstm_stack`` op and torch ops (device-generic; no
    host synchronisation): a second oracle for the fused step kernels (csrc/*/l2l_step_*), and what
    the CUDA step was before its fused kernel."""
    from . import reference

    reference.l2l_step_(params, grads, states, w_ih, w_hh, b, w_out, b_out, lr, weight_decay, update_scale, p,
                        log_sign, grad_scale, found_inf, stack=torch.ops.learnedopt.coord_lstm_stack)
