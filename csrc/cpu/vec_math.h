// MathOps for at::vec::Vectorized, so the per-element maths of lstm_math.h runs on SIMD vectors
// in the CPU kernels.
#pragma once

#include <ATen/cpu/vec/vec.h>

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
