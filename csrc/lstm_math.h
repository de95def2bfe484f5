// Per-element maths of the coordinatewise LSTM cell, shared by the CPU and CUDA kernels.
//
// One definition per formula. Every function is a template on the value type T, which is
// float or double on both CPU and CUDA, and at::vec::Vectorized<float/double> in the CPU
// kernels (see cpu/vec_math.h for the MathOps specialisation that makes that work).
//
// Gate order is (i, f, g, o), exactly as torch.nn.LSTMCell:
//   i = sigmoid(z_i)  f = sigmoid(z_f)  g = tanh(z_g)  o = sigmoid(z_o)
//   c' = f * c + i * g
//   h' = o * tanh(c')
// where z = x W_ih^T + h W_hh^T + b (one bias; nn.LSTMCell's b_ih + b_hh folded into it).
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>

namespace learnedopt {

// Transcendentals used by the cell. Specialised for SIMD vector types in the CPU kernels.
template <typename T>
struct MathOps;

template <>
struct MathOps<float> {
  static C10_HOST_DEVICE C10_ALWAYS_INLINE float exp(float x) { return ::expf(x); }
  static C10_HOST_DEVICE C10_ALWAYS_INLINE float tanh(float x) { return ::tanhf(x); }
  // exp(-x) overflows to inf for x < -88, giving 0.
  static C10_HOST_DEVICE C10_ALWAYS_INLINE float sigmoid(float x) { return 1.0f / (1.0f + ::expf(-x)); }
  static C10_HOST_DEVICE C10_ALWAYS_INLINE float log(float x) { return ::logf(x); }
  static C10_HOST_DEVICE C10_ALWAYS_INLINE float sqrt(float x) { return ::sqrtf(x); }
  static C10_HOST_DEVICE C10_ALWAYS_INLINE float abs(float x) { return ::fabsf(x); }
  static C10_HOST_DEVICE C10_ALWAYS_INLINE float copysign(float x, float s) { return ::copysignf(x, s); }
  static C10_HOST_DEVICE C10_ALWAYS_INLINE float min(float a, float b) { return a < b ? a : b; }
  static C10_HOST_DEVICE C10_ALWAYS_INLINE float max(float a, float b) { return a > b ? a : b; }
};

template <>
struct MathOps<double> {
  static C10_HOST_DEVICE C10_ALWAYS_INLINE double exp(double x) { return ::exp(x); }
  static C10_HOST_DEVICE C10_ALWAYS_INLINE double tanh(double x) { return ::tanh(x); }
  // exp(-x) overflows to inf for x < -709, giving 0.
  static C10_HOST_DEVICE C10_ALWAYS_INLINE double sigmoid(double x) { return 1.0 / (1.0 + ::exp(-x)); }
  static C10_HOST_DEVICE C10_ALWAYS_INLINE double log(double x) { return ::log(x); }
  static C10_HOST_DEVICE C10_ALWAYS_INLINE double sqrt(double x) { return ::sqrt(x); }
  static C10_HOST_DEVICE C10_ALWAYS_INLINE double abs(double x) { return ::fabs(x); }
  static C10_HOST_DEVICE C10_ALWAYS_INLINE double copysign(double x, double s) { return ::copysign(x, s); }
  static C10_HOST_DEVICE C10_ALWAYS_INLINE double min(double a, double b) { return a < b ? a : b; }
  static C10_HOST_DEVICE C10_ALWAYS_INLINE double max(double a, double b) { return a > b ? a : b; }
};

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T lo_sigmoid(T x) {
  return MathOps<T>::sigmoid(x);
}

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T lo_tanh(T x) {
  return MathOps<T>::tanh(x);
}

// The activated gates and new cell of one LSTM unit; everything the backward pass needs.
template <typename T>
struct LstmUnit {
  T i, f, g, o;  // activated gates
  T c_new;       // c' = f c + i g
  T tanh_c_new;  // tanh(c')
  T h_new;       // h' = o tanh(c')
};

// Forward of one unit from its four pre-activations (z_i, z_f, z_g, z_o) and old cell c.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE LstmUnit<T> lstm_unit_forward(T zi, T zf, T zg, T zo, T c) {
  LstmUnit<T> u;
  u.i = lo_sigmoid(zi);
  u.f = lo_sigmoid(zf);
  u.g = lo_tanh(zg);
  u.o = lo_sigmoid(zo);
  u.c_new = u.f * c + u.i * u.g;
  u.tanh_c_new = lo_tanh(u.c_new);
  u.h_new = u.o * u.tanh_c_new;
  return u;
}

// Gradients of one unit: d(loss)/d(z_i, z_f, z_g, z_o) and d(loss)/dc (old cell), given the
// unit's forward values, its old cell c and the incoming gradients dh' and dc'.
template <typename T>
struct LstmUnitGrad {
  T dzi, dzf, dzg, dzo;
  T dc;
};

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE LstmUnitGrad<T> lstm_unit_backward(
    const LstmUnit<T>& u, T c, T dh_new, T dc_new) {
  LstmUnitGrad<T> d;
  const T one(1);
  // total gradient reaching c' (directly, and through h' = o tanh(c'))
  const T dct = dc_new + dh_new * u.o * (one - u.tanh_c_new * u.tanh_c_new);
  // Each product starts with its bounded factors (gates and their derivatives, <= 1 in magnitude),
  // so that no partial product overflows unless the result does: dzf's c * f (1 - f) is 0 for a
  // saturated forget gate whatever c is, where (dct * c) could first overflow to inf and then give
  // inf * 0 = NaN (a large cell with a large incoming gradient).
  d.dzi = dct * (u.g * (u.i * (one - u.i)));
  d.dzf = dct * (c * (u.f * (one - u.f)));
  d.dzg = dct * (u.i * (one - u.g * u.g));
  d.dzo = dh_new * (u.tanh_c_new * (u.o * (one - u.o)));
  d.dc = dct * u.f;
  return d;
}

// The gradient the L2L network reads: g' = g / grad_scale + weight_decay * p (inv_scale =
// 1 / grad_scale), in the compute type. One definition for the finiteness pass and the update pass of
// the CPU and CUDA step kernels.
template <typename acc_t, typename scalar_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE acc_t l2l_net_input_grad(scalar_t g, scalar_t p, acc_t inv_scale, acc_t weight_decay) {
  return static_cast<acc_t>(g) * inv_scale + weight_decay * static_cast<acc_t>(p);
}

// Gradient preprocessing of Andrychowicz et al. 2016, Appendix A: g becomes
//   (log|g| / p, sign g) if |g| >= e^-p,  (-1, e^p g) otherwise,
// computed branch-free as (max(log|g| / p, -1), clamp(e^p g, -1, 1)) (identical values; the official
// code's LogAndSign). exp_p = e^p. NaN stays NaN in both parts; g = 0 gives (-1, 0).
template <typename T>
struct LogSign {
  T log_part, sign_part;
};

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE LogSign<T> log_sign_preprocess(T g, T p, T exp_p) {
  LogSign<T> r;
  const T l = MathOps<T>::log(g < T(0) ? -g : g) / p;
  r.log_part = l < T(-1) ? T(-1) : l;  // comparisons with NaN are false: NaN passes through
  const T s = g * exp_p;
  r.sign_part = s > T(1) ? T(1) : (s < T(-1) ? T(-1) : s);
  return r;
}

}  // namespace learnedopt
