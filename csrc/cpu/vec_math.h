// MathOps for at::vec::Vectorized, so the per-element maths of lstm_math.h runs on SIMD vectors
// in the CPU kernels (SLEEF exp/tanh, 1 ulp).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "lstm_math.h"

namespace learnedopt {

template <typename S>
struct MathOps<at::vec::Vectorized<S>> {
  using V = at::vec::Vectorized<S>;
  static C10_ALWAYS_INLINE V exp(const V& x) { return x.exp(); }
  static C10_ALWAYS_INLINE V tanh(const V& x) { return x.tanh(); }
};

}  // namespace learnedopt
