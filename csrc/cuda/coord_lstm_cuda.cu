// CUDA kernels of the coordinatewise LSTM ops (same semantics and argument checks as
// cpu/coord_lstm_cpu.cpp).
//
// Forward, one layer (coord_lstm_fwd_kernel): one thread per coordinate (row), blocks of T <= 128
// rows. A block
//   1. stages the layer's weights, converted to opmath, in dynamic shared memory (the "smem-weights"
//      variant; the "global-weights" variant reads a packed opmath copy from global memory instead,
//      used when the weights do not fit next to the state tiles),
//   2. loads its tiles of x [T, I], h [T, H] (side by side, one row [x | h | 0-pad] of K = I + H
//      values) and c [T, H] as flat contiguous (coalesced) ranges, converted to opmath,
//   3. each thread walks its own row: for each hidden unit j the four pre-activations
//      z_g = b[gH+j] + <[x|h], W[gH+j, :]> (g = i, f, g, o), then lstm_unit_forward,
//   4. writes h', c' to shared tiles, and the block stores them as flat contiguous ranges.
// Row strides of the state tiles are odd (in opmath words), so the 32 threads of a warp reading
// element k of their 32 rows hit 32 different banks; all threads read the same weight address at
// the same time (a broadcast).
//
// Weight layout (shared memory and the packed global copy), in opmath:
//   W [4][Hp][Kp]: W[g][j][k] = w_ih[gH+j][k] (k < I), w_hh[gH+j][k-I] (I <= k < K), 0 otherwise
//   B [4][Hp]:     B[g][j]    = b[gH+j] (j < H), 0 otherwise
// with Kp = K rounded up to 4 (16-byte vector loads along k) and Hp = H rounded up to kUnits (the
// inner loop does kUnits units at a time; the padded units compute zeros and are not stored).
//
// Backward, one layer (coord_lstm_bwd_kernel): the same tiles plus dh', dc'; each thread recomputes
// its units (same code, so the same values as the forward pass) and applies lstm_unit_backward,
// writing dc (through a shared tile) and dz = dL/d(pre-activations) to a scratch tensor dzT
// [4H, n] in opmath (transposed, so that the threads of a warp write consecutive addresses). Then
// with cuBLAS / ATen reductions (deterministic, no atomics): dx = dz W_ih, dh = dz W_hh,
// dW_ih += dz^T x, dW_hh += dz^T h, db += sum_rows(dz), all in opmath. The rows are processed in
// chunks of at most 2^26 / (4 max H) so that the scratch stays bounded; the chunking depends only on
// N and H.
//
// Stacks compose these (see coord_lstm_stack_cuda / coord_lstm_stack_backward_cuda).
#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cuda/lstm_device.cuh"
#include "lstm_math.h"
#include "cuda/launch.cuh"
#include "ops.h"

namespace learnedopt {
namespace {

// Stages W and B (layout above) from w_ih [4H, I], w_hh [4H, H], b [4H] (contiguous, weight_t) to
// shared memory, converted to opmath. Whole block.
template <typename acc_t, typename weight_t>
__device__ __forceinline__ void stage_weights(acc_t* ws, acc_t* bs, const weight_t* __restrict__ w_ih,
                                              const weight_t* __restrict__ w_hh,
                                              const weight_t* __restrict__ b, const Geometry& G) {
  const int nw = 4 * G.Hp * G.Kp;
  for (int e = threadIdx.x; e < nw; e += blockDim.x) {
    const int r = e / G.Kp;  // r = g * Hp + j
    const int k = e - r * G.Kp;
    const int g = r / G.Hp;
    const int j = r - g * G.Hp;
    acc_t v(0);
    if (j < G.H && k < G.K) {
      const int row = g * G.H + j;
      v = k < G.I ? static_cast<acc_t>(w_ih[row * G.I + k]) : static_cast<acc_t>(w_hh[row * G.H + (k - G.I)]);
    }
    ws[e] = v;
  }
  for (int e = threadIdx.x; e < 4 * G.Hp; e += blockDim.x) {
    const int g = e / G.Hp;
    const int j = e - g * G.Hp;
    bs[e] = j < G.H ? static_cast<acc_t>(b[g * G.H + j]) : acc_t(0);
  }
}

// dst[t * stride + col0 + k] = src[t * width + k] for t < nr, k < width (src: nr rows of width
// contiguous values, read as one flat range). Whole block.
template <typename acc_t, typename src_t>
__device__ __forceinline__ void load_tile(acc_t* dst, int stride, int col0, const src_t* __restrict__ src,
                                          int nr, int width) {
  const int n = nr * width;
  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    const int t = e / width;
    const int k = e - t * width;
    dst[t * stride + col0 + k] = static_cast<acc_t>(src[e]);
  }
}

// dst[t * width + k] = src[t * stride + k] for t < nr, k < width. Whole block.
template <typename dst_t, typename acc_t>
__device__ __forceinline__ void store_tile(dst_t* __restrict__ dst, const acc_t* src, int stride, int nr,
                                           int width) {
  const int n = nr * width;
  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    const int t = e / width;
    const int k = e - t * width;
    dst[e] = static_cast<dst_t>(src[t * stride + k]);
  }
}

template <typename scalar_t, typename weight_t>
struct FwdArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;  // [N, I]
  const scalar_t* h;  // [N, H]
  const scalar_t* c;  // [N, H]
  // smem-weights variant: the layer's weights as given (contiguous)
  const weight_t* w_ih;  // [4H, I]
  const weight_t* w_hh;  // [4H, H]
  const weight_t* b;     // [4H]
  // global-weights variant: the packed opmath copies W [4][Hp][Kp], B [4][Hp]
  const acc_t* wpack;
  const acc_t* bpack;
  scalar_t* h_new;  // [N, H]
  scalar_t* c_new;  // [N, H], or null (not stored)
  int64_t N;
  Geometry g;
};

// Dynamic shared memory (opmath): [W, B (smem-weights variant only)] [x|h tile T x SK]
// [c tile T x SH (c, overwritten by c')] [h' tile T x SH].
template <typename scalar_t, typename weight_t, bool kSmemWeights>
__global__ void __launch_bounds__(kMaxThreads) coord_lstm_fwd_kernel(const FwdArgs<scalar_t, weight_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  using idx_t = std::conditional_t<kSmemWeights, int, int64_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sm = reinterpret_cast<acc_t*>(smem_raw);
  const Geometry G = a.g;
  const int T = blockDim.x;
  const int tid = threadIdx.x;

  const acc_t* W;
  const acc_t* B;
  acc_t* xh;
  if constexpr (kSmemWeights) {
    acc_t* ws = sm;
    acc_t* bs = ws + 4 * G.Hp * G.Kp;
    stage_weights(ws, bs, a.w_ih, a.w_hh, a.b, G);
    W = ws;
    B = bs;
    xh = bs + 4 * G.Hp;
  } else {
    W = a.wpack;
    B = a.bpack;
    xh = sm;
  }
  acc_t* cs = xh + T * G.SK;
  acc_t* hs = cs + T * G.SH;

  const int64_t r0 = int64_t(blockIdx.x) * T;  // first row of the block
  const int64_t rem = a.N - r0;
  const int nr = rem < T ? static_cast<int>(rem) : T;  // rows of the block (>= 1)
  load_tile(xh, G.SK, 0, a.x + r0 * G.I, nr, G.I);
  load_tile(xh, G.SK, G.I, a.h + r0 * G.H, nr, G.H);
  load_tile(cs, G.SH, 0, a.c + r0 * G.H, nr, G.H);
  if (tid < nr) {
    for (int k = G.K; k < G.Kp; ++k) xh[tid * G.SK + k] = acc_t(0);
  }
  __syncthreads();

  if (tid < nr) {
    const acc_t* xr = xh + tid * G.SK;
    acc_t* cr = cs + tid * G.SH;
    acc_t* hr = hs + tid * G.SH;
    for_each_unit<idx_t>(W, B, xr, G, [&](int j, acc_t zi, acc_t zf, acc_t zg, acc_t zo) {
      const LstmUnit<acc_t> u = lstm_unit_forward(zi, zf, zg, zo, cr[j]);
      cr[j] = u.c_new;
      hr[j] = u.h_new;
    });
  }
  __syncthreads();

  store_tile(a.h_new + r0 * G.H, hs, G.SH, nr, G.H);
  if (a.c_new != nullptr) store_tile(a.c_new + r0 * G.H, cs, G.SH, nr, G.H);
}

template <typename scalar_t, typename dh_t>
struct BwdArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;       // [N, I]
  const scalar_t* h;       // [N, H]
  const scalar_t* c;       // [N, H]
  const dh_t* dh_new;      // [N, H]
  const scalar_t* dc_new;  // [N, H]
  // smem-weights variant: opmath weights (contiguous)
  const acc_t* w_ih;  // [4H, I]
  const acc_t* w_hh;  // [4H, H]
  const acc_t* b;     // [4H]
  // global-weights variant: packed W [4][Hp][Kp], B [4][Hp]
  const acc_t* wpack;
  const acc_t* bpack;
  acc_t* dzT;    // [4H, N]: dzT[(g H + j) N + n] = dL/dz_g of unit j, row n
  scalar_t* dc;  // [N, H]
  int64_t N;
  Geometry g;
};

// Dynamic shared memory (opmath): [W, B (smem-weights variant only)] [x|h tile T x SK]
// [c tile T x SH] [dh' tile T x SH] [dc' tile T x SH (overwritten by dc)].
template <typename scalar_t, typename dh_t, bool kSmemWeights>
__global__ void __launch_bounds__(kMaxThreads) coord_lstm_bwd_kernel(const BwdArgs<scalar_t, dh_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  using idx_t = std::conditional_t<kSmemWeights, int, int64_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sm = reinterpret_cast<acc_t*>(smem_raw);
  const Geometry G = a.g;
  const int T = blockDim.x;
  const int tid = threadIdx.x;

  const acc_t* W;
  const acc_t* B;
  acc_t* xh;
  if constexpr (kSmemWeights) {
    acc_t* ws = sm;
    acc_t* bs = ws + 4 * G.Hp * G.Kp;
    stage_weights(ws, bs, a.w_ih, a.w_hh, a.b, G);
    W = ws;
    B = bs;
    xh = bs + 4 * G.Hp;
  } else {
    W = a.wpack;
    B = a.bpack;
    xh = sm;
  }
  acc_t* cs = xh + T * G.SK;
  acc_t* dhs = cs + T * G.SH;
  acc_t* dcs = dhs + T * G.SH;

  const int64_t r0 = int64_t(blockIdx.x) * T;
  const int64_t rem = a.N - r0;
  const int nr = rem < T ? static_cast<int>(rem) : T;
  load_tile(xh, G.SK, 0, a.x + r0 * G.I, nr, G.I);
  load_tile(xh, G.SK, G.I, a.h + r0 * G.H, nr, G.H);
  load_tile(cs, G.SH, 0, a.c + r0 * G.H, nr, G.H);
  load_tile(dhs, G.SH, 0, a.dh_new + r0 * G.H, nr, G.H);
  load_tile(dcs, G.SH, 0, a.dc_new + r0 * G.H, nr, G.H);
  if (tid < nr) {
    for (int k = G.K; k < G.Kp; ++k) xh[tid * G.SK + k] = acc_t(0);
  }
  __syncthreads();

  if (tid < nr) {
    const acc_t* xr = xh + tid * G.SK;
    const acc_t* cr = cs + tid * G.SH;
    const acc_t* dhr = dhs + tid * G.SH;
    acc_t* dcr = dcs + tid * G.SH;
    const int64_t gstride = int64_t(G.H) * a.N;   // between the gates' rows of dzT
    acc_t* dz = a.dzT + (r0 + tid);                // dzT[0][n], n = r0 + tid
    for_each_unit<idx_t>(W, B, xr, G, [&](int j, acc_t zi, acc_t zf, acc_t zg, acc_t zo) {
      const acc_t c_old = cr[j];
      const LstmUnit<acc_t> u = lstm_unit_forward(zi, zf, zg, zo, c_old);
      const LstmUnitGrad<acc_t> d = lstm_unit_backward(u, c_old, dhr[j], dcr[j]);
      dcr[j] = d.dc;
      acc_t* dzj = dz + int64_t(j) * a.N;
      dzj[0] = d.dzi;
      dzj[gstride] = d.dzf;
      dzj[2 * gstride] = d.dzg;
      dzj[3 * gstride] = d.dzo;
    });
  }
  __syncthreads();

  store_tile(a.dc + r0 * G.H, dcs, G.SH, nr, G.H);
}

// ------------------------------------------------------------------------------------------------
// Host side

// Launch configuration of one layer kernel.
struct Plan {
  int threads;         // rows per block
  int64_t smem_bytes;  // dynamic shared memory
  bool smem_weights;   // weights staged in shared memory (else read from the packed global copy)
  int64_t blocks;
};

// n_tiles: the [T, H] tiles besides [x | h] (forward 2, backward 3). The choice of variant depends
// only on the sizes and the device (never on N): shared weights whenever they fit with T = 32. The
// block size depends on N too (small N: smaller blocks, so that every SM gets work) and, with shared
// weights, is the T in [32, 128] with the most threads resident per SM by shared memory (ties: the
// larger T, which stages the weights fewer times). None of this changes the per-row arithmetic.
Plan make_plan(const char* op, int64_t N, const Geometry& G, int64_t acc_size, int n_tiles) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t optin = static_cast<int64_t>(prop->sharedMemPerBlockOptin);
  const int64_t per_sm = static_cast<int64_t>(prop->sharedMemPerMultiprocessor);
  const int64_t reserved = static_cast<int64_t>(prop->reservedSharedMemPerBlock);
  const int64_t sms = prop->multiProcessorCount;
  const int64_t row = int64_t(G.SK) + n_tiles * int64_t(G.SH);  // opmath elements per tile row
  const int64_t wts = weight_elems(G);
  int t0 = kMaxThreads;
  while (t0 > 32 && ceil_div(N, t0) < sms) t0 /= 2;
  Plan p{0, 0, false, 0};
  int64_t best_resident = -1;
  for (int t = t0; t >= 32; t /= 2) {
    const int64_t bytes = (wts + t * row) * acc_size;
    if (bytes > optin) continue;
    const int64_t blocks_per_sm =
        std::min<int64_t>(std::max<int64_t>(per_sm / (bytes + reserved), 1), 2048 / t);
    if (t * blocks_per_sm > best_resident) {
      best_resident = t * blocks_per_sm;
      p = {t, bytes, true, 0};
    }
  }
  for (int t = t0; t >= 1 && p.threads == 0; t /= 2) {
    const int64_t bytes = t * row * acc_size;
    if (bytes <= optin) p = {t, bytes, false, 0};
  }
  TORCH_CHECK(p.threads > 0, op, ": input size ", G.I, " and hidden size ", G.H,
              " are too large for the CUDA kernels (one row of state needs ", row * acc_size,
              " bytes of shared memory, the device has ", optin, " per block)");
  p.blocks = ceil_div(N, p.threads);
  TORCH_CHECK(p.blocks <= INT_MAX, op, ": too many rows (", N, ") for one kernel launch");
  return p;
}

template <typename Kernel>
void allow_smem(Kernel kernel, int64_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

at::ScalarType opmath_dtype(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

Tensor to_dtype(const Tensor& t, at::ScalarType s) { return t.scalar_type() == s ? t : t.to(s); }

template <typename scalar_t>
constexpr bool is_reduced_v = std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;

// One layer's weights and geometry.
struct Layer {
  Geometry G;
  Tensor w_ih, w_hh, b;  // contiguous, their own dtype
  Tensor o_ih, o_hh, o_b;  // contiguous opmath copies (backward only; may alias w_*)
  Tensor wpack, bpack;     // packed opmath copies for the global-weights variant (made on demand)
};

Layer make_layer(const char* op, int64_t I, int64_t H, const Tensor& w_ih, const Tensor& w_hh, const Tensor& b,
                 bool with_opmath, at::ScalarType opm) {
  Layer L;
  L.G = make_geometry(op, I, H);
  L.w_ih = w_ih.contiguous();
  L.w_hh = w_hh.contiguous();
  L.b = b.contiguous();
  if (with_opmath) {
    L.o_ih = to_dtype(L.w_ih, opm);
    L.o_hh = to_dtype(L.w_hh, opm);
    L.o_b = to_dtype(L.b, opm);
  }
  return L;
}

// W [4][Hp][Kp] and B [4][Hp] (layout at the top of the file), opmath, for the global variant.
void ensure_packed(Layer& L, at::ScalarType opm) {
  if (L.wpack.defined()) return;
  const Geometry& G = L.G;
  const auto opts = L.w_ih.options().dtype(opm);
  L.wpack = at::zeros({4, G.Hp, G.Kp}, opts);
  L.wpack.narrow(1, 0, G.H).narrow(2, 0, G.I).copy_(L.w_ih.view({4, G.H, G.I}));
  L.wpack.narrow(1, 0, G.H).narrow(2, G.I, G.H).copy_(L.w_hh.view({4, G.H, G.H}));
  L.bpack = at::zeros({4, G.Hp}, opts);
  L.bpack.narrow(1, 0, G.H).copy_(L.b.view({4, G.H}));
}

template <typename scalar_t, typename weight_t, bool kSmemWeights>
void launch_fwd(const Plan& p, const FwdArgs<scalar_t, weight_t>& args) {
  auto kernel = &coord_lstm_fwd_kernel<scalar_t, weight_t, kSmemWeights>;
  allow_smem(kernel, p.smem_bytes);
  launch_kernel("coord_lstm_fwd_kernel", kernel, static_cast<unsigned>(p.blocks), p.threads,
                static_cast<size_t>(p.smem_bytes), c10::cuda::getCurrentCUDAStream(), args);
}

// h_new, c_new (c_new may be undefined: not stored) = one layer on x [N, I], h, c [N, H] (all
// contiguous, state dtype). opmath_weights: use L.o_* (else L.w_*).
template <typename scalar_t>
void layer_forward(const char* op, const Tensor& x, const Tensor& h, const Tensor& c, Layer& L,
                   bool opmath_weights, const Tensor& h_new, const Tensor& c_new) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0);
  if (N == 0) return;
  const Plan p = make_plan(op, N, L.G, sizeof(acc_t), 2);
  const Tensor& w_ih = opmath_weights ? L.o_ih : L.w_ih;
  const Tensor& w_hh = opmath_weights ? L.o_hh : L.w_hh;
  const Tensor& b = opmath_weights ? L.o_b : L.b;
  auto fill = [&](auto& args) {
    args.x = x.const_data_ptr<scalar_t>();
    args.h = h.const_data_ptr<scalar_t>();
    args.c = c.const_data_ptr<scalar_t>();
    args.h_new = h_new.mutable_data_ptr<scalar_t>();
    args.c_new = c_new.defined() ? c_new.mutable_data_ptr<scalar_t>() : nullptr;
    args.N = N;
    args.g = L.G;
  };
  if (p.smem_weights) {
    if (w_ih.scalar_type() == x.scalar_type()) {
      FwdArgs<scalar_t, scalar_t> args{};
      fill(args);
      args.w_ih = w_ih.const_data_ptr<scalar_t>();
      args.w_hh = w_hh.const_data_ptr<scalar_t>();
      args.b = b.const_data_ptr<scalar_t>();
      launch_fwd<scalar_t, scalar_t, true>(p, args);
    } else {
      if constexpr (is_reduced_v<scalar_t>) {
        FwdArgs<scalar_t, float> args{};
        fill(args);
        args.w_ih = w_ih.const_data_ptr<float>();
        args.w_hh = w_hh.const_data_ptr<float>();
        args.b = b.const_data_ptr<float>();
        launch_fwd<scalar_t, float, true>(p, args);
      } else {
        TORCH_INTERNAL_ASSERT(false, op, ": unexpected weight dtype ", w_ih.scalar_type());
      }
    }
  } else {
    ensure_packed(L, c10::CppTypeToScalarType<acc_t>::value);
    FwdArgs<scalar_t, acc_t> args{};
    fill(args);
    args.wpack = L.wpack.const_data_ptr<acc_t>();
    args.bpack = L.bpack.const_data_ptr<acc_t>();
    launch_fwd<scalar_t, acc_t, false>(p, args);
  }
}

template <typename scalar_t, typename dh_t, bool kSmemWeights>
void launch_bwd(const Plan& p, const BwdArgs<scalar_t, dh_t>& args) {
  auto kernel = &coord_lstm_bwd_kernel<scalar_t, dh_t, kSmemWeights>;
  allow_smem(kernel, p.smem_bytes);
  launch_kernel("coord_lstm_bwd_kernel", kernel, static_cast<unsigned>(p.blocks), p.threads,
                static_cast<size_t>(p.smem_bytes), c10::cuda::getCurrentCUDAStream(), args);
}

template <typename scalar_t, typename dh_t>
void layer_backward_typed(const char* op, const Tensor& x, const Tensor& h, const Tensor& c, const Tensor& dh_new,
                          const Tensor& dc_new, Layer& L, const Tensor& dzT, const Tensor& dc) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0);
  const Plan p = make_plan(op, N, L.G, sizeof(acc_t), 3);
  BwdArgs<scalar_t, dh_t> args{};
  args.x = x.const_data_ptr<scalar_t>();
  args.h = h.const_data_ptr<scalar_t>();
  args.c = c.const_data_ptr<scalar_t>();
  args.dh_new = dh_new.const_data_ptr<dh_t>();
  args.dc_new = dc_new.const_data_ptr<scalar_t>();
  args.dzT = dzT.mutable_data_ptr<acc_t>();
  args.dc = dc.mutable_data_ptr<scalar_t>();
  args.N = N;
  args.g = L.G;
  if (p.smem_weights) {
    args.w_ih = L.o_ih.const_data_ptr<acc_t>();
    args.w_hh = L.o_hh.const_data_ptr<acc_t>();
    args.b = L.o_b.const_data_ptr<acc_t>();
    launch_bwd<scalar_t, dh_t, true>(p, args);
  } else {
    ensure_packed(L, c10::CppTypeToScalarType<acc_t>::value);
    args.wpack = L.wpack.const_data_ptr<acc_t>();
    args.bpack = L.bpack.const_data_ptr<acc_t>();
    launch_bwd<scalar_t, dh_t, false>(p, args);
  }
}

// dzT [4H, n] (opmath) and dc [n, H] of one layer on n = x.size(0) >= 1 rows: x [n, I], h, c,
// dc_new [n, H] (contiguous, state dtype), dh_new [n, H] (contiguous, state dtype or opmath).
template <typename scalar_t>
void layer_backward(const char* op, const Tensor& x, const Tensor& h, const Tensor& c, const Tensor& dh_new,
                    const Tensor& dc_new, Layer& L, const Tensor& dzT, const Tensor& dc) {
  using acc_t = at::opmath_type<scalar_t>;
  if (dh_new.scalar_type() == x.scalar_type()) {
    layer_backward_typed<scalar_t, scalar_t>(op, x, h, c, dh_new, dc_new, L, dzT, dc);
  } else {
    if constexpr (is_reduced_v<scalar_t>) {
      layer_backward_typed<scalar_t, acc_t>(op, x, h, c, dh_new, dc_new, L, dzT, dc);
    } else {
      TORCH_INTERNAL_ASSERT(false, op, ": unexpected dtype of dh_new ", dh_new.scalar_type());
    }
  }
}

// out = a b, converting to out's dtype where it differs.
void mm_into(Tensor out, const Tensor& a, const Tensor& b) {
  if (out.scalar_type() == a.scalar_type()) {
    at::mm_out(out, a, b);
  } else {
    out.copy_(at::mm(a, b));
  }
}

// Rows per chunk of the backward passes: the dz scratch (4 H opmath values a row) stays <= 2^26
// values.
int64_t chunk_rows(int64_t max_H) { return std::max<int64_t>(1, (int64_t(1) << 26) / (4 * max_H)); }

std::tuple<Tensor, Tensor> coord_lstm_cuda(const Tensor& x_, const Tensor& h_, const Tensor& c_,
                                           const Tensor& w_ih_, const Tensor& w_hh_, const Tensor& b_) {
  const char* op = "learnedopt::coord_lstm";
  const auto d = check_cell(op, x_, h_, c_, w_ih_, w_hh_, b_);
  at::AutoDispatchBelowADInplaceOrView guard;
  const c10::cuda::CUDAGuard device_guard(x_.device());
  const Tensor x = x_.contiguous(), h = h_.contiguous(), c = c_.contiguous();
  Tensor h_new = at::empty({d.N, d.H}, x.options());
  Tensor c_new = at::empty({d.N, d.H}, x.options());
  if (d.N == 0) return {h_new, c_new};
  Layer L = make_layer(op, d.I, d.H, w_ih_, w_hh_, b_, false, opmath_dtype(x));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "learnedopt_coord_lstm_cuda", [&] {
    layer_forward<scalar_t>(op, x, h, c, L, false, h_new, c_new);
  });
  return {h_new, c_new};
}

CellGrads coord_lstm_backward_cuda(const Tensor& grad_h_new, const Tensor& grad_c_new, const Tensor& x_,
                                   const Tensor& h_, const Tensor& c_, const Tensor& w_ih_, const Tensor& w_hh_,
                                   const Tensor& b_) {
  const char* op = "learnedopt::coord_lstm_backward";
  const auto d = check_cell_backward(op, grad_h_new, grad_c_new, x_, h_, c_, w_ih_, w_hh_, b_);
  at::AutoDispatchBelowADInplaceOrView guard;
  const c10::cuda::CUDAGuard device_guard(x_.device());
  const Tensor x = x_.contiguous(), h = h_.contiguous(), c = c_.contiguous();
  const Tensor dhn = grad_h_new.contiguous(), dcn = grad_c_new.contiguous();
  const at::ScalarType opm = opmath_dtype(x);
  const auto oopts = x.options().dtype(opm);
  Layer L = make_layer(op, d.I, d.H, w_ih_, w_hh_, b_, true, opm);
  Tensor dx = at::empty({d.N, d.I}, x.options());
  Tensor dh = at::empty({d.N, d.H}, x.options());
  Tensor dc = at::empty({d.N, d.H}, x.options());
  Tensor dw_ih = at::zeros({4 * d.H, d.I}, oopts);
  Tensor dw_hh = at::zeros({4 * d.H, d.H}, oopts);
  Tensor db = at::zeros({4 * d.H}, oopts);
  const int64_t nc = chunk_rows(d.H);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "learnedopt_coord_lstm_backward_cuda", [&] {
    for (int64_t r0 = 0; r0 < d.N; r0 += nc) {
      const int64_t n = std::min(nc, d.N - r0);
      const Tensor xb = x.narrow(0, r0, n), hb = h.narrow(0, r0, n);
      const Tensor dzT = at::empty({4 * d.H, n}, oopts);
      layer_backward<scalar_t>(op, xb, hb, c.narrow(0, r0, n), dhn.narrow(0, r0, n), dcn.narrow(0, r0, n), L, dzT,
                               dc.narrow(0, r0, n));
      const Tensor dz = dzT.t();  // [n, 4H]
      mm_into(dx.narrow(0, r0, n), dz, L.o_ih);
      mm_into(dh.narrow(0, r0, n), dz, L.o_hh);
      dw_ih.addmm_(dzT, to_dtype(xb, opm));
      dw_hh.addmm_(dzT, to_dtype(hb, opm));
      db.add_(at::sum(dzT, {1}));
    }
  });
  return {dx, dh, dc, to_dtype(dw_ih, w_ih_.scalar_type()), to_dtype(dw_hh, w_hh_.scalar_type()),
          to_dtype(db, b_.scalar_type())};
}

std::vector<Layer> make_layers(const char* op, int64_t I, TensorList w_ih, TensorList w_hh, TensorList b,
                               const std::vector<CellDims>& dims, bool with_opmath, at::ScalarType opm) {
  std::vector<Layer> layers;
  for (size_t l = 0; l < dims.size(); ++l) {
    layers.push_back(make_layer(op, I, dims[l].H, w_ih[l], w_hh[l], b[l], with_opmath, opm));
    I = dims[l].H;
  }
  return layers;
}

StackOut coord_lstm_stack_cuda(const Tensor& x_, TensorList h, TensorList c, TensorList w_ih, TensorList w_hh,
                               TensorList b, const Tensor& w_out_, const Tensor& b_out_) {
  const char* op = "learnedopt::coord_lstm_stack";
  const auto dims = check_stack(op, x_, h, c, w_ih, w_hh, b, w_out_, b_out_);
  at::AutoDispatchBelowADInplaceOrView guard;
  const c10::cuda::CUDAGuard device_guard(x_.device());
  const Tensor x = x_.contiguous(), w_out = w_out_.contiguous(), b_out = b_out_.contiguous();
  const int64_t N = x.size(0), nL = static_cast<int64_t>(dims.size());
  std::vector<Tensor> h_new, c_new;
  for (const auto& d : dims) {
    h_new.push_back(at::empty({N, d.H}, x.options()));
    c_new.push_back(at::empty({N, d.H}, x.options()));
  }
  Tensor y = at::empty({N, w_out.size(0)}, x.options());
  if (N == 0) return {y, h_new, c_new};
  const at::ScalarType opm = opmath_dtype(x);
  auto layers = make_layers(op, x.size(1), w_ih, w_hh, b, dims, false, opm);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "learnedopt_coord_lstm_stack_cuda", [&] {
    for (int64_t l = 0; l < nL; ++l) {
      layer_forward<scalar_t>(op, l == 0 ? x : h_new[l - 1], h[l].contiguous(), c[l].contiguous(), layers[l], false,
                              h_new[l], c_new[l]);
    }
  });
  // Read-out y = h_top w_out^T + b_out, in opmath.
  if (x.scalar_type() == opm) {
    at::addmm_out(y, b_out, h_new[nL - 1], w_out.t());
  } else {
    y.copy_(at::addmm(to_dtype(b_out, opm), to_dtype(h_new[nL - 1], opm), to_dtype(w_out, opm).t()));
  }
  return {y, h_new, c_new};
}

StackGrads coord_lstm_stack_backward_cuda(const Tensor& grad_y_, TensorList grad_h_new, TensorList grad_c_new,
                                          const Tensor& x_, TensorList h, TensorList c, TensorList w_ih,
                                          TensorList w_hh, TensorList b, const Tensor& w_out_, const Tensor& b_out_) {
  const char* op = "learnedopt::coord_lstm_stack_backward";
  const auto dims =
      check_stack_backward(op, grad_y_, grad_h_new, grad_c_new, x_, h, c, w_ih, w_hh, b, w_out_, b_out_);
  const int64_t N = x_.size(0), nL = static_cast<int64_t>(dims.size());
  at::AutoDispatchBelowADInplaceOrView guard;
  const c10::cuda::CUDAGuard device_guard(x_.device());
  const Tensor x = x_.contiguous(), w_out = w_out_.contiguous(), b_out = b_out_.contiguous();
  const Tensor grad_y = grad_y_.contiguous();
  const at::ScalarType opm = opmath_dtype(x);
  const auto oopts = x.options().dtype(opm);
  auto layers = make_layers(op, x.size(1), w_ih, w_hh, b, dims, true, opm);
  const Tensor w_out_op = to_dtype(w_out, opm);
  std::vector<Tensor> hs, cs, ghn, gcn, hn, dh, dc, dw_ih, dw_hh, db;
  int64_t maxH = 1;
  for (int64_t l = 0; l < nL; ++l) {
    const int64_t H = dims[l].H, I = layers[l].G.I;
    maxH = std::max(maxH, H);
    hs.push_back(h[l].contiguous());
    cs.push_back(c[l].contiguous());
    ghn.push_back(grad_h_new[l].contiguous());
    gcn.push_back(grad_c_new[l].contiguous());
    hn.push_back(at::empty({N, H}, x.options()));
    dh.push_back(at::empty({N, H}, x.options()));
    dc.push_back(at::empty({N, H}, x.options()));
    dw_ih.push_back(at::zeros({4 * H, I}, oopts));
    dw_hh.push_back(at::zeros({4 * H, H}, oopts));
    db.push_back(at::zeros({4 * H}, oopts));
  }
  Tensor dx = at::empty({N, x.size(1)}, x.options());
  Tensor dw_out = at::zeros({w_out.size(0), w_out.size(1)}, oopts);
  Tensor db_out = at::zeros({w_out.size(0)}, oopts);
  const int64_t nc = chunk_rows(maxH);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "learnedopt_coord_lstm_stack_backward_cuda", [&] {
    // Recompute every layer's h_new (the input of the next layer, and of the read-out), exactly as
    // the forward pass computed it (state dtype).
    for (int64_t l = 0; l < nL && N > 0; ++l) {
      layer_forward<scalar_t>(op, l == 0 ? x : hn[l - 1], hs[l], cs[l], layers[l], true, hn[l], Tensor());
    }
    for (int64_t r0 = 0; r0 < N; r0 += nc) {
      const int64_t n = std::min(nc, N - r0);
      // Read-out: y = h_top w_out^T + b_out.
      const Tensor gy = to_dtype(grad_y.narrow(0, r0, n), opm);  // [n, O]
      dw_out.addmm_(gy.t(), to_dtype(hn[nL - 1].narrow(0, r0, n), opm));
      db_out.add_(at::sum(gy, {0}));
      // dL/dh_new of the top layer, opmath [n, H_top].
      Tensor dhn = at::addmm(to_dtype(ghn[nL - 1].narrow(0, r0, n), opm), gy, w_out_op);
      for (int64_t l = nL - 1; l >= 0; --l) {
        Layer& L = layers[l];
        const Tensor zin = l == 0 ? x.narrow(0, r0, n) : hn[l - 1].narrow(0, r0, n);
        const Tensor hb = hs[l].narrow(0, r0, n);
        const Tensor dzT = at::empty({4 * int64_t(L.G.H), n}, oopts);
        layer_backward<scalar_t>(op, zin, hb, cs[l].narrow(0, r0, n), dhn, gcn[l].narrow(0, r0, n), L, dzT,
                                 dc[l].narrow(0, r0, n));
        const Tensor dz = dzT.t();  // [n, 4H]
        dw_ih[l].addmm_(dzT, to_dtype(zin, opm));
        dw_hh[l].addmm_(dzT, to_dtype(hb, opm));
        db[l].add_(at::sum(dzT, {1}));
        mm_into(dh[l].narrow(0, r0, n), dz, L.o_hh);
        if (l == 0) {
          mm_into(dx.narrow(0, r0, n), dz, L.o_ih);
        } else {
          dhn = at::addmm(to_dtype(ghn[l - 1].narrow(0, r0, n), opm), dz, L.o_ih);
        }
      }
    }
  });
  std::vector<Tensor> dw_ih_out, dw_hh_out, db_out_l;
  for (int64_t l = 0; l < nL; ++l) {
    dw_ih_out.push_back(to_dtype(dw_ih[l], w_ih[l].scalar_type()));
    dw_hh_out.push_back(to_dtype(dw_hh[l], w_hh[l].scalar_type()));
    db_out_l.push_back(to_dtype(db[l], b[l].scalar_type()));
  }
  return {dx, dh, dc, dw_ih_out, dw_hh_out, db_out_l, to_dtype(dw_out, w_out.scalar_type()),
          to_dtype(db_out, b_out.scalar_type())};
}

}  // namespace

LEARNEDOPT_CUDA_IMPL(m) {
  m.impl("coord_lstm", &coord_lstm_cuda);
  m.impl("coord_lstm_backward", &coord_lstm_backward_cuda);
  m.impl("coord_lstm_stack", &coord_lstm_stack_cuda);
  m.impl("coord_lstm_stack_backward", &coord_lstm_stack_backward_cuda);
}

}  // namespace learnedopt
