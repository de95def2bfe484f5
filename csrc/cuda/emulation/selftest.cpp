// Kernels that test the CUDA emulation itself (tests/test_cuda_emu.py): each semantic of cuda_emu.h
// and each of its checks, with the planted bugs the checks must catch. Written as CUDA is; only in
// the emulation build (ops learnedopt_emu::selftest_*).
#include "cuda/emulation/prelude.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cuda/launch.cuh"

namespace learnedopt {
namespace {

using at::Tensor;

// (blockIdx.x, threadIdx.x, blockDim.x, gridDim.x) of every thread, row blockIdx.x * blockDim.x + threadIdx.x.
__global__ void indices_kernel(int* out) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  out[4 * r + 0] = blockIdx.x;
  out[4 * r + 1] = threadIdx.x;
  out[4 * r + 2] = blockDim.x;
  out[4 * r + 3] = gridDim.x;
}

Tensor selftest_indices(int64_t grid, int64_t block) {
  Tensor out = at::zeros({grid * block, 4}, at::kInt);
  launch_kernel("indices_kernel", indices_kernel, unsigned(grid), unsigned(block), 0, nullptr, out.mutable_data_ptr<int>());
  return out;
}

// out[t] = x[(t + 1) % T] through shared memory; `barrier` false plants the missing __syncthreads.
__global__ void stage_kernel(const float* x, float* out, int T, bool barrier) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sm = reinterpret_cast<float*>(smem_raw);
  const int t = threadIdx.x;
  sm[t] = x[t];
  if (barrier) __syncthreads();
  out[t] = sm[(t + 1) % T];
}

Tensor selftest_stage(const Tensor& x, bool barrier) {
  const int T = static_cast<int>(x.numel());
  Tensor xc = x.contiguous(), out = at::empty({T}, x.options());
  launch_kernel("stage_kernel", stage_kernel, 1u, unsigned(T), size_t(T) * sizeof(float), nullptr,
                xc.const_data_ptr<float>(), out.mutable_data_ptr<float>(), T, barrier);
  return out;
}

// Butterfly sum over the lanes of `mask` (out[lane] = the sum, for lanes in the mask; others keep 0).
// Offsets first, first / 2, ..., 1. Lane `exit_lane` (if >= 0) returns before the shuffles: the
// planted bug of a missing lane.
__global__ void warp_sum_kernel(const float* x, float* out, unsigned mask, int first, int exit_lane) {
  const int lane = threadIdx.x;
  if (lane == exit_lane || !(mask >> lane & 1u)) return;
  float v = x[lane];
  for (int o = first; o > 0; o >>= 1) v += __shfl_xor_sync(mask, v, o);
  out[lane] = v;
}

Tensor selftest_warp_sum(const Tensor& x, int64_t mask, int64_t first, int64_t exit_lane) {
  Tensor xc = x.contiguous(), out = at::zeros({32}, x.options());
  launch_kernel("warp_sum_kernel", warp_sum_kernel, 1u, 32u, 0, nullptr, xc.const_data_ptr<float>(),
                out.mutable_data_ptr<float>(), static_cast<unsigned>(mask), static_cast<int>(first),
                static_cast<int>(exit_lane));
  return out;
}

// Per thread: [ballot, any, all, shfl from lane src, shfl_down by 1, shfl_up by 1] over a full warp.
__global__ void warp_ops_kernel(const int* pred, int* out, int src, int width) {
  const int lane = threadIdx.x;
  const int p = pred[lane];
  int* o = out + 6 * lane;
  o[0] = static_cast<int>(__ballot_sync(0xffffffffu, p));
  o[1] = __any_sync(0xffffffffu, p);
  o[2] = __all_sync(0xffffffffu, p);
  o[3] = __shfl_sync(0xffffffffu, lane * 10, src, width);
  o[4] = __shfl_down_sync(0xffffffffu, lane * 10, 1u, width);
  o[5] = __shfl_up_sync(0xffffffffu, lane * 10, 1u, width);
  __syncwarp();
}

Tensor selftest_warp_ops(const Tensor& pred, int64_t src, int64_t width) {
  Tensor pc = pred.to(at::kInt).contiguous(), out = at::zeros({32, 6}, at::kInt);
  launch_kernel("warp_ops_kernel", warp_ops_kernel, 1u, 32u, 0, nullptr, pc.const_data_ptr<int>(),
                out.mutable_data_ptr<int>(), static_cast<int>(src), static_cast<int>(width));
  return out;
}

// __syncthreads_or / _and / _count of pred over a block; out[t] = the three results seen by thread t.
__global__ void block_reduce_kernel(const int* pred, int* out) {
  const int t = threadIdx.x;
  const int p = pred[t];
  out[3 * t + 0] = __syncthreads_or(p);
  out[3 * t + 1] = __syncthreads_and(p);
  out[3 * t + 2] = __syncthreads_count(p);
}

Tensor selftest_block_reduce(const Tensor& pred) {
  const int T = static_cast<int>(pred.numel());
  Tensor pc = pred.to(at::kInt).contiguous(), out = at::zeros({T, 3}, at::kInt);
  launch_kernel("block_reduce_kernel", block_reduce_kernel, 1u, unsigned(T), 0, nullptr, pc.const_data_ptr<int>(),
                out.mutable_data_ptr<int>());
  return out;
}

// Planted divergence in a block of 32: lanes 0..15 wait at __syncthreads while lanes 16..31 call a
// full-warp shuffle (mode 0) or __syncthreads_or (mode 1).
__global__ void divergent_kernel(int* out, int mode) {
  const int t = threadIdx.x;
  if (t < 16) {
    __syncthreads();
  } else if (mode == 0) {
    out[t] = __shfl_xor_sync(0xffffffffu, t, 1);
  } else {
    out[t] = __syncthreads_or(1);
  }
}

void selftest_divergent(int64_t mode) {
  Tensor out = at::zeros({32}, at::kInt);
  launch_kernel("divergent_kernel", divergent_kernel, 1u, 32u, 0, nullptr, out.mutable_data_ptr<int>(),
                static_cast<int>(mode));
}

// atomicAdd of 1 by every thread of every block.
__global__ void atomic_kernel(int* counter) { atomicAdd(counter, 1); }

int64_t selftest_atomic(int64_t grid, int64_t block) {
  Tensor c = at::zeros({1}, at::kInt);
  launch_kernel("atomic_kernel", atomic_kernel, unsigned(grid), unsigned(block), 0, nullptr, c.mutable_data_ptr<int>());
  return c.item<int>();
}

// A kernel that writes one byte of dynamic shared memory at `at` (if >= 0; the planted overflow when
// at >= smem).
__global__ void smem_write_kernel(int64_t at) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  if (threadIdx.x == 0 && at >= 0) smem_raw[at] = 1;
}

// Launches smem_write_kernel with the given configuration; attr > 0 first raises its dynamic
// shared memory limit to attr bytes (cudaFuncSetAttribute).
void selftest_launch(int64_t grid, int64_t block, int64_t smem, int64_t attr, int64_t write_at) {
  if (attr > 0)
    C10_CUDA_CHECK(cudaFuncSetAttribute(smem_write_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(attr)));
  launch_kernel("smem_write_kernel", smem_write_kernel, unsigned(grid), unsigned(block), size_t(smem), nullptr,
                write_at);
}

// Shared-memory access patterns for the memory checker, one block of T threads (T <= 64); out[t] is
// what thread t read. Races (planted bugs): 0 every thread writes the same value to one word with no
// barrier after the first write (a race that no schedule shows: the value is the same either way);
// 1 thread t reads word t + 1 and writes word t with no barrier between (write after read); 5 lanes
// exchange words with no __syncwarp (within one warp). Race-free: 2 as 1 with a barrier; 3 every
// thread reads word 0 (a broadcast); 4 as 5 with __syncwarp; 6 atomicAdd on one word. 7 reads
// static __shared__ memory that no thread wrote (a planted bug).
__global__ void shared_patterns_kernel(float* out, int mode) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sm = reinterpret_cast<float*>(smem_raw);
  __shared__ float never_written[64];
  __shared__ int counter;
  const int t = threadIdx.x, T = blockDim.x;
  sm[t] = float(t);
  if (t == 0) counter = 0;
  __syncthreads();
  float v = 0.f;
  switch (mode) {
    case 0: sm[0] = 1.f; __syncthreads(); v = sm[0]; break;
    case 1: v = sm[(t + 1) % T]; sm[t] = v + 1.f; break;
    case 2: v = sm[(t + 1) % T]; __syncthreads(); sm[t] = v + 1.f; break;
    case 3: v = sm[0]; break;
    case 4: sm[t] = float(2 * t); __syncwarp(); v = sm[t ^ 1]; break;
    case 5: sm[t] = float(2 * t); v = sm[t ^ 1]; break;
    case 6: atomicAdd(&counter, 1); __syncthreads(); v = float(counter); break;
    case 7: v = never_written[t]; break;
    case 8: never_written[t] = 1.f; break;  // (never run: that the compiler may not fold the reads of mode 7 to 0)
    default: break;
  }
  out[t] = v;
}

Tensor selftest_shared_patterns(int64_t threads, int64_t mode) {
  Tensor out = at::zeros({threads}, at::kFloat);
  launch_kernel("shared_patterns_kernel", shared_patterns_kernel, 1u, unsigned(threads), size_t(threads) * sizeof(float),
                nullptr, out.mutable_data_ptr<float>(), static_cast<int>(mode));
  return out;
}

// Thread 0 reads (or writes) element `at` of x, which may be out of bounds (the planted bugs: at
// == numel, at < 0); returns what it read.
__global__ void global_access_kernel(float* x, int64_t at, bool write, float* out) {
  if (threadIdx.x != 0) return;
  if (write)
    x[at] = 1.f;
  else
    out[0] = x[at];
}

double selftest_global_access(const Tensor& x, int64_t at, bool write) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat, "selftest_global_access: contiguous float32 x");
  Tensor out = at::zeros({1}, at::kFloat);
  launch_kernel("global_access_kernel", global_access_kernel, 1u, 32u, 0, nullptr, x.mutable_data_ptr<float>(), at,
                write, out.mutable_data_ptr<float>());
  return out.item<float>();
}

// float -> bfloat16 / float16 as device code converts (c10's conversions: round to nearest, ties to even).
__global__ void round_kernel(const float* x, c10::BFloat16* b, c10::Half* h, int64_t n) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    b[i] = c10::BFloat16(x[i]);
    h[i] = c10::Half(x[i]);
  }
}

std::tuple<Tensor, Tensor> selftest_round(const Tensor& x) {
  Tensor xc = x.contiguous();
  Tensor b = at::empty(x.sizes(), x.options().dtype(at::kBFloat16)), h = at::empty(x.sizes(), x.options().dtype(at::kHalf));
  launch_kernel("round_kernel", round_kernel, 1u, 64u, 0, nullptr, xc.const_data_ptr<float>(),
                b.mutable_data_ptr<c10::BFloat16>(), h.mutable_data_ptr<c10::Half>(), xc.numel());
  return {b, h};
}

}  // namespace
}  // namespace learnedopt

TORCH_LIBRARY_FRAGMENT(learnedopt_emu, m) {
  using namespace learnedopt;
  m.def("selftest_indices(int grid, int block) -> Tensor", &selftest_indices);
  m.def("selftest_stage(Tensor x, bool barrier) -> Tensor", &selftest_stage);
  m.def("selftest_warp_sum(Tensor x, int mask, int first, int exit_lane) -> Tensor", &selftest_warp_sum);
  m.def("selftest_warp_ops(Tensor pred, int src, int width) -> Tensor", &selftest_warp_ops);
  m.def("selftest_block_reduce(Tensor pred) -> Tensor", &selftest_block_reduce);
  m.def("selftest_divergent(int mode) -> ()", &selftest_divergent);
  m.def("selftest_atomic(int grid, int block) -> int", &selftest_atomic);
  m.def("selftest_launch(int grid, int block, int smem, int attr, int write_at) -> ()", &selftest_launch);
  m.def("selftest_round(Tensor x) -> (Tensor, Tensor)", &selftest_round);
  m.def("selftest_shared_patterns(int threads, int mode) -> Tensor", &selftest_shared_patterns);
  m.def("selftest_global_access(Tensor(a!) x, int at, bool write) -> float", &selftest_global_access);
}
