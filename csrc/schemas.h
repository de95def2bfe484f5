// Schemas of every op of learnedopt, defined once: for the learnedopt ops (registration.cpp) and for
// the learnedopt_emu ops of the CUDA emulation build (cuda/emulation/registration.cpp).
#pragma once

#include <torch/library.h>

namespace learnedopt {

inline void define_ops(torch::Library& m) {
  // One LSTM cell applied independently to N coordinates with shared weights.
  // x [N, I], h [N, H], c [N, H], w_ih [4H, I], w_hh [4H, H], b [4H]; gate order (i, f, g, o)
  // as torch.nn.LSTMCell, with one bias b (= b_ih + b_hh of nn.LSTMCell).
  m.def("coord_lstm(Tensor x, Tensor h, Tensor c, Tensor w_ih, Tensor w_hh, Tensor b) -> (Tensor, Tensor)");
  // Gradients of coord_lstm: (dx, dh, dc, dw_ih, dw_hh, db). Recomputes the gates from the inputs.
  m.def(
      "coord_lstm_backward(Tensor grad_h_new, Tensor grad_c_new, Tensor x, Tensor h, Tensor c, "
      "Tensor w_ih, Tensor w_hh, Tensor b) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // A stack of L cells (layer l > 0 takes layer l-1's new h as input) and a linear read-out
  // y = h_new[L-1] w_out^T + b_out. Returns (y [N, O], h_new list, c_new list).
  m.def(
      "coord_lstm_stack(Tensor x, Tensor[] h, Tensor[] c, Tensor[] w_ih, Tensor[] w_hh, Tensor[] b, "
      "Tensor w_out, Tensor b_out) -> (Tensor, Tensor[], Tensor[])");
  // Gradients of coord_lstm_stack:
  // (dx, dh list, dc list, dw_ih list, dw_hh list, db list, dw_out, db_out).
  m.def(
      "coord_lstm_stack_backward(Tensor grad_y, Tensor[] grad_h_new, Tensor[] grad_c_new, Tensor x, "
      "Tensor[] h, Tensor[] c, Tensor[] w_ih, Tensor[] w_hh, Tensor[] b, Tensor w_out, Tensor b_out) "
      "-> (Tensor, Tensor[], Tensor[], Tensor[], Tensor[], Tensor[], Tensor, Tensor)");
  // One step of the L2L optimizer (Andrychowicz et al. 2016) on a list of parameters, in place.
  // For each parameter p with gradient g and state s ([numel, 2 * sum(H)]: per coordinate h_0, c_0,
  // h_1, c_1, ... of the layers; float32, or float64 for float64 parameters):
  //   g' = g / grad_scale + weight_decay * p;  x = log_sign ? (log|g'|/p_pre, sign g') : g'
  //   (y, h', c') = coord_lstm_stack(x, h, c, w_ih, w_hh, b, w_out [1, H_top], b_out [1])
  //   p += lr * update_scale * y;  s <- (h', c')
  // A parameter whose g' holds a NaN or inf is left alone, and so is its state; a nonzero
  // found_inf (torch.amp.GradScaler) skips the whole step. No host synchronisation on CUDA.
  m.def(
      "l2l_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] states, Tensor[] w_ih, Tensor[] w_hh, "
      "Tensor[] b, Tensor w_out, Tensor b_out, float lr, float weight_decay, float update_scale, "
      "float p, bool log_sign, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // One step of the hierarchical optimizer (Wichrowska et al. 2017), per-coordinate part, in place.
  // For each parameter p (gradient g, state s [32, numel]: rows of csrc/hier_math.h; float32 or
  // bfloat16, float64 for float64 parameters): the momenta, mean squares, features, LSTM cell (gate
  // bias: weights' b + coord_bias[i]), read-outs and new log-lr of every coordinate (state rows
  // updated, u = exp(step log-lr + offset) * d), then p -= lrs[i] / sqrt(mean(d^2) + 1e-16) * u.
  // weights: HierarchicalNet.packed_coord_weights(); mean_log_lr: the problem's mean log-lr.
  // Returns sums [num_params, 25] (float32): per parameter sum of h' (10), of the features (12), of
  // d^2, of the new log-lr, and 1 if it stepped (0: skipped). A parameter whose g / grad_scale holds a
  // NaN or inf is skipped with its state; a nonzero found_inf skips every parameter. No host sync on CUDA.
  m.def(
      "hier_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] states, Tensor coord_bias, "
      "Tensor mean_log_lr, Tensor weights, float[] lrs, Tensor? grad_scale=None, Tensor? found_inf=None) -> Tensor");
}

}  // namespace learnedopt
