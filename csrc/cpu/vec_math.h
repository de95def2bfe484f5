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
  static C10_ALWAYS_INLINE V sigmoid(const V& x) { return V(S(1)) / (V(S(1)) + exp(V(S(0)) - x)); }
};

// float: the transcendentals are most of the CPU time of the cell (5 per unit and coordinate).
// exp is at::vec's exp_u20 (a degree-5 polynomial, <= 20 ulp ~ 2.4e-6 relative; SLEEF's 1-ulp exp
// took 3x longer), with NaN passed through (exp_u20 alone would turn NaN into a large finite number).
// tanh is a rational function, x P(x^2) / Q(x^2) with P, Q of degree 4 in x^2, on x clamped to
// [-9, 9] (tanh rounds to +-1 in float from 8.7 on): 9 FMAs and one divide, no exp, no branch.
// Its relative error, measured in float32 over [-12, 12] and tiny |x|, is <= 3.4e-7 (~3 ulp); |tanh|
// can exceed 1 by at most 2 ulp. The coefficients are a least-squares fit of the relative error
// with Lawson reweighting towards minimax (docs/fit_tanh.py), rounded to float.
// sigmoid(x) = 1/2 + tanh(x/2)/2 then costs no exp either; its absolute error is <= 2e-7 (it is
// not accurate relative to tiny values: sigmoid(-20) gives 0, which no consumer here minds).
// NaN stays NaN (min/max propagate it); +-inf gives +-1 (and 0, 1 for sigmoid).
template <>
struct MathOps<at::vec::Vectorized<float>> : VecCommonOps<at::vec::Vectorized<float>> {
  using V = at::vec::Vectorized<float>;
  static C10_ALWAYS_INLINE V exp(const V& x) { return V::blendv(x.exp_u20(), x, x.isnan()); }
  static C10_ALWAYS_INLINE V tanh(const V& x) {
    const V xc = at::vec::minimum(at::vec::maximum(x, V(-9.0f)), V(9.0f));
    const V y = xc * xc;
    const V p = at::vec::fmadd(
        at::vec::fmadd(at::vec::fmadd(at::vec::fmadd(V(1.336228461e-08f), y, V(2.061468149e-05f)), y,
                                      V(3.495932324e-03f)),
                       y, V(1.338131726e-01f)),
        y, V(1.0f));
    const V q = at::vec::fmadd(
        at::vec::fmadd(at::vec::fmadd(at::vec::fmadd(V(7.779707403e-07f), y, V(3.286194988e-04f)), y,
                                      V(2.587829530e-02f)),
                       y, V(4.671463370e-01f)),
        y, V(1.0f));
    return xc * p / q;
  }
  static C10_ALWAYS_INLINE V sigmoid(const V& x) {
    const V half(0.5f);
    return at::vec::fmadd(half, tanh(half * x), half);
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
  static C10_ALWAYS_INLINE P sigmoid(const P& x) { return {M::sigmoid(x.lo), M::sigmoid(x.hi)}; }
  static C10_ALWAYS_INLINE P log(const P& x) { return {M::log(x.lo), M::log(x.hi)}; }
  static C10_ALWAYS_INLINE P sqrt(const P& x) { return {M::sqrt(x.lo), M::sqrt(x.hi)}; }
  static C10_ALWAYS_INLINE P abs(const P& x) { return {M::abs(x.lo), M::abs(x.hi)}; }
  static C10_ALWAYS_INLINE P copysign(const P& x, const P& s) { return {M::copysign(x.lo, s.lo), M::copysign(x.hi, s.hi)}; }
  static C10_ALWAYS_INLINE P min(const P& a, const P& b) { return {M::min(a.lo, b.lo), M::min(a.hi, b.hi)}; }
  static C10_ALWAYS_INLINE P max(const P& a, const P& b) { return {M::max(a.lo, b.lo), M::max(a.hi, b.hi)}; }
};

}  // namespace learnedopt
