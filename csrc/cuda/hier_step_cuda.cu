// CUDA kernels of the hierarchical optimizer step (learnedopt::hier_step_, see registration.cpp; same
// semantics and argument checks as cpu/hier_step_cpu.cpp, the per-coordinate maths is hier_math.h's
// coord_step).
//
// Per group of parameters with one (parameter dtype, state dtype) pair (compute in acc_t: double for
// double parameters, float otherwise), four kernels on the current stream, no host synchronisation:
//   1. hier_finite_kernel: flags[i] = 1 when g / grad_scale has a non-finite element anywhere in
//      parameter i (such a parameter is skipped entirely: state, parameter and sums untouched);
//   2. hier_coord_kernel: one thread per coordinate, blocks of kStepCoords coordinates of one tensor
//      (kStepTiles tiles of kStepThreads). Each block stages the packed weights (in acc_t) and the
//      tensor's gate bias (weights' b + coord_bias[i]) in shared memory; each thread loads its
//      coordinate's 31 state rows (row r of coordinate c at s[r * n + c]: coalesced), runs
//      coord_step, stores the ROWS rows back (rounded to the state dtype) and the block reduces the
//      K_STEPPED per-coordinate quantities (h', features, d^2, new log-lr) in a fixed order (warp
//      reduce-scatter by shuffles in acc_t, then double across tiles and warps) into its row of
//      partial [blocks, K_STEPPED] (double);
//   3. hier_sums_kernel: one block per tensor sums its blocks' partials in a fixed order (double),
//      writes sums[i] (float32, column K_STEPPED = stepped flag) and the update scale
//      scale[i] = lrs[i] / sqrt(sum d^2 / n + 1e-16) (0 when skipped);
//   4. hier_update_kernel: p = p - scale * u (u: state row R_U in the state dtype), p in its dtype.
// A nonzero *found_inf skips every parameter (sums rows stay 0). grad_scale, found_inf (read as
// float64 device scalars) and mean_log_lr are read inside the kernels; lrs travel by value.
// Tensors are handed to the kernels by value in fixed-size argument structs, kMaxTensors at a time
// (as l2l_step_cuda.cu): no metadata copies to the device. Non-contiguous parameters and gradients
// are worked on as contiguous copies; parameters are copied back at the end (as the CPU op).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"
#include "cuda/device_scalar.cuh"
#include "hier_math.h"
#include "cuda/launch.cuh"
#include "ops.h"

namespace learnedopt {
namespace {

using namespace hier;

constexpr int kMaxTensors = 32;                         // tensors per launch
constexpr int kStepThreads = 256;                       // threads of the coordinate kernel
constexpr int kStepWarps = kStepThreads / 32;
constexpr int kStepMinBlocks = 2;                       // resident blocks per SM (<= 128 registers per thread)
constexpr int kStepTiles = 2;                           // tiles of kStepThreads coordinates per block
constexpr int64_t kStepCoords = int64_t(kStepThreads) * kStepTiles;  // coordinates per block
constexpr int kFiniteThreads = 256;
constexpr int64_t kFiniteCoords = 4096;                 // coordinates per block of the finiteness pass
constexpr int kUpdateThreads = 256;
constexpr int64_t kUpdateCoords = 2048;                 // coordinates per block of the update
constexpr int kSumsThreads = 256;
constexpr int kSumsWarps = kSumsThreads / 32;

static_assert(K_STEPPED == 24, "the warp reduce-scatter below is written for 24 summed quantities");
static_assert(R_U == ROWS - 1, "u is the last state row");

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Device scalars shared by every kernel of a call.
struct StepArgs {
  const double* grad_scale;   // 0-dim float64 or null: gradients are multiplied by 1 / *grad_scale
  const double* found_inf;    // 0-dim float64 or null: nonzero skips every parameter
  const float* mean_log_lr;   // 0-dim float32
  const float* weights;       // [NUM_WEIGHTS] float32
  const float* coord_bias;    // [T, G4] float32, contiguous
  const int* flags;           // [T]: 1 when parameter i is skipped (non-finite gradient)
};

// Up to kMaxTensors tensors of one group, by value. Blocks of a launch cover the tensors in order:
// tensor k owns blocks [block_start[k], block_start[k + 1]) (of a kernel-specific size in
// coordinates).
template <typename scalar_t, typename state_t>
struct Chunk {
  scalar_t* p[kMaxTensors];        // contiguous parameter [numel]
  const scalar_t* g[kMaxTensors];  // contiguous gradient [numel]
  state_t* s[kMaxTensors];         // contiguous state [ROWS, numel]
  int64_t numel[kMaxTensors];
  double lr[kMaxTensors];
  int index[kMaxTensors];          // the parameter's index in the op's lists (flags, coord_bias, sums, scale)
  int64_t block_start[kMaxTensors + 1];
  int64_t partial_base;            // row of partial of the launch's first block (coordinate kernel)
  int n;                           // tensors in the chunk
};

// The tensor of block `blk` (block_start is increasing; n <= kMaxTensors).
template <typename C>
__device__ __forceinline__ int tensor_of_block(const C& ch, int64_t blk) {
  int t = 0;
  while (t + 1 < ch.n && ch.block_start[t + 1] <= blk) ++t;
  return t;
}

__device__ __forceinline__ bool step_skipped(const StepArgs& a) {
  return a.found_inf != nullptr && *a.found_inf != 0.0;
}

// 1 / grad_scale, computed in double and rounded to acc_t (as the CPU op).
template <typename acc_t>
__device__ __forceinline__ acc_t inverse_scale(const StepArgs& a) {
  return a.grad_scale != nullptr ? static_cast<acc_t>(1.0 / *a.grad_scale) : acc_t(1);
}

// ------------------------------------------------------------------------------------------------
// 1. finiteness of g / grad_scale

template <typename scalar_t, typename state_t>
__global__ void __launch_bounds__(kFiniteThreads) hier_finite_kernel(const Chunk<scalar_t, state_t> ch,
                                                                     const StepArgs a, int* __restrict__ flags) {
  using acc_t = at::opmath_type<scalar_t>;
  if (step_skipped(a)) return;
  const int t = tensor_of_block(ch, blockIdx.x);
  const int64_t c0 = (int64_t(blockIdx.x) - ch.block_start[t]) * kFiniteCoords;
  const int64_t c1 = c0 + kFiniteCoords < ch.numel[t] ? c0 + kFiniteCoords : ch.numel[t];
  const acc_t inv = inverse_scale<acc_t>(a);
  const scalar_t* g = ch.g[t];
  bool bad = false;
  for (int64_t c = c0 + threadIdx.x; c < c1; c += kFiniteThreads)
    bad |= !::isfinite(static_cast<acc_t>(g[c]) * inv);
  if (__syncthreads_or(bad) && threadIdx.x == 0) atomicExch(flags + ch.index[t], 1);
}

// ------------------------------------------------------------------------------------------------
// 2. the per-coordinate step

// One halving step of the warp reduce-scatter: v[0, N) of every lane -> v[0, N/2), each the sum of
// the lane's and its partner's (lane ^ O) values; the lane with bit O set keeps the upper half.
template <int N, int O, typename T>
__device__ __forceinline__ void reduce_scatter_step(T (&v)[K_STEPPED], bool upper) {
#pragma unroll
  for (int k = 0; k < N / 2; ++k) {
    const T send = upper ? v[k] : v[k + N / 2];
    const T keep = upper ? v[k + N / 2] : v[k];
    v[k] = keep + __shfl_xor_sync(0xffffffffu, send, O);
  }
}

// Sums v[0, 24) over the 32 lanes of a warp (all lanes must take part), in a fixed order. Afterwards
// v[0, 3) of lane l holds the warp sums of quantities first_quantity(l) + 0, 1, 2 (the same in the 4
// lanes l & ~3 ... l | 3).
__device__ __forceinline__ int first_quantity(int lane) {
  return ((lane >> 4) & 1) * 12 + ((lane >> 3) & 1) * 6 + ((lane >> 2) & 1) * 3;
}

template <typename T>
__device__ __forceinline__ void warp_reduce_scatter(T (&v)[K_STEPPED], int lane) {
  reduce_scatter_step<24, 16>(v, (lane & 16) != 0);
  reduce_scatter_step<12, 8>(v, (lane & 8) != 0);
  reduce_scatter_step<6, 4>(v, (lane & 4) != 0);
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    v[k] = v[k] + __shfl_xor_sync(0xffffffffu, v[k], 2);
    v[k] = v[k] + __shfl_xor_sync(0xffffffffu, v[k], 1);
  }
}

template <typename scalar_t, typename state_t>
__global__ void __launch_bounds__(kStepThreads, kStepMinBlocks)
    hier_coord_kernel(const Chunk<scalar_t, state_t> ch, const StepArgs a, double* __restrict__ partial) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ __align__(16) acc_t w_sm[NUM_WEIGHTS];
  __shared__ acc_t bias_sm[G4];
  __shared__ double red_sm[kStepWarps][K_STEPPED];

  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int t = tensor_of_block(ch, blockIdx.x);
  const int pi = ch.index[t];
  // Skipped tensors (and steps) leave parameter, state and partials untouched: uniform over the block.
  if (step_skipped(a) || a.flags[pi] != 0) return;

  for (int e = tid; e < NUM_WEIGHTS; e += kStepThreads) w_sm[e] = static_cast<acc_t>(__ldg(a.weights + e));
  if (tid < G4) {
    // b + coord_bias in double, rounded to acc_t (as the CPU op)
    bias_sm[tid] = static_cast<acc_t>(double(__ldg(a.weights + W_B + tid)) +
                                      double(__ldg(a.coord_bias + int64_t(pi) * G4 + tid)));
  }
  __syncthreads();

  const acc_t inv = inverse_scale<acc_t>(a);
  const acc_t mll = static_cast<acc_t>(*a.mean_log_lr);
  const int64_t n = ch.numel[t];
  const int64_t b0 = (int64_t(blockIdx.x) - ch.block_start[t]) * kStepCoords;
  state_t* __restrict__ s = ch.s[t];
  const scalar_t* __restrict__ g = ch.g[t];
  const acc_t* w = w_sm;

  double sum3[3] = {0.0, 0.0, 0.0};  // this lane's running sums of quantities first_quantity(lane) + 0, 1, 2
#pragma unroll 1
  for (int tile = 0; tile < kStepTiles; ++tile) {
    const int64_t tile0 = b0 + int64_t(tile) * kStepThreads;
    if (tile0 >= n) break;  // uniform over the block
    const int64_t c = tile0 + tid;
    acc_t v[K_STEPPED];
    if (c < n) {
      acc_t st[ROWS];
#pragma unroll
      for (int r = 0; r < R_U; ++r) st[r] = static_cast<acc_t>(s[int64_t(r) * n + c]);
      st[R_U] = acc_t(0);  // output only
      acc_t feat[F];
      acc_t d;
      coord_step<acc_t>(w, bias_sm, mll, static_cast<acc_t>(g[c]) * inv, st, feat, d);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) s[int64_t(r) * n + c] = static_cast<state_t>(st[r]);
#pragma unroll
      for (int j = 0; j < H; ++j) v[K_H + j] = st[R_H + j];
#pragma unroll
      for (int f = 0; f < F; ++f) v[K_FEAT + f] = feat[f];
      v[K_D2] = d * d;
      v[K_LOG_LR] = st[R_LOG_LR];
    } else {
#pragma unroll
      for (int q = 0; q < K_STEPPED; ++q) v[q] = acc_t(0);
    }
    warp_reduce_scatter(v, lane);
#pragma unroll
    for (int k = 0; k < 3; ++k) sum3[k] += static_cast<double>(v[k]);
  }
  if ((lane & 3) == 0) {
    const int q0 = first_quantity(lane);
#pragma unroll
    for (int k = 0; k < 3; ++k) red_sm[warp][q0 + k] = sum3[k];
  }
  __syncthreads();
  if (tid < K_STEPPED) {
    double sum = 0.0;
#pragma unroll
    for (int w8 = 0; w8 < kStepWarps; ++w8) sum += red_sm[w8][tid];
    partial[(ch.partial_base + blockIdx.x) * K_STEPPED + tid] = sum;
  }
}

// ------------------------------------------------------------------------------------------------
// 3. per-tensor sums and update scale: one block per tensor of the chunk (the coordinate kernel's)

template <typename scalar_t, typename state_t>
__global__ void __launch_bounds__(kSumsThreads) hier_sums_kernel(const Chunk<scalar_t, state_t> ch,
                                                                 const StepArgs a,
                                                                 const double* __restrict__ partial,
                                                                 float* __restrict__ sums,
                                                                 double* __restrict__ scale) {
  __shared__ double red_sm[kSumsWarps][K_STEPPED];
  __shared__ double d2_sm;
  const int t = blockIdx.x;
  const int pi = ch.index[t];
  const int tid = threadIdx.x;
  float* out = sums + int64_t(pi) * K;
  if (step_skipped(a) || a.flags[pi] != 0) {
    if (tid < K) out[tid] = 0.0f;
    if (tid == 0) scale[pi] = 0.0;
    return;
  }
  const int lane = tid & 31, warp = tid >> 5;
  const int64_t r0 = ch.partial_base + ch.block_start[t], r1 = ch.partial_base + ch.block_start[t + 1];
  if (lane < K_STEPPED) {
    double s = 0.0;
    for (int64_t r = r0 + warp; r < r1; r += kSumsWarps) s += partial[r * K_STEPPED + lane];
    red_sm[warp][lane] = s;
  }
  __syncthreads();
  if (tid < K_STEPPED) {
    double s = 0.0;
#pragma unroll
    for (int w8 = 0; w8 < kSumsWarps; ++w8) s += red_sm[w8][tid];
    out[tid] = static_cast<float>(s);
    if (tid == K_D2) d2_sm = s;
  } else if (tid == K_STEPPED) {
    out[K_STEPPED] = 1.0f;
  }
  __syncthreads();
  if (tid == 0) scale[pi] = ch.lr[t] / ::sqrt(d2_sm / static_cast<double>(ch.numel[t]) + RMS_EPS);
}

// ------------------------------------------------------------------------------------------------
// 4. the update p -= scale * u

template <typename scalar_t, typename state_t>
__global__ void __launch_bounds__(kUpdateThreads) hier_update_kernel(const Chunk<scalar_t, state_t> ch,
                                                                     const StepArgs a,
                                                                     const double* __restrict__ scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int t = tensor_of_block(ch, blockIdx.x);
  const int pi = ch.index[t];
  if (step_skipped(a) || a.flags[pi] != 0) return;
  const acc_t sc = static_cast<acc_t>(scale[pi]);
  const int64_t n = ch.numel[t];
  const int64_t c0 = (int64_t(blockIdx.x) - ch.block_start[t]) * kUpdateCoords;
  const int64_t c1 = c0 + kUpdateCoords < n ? c0 + kUpdateCoords : n;
  scalar_t* __restrict__ p = ch.p[t];
  const state_t* __restrict__ u = ch.s[t] + int64_t(R_U) * n;
  for (int64_t c = c0 + threadIdx.x; c < c1; c += kUpdateThreads)
    p[c] = static_cast<scalar_t>(static_cast<acc_t>(p[c]) - sc * static_cast<acc_t>(u[c]));
}

// ------------------------------------------------------------------------------------------------
// Host side

// One group: parameters idx (non-empty) with parameter dtype scalar_t and state dtype state_t.
template <typename scalar_t, typename state_t>
void step_group(const char* op, const std::vector<int64_t>& idx, TensorList params, TensorList grads,
                TensorList states, c10::ArrayRef<double> lrs, const StepArgs& args, int* flags, float* sums,
                double* scale) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // Contiguous working copies of non-contiguous parameters and gradients.
  std::vector<Tensor> P, G;
  for (int64_t i : idx) {
    P.push_back(params[i].is_contiguous() ? params[i] : params[i].contiguous());
    G.push_back(grads[i].contiguous());
  }
  auto fill = [&](size_t j0, size_t j1, int64_t coords_per_block, int64_t partial_base) {
    Chunk<scalar_t, state_t> ch{};
    ch.n = static_cast<int>(j1 - j0);
    ch.partial_base = partial_base;
    int64_t blocks = 0;
    for (size_t j = j0; j < j1; ++j) {
      const int k = static_cast<int>(j - j0);
      ch.p[k] = P[j].mutable_data_ptr<scalar_t>();
      ch.g[k] = G[j].const_data_ptr<scalar_t>();
      ch.s[k] = states[idx[j]].mutable_data_ptr<state_t>();
      ch.numel[k] = P[j].numel();
      ch.lr[k] = lrs[idx[j]];
      ch.index[k] = static_cast<int>(idx[j]);
      ch.block_start[k] = blocks;
      blocks += ceil_div(P[j].numel(), coords_per_block);
    }
    ch.block_start[ch.n] = blocks;
    TORCH_CHECK(blocks <= INT_MAX, op, ": too many coordinates for one launch");
    return ch;
  };
  // Pass 1: finiteness.
  for (size_t j0 = 0; j0 < idx.size(); j0 += kMaxTensors) {
    const size_t j1 = std::min(idx.size(), j0 + kMaxTensors);
    const auto ch = fill(j0, j1, kFiniteCoords, 0);
    launch_kernel("hier_finite_kernel", hier_finite_kernel<scalar_t, state_t>,
                  static_cast<unsigned>(ch.block_start[ch.n]), kFiniteThreads, 0, stream, ch, args, flags);
  }
  // Passes 2 and 3: the coordinate step with its partial sums, then the per-tensor sums and scales.
  int64_t total_blocks = 0;
  for (int64_t i : idx) total_blocks += ceil_div(params[i].numel(), kStepCoords);
  const Tensor partial = at::empty({total_blocks, int64_t(K_STEPPED)}, params[idx[0]].options().dtype(at::kDouble));
  double* partial_ptr = partial.mutable_data_ptr<double>();
  int64_t base = 0;
  for (size_t j0 = 0; j0 < idx.size(); j0 += kMaxTensors) {
    const size_t j1 = std::min(idx.size(), j0 + kMaxTensors);
    const auto ch = fill(j0, j1, kStepCoords, base);
    launch_kernel("hier_coord_kernel", hier_coord_kernel<scalar_t, state_t>,
                  static_cast<unsigned>(ch.block_start[ch.n]), kStepThreads, 0, stream, ch, args, partial_ptr);
    launch_kernel("hier_sums_kernel", hier_sums_kernel<scalar_t, state_t>, static_cast<unsigned>(ch.n),
                  kSumsThreads, 0, stream, ch, args, partial_ptr, sums, scale);
    base += ch.block_start[ch.n];
  }
  // Pass 4: the update.
  for (size_t j0 = 0; j0 < idx.size(); j0 += kMaxTensors) {
    const size_t j1 = std::min(idx.size(), j0 + kMaxTensors);
    const auto ch = fill(j0, j1, kUpdateCoords, 0);
    launch_kernel("hier_update_kernel", hier_update_kernel<scalar_t, state_t>,
                  static_cast<unsigned>(ch.block_start[ch.n]), kUpdateThreads, 0, stream, ch, args, scale);
  }
  for (size_t j = 0; j < idx.size(); ++j)
    if (!P[j].is_same(params[idx[j]])) params[idx[j]].copy_(P[j]);
}

Tensor hier_step_cuda(TensorList params, TensorList grads, TensorList states, const Tensor& coord_bias,
                      const Tensor& mean_log_lr, const Tensor& weights, c10::ArrayRef<double> lrs,
                      const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf) {
  const char* op = "learnedopt::hier_step_";
  check_hier_step(op, params, grads, states, coord_bias, mean_log_lr, weights, lrs, grad_scale, found_inf, ROWS, G4,
                  NUM_WEIGHTS);
  at::AutoDispatchBelowADInplaceOrView guard;
  const int64_t T = int64_t(params.size());
  TORCH_CHECK(on_cuda_kernels_device(weights), op, ": weights must be a CUDA tensor, got one on ", weights.device());
  const c10::cuda::CUDAGuard device_guard(T > 0 ? params[0].device() : weights.device());
  Tensor sums = at::zeros({T, K}, weights.options());
  const auto groups = nonempty_params_by_dtype(params);
  if (groups.empty()) return sums;
  TORCH_CHECK(T <= INT_MAX, op, ": too many parameters");
  std::vector<Tensor> keep;
  const Tensor w = weights.contiguous();
  const Tensor cb = coord_bias.contiguous();
  const Tensor flags = at::zeros({T}, weights.options().dtype(at::kInt));
  const Tensor scale = at::empty({T}, weights.options().dtype(at::kDouble));
  StepArgs args{};
  args.grad_scale = device_scalar_f64(grad_scale, keep);
  args.found_inf = device_scalar_f64(found_inf, keep);
  args.mean_log_lr = mean_log_lr.const_data_ptr<float>();
  args.weights = w.const_data_ptr<float>();
  args.coord_bias = cb.const_data_ptr<float>();
  args.flags = flags.const_data_ptr<int>();
  int* flags_ptr = flags.mutable_data_ptr<int>();
  float* sums_ptr = sums.mutable_data_ptr<float>();
  double* scale_ptr = scale.mutable_data_ptr<double>();
  for (const auto& group : groups) {
    const at::ScalarType pt = group.first;
    // Split by state dtype: float64 for float64 parameters, else float32 or bfloat16 (check_hier_step).
    std::vector<int64_t> f32_state, bf16_state;
    for (int64_t i : group.second) (states[i].scalar_type() == at::kBFloat16 ? bf16_state : f32_state).push_back(i);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pt, "learnedopt_hier_step_cuda", [&] {
      if constexpr (std::is_same_v<scalar_t, double>) {
        step_group<scalar_t, double>(op, group.second, params, grads, states, lrs, args, flags_ptr, sums_ptr,
                                     scale_ptr);
      } else {
        if (!f32_state.empty())
          step_group<scalar_t, float>(op, f32_state, params, grads, states, lrs, args, flags_ptr, sums_ptr,
                                      scale_ptr);
        if (!bf16_state.empty())
          step_group<scalar_t, c10::BFloat16>(op, bf16_state, params, grads, states, lrs, args, flags_ptr,
                                              sums_ptr, scale_ptr);
      }
    });
  }
  return sums;
}

}  // namespace

LEARNEDOPT_CUDA_IMPL(m) { m.impl("hier_step_", &hier_step_cuda); }

}  // namespace learnedopt
