// Per-coordinate maths of the hierarchical learned optimizer (Wichrowska et al. 2017), shared by
// the CPU and CUDA kernels of learnedopt::hier_step_. The pure-PyTorch statement of the same maths
// is learnedopt/hierarchical.py (coord_step_reference); the constants and the layouts below must
// match it (tests compare the two over 100 steps).
//
// Every function is a template on the value type T: float or double on CPU and CUDA, and
// at::vec::Vectorized<float/double> in the CPU kernel (MathOps in cpu/vec_math.h).
#pragma once

#include <c10/macros/Macros.h>

#include "lstm_math.h"

// #pragma unroll for nvcc's device pass; host compilers unroll on their own.
#if defined(__CUDA_ARCH__)
#define LO_UNROLL _Pragma("unroll")
#define LO_NO_UNROLL _Pragma("unroll 1")
#else
#define LO_UNROLL
#define LO_NO_UNROLL
#endif

namespace learnedopt {
namespace hier {

constexpr int H = 10;          // per-coordinate LSTM hidden size
constexpr int S = 4;           // momentum timescales
constexpr int F = 3 * S;       // cell inputs: S scaled momenta, S-1 products, S log mean squares, 1 log-lr
constexpr int G4 = 4 * H;      // gate pre-activations (i, f, g, o)

// Rows of the per-coordinate state [ROWS, n] (learnedopt.hierarchical.Rows).
constexpr int R_H = 0;
constexpr int R_C = R_H + H;
constexpr int R_A = R_C + H;
constexpr int R_MS = R_A + S;
constexpr int R_BETA = R_MS + S;
constexpr int R_GAMMA = R_BETA + 1;
constexpr int R_LOG_LR = R_GAMMA + 1;
constexpr int R_U = R_LOG_LR + 1;  // exp(step log-lr + offset) * d: the step's unnormalised update
constexpr int ROWS = R_U + 1;      // 32

// Offsets into the packed weights (HierarchicalNet.packed_coord_weights).
constexpr int W_IH = 0;                // [4H, F] row-major
constexpr int W_HH = W_IH + G4 * F;    // [4H, H]
constexpr int W_B = W_HH + G4 * H;     // [4H]
constexpr int W_D = W_B + G4;          // [H]  direction read-out
constexpr int W_SC = W_D + H;          // [S]  gradient shortcut
constexpr int W_GAMMA = W_SC + S;      // [H]
constexpr int B_GAMMA = W_GAMMA + H;
constexpr int W_BETA = B_GAMMA + 1;    // [H]
constexpr int B_BETA = W_BETA + H;
constexpr int W_LR = B_BETA + 1;       // [H]
constexpr int B_LR = W_LR + H;
constexpr int LR_M = B_LR + 1;         // sigmoid(lr momentum logit)
constexpr int LR_OFFSET = LR_M + 1;
constexpr int NUM_WEIGHTS = LR_OFFSET + 1;

// Per-tensor sums a step returns (the tensor RNN's inputs and the direction's RMS):
// sum h' (H), sum features (F), sum d^2, sum new log-lr; then a "stepped" flag (1 or 0).
constexpr int K_H = 0;
constexpr int K_FEAT = H;
constexpr int K_D2 = H + F;
constexpr int K_LOG_LR = K_D2 + 1;
constexpr int K_STEPPED = K_LOG_LR + 1;
constexpr int K = K_STEPPED + 1;  // 25

constexpr double MAX_LOG_LR = 33.0;
constexpr double MS_EPS = 1e-12;
constexpr double RMS_EPS = 1e-16;
// Finite in, finite out: a gradient is saturated to [-GRAD_MAX, GRAD_MAX] before it enters the
// momenta, so every momentum is at most GRAD_MAX in magnitude and every square and mean square at
// most GRAD_MAX^2 = 1e36 (finite in float32 and bfloat16, whose maximum is ~3.4e38). The cell's inputs
// are scale-free (a / rms, log ms minus its mean over the timescales), so a gradient above 1e18 gives
// the inputs that exact arithmetic would give (to a relative ~(|history| / 1e18)^2): the saturation
// changes no result of an ordinary gradient and keeps those of an exploding one meaningful.
// (learnedopt.rules.hierarchical.GRAD_MAX is the same constant.)
constexpr double GRAD_MAX = 1e18;

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T clamp(T x, T lo, T hi) {
  return MathOps<T>::min(MathOps<T>::max(x, lo), hi);
}

// asinh(x) = sign(x) log(|x| + sqrt(x^2 + 1)) (absolute error ~1e-7 in float).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T asinh_(T x) {
  const T ax = MathOps<T>::abs(x);
  const T r = MathOps<T>::log(ax + MathOps<T>::sqrt(ax * ax + T(1)));
  return MathOps<T>::copysign(r, x);
}

// One coordinate's step. In: the gradient g (unscaled), its state st[ROWS] (u is not read), the
// per-tensor gate bias bias[4H] (b + the tensor/global injected bias), the problem's mean log-lr,
// the packed weights w (accessed as T(w[k])). Out: st[] (every row, u included), the cell inputs
// feat[F] and the direction d. W is any type with operator[](int) -> float/double.
template <typename T, typename W>
C10_HOST_DEVICE C10_ALWAYS_INLINE void coord_step(const W& w, const T* bias, T mean_log_lr, T g, T* st, T* feat,
                                                   T& d) {
  // 0. saturation (see GRAD_MAX); g is finite here (a non-finite gradient skips its tensor)
  g = clamp(g, T(-GRAD_MAX), T(GRAD_MAX));
  // 1. momenta at S timescales: beta_1 = beta, beta_{s+1} = sqrt(beta_s)
  T beta = st[R_BETA];
  const T gamma = st[R_GAMMA];
  T x[S];
  T log_ms[S];
  T mean_log_ms(0);
LO_UNROLL
  for (int s = 0; s < S; ++s) {
    if (s > 0) beta = MathOps<T>::sqrt(beta);
    const T a = (T(1) - beta) * g + beta * st[R_A + s];
    // 2. mean squares, scaled inputs
    const T ms = (T(1) - gamma) * (a * a + T(MS_EPS)) + gamma * st[R_MS + s];
    st[R_A + s] = a;
    st[R_MS + s] = ms;
    x[s] = asinh_(a / MathOps<T>::sqrt(ms + T(RMS_EPS)));
    log_ms[s] = MathOps<T>::log(ms + T(RMS_EPS));
    mean_log_ms = mean_log_ms + log_ms[s];
  }
  mean_log_ms = mean_log_ms * T(1.0 / S);
  // 3. features
LO_UNROLL
  for (int s = 0; s < S; ++s) feat[s] = x[s];
LO_UNROLL
  for (int s = 0; s < S - 1; ++s) feat[S + s] = x[s] * x[s + 1];
LO_UNROLL
  for (int s = 0; s < S; ++s) feat[2 * S - 1 + s] = log_ms[s] - mean_log_ms;
  const T log_lr = st[R_LOG_LR];
  feat[F - 1] = log_lr - mean_log_lr;
  // 4. the LSTM cell, unit by unit (gate rows j, H + j, 2H + j, 3H + j); each input is read once
  // for the four gates of a unit
  T h_new[H];
LO_NO_UNROLL
  for (int j = 0; j < H; ++j) {
    T z0 = bias[j], z1 = bias[H + j], z2 = bias[2 * H + j], z3 = bias[3 * H + j];
LO_UNROLL
    for (int k = 0; k < F; ++k) {
      const T v = feat[k];
      z0 = z0 + T(w[W_IH + j * F + k]) * v;
      z1 = z1 + T(w[W_IH + (H + j) * F + k]) * v;
      z2 = z2 + T(w[W_IH + (2 * H + j) * F + k]) * v;
      z3 = z3 + T(w[W_IH + (3 * H + j) * F + k]) * v;
    }
LO_UNROLL
    for (int k = 0; k < H; ++k) {
      const T v = st[R_H + k];
      z0 = z0 + T(w[W_HH + j * H + k]) * v;
      z1 = z1 + T(w[W_HH + (H + j) * H + k]) * v;
      z2 = z2 + T(w[W_HH + (2 * H + j) * H + k]) * v;
      z3 = z3 + T(w[W_HH + (3 * H + j) * H + k]) * v;
    }
    const LstmUnit<T> u = lstm_unit_forward(z0, z1, z2, z3, st[R_C + j]);
    st[R_C + j] = u.c_new;
    h_new[j] = u.h_new;
  }
  // 5. read-outs
  T dd(0), zg(w[B_GAMMA]), zb(w[B_BETA]), dl(w[B_LR]);
LO_UNROLL
  for (int j = 0; j < H; ++j) {
    st[R_H + j] = h_new[j];
    dd = dd + T(w[W_D + j]) * h_new[j];
    zg = zg + T(w[W_GAMMA + j]) * h_new[j];
    zb = zb + T(w[W_BETA + j]) * h_new[j];
    dl = dl + T(w[W_LR + j]) * h_new[j];
  }
LO_UNROLL
  for (int s = 0; s < S; ++s) dd = dd + T(w[W_SC + s]) * x[s];
  st[R_GAMMA] = lo_sigmoid(zg);
  st[R_BETA] = lo_sigmoid(zb);
  const T step_log_lr = clamp(log_lr + dl, T(-MAX_LOG_LR), T(MAX_LOG_LR));
  const T m(w[LR_M]);
  st[R_LOG_LR] = m * log_lr + (T(1) - m) * step_log_lr;
  st[R_U] = MathOps<T>::exp(step_log_lr + T(w[LR_OFFSET])) * dd;
  d = dd;
}

}  // namespace hier
}  // namespace learnedopt
