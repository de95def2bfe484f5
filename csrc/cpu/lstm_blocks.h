// Building blocks of the CPU kernels of the coordinatewise LSTM ops (coord_lstm_cpu.cpp) and of
// the optimizer steps that run the same network (l2l_step_cpu.cpp).
//
// The N coordinates are cut into blocks of a fixed number of rows B (it depends only on the hidden
// sizes, never on the thread count). Each block runs start to finish on one thread with its
// scratch in cache. Inside a block everything is kept "unit-major" (transposed, [units, B]) so the
// per-unit maths of lstm_math.h runs on full SIMD vectors along the coordinates:
//   gates^T [4H, B] = b + [W_ih | W_hh] [x | h]_blk^T         (BLAS, through at::addmm)
//   i, f, g, o, c', h' = lstm_unit_forward(...)               (at::vec, over the flat [H*B])
// except in float32 with AVX2, where fused_layer_forward_f32 does both 16 coordinates at a time
// with the gate sums in registers (these products, K = I + H, are too small for BLAS to pay off).
// The backward pass recomputes the gates of a block instead of storing them (4H numbers per
// coordinate), forms dz^T = dL/d(gates)^T, then dL/d[x | h] = dz [W_ih | W_hh] and the block's
// weight-gradient partials dz^T [x | h], sum(dz), each in its own slot. The partials are summed in
// block order at the end, so weight gradients are deterministic and independent of the thread
// count (no atomics, no thread-dependent reduction order).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/vec_math.h"
#include "ops.h"

namespace learnedopt {
namespace cpu {

using at::vec::Vectorized;

// Rows per block: the gate scratch of a block (4H x B) stays around 96 KB in float32 (MKL ran the
// block products fastest at a few hundred rows, measured for H = 20); a multiple
// of 16 so every row of a unit-major [units, B] tile starts on a vector boundary.
inline int64_t rows_per_block(int64_t max_H) {
  return std::clamp<int64_t>(24576 / (4 * max_H), 16, 512) / 16 * 16;
}

// Unit-major forward of one block: M = H*B values per gate. gates [4M] = (z_i, z_f, z_g, z_o)
// pre-activations in, activated (i, f, g, o) out (kKeepGates; else left as they were). c [M] in;
// c_new, h_new, tanh_c_new [M] out where non-null. An output may be c itself: each element of c
// is read before it is written.
template <typename scalar_t, bool kKeepGates = true>
inline void pointwise_forward(int64_t M, scalar_t* gates, const scalar_t* c, scalar_t* c_new, scalar_t* h_new,
                       scalar_t* tanh_c_new) {
  using V = Vectorized<scalar_t>;
  constexpr int64_t VS = V::size();
  scalar_t *zi = gates, *zf = gates + M, *zg = gates + 2 * M, *zo = gates + 3 * M;
  for (int64_t e = 0; e < M; e += VS) {
    const int64_t n = std::min<int64_t>(VS, M - e);
    const auto u = lstm_unit_forward(V::loadu(zi + e, n), V::loadu(zf + e, n), V::loadu(zg + e, n),
                                     V::loadu(zo + e, n), V::loadu(c + e, n));
    if constexpr (kKeepGates) {
      u.i.store(zi + e, n);
      u.f.store(zf + e, n);
      u.g.store(zg + e, n);
      u.o.store(zo + e, n);
    }
    if (c_new) u.c_new.store(c_new + e, n);
    if (h_new) u.h_new.store(h_new + e, n);
    if (tanh_c_new) u.tanh_c_new.store(tanh_c_new + e, n);
  }
}

#if defined(CPU_CAPABILITY_AVX2)
// Cell maths of one 16-coordinate chunk of a layer (fused_layer_forward_f32): gates [4H, 16]
// (pre-activations, unit-major) in; c_new, h_new out and, where non-null, the activated gates
// act [4H, ld B] and tanh_c_new; c and every output have row stride B; n0 + n1 valid coordinates.
// Not inlined: inlined, its constants stayed live in registers across the gate sums and pushed an
// accumulator to the stack.
template <bool kFull>
C10_NOINLINE void chunk_pointwise_f32(const float* gates, int64_t H, const float* c, float* c_new, float* h_new,
                                      float* act, float* tanh_c_new, int64_t B, int64_t n0, int64_t n1) {
  using V = Vectorized<float>;
  using P = VecPair<V>;  // the chunk's two vectors, their activation chains interleaved
  constexpr int64_t W = P::size();
  const auto load = [&](const float* ptr) { return kFull ? P::loadu(ptr) : P(V::loadu(ptr, n0), V::loadu(ptr + W / 2, n1)); };
  const auto store = [&](const P& v, float* ptr) {
    if (kFull) {
      v.store(ptr);
    } else {
      v.lo.store(ptr, n0);
      v.hi.store(ptr + W / 2, n1);
    }
  };
  const int64_t M = H * B;
  for (int64_t j = 0; j < H; ++j) {
    const float* gz = gates + j * W;
    const int64_t o = j * B;
    const auto u = lstm_unit_forward(P::loadu(gz), P::loadu(gz + W * H), P::loadu(gz + 2 * W * H),
                                     P::loadu(gz + 3 * W * H), load(c + o));
    store(u.c_new, c_new + o);
    store(u.h_new, h_new + o);
    if (act) {
      store(u.i, act + o);
      store(u.f, act + M + o);
      store(u.g, act + 2 * M + o);
      store(u.o, act + 3 * M + o);
    }
    if (tanh_c_new) store(u.tanh_c_new, tanh_c_new + o);
  }
}

// Fused forward of one layer in float32, unit-major, 16 coordinates at a time: for each unit j the
// four gate pre-activations b + W[g H + j, :] . z[:, e .. e+16) are summed in eight registers (k in
// order, one FMA per weight and vector) into a [4H, 16] gate tile that stays in L1, then the cell
// maths runs on the tile. Replaces a BLAS product [4H, K] x [K, B] and a pass over [4H, B] gates:
// with K = I + H = 22 or 40 the product is too small for BLAS to run near its peak.
// z [K, ld B]; c, c_new, h_new [H, ld B]; h_new may be c (each element is read before written);
// act [4H, ld B] (activated gates) and tanh_c_new [H, ld B] are written where non-null.
// gbuf: scratch of 4H * 16 floats.
inline void fused_layer_forward_f32(const float* w, const float* bias, int64_t H, int64_t K, const float* z, int64_t B,
                                    const float* c, float* c_new, float* h_new, float* gbuf, float* act = nullptr,
                                    float* tanh_c_new = nullptr) {
  using V = Vectorized<float>;
  constexpr int64_t VS = V::size();
  const auto gate_sums = [&](int64_t e, int64_t n0, int64_t n1, auto full) {
    constexpr bool kFull = decltype(full)::value;
    const auto load = [&](const float* ptr, int64_t n) { return kFull ? V::loadu(ptr) : V::loadu(ptr, n); };
    for (int64_t j = 0; j < H; ++j) {
      const float *w0 = w + j * K, *w1 = w + (H + j) * K, *w2 = w + (2 * H + j) * K, *w3 = w + (3 * H + j) * K;
      V a0(bias[j]), a1(bias[H + j]), a2(bias[2 * H + j]), a3(bias[3 * H + j]);
      V b0 = a0, b1 = a1, b2 = a2, b3 = a3;
      const float* zk = z + e;
      for (int64_t k = 0; k < K; ++k, zk += B) {
        const V x0 = load(zk, n0), x1 = load(zk + VS, n1);
        V t(w0[k]);
        a0 = at::vec::fmadd(t, x0, a0);
        b0 = at::vec::fmadd(t, x1, b0);
        t = V(w1[k]);
        a1 = at::vec::fmadd(t, x0, a1);
        b1 = at::vec::fmadd(t, x1, b1);
        t = V(w2[k]);
        a2 = at::vec::fmadd(t, x0, a2);
        b2 = at::vec::fmadd(t, x1, b2);
        t = V(w3[k]);
        a3 = at::vec::fmadd(t, x0, a3);
        b3 = at::vec::fmadd(t, x1, b3);
      }
      float* g = gbuf + j * 2 * VS;  // gate q of unit j: gbuf + (q H + j) 16
      a0.store(g);
      b0.store(g + VS);
      a1.store(g + 2 * VS * H);
      b1.store(g + 2 * VS * H + VS);
      a2.store(g + 4 * VS * H);
      b2.store(g + 4 * VS * H + VS);
      a3.store(g + 6 * VS * H);
      b3.store(g + 6 * VS * H + VS);
    }
  };
  int64_t e = 0;
  for (; e + 2 * VS <= B; e += 2 * VS) {
    gate_sums(e, VS, VS, std::true_type{});
    chunk_pointwise_f32<true>(gbuf, H, c + e, c_new + e, h_new + e, act ? act + e : nullptr,
                              tanh_c_new ? tanh_c_new + e : nullptr, B, VS, VS);
  }
  if (e < B) {
    const int64_t n = B - e, n0 = std::min(n, VS);
    gate_sums(e, n0, n - n0, std::false_type{});
    chunk_pointwise_f32<false>(gbuf, H, c + e, c_new + e, h_new + e, act ? act + e : nullptr,
                               tanh_c_new ? tanh_c_new + e : nullptr, B, n0, n - n0);
  }
}
#endif

// Unit-major backward of one block: from activated gates act [4M], old cell c, tanh(c_new) and the
// incoming dh_new, dc_new [M] to dz [4M] (gradient of the pre-activations) and dc [M].
template <typename scalar_t>
inline void pointwise_backward(int64_t M, const scalar_t* act, const scalar_t* c, const scalar_t* tanh_c_new,
                        const scalar_t* dh_new, const scalar_t* dc_new, scalar_t* dz, scalar_t* dc) {
  using V = Vectorized<scalar_t>;
  constexpr int64_t VS = V::size();
  for (int64_t e = 0; e < M; e += VS) {
    const int64_t n = std::min<int64_t>(VS, M - e);
    LstmUnit<V> u;
    u.i = V::loadu(act + e, n);
    u.f = V::loadu(act + M + e, n);
    u.g = V::loadu(act + 2 * M + e, n);
    u.o = V::loadu(act + 3 * M + e, n);
    u.tanh_c_new = V::loadu(tanh_c_new + e, n);
    const auto g = lstm_unit_backward(u, V::loadu(c + e, n), V::loadu(dh_new + e, n), V::loadu(dc_new + e, n));
    g.dzi.store(dz + e, n);
    g.dzf.store(dz + M + e, n);
    g.dzg.store(dz + 2 * M + e, n);
    g.dzo.store(dz + 3 * M + e, n);
    g.dc.store(dc + e, n);
  }
}

// Sums parts [nblocks, ...] over blocks, in block order, into out (shape parts.shape[1:]).
inline void sum_parts_in_order(const Tensor& parts, const Tensor& out) {
  const int64_t nb = parts.size(0);
  const int64_t M = out.numel();
  AT_DISPATCH_FLOATING_TYPES(parts.scalar_type(), "learnedopt_sum_parts", [&] {
    const scalar_t* p = parts.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, M, 256, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        scalar_t acc = 0;
        for (int64_t k = 0; k < nb; ++k) acc += p[k * M + m];
        o[m] = acc;
      }
    });
  });
}

// at::*_out take the output by non-const reference; these take views (rvalues) of larger tensors.
inline void mm_into(Tensor out, const Tensor& a, const Tensor& b) { at::mm_out(out, a, b); }
// out = self + a @ b
inline void addmm_into(Tensor out, const Tensor& self, const Tensor& a, const Tensor& b) { at::addmm_out(out, self, a, b); }
inline void add_into(Tensor out, const Tensor& a, const Tensor& b) { at::add_out(out, a, b); }
inline void copy_into(Tensor out, const Tensor& src) { out.copy_(src); }

// dst [C, R] (row stride ld_dst) = src^T, src [R, C] (row stride ld_src). Blocked 8 x 8 so both
// sides touch whole cache lines; at::copy_ of a transposed view went through a generic tiled path
// with a memcpy per row and was a fifth of the backward time.
#if defined(CPU_CAPABILITY_AVX2)
// The 4-wide edge tiles of a float transpose (a hidden size of 20 = 8 + 8 + 4 leaves one in every
// row of tiles; done element by element it made the narrow transposes of [N, 20] slices cost twice
// as much per byte as whole 8 x 8 tiles). Both use the in-lane 4 x 4 transpose of two 4 x 4 blocks
// held as [upper | lower] halves of four AVX registers.
// dst [4, 8] (row stride ld_dst) = src [8, 4]^T (row stride ld_src).
inline void transpose_8x4(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m256 t[4];
  for (int i = 0; i < 4; ++i)  // [row i | row i + 4]
    t[i] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(src + i * ld_src)),
                                _mm_loadu_ps(src + (i + 4) * ld_src), 1);
  const __m256 u0 = _mm256_unpacklo_ps(t[0], t[1]), u1 = _mm256_unpackhi_ps(t[0], t[1]);
  const __m256 u2 = _mm256_unpacklo_ps(t[2], t[3]), u3 = _mm256_unpackhi_ps(t[2], t[3]);
  _mm256_storeu_ps(dst, _mm256_shuffle_ps(u0, u2, _MM_SHUFFLE(1, 0, 1, 0)));
  _mm256_storeu_ps(dst + ld_dst, _mm256_shuffle_ps(u0, u2, _MM_SHUFFLE(3, 2, 3, 2)));
  _mm256_storeu_ps(dst + 2 * ld_dst, _mm256_shuffle_ps(u1, u3, _MM_SHUFFLE(1, 0, 1, 0)));
  _mm256_storeu_ps(dst + 3 * ld_dst, _mm256_shuffle_ps(u1, u3, _MM_SHUFFLE(3, 2, 3, 2)));
}
// dst [8, 4] (row stride ld_dst) = src [4, 8]^T (row stride ld_src).
inline void transpose_4x8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  const __m256 a0 = _mm256_loadu_ps(src), a1 = _mm256_loadu_ps(src + ld_src);
  const __m256 a2 = _mm256_loadu_ps(src + 2 * ld_src), a3 = _mm256_loadu_ps(src + 3 * ld_src);
  const __m256 u0 = _mm256_unpacklo_ps(a0, a1), u1 = _mm256_unpackhi_ps(a0, a1);
  const __m256 u2 = _mm256_unpacklo_ps(a2, a3), u3 = _mm256_unpackhi_ps(a2, a3);
  const __m256 k[4] = {_mm256_shuffle_ps(u0, u2, _MM_SHUFFLE(1, 0, 1, 0)), _mm256_shuffle_ps(u0, u2, _MM_SHUFFLE(3, 2, 3, 2)),
                       _mm256_shuffle_ps(u1, u3, _MM_SHUFFLE(1, 0, 1, 0)), _mm256_shuffle_ps(u1, u3, _MM_SHUFFLE(3, 2, 3, 2))};
  for (int i = 0; i < 4; ++i) {  // k[i] = [column i | column i + 4] of src = rows i, i + 4 of dst
    _mm_storeu_ps(dst + i * ld_dst, _mm256_castps256_ps128(k[i]));
    _mm_storeu_ps(dst + (i + 4) * ld_dst, _mm256_extractf128_ps(k[i], 1));
  }
}
#endif

template <typename scalar_t>
inline void transpose_block(const scalar_t* src, int64_t ld_src, scalar_t* dst, int64_t ld_dst, int64_t R, int64_t C) {
  constexpr int64_t T = 8;
  for (int64_t r0 = 0; r0 < R; r0 += T) {
    const int64_t r1 = std::min(R, r0 + T);
    for (int64_t c0 = 0; c0 < C; c0 += T) {
      const int64_t c1 = std::min(C, c0 + T);
      if (r1 - r0 == T && c1 - c0 == T) {  // a full tile: at::vec's (AVX2: in-register) 8 x 8 transpose
        at::vec::transpose_mxn<scalar_t, T, T>(src + r0 * ld_src + c0, ld_src, dst + c0 * ld_dst + r0, ld_dst);
        continue;
      }
#if defined(CPU_CAPABILITY_AVX2)
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (r1 - r0 == T && c1 - c0 == 4) {
          transpose_8x4(src + r0 * ld_src + c0, ld_src, dst + c0 * ld_dst + r0, ld_dst);
          continue;
        }
        if (r1 - r0 == 4 && c1 - c0 == T) {
          transpose_4x8(src + r0 * ld_src + c0, ld_src, dst + c0 * ld_dst + r0, ld_dst);
          continue;
        }
      }
#endif
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * ld_dst + r] = src[r * ld_src + c];
    }
  }
}

// Unit-major tile [C, B] (contiguous rows of B) <- rows r0 .. r0+B of a row-major [N, C] tensor
// (unit column stride; the row stride may exceed C, e.g. a column slice of a wider state), and back.
template <typename scalar_t>
void gather_rows_T(const Tensor& rows_major, int64_t r0, int64_t B, const Tensor& tileT) {
  const int64_t C = rows_major.size(1), ld = rows_major.stride(0);
  transpose_block(rows_major.const_data_ptr<scalar_t>() + r0 * ld, ld, tileT.mutable_data_ptr<scalar_t>(), B, B, C);
}
template <typename scalar_t>
void scatter_rows_T(const Tensor& tileT, const Tensor& rows_major, int64_t r0, int64_t B) {
  const int64_t C = rows_major.size(1), ld = rows_major.stride(0);
  transpose_block(tileT.const_data_ptr<scalar_t>(), B, rows_major.mutable_data_ptr<scalar_t>() + r0 * ld, ld, C, B);
}
// out = sum of a over dimension dim
inline void sum_into(Tensor out, const Tensor& a, int64_t dim) { at::sum_out(out, a, {dim}); }

// One layer. The two weight matrices are joined, w = [W_ih | W_hh] [4H, I+H], so that each block
// needs one matrix product per direction: the separate products with K = I = 2 ran several times
// slower per flop in MKL than one with K = I + H.
struct Layer {
  Tensor w, b;  // [4H, K = I + H], [4H] (contiguous)
  Tensor h, c;  // [N, H] old state (contiguous)
  int64_t I, H;
  int64_t K() const { return I + H; }
};

inline Layer make_layer(const Tensor& h, const Tensor& c, const Tensor& w_ih, const Tensor& w_hh, const Tensor& b,
                 const CellDims& d) {
  return {at::cat({w_ih, w_hh}, 1), b.contiguous(), h.contiguous(), c.contiguous(), d.I, d.H};
}

inline std::vector<Layer> make_layers(TensorList h, TensorList c, TensorList w_ih, TensorList w_hh, TensorList b,
                               const std::vector<CellDims>& dims) {
  std::vector<Layer> layers;
  for (size_t l = 0; l < dims.size(); ++l) layers.push_back(make_layer(h[l], c[l], w_ih[l], w_hh[l], b[l], dims[l]));
  return layers;
}

// [units, B] view of the first units*B elements of a flat scratch buffer.
inline Tensor tile(const Tensor& buf, int64_t units, int64_t B) { return buf.narrow(0, 0, units * B).view({units, B}); }

// One layer's forward on a unit-major block of B coordinates: z [K, ld B] (the layer's [input | h])
// and the old cell c in; c_new and h_new out (h_new may be c). With tanh_c_new non-null (the
// backward needs them) the activated gates go to gates [4H * B] and tanh(c_new) to tanh_c_new;
// otherwise gates is only scratch. float32 with AVX2 runs fused_layer_forward_f32 (gbuf: 4H * 16
// scratch, which may be gates when nothing is kept); anything else a BLAS product into gates and
// pointwise_forward.
template <typename scalar_t>
inline void layer_forward(const Layer& L, scalar_t* z, int64_t B, scalar_t* gates, scalar_t* gbuf, const scalar_t* c,
                          scalar_t* c_new, scalar_t* h_new, scalar_t* tanh_c_new) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, float>) {
    fused_layer_forward_f32(L.w.const_data_ptr<float>(), L.b.const_data_ptr<float>(), L.H, L.K(), z, B, c, c_new,
                            h_new, gbuf, tanh_c_new ? gates : nullptr, tanh_c_new);
    return;
  }
#endif
  const auto opt = L.w.options();
  addmm_into(at::from_blob(gates, {4 * L.H, B}, opt), L.b.unsqueeze(1), L.w, at::from_blob(z, {L.K(), B}, opt));
  if (tanh_c_new)
    pointwise_forward<scalar_t>(L.H * B, gates, c, c_new, h_new, tanh_c_new);
  else
    pointwise_forward<scalar_t, /*kKeepGates=*/false>(L.H * B, gates, c, c_new, h_new, nullptr);
}

// Unit-major scratch of one layer for one block of up to `rows` coordinates.
struct LayerScratch {
  Tensor zT;     // [K * rows]: the layer's input and old h, [x | h]^T
  Tensor gates;  // [4H * rows]: pre-activations, then activated gates
  Tensor cT;     // [H * rows]: old cell
  Tensor tcT;    // [H * rows]: tanh(c_new)
  Tensor hnT;    // [H * rows]: h_new
  Tensor cnT;    // [H * rows]: c_new
  LayerScratch(const Layer& L, int64_t rows, const at::TensorOptions& opt)
      : zT(at::empty({L.K() * rows}, opt)), gates(at::empty({4 * L.H * rows}, opt)), cT(at::empty({L.H * rows}, opt)),
        tcT(at::empty({L.H * rows}, opt)), hnT(at::empty({L.H * rows}, opt)), cnT(at::empty({L.H * rows}, opt)) {}
};

// All scratch of one thread for a stack of layers. Backward adds (unit-major) dL/dh_new per layer,
// and dz [4H], dL/d[x | h] [K], dL/dc_new and dL/dc [H] (times rows) shared by the layers.
struct BlockScratch {
  std::vector<LayerScratch> layer;
  std::vector<Tensor> dhnT;
  Tensor dz, dZ, dcnT, dcT;
  Tensor gchunk;  // [4 max H * 16]: the gate tile of fused_layer_forward_f32
  BlockScratch(const std::vector<Layer>& layers, int64_t rows, const at::TensorOptions& opt, bool backward) {
    int64_t maxH = 1, maxK = 1;
    for (const auto& L : layers) {
      layer.emplace_back(L, rows, opt);
      if (backward) dhnT.push_back(at::empty({L.H * rows}, opt));
      maxH = std::max(maxH, L.H);
      maxK = std::max(maxK, L.K());
    }
    gchunk = at::empty({4 * maxH * 16}, opt);
    if (backward) {
      dz = at::empty({4 * maxH * rows}, opt);
      dZ = at::empty({maxK * rows}, opt);
      dcnT = at::empty({maxH * rows}, opt);
      dcT = at::empty({maxH * rows}, opt);
    }
  }
};

// Scratch for each thread of the pool, allocated by the calling thread before at::parallel_for:
// allocations made (and freed) inside the pool's threads went to fresh mmaps on every call, and
// their page faults serialised the threads (measured: 2 threads slower than 1).
inline std::vector<BlockScratch> per_thread_scratch(const std::vector<Layer>& layers, int64_t rows,
                                             const at::TensorOptions& opt, bool backward) {
  std::vector<BlockScratch> all;
  for (int t = 0; t < at::get_num_threads(); ++t) all.emplace_back(layers, rows, opt, backward);
  return all;
}

inline int64_t max_hidden(const std::vector<Layer>& layers) {
  int64_t m = 1;
  for (const auto& L : layers) m = std::max(m, L.H);
  return m;
}

inline int64_t num_blocks(int64_t N, int64_t rpb) { return (N + rpb - 1) / rpb; }

// Forward of all layers on the block of B rows starting at r0 (x: the op's input, [N, I]; or an
// undefined tensor when the caller already wrote the block's input into layer 0's zT rows). Leaves
// in each layer's scratch its input, activated gates, tanh(c_new), h_new^T and c_new^T.
template <typename scalar_t>
inline void layers_forward_block(const std::vector<Layer>& layers, BlockScratch& bs, int64_t r0, int64_t B, const Tensor& x) {
  for (size_t l = 0; l < layers.size(); ++l) {
    const Layer& L = layers[l];
    LayerScratch& s = bs.layer[l];
    const Tensor z = tile(s.zT, L.K(), B);
    if (l == 0) {
      if (x.defined()) gather_rows_T<scalar_t>(x, r0, B, z);  // else: the caller staged the input
    } else {
      copy_into(z.narrow(0, 0, L.I), tile(bs.layer[l - 1].hnT, L.I, B));
    }
    gather_rows_T<scalar_t>(L.h, r0, B, z.narrow(0, L.I, L.H));
    gather_rows_T<scalar_t>(L.c, r0, B, s.cT);
    layer_forward<scalar_t>(L, s.zT.mutable_data_ptr<scalar_t>(), B, s.gates.mutable_data_ptr<scalar_t>(),
                            bs.gchunk.mutable_data_ptr<scalar_t>(), s.cT.const_data_ptr<scalar_t>(),
                            s.cnT.mutable_data_ptr<scalar_t>(), s.hnT.mutable_data_ptr<scalar_t>(),
                            s.tcT.mutable_data_ptr<scalar_t>());
  }
}

// Gradients of one layer stack, per block (after layers_forward_block on the same block).
struct StackGradBuffers {
  Tensor dx;                          // [N, I]
  std::vector<Tensor> dh, dc;         // [N, H_l]
  std::vector<Tensor> p_w, p_b;       // per-block partials [nparts, 4H, K], [nparts, 4H]
  std::vector<Tensor> ghn, gcn;       // incoming dL/dh_new, dL/dc_new [N, H_l] (contiguous)
};

// Backward through all layers of block k (rows r0 .. r0+B), top to bottom. On entry bs.dhnT[top]
// holds dL/dh_new of the top layer; the gradients reaching lower layers' h_new are
// ghn[l] + dL/d(input of layer l+1).
template <typename scalar_t>
inline void layers_backward_block(const std::vector<Layer>& layers, BlockScratch& bs, int64_t k, int64_t r0, int64_t B,
                           StackGradBuffers& g) {
  for (int64_t l = static_cast<int64_t>(layers.size()) - 1; l >= 0; --l) {
    const Layer& L = layers[l];
    const LayerScratch& s = bs.layer[l];
    gather_rows_T<scalar_t>(g.gcn[l], r0, B, bs.dcnT);
    pointwise_backward<scalar_t>(L.H * B, s.gates.const_data_ptr<scalar_t>(), s.cT.const_data_ptr<scalar_t>(),
                                 s.tcT.const_data_ptr<scalar_t>(), bs.dhnT[l].const_data_ptr<scalar_t>(),
                                 bs.dcnT.const_data_ptr<scalar_t>(), bs.dz.mutable_data_ptr<scalar_t>(),
                                 bs.dcT.mutable_data_ptr<scalar_t>());
    const Tensor dzT = tile(bs.dz, 4 * L.H, B);
    scatter_rows_T<scalar_t>(bs.dcT, g.dc[l], r0, B);
    mm_into(g.p_w[l][k], dzT, tile(s.zT, L.K(), B).t());
    sum_into(g.p_b[l][k], dzT, 1);
    const Tensor dZT = tile(bs.dZ, L.K(), B);  // dL/d[input | h]^T
    mm_into(dZT, L.w.t(), dzT);
    scatter_rows_T<scalar_t>(dZT.narrow(0, L.I, L.H), g.dh[l], r0, B);
    if (l == 0) {
      scatter_rows_T<scalar_t>(dZT, g.dx, r0, B);
    } else {
      add_into(tile(bs.dhnT[l - 1], L.I, B), g.ghn[l - 1].narrow(0, r0, B).t(), dZT.narrow(0, 0, L.I));
    }
  }
}

// Allocates the gradient buffers of a backward pass; the partials are zero for N = 0.
inline StackGradBuffers make_grad_buffers(const std::vector<Layer>& layers, const Tensor& x, TensorList grad_h_new,
                                   TensorList grad_c_new, int64_t nparts) {
  StackGradBuffers g;
  const int64_t N = x.size(0);
  g.dx = at::empty_like(x);
  for (size_t l = 0; l < layers.size(); ++l) {
    const Layer& L = layers[l];
    g.dh.push_back(at::empty({N, L.H}, x.options()));
    g.dc.push_back(at::empty({N, L.H}, x.options()));
    g.p_w.push_back(at::zeros({nparts, 4 * L.H, L.K()}, L.w.options()));
    g.p_b.push_back(at::zeros({nparts, 4 * L.H}, L.w.options()));
    g.ghn.push_back(grad_h_new[l].contiguous());
    g.gcn.push_back(grad_c_new[l].contiguous());
  }
  return g;
}

// The weight gradients (dw_ih, dw_hh, db) of each layer from the per-block partials.
inline void finish_weight_grads(const std::vector<Layer>& layers, const StackGradBuffers& g, std::vector<Tensor>& dw_ih,
                         std::vector<Tensor>& dw_hh, std::vector<Tensor>& db) {
  for (size_t l = 0; l < layers.size(); ++l) {
    const Layer& L = layers[l];
    Tensor dw = at::empty_like(L.w), dbl = at::empty_like(L.b);
    sum_parts_in_order(g.p_w[l], dw);
    sum_parts_in_order(g.p_b[l], dbl);
    dw_ih.push_back(dw.narrow(1, 0, L.I).contiguous());
    dw_hh.push_back(dw.narrow(1, L.I, L.H).contiguous());
    db.push_back(dbl);
  }
}

}  // namespace cpu
}  // namespace learnedopt
