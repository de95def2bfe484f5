// MathOps for at::vec::Vectorized, so the per-element maths of lstm_math.h runs on SIMD vectors
// in the CPU kernels.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "lstm_math.h"

namespace learnedopt {

// Operations every vector type shares (the hierarchical optimizer's maths needs them).
template <typename V>
struct VecCommonOps {
  static C10_ALWAYS_INLINE V log(const V& x) { return x.log(); }
  static C10_ALWAYS_INLINE V sqrt(const V& x) { return x.sqrt(); }
  static C10_ALWAYS_INLINE V abs(const V& x) { return x.abs(); }
  static C10_ALWAYS_INLINE V copysign(const V& x, const V& s) { return x.copysign(s); }
  static C10_ALWAYS_INLINE V min(const V& a, const V& b) { return at::vec::minimum(a, b); }
  static C10_ALWAYS_INLINE V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
};

template <typename S>
struct MathOps<at::vec::Vectorized<S>> : VecCommonOps<at::vec::Vectorized<S>> {
  using V = at::vec::Vectorized<S>;
  // SLEEF, 1 ulp.
  static C10_ALWAYS_INLINE V exp(const V& x) { return x.exp(); }
  static C10_ALWAYS_INLINE V tanh(const V& x) { return x.tanh(); }
};

// float: the transcendentals are most of the CPU time of the cell (5 per unit and coordinate).
// exp is at::vec's exp_u20 (a degree-5 polynomial, <= 20 ulp ~ 2.4e-6 relative; SLEEF's 1-ulp exp
// took 3x longer), with NaN passed through (exp_u20 alone would turn NaN into a large finite number).
// SLEEF's tanh (and expm1) cost several times its exp, so tanh is built from one exp:
//   |x| >= 1/4: tanh|x| = (1 - e) / (1 + e), e = exp(-2|x|) in (0, 0.61]: no overflow, no
//               cancellation to speak of (relative error ~ 3 ulp);
//   |x| <  1/4: the odd Taylor series to x^9 (truncation < 1e-8 relative).
// NaN stays NaN (it takes the first branch); +-inf gives +-1.
template <>
struct MathOps<at::vec::Vectorized<float>> : VecCommonOps<at::vec::Vectorized<float>> {
  using V = at::vec::Vectorized<float>;
  static C10_ALWAYS_INLINE V exp(const V& x) { return V::blendv(x.exp_u20(), x, x.isnan()); }
  static C10_ALWAYS_INLINE V tanh(const V& x) {
    const V one(1.0f);
    const V t = x.abs();
    const V e = exp(V(0.0f) - (t + t));
    const V big = (one - e) / (one + e);
    const V signed_big = V::blendv(big, V(0.0f) - big, x < V(0.0f));
    const V x2 = x * x;
    const V poly =
        x * (one + x2 * (V(-1.0f / 3) + x2 * (V(2.0f / 15) + x2 * (V(-17.0f / 315) + x2 * V(62.0f / 2835)))));
    return V::blendv(signed_big, poly, t < V(0.25f));
  }
};

}  // namespace learnedopt

namespace learnedopt {

// Two SIMD vectors that act as one of twice the width: the per-coordinate maths written for one
// vector (hier_math.h's coord_step) then runs on two independent vectors interleaved. A scalar
// LSTM unit has only 4 accumulators (its gates), each a chain of dependent FMAs; on two vectors
// there are 8 chains, enough to keep two FMA pipes of 4-cycle latency busy, every broadcast weight
// load feeds two FMAs, and the activations' exp/divide chains overlap pairwise. Element for element
// it computes exactly what one vector would.
template <typename V>
struct VecPair {
  V lo, hi;
  VecPair() = default;
  C10_ALWAYS_INLINE VecPair(const V& a, const V& b) : lo(a), hi(b) {}
  C10_ALWAYS_INLINE VecPair(const V& x) : lo(x), hi(x) {}  // NOLINT: a broadcast vector (the weights)
  template <typename S, typename = std::enable_if_t<std::is_arithmetic_v<S>>>
  C10_ALWAYS_INLINE VecPair(S s) : lo(typename V::value_type(s)), hi(typename V::value_type(s)) {}  // NOLINT
  static constexpr int64_t size() { return 2 * V::size(); }
  static C10_ALWAYS_INLINE VecPair loadu(const typename V::value_type* p) { return {V::loadu(p), V::loadu(p + V::size())}; }
  C10_ALWAYS_INLINE void store(typename V::value_type* p) const {
    lo.store(p);
    hi.store(p + V::size());
  }
};

#define LO_PAIR_OP(op)                                                                        \
  template <typename V>                                                                       \
  C10_ALWAYS_INLINE VecPair<V> operator op(const VecPair<V>& a, const VecPair<V>& b) {        \
    return {a.lo op b.lo, a.hi op b.hi};                                                      \
  }
LO_PAIR_OP(+)
LO_PAIR_OP(-)
LO_PAIR_OP(*)
LO_PAIR_OP(/)
#undef LO_PAIR_OP

template <typename V>
struct MathOps<VecPair<V>> {
  using P = VecPair<V>;
  using M = MathOps<V>;
  static C10_ALWAYS_INLINE P exp(const P& x) { return {M::exp(x.lo), M::exp(x.hi)}; }
  static C10_ALWAYS_INLINE P tanh(const P& x) { return {M::tanh(x.lo), M::tanh(x.hi)}; }
  static C10_ALWAYS_INLINE P log(const P& x) { return {M::log(x.lo), M::log(x.hi)}; }
  static C10_ALWAYS_INLINE P sqrt(const P& x) { return {M::sqrt(x.lo), M::sqrt(x.hi)}; }
  static C10_ALWAYS_INLINE P abs(const P& x) { return {M::abs(x.lo), M::abs(x.hi)}; }
  static C10_ALWAYS_INLINE P copysign(const P& x, const P& s) { return {M::copysign(x.lo, s.lo), M::copysign(x.hi, s.hi)}; }
  static C10_ALWAYS_INLINE P min(const P& a, const P& b) { return {M::min(a.lo, b.lo), M::min(a.hi, b.hi)}; }
  static C10_ALWAYS_INLINE P max(const P& a, const P& b) { return {M::max(a.lo, b.lo), M::max(a.hi, b.hi)}; }
};

}  // namespace learnedopt
