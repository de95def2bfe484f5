// Device code shared by the CUDA kernels of the coordinatewise LSTM (coord_lstm_cuda.cu) and of the
// L2L optimizer step (l2l_step_cuda.cu): the geometry of one layer, vector loads of weights, and the
// per-row loop over hidden units (weight layout: see coord_lstm_cuda.cu).
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

namespace learnedopt {
namespace {

constexpr int kMaxThreads = 128;  // rows (= threads) per block at most
constexpr int kUnits = 4;         // hidden units per pass of the inner loop (16 accumulators)
constexpr int kKAlign = 4;        // K is padded to a multiple of this (vector loads of 4 weights)

// Sizes of one layer as the kernels see them. All fit in int (checked by make_geometry).
struct Geometry {
  int I, H;  // input and hidden size
  int K;     // I + H: length of the row [x | h]
  int Kp;    // K rounded up to kKAlign: row stride of the weights
  int Hp;    // H rounded up to kUnits
  int SK;    // row stride of the [x | h] tile: Kp + 1 (odd)
  int SH;    // row stride of the [T, H] tiles: H or H + 1 (odd)
};

inline int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline Geometry make_geometry(const char* op, int64_t I, int64_t H) {
  TORCH_CHECK(I + H <= (int64_t(1) << 28), op, ": input size ", I, " + hidden size ", H,
              " is too large for the CUDA kernels");
  Geometry g;
  g.I = static_cast<int>(I);
  g.H = static_cast<int>(H);
  g.K = static_cast<int>(I + H);
  g.Kp = static_cast<int>(round_up(I + H, kKAlign));
  g.Hp = static_cast<int>(round_up(H, kUnits));
  g.SK = g.Kp + 1;
  g.SH = static_cast<int>(H | 1);
  return g;
}

// Opmath elements of the staged weights W and B.
inline int64_t weight_elems(const Geometry& g) { return 4 * int64_t(g.Hp) * g.Kp + 4 * int64_t(g.Hp); }

// ------------------------------------------------------------------------------------------------
// Device code

__device__ __forceinline__ void load4(const float* p, float (&w)[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  w[0] = v.x;
  w[1] = v.y;
  w[2] = v.z;
  w[3] = v.w;
}

__device__ __forceinline__ void load4(const double* p, double (&w)[4]) {
  const double2 a = reinterpret_cast<const double2*>(p)[0];
  const double2 b = reinterpret_cast<const double2*>(p)[1];
  w[0] = a.x;
  w[1] = a.y;
  w[2] = b.x;
  w[3] = b.y;
}

// For every hidden unit j < H of one row xr = [x | h | 0-pad] (Kp values): the pre-activations
// z_g = B[g][j] + sum_k xr[k] W[g][j][k], then f(j, z_i, z_f, z_g, z_o). idx_t: the integer type
// of offsets into W (int for shared memory, int64_t for the packed global copy).
template <typename idx_t, typename acc_t, typename F>
__device__ __forceinline__ void for_each_unit(const acc_t* __restrict__ W, const acc_t* __restrict__ B,
                                              const acc_t* __restrict__ xr, const Geometry& G, F&& f) {
  const idx_t gstride = idx_t(G.Hp) * G.Kp;  // offset between gates in W
  for (int j0 = 0; j0 < G.H; j0 += kUnits) {
    acc_t acc[kUnits][4];
#pragma unroll
    for (int u = 0; u < kUnits; ++u) {
#pragma unroll
      for (int g = 0; g < 4; ++g) acc[u][g] = B[g * G.Hp + j0 + u];
    }
    const acc_t* wj = W + idx_t(j0) * G.Kp;  // W[0][j0][0]
#pragma unroll 2
    for (int k = 0; k < G.Kp; k += kKAlign) {
      const acc_t x0 = xr[k], x1 = xr[k + 1], x2 = xr[k + 2], x3 = xr[k + 3];
#pragma unroll
      for (int u = 0; u < kUnits; ++u) {
#pragma unroll
        for (int g = 0; g < 4; ++g) {
          acc_t w[4];
          load4(wj + (g * gstride + idx_t(u) * G.Kp + k), w);
          acc_t a = acc[u][g];
          a = a + x0 * w[0];
          a = a + x1 * w[1];
          a = a + x2 * w[2];
          a = a + x3 * w[3];
          acc[u][g] = a;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnits; ++u) {
      const int j = j0 + u;
      if (j < G.H) f(j, acc[u][0], acc[u][1], acc[u][2], acc[u][3]);
    }
  }
}

}  // namespace
}  // namespace learnedopt
