// Host-side argument checks shared by the CPU and CUDA implementations of every op.
// Each failure is a TORCH_CHECK whose message names the op, the argument, what was expected and
// what came.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace learnedopt {

// Indices of the non-empty parameters of each floating dtype present (float, double, half,
// bfloat16, in that order): the groups the optimizer step kernels work on.
inline std::vector<std::pair<at::ScalarType, std::vector<int64_t>>> nonempty_params_by_dtype(at::TensorList params) {
  std::vector<std::pair<at::ScalarType, std::vector<int64_t>>> groups;
  for (const auto dt : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    std::vector<int64_t> idx;
    for (size_t i = 0; i < params.size(); ++i)
      if (params[i].numel() > 0 && params[i].scalar_type() == dt) idx.push_back(int64_t(i));
    if (!idx.empty()) groups.emplace_back(dt, std::move(idx));
  }
  return groups;
}

// Sizes of one coordinatewise LSTM layer.
struct CellDims {
  int64_t N;  // coordinates
  int64_t I;  // input size
  int64_t H;  // hidden size
};

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (d) s += ", ";
    s += std::to_string(t.size(d));
  }
  return s + "]";
}

inline std::string indexed(const char* name, int64_t layer) {
  return layer < 0 ? std::string(name) : std::string(name) + "[" + std::to_string(layer) + "]";
}

inline void check_defined(const char* op, const std::string& name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got an undefined tensor (None)");
}

inline void check_shape(const char* op, const std::string& name, const at::Tensor& t,
                        std::vector<int64_t> expected, const char* meaning) {
  check_defined(op, name, t);
  TORCH_CHECK(t.sizes().vec() == expected, op, ": ", name, " must have shape ", meaning, " = ",
              c10::IntArrayRef(expected), ", got ", shape_str(t));
}

// Every tensor of an op lives on the device of the first one and has one of the allowed dtypes.
// x/h/c ("state") share one dtype; weights share the state's dtype, or are float32 when the state is
// a 16-bit type on CUDA (compute is always in float32 or float64).
inline void check_device(const char* op, const std::string& name, const at::Tensor& t,
                         const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the same device as ",
              ref_name, " (", ref.device(), "), got ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor, got layout ",
              t.layout());
}

// Whether t is where the CUDA kernels run: a CUDA tensor; in the emulation build of csrc/cuda
// (LEARNEDOPT_CUDA_EMULATION, csrc/cuda/emulation), the CPU tensors the emulated kernels are given.
inline bool on_cuda_kernels_device(const at::Tensor& t) {
#ifdef LEARNEDOPT_CUDA_EMULATION
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

inline void check_state_dtype(const char* op, const std::string& name, const at::Tensor& t) {
  const auto st = t.scalar_type();
  if (on_cuda_kernels_device(t)) {
    TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op,
                ": ", name, " must be float32, float64, bfloat16 or float16 on CUDA, got ", st);
  } else {
    TORCH_CHECK(st == at::kFloat || st == at::kDouble, op, ": ", name,
                " must be float32 or float64 on CPU, got ", st);
  }
}

inline void check_same_dtype(const char* op, const std::string& name, const at::Tensor& t,
                             const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_weight_dtype(const char* op, const std::string& name, const at::Tensor& w,
                               const at::Tensor& x) {
  const bool low = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  TORCH_CHECK(w.scalar_type() == x.scalar_type() || (low && w.scalar_type() == at::kFloat), op, ": ",
              name, " must have the dtype of x (", x.scalar_type(), ")",
              low ? " or float32" : "", ", got ", w.scalar_type());
}

// Checks one layer: h, c [N, H]; w_ih [4H, I]; w_hh [4H, H]; b [4H]. `layer` < 0 for the
// single-cell op (names without an index). `x` is the op's input, the reference for device/dtype.
inline CellDims check_layer(const char* op, int64_t layer, int64_t N, int64_t I, const at::Tensor& x,
                            const at::Tensor& h, const at::Tensor& c, const at::Tensor& w_ih,
                            const at::Tensor& w_hh, const at::Tensor& b) {
  const auto hn = indexed("h", layer);
  check_defined(op, hn, h);
  TORCH_CHECK(h.dim() == 2, op, ": ", hn, " must be a 2-D tensor [N, H], got a ", h.dim(),
              "-D tensor of shape ", shape_str(h));
  TORCH_CHECK(h.size(0) == N, op, ": ", hn, " must have N = ", N, " rows (the rows of x), got shape ",
              shape_str(h));
  const int64_t H = h.size(1);
  TORCH_CHECK(H >= 1, op, ": ", hn, " must have a hidden size H >= 1, got shape ", shape_str(h));
  check_shape(op, indexed("c", layer), c, {N, H}, "[N, H]");
  check_shape(op, indexed("w_ih", layer), w_ih, {4 * H, I}, "[4*H, I]");
  check_shape(op, indexed("w_hh", layer), w_hh, {4 * H, H}, "[4*H, H]");
  check_shape(op, indexed("b", layer), b, {4 * H}, "[4*H]");
  for (auto& [name, t] : std::vector<std::pair<std::string, const at::Tensor*>>{
           {hn, &h}, {indexed("c", layer), &c}}) {
    check_device(op, name, *t, x, "x");
    check_same_dtype(op, name, *t, x, "x");
  }
  for (auto& [name, t] : std::vector<std::pair<std::string, const at::Tensor*>>{
           {indexed("w_ih", layer), &w_ih}, {indexed("w_hh", layer), &w_hh}, {indexed("b", layer), &b}}) {
    check_device(op, name, *t, x, "x");
    check_weight_dtype(op, name, *t, x);
  }
  TORCH_CHECK(w_ih.scalar_type() == w_hh.scalar_type() && w_ih.scalar_type() == b.scalar_type(), op,
              ": ", indexed("w_ih", layer), ", ", indexed("w_hh", layer), " and ", indexed("b", layer),
              " must share one dtype, got ", w_ih.scalar_type(), ", ", w_hh.scalar_type(), " and ",
              b.scalar_type());
  return {N, I, H};
}

inline void check_input(const char* op, const at::Tensor& x) {
  check_defined(op, "x", x);
  TORCH_CHECK(x.dim() == 2, op, ": x must be a 2-D tensor [N, I], got a ", x.dim(),
              "-D tensor of shape ", shape_str(x));
  TORCH_CHECK(x.size(1) >= 1, op, ": x must have an input size I >= 1, got shape ", shape_str(x));
  TORCH_CHECK(x.layout() == at::kStrided, op, ": x must be a dense (strided) tensor, got layout ",
              x.layout());
  check_state_dtype(op, "x", x);
}

// The single-cell op.
inline CellDims check_cell(const char* op, const at::Tensor& x, const at::Tensor& h,
                           const at::Tensor& c, const at::Tensor& w_ih, const at::Tensor& w_hh,
                           const at::Tensor& b) {
  check_input(op, x);
  return check_layer(op, -1, x.size(0), x.size(1), x, h, c, w_ih, w_hh, b);
}

// Incoming gradient of an output: same shape/device/dtype as the output it belongs to.
inline void check_grad(const char* op, const std::string& name, const at::Tensor& g,
                       const at::Tensor& like, const char* like_name) {
  check_defined(op, name, g);
  TORCH_CHECK(g.sizes() == like.sizes(), op, ": ", name, " must have the shape of ", like_name, " ",
              shape_str(like), ", got ", shape_str(g));
  check_device(op, name, g, like, like_name);
  check_same_dtype(op, name, g, like, like_name);
}

// The multi-layer op: L layers (all lists of length L >= 1), read-out w_out [O, H_last], b_out [O].
inline std::vector<CellDims> check_stack(const char* op, const at::Tensor& x, at::TensorList h,
                                         at::TensorList c, at::TensorList w_ih, at::TensorList w_hh,
                                         at::TensorList b, const at::Tensor& w_out,
                                         const at::Tensor& b_out) {
  check_input(op, x);
  const int64_t L = static_cast<int64_t>(h.size());
  TORCH_CHECK(L >= 1, op, ": h must hold one tensor per layer (at least one layer), got an empty list");
  TORCH_CHECK(static_cast<int64_t>(c.size()) == L && static_cast<int64_t>(w_ih.size()) == L &&
                  static_cast<int64_t>(w_hh.size()) == L && static_cast<int64_t>(b.size()) == L,
              op, ": h, c, w_ih, w_hh and b must all hold one tensor per layer, got lengths ", h.size(),
              ", ", c.size(), ", ", w_ih.size(), ", ", w_hh.size(), " and ", b.size());
  std::vector<CellDims> dims;
  int64_t I = x.size(1);
  for (int64_t l = 0; l < L; ++l) {
    dims.push_back(check_layer(op, l, x.size(0), I, x, h[l], c[l], w_ih[l], w_hh[l], b[l]));
    I = dims.back().H;
  }
  check_defined(op, "w_out", w_out);
  TORCH_CHECK(w_out.dim() == 2 && w_out.size(1) == I && w_out.size(0) >= 1, op,
              ": w_out must have shape [O, H_last] with O >= 1 and H_last = ", I,
              " (the hidden size of the last layer), got ", shape_str(w_out));
  check_shape(op, "b_out", b_out, {w_out.size(0)}, "[O]");
  check_device(op, "w_out", w_out, x, "x");
  check_device(op, "b_out", b_out, x, "x");
  check_weight_dtype(op, "w_out", w_out, x);
  check_same_dtype(op, "b_out", b_out, w_out, "w_out");
  return dims;
}

// The backward of the single-cell op: the cell's checks plus the incoming gradients of h', c'.
inline CellDims check_cell_backward(const char* op, const at::Tensor& grad_h_new, const at::Tensor& grad_c_new,
                                    const at::Tensor& x, const at::Tensor& h, const at::Tensor& c,
                                    const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& b) {
  const auto d = check_cell(op, x, h, c, w_ih, w_hh, b);
  check_grad(op, "grad_h_new", grad_h_new, h, "h");
  check_grad(op, "grad_c_new", grad_c_new, c, "c");
  return d;
}

// The backward of the multi-layer op: the stack's checks plus grad_y [N, O] and one incoming
// gradient per layer for h' and c'.
inline std::vector<CellDims> check_stack_backward(const char* op, const at::Tensor& grad_y,
                                                  at::TensorList grad_h_new, at::TensorList grad_c_new,
                                                  const at::Tensor& x, at::TensorList h, at::TensorList c,
                                                  at::TensorList w_ih, at::TensorList w_hh, at::TensorList b,
                                                  const at::Tensor& w_out, const at::Tensor& b_out) {
  auto dims = check_stack(op, x, h, c, w_ih, w_hh, b, w_out, b_out);
  const int64_t N = x.size(0), nL = static_cast<int64_t>(dims.size());
  check_defined(op, "grad_y", grad_y);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == N && grad_y.size(1) == w_out.size(0), op,
              ": grad_y must have shape [N, O] = [", N, ", ", w_out.size(0), "], got ", shape_str(grad_y));
  check_device(op, "grad_y", grad_y, x, "x");
  check_same_dtype(op, "grad_y", grad_y, x, "x");
  TORCH_CHECK(static_cast<int64_t>(grad_h_new.size()) == nL && static_cast<int64_t>(grad_c_new.size()) == nL,
              op, ": grad_h_new and grad_c_new must hold one tensor per layer (", nL, "), got lengths ",
              grad_h_new.size(), " and ", grad_c_new.size());
  for (int64_t l = 0; l < nL; ++l) {
    check_grad(op, indexed("grad_h_new", l), grad_h_new[l], h[l], indexed("h", l).c_str());
    check_grad(op, indexed("grad_c_new", l), grad_c_new[l], c[l], indexed("c", l).c_str());
  }
  return dims;
}

// GradScaler's grad_scale / found_inf of a fused step: absent, or one element on the parameters' device.
inline void check_amp_scalars(const char* op, const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf, const at::Device& device) {
  for (const auto& [name, t] : {std::pair<const char*, const std::optional<at::Tensor>*>{"grad_scale", &grad_scale},
                                {"found_inf", &found_inf}}) {
    if (t->has_value() && (*t)->defined())
      TORCH_CHECK((*t)->numel() == 1 && (*t)->device() == device, op, ": ", name, " must be a one-element tensor on ",
                  device, " (the parameters' device), got ", (*t)->numel(), " elements on ", (*t)->device());
  }
}

// The L2L optimizer step: parameters with their gradients and states, and the network's weights.
// Returns the dims of each layer (N unused: 0); the state of a parameter is [numel, 2 * sum(H)].
inline std::vector<CellDims> check_l2l_step(const char* op, at::TensorList params, at::TensorList grads,
                                            at::TensorList states, at::TensorList w_ih, at::TensorList w_hh,
                                            at::TensorList b, const at::Tensor& w_out, const at::Tensor& b_out,
                                            bool log_sign) {
  TORCH_CHECK(grads.size() == params.size() && states.size() == params.size(), op,
              ": params, grads and states must have one entry per parameter, got lengths ", params.size(), ", ",
              grads.size(), " and ", states.size());
  TORCH_CHECK(w_hh.size() == w_ih.size() && b.size() == w_ih.size(), op,
              ": w_ih, w_hh and b must hold one tensor per layer, got lengths ", w_ih.size(), ", ", w_hh.size(),
              " and ", b.size());
  std::vector<CellDims> dims;
  int64_t I = log_sign ? 2 : 1, width = 0;
  for (size_t l = 0; l < w_ih.size(); ++l) {
    check_defined(op, indexed("w_hh", l), w_hh[l]);
    TORCH_CHECK(w_hh[l].dim() == 2 && w_hh[l].size(1) >= 1 && w_hh[l].size(0) == 4 * w_hh[l].size(1), op, ": ",
                indexed("w_hh", l), " must have shape [4*H, H] with H >= 1, got ", shape_str(w_hh[l]));
    const int64_t H = w_hh[l].size(1);
    check_shape(op, indexed("w_ih", l), w_ih[l], {4 * H, I}, "[4*H, I]");
    check_shape(op, indexed("b", l), b[l], {4 * H}, "[4*H]");
    dims.push_back({0, I, H});
    I = H;
    width += 2 * H;
  }
  check_shape(op, "w_out", w_out, {1, I}, "[1, H_top] (H_top: the last layer's H, or the input size without layers)");
  check_shape(op, "b_out", b_out, {1}, "[1]");
  const auto& ref = w_out;
  for (size_t l = 0; l < w_ih.size(); ++l) {
    check_device(op, indexed("w_ih", l), w_ih[l], ref, "w_out");
    check_device(op, indexed("w_hh", l), w_hh[l], ref, "w_out");
    check_device(op, indexed("b", l), b[l], ref, "w_out");
  }
  check_device(op, "b_out", b_out, ref, "w_out");
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    const auto pn = indexed("params", i), gn = indexed("grads", i), sn = indexed("states", i);
    check_defined(op, pn, p);
    check_device(op, pn, p, ref, "w_out");
    TORCH_CHECK(at::isFloatingType(p.scalar_type()), op, ": ", pn, " must be a floating-point tensor, got ",
                p.scalar_type());
    const auto pdt = p.scalar_type();
    TORCH_CHECK(pdt == at::kFloat || pdt == at::kDouble || pdt == at::kHalf || pdt == at::kBFloat16, op, ": ", pn,
                " must be float32, float64, float16 or bfloat16, got ", pdt);
    check_defined(op, gn, grads[i]);
    TORCH_CHECK(grads[i].sizes() == p.sizes(), op, ": ", gn, " must have the shape of ", pn, " ", shape_str(p),
                ", got ", shape_str(grads[i]));
    check_device(op, gn, grads[i], p, pn.c_str());
    check_same_dtype(op, gn, grads[i], p, pn.c_str());
    const auto sdt = p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    check_defined(op, sn, states[i]);
    check_device(op, sn, states[i], p, pn.c_str());
    TORCH_CHECK(states[i].scalar_type() == sdt, op, ": ", sn, " must be ", sdt, " for a ", p.scalar_type(),
                " parameter, got ", states[i].scalar_type());
    check_shape(op, sn, states[i], {p.numel(), width}, "[numel, 2 * sum of hidden sizes]");
    TORCH_CHECK(states[i].is_contiguous(), op, ": ", sn, " must be contiguous");
  }
  return dims;
}

}  // namespace learnedopt

namespace learnedopt {

// The hierarchical optimizer step (learnedopt::hier_step_): per parameter its gradient and its state
// [rows, numel] (float32 or bfloat16; float64 for float64 parameters), contiguous; coord_bias
// [T, 4H] float32 (T = number of parameters), mean_log_lr a 0-dim float32 tensor, weights the packed
// float32 weights [num_weights], one lr per parameter.
inline void check_hier_step(const char* op, at::TensorList params, at::TensorList grads, at::TensorList states,
                            const at::Tensor& coord_bias, const at::Tensor& mean_log_lr, const at::Tensor& weights,
                            c10::ArrayRef<double> lrs, const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf, int64_t rows, int64_t gates,
                            int64_t num_weights) {
  const size_t T = params.size();
  TORCH_CHECK(grads.size() == T && states.size() == T && lrs.size() == T, op,
              ": params, grads, states and lrs must have one entry per parameter, got lengths ", T, ", ",
              grads.size(), ", ", states.size(), " and ", lrs.size());
  check_shape(op, "weights", weights, {num_weights}, "[num_weights] (HierarchicalNet.packed_coord_weights())");
  TORCH_CHECK(weights.scalar_type() == at::kFloat, op, ": weights must be float32, got ", weights.scalar_type());
  check_shape(op, "coord_bias", coord_bias, {int64_t(T), gates}, "[num_params, 4*H]");
  TORCH_CHECK(coord_bias.scalar_type() == at::kFloat, op, ": coord_bias must be float32, got ",
              coord_bias.scalar_type());
  check_device(op, "coord_bias", coord_bias, weights, "weights");
  check_shape(op, "mean_log_lr", mean_log_lr, {}, "[] (a 0-dim tensor)");
  TORCH_CHECK(mean_log_lr.scalar_type() == at::kFloat, op, ": mean_log_lr must be float32, got ",
              mean_log_lr.scalar_type());
  check_device(op, "mean_log_lr", mean_log_lr, weights, "weights");
  check_amp_scalars(op, grad_scale, found_inf, weights.device());
  for (size_t i = 0; i < T; ++i) {
    const auto& p = params[i];
    const auto pn = indexed("params", i), gn = indexed("grads", i), sn = indexed("states", i);
    check_defined(op, pn, p);
    check_device(op, pn, p, weights, "weights");
    const auto pdt = p.scalar_type();
    TORCH_CHECK(pdt == at::kFloat || pdt == at::kDouble || pdt == at::kHalf || pdt == at::kBFloat16, op, ": ", pn,
                " must be float32, float64, float16 or bfloat16, got ", pdt);
    check_defined(op, gn, grads[i]);
    TORCH_CHECK(grads[i].sizes() == p.sizes(), op, ": ", gn, " must have the shape of ", pn, " ", shape_str(p),
                ", got ", shape_str(grads[i]));
    check_device(op, gn, grads[i], p, pn.c_str());
    check_same_dtype(op, gn, grads[i], p, pn.c_str());
    check_defined(op, sn, states[i]);
    check_device(op, sn, states[i], p, pn.c_str());
    const auto sdt = states[i].scalar_type();
    if (p.scalar_type() == at::kDouble) {
      TORCH_CHECK(sdt == at::kDouble, op, ": ", sn, " must be float64 for a float64 parameter, got ", sdt);
    } else {
      TORCH_CHECK(sdt == at::kFloat || sdt == at::kBFloat16, op, ": ", sn, " must be float32 or bfloat16 for a ",
                  p.scalar_type(), " parameter, got ", sdt);
    }
    check_shape(op, sn, states[i], {rows, p.numel()}, "[rows, numel]");
    TORCH_CHECK(states[i].is_contiguous(), op, ": ", sn, " must be contiguous");
  }
}

}  // namespace learnedopt
