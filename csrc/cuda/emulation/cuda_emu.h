// CUDA emulation: what csrc/cuda/*.cu needs of CUDA, for a host C++ compiler, so that the same
// source nvcc compiles runs on the CPU (test infrastructure, not product: see README.md here).
//
// Model: a kernel launch runs its blocks one after the other; the threads of a block are fibers
// (ucontext) that run one at a time and switch only at the synchronisation points: __syncthreads
// (and _or / _and / _count) is a real barrier of the block's live threads, the warp intrinsics
// (__shfl_*_sync, __ballot_sync, __any_sync, __all_sync, __syncwarp) a rendezvous of the lanes in
// their mask, which must all take part (else the launch fails with a message). Between two
// synchronisation points a thread runs alone, in the order of the launch's schedule (forward or
// reverse thread order): a race in shared memory then gives different results under the two
// schedules. Dynamic shared memory is the requested size, poisoned with 0xFF bytes (NaN for
// floating point) at the start of every block and checked for writes past its end after it.
// Launch limits of sm_90 are checked (block <= 1024 threads, grid limits, dynamic shared memory
// <= 48 KiB unless cudaFuncSetAttribute raised the kernel's limit, <= 227 KiB).
//
// Not emulated: timing, memory-model effects beyond barriers, the exact results of the GPU's
// approximate instructions (the host's libm runs instead), registers and local memory.
#pragma once

#ifndef LEARNEDOPT_CUDA_EMULATION
#error "cuda_emu.h is only for the emulation build (LEARNEDOPT_CUDA_EMULATION)"
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- keywords ------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// The threads of a block are fibers of one host thread, and blocks run one after the other on it:
// storage per host thread is storage per block.
#define __shared__ thread_local

// Code that the memory checker's instrumentation must not see (memcheck.h): the emulator's runtime as
// device code reaches it, and the atomics. GCC neither instruments such a function nor inlines it
// into one that is instrumented.
#define CUDA_EMU_NOT_INSTRUMENTED __attribute__((no_sanitize_thread, noinline))

// ---- the CUDA math API's global names that <cmath> keeps in std ---------------------------------
using std::isfinite;
using std::isinf;
using std::isnan;

// ---- vector types and the runtime API's types ------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};

struct cuda_emu_stream;
using cudaStream_t = cuda_emu_stream*;

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};

// The fields of cudaDeviceProp the launchers read, with an H200's (sm_90) values.
struct cudaDeviceProp {
  char name[256];
  int major, minor;
  int multiProcessorCount;
  int maxThreadsPerBlock, maxThreadsPerMultiProcessor, warpSize;
  int maxThreadsDim[3], maxGridSize[3];
  int regsPerBlock, regsPerMultiprocessor;
  size_t sharedMemPerBlock, sharedMemPerBlockOptin, sharedMemPerMultiprocessor, reservedSharedMemPerBlock;
};

const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();

namespace cuda_emu {

constexpr size_t kMaxDynamicSharedBytes = 227 * 1024;  // sm_90's opt-in limit per block
constexpr size_t kDefaultDynamicSharedBytes = 48 * 1024;

// What device code sees of the thread that runs it.
struct ThreadState {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

// The running emulated thread; fails (a c10::Error on the host) outside a kernel.
ThreadState* self();

const cudaDeviceProp* device_properties();
cudaError_t set_function_attribute(const void* func, cudaFuncAttribute attr, int value);

// Intrinsics (runtime.cpp).
void syncthreads();
int syncthreads_reduce(int kind, int predicate);  // kind: 0 or, 1 and, 2 count
enum WarpOp : int { kShflXor, kShfl, kShflDown, kShflUp, kBallot, kAny, kAll, kSyncwarp };
uint64_t warp_op(WarpOp op, unsigned mask, uint64_t bits, int param, int width);

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp shuffles move at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// The dynamic shared memory of a translation unit (an array each emulated .cu defines: see the
// wrappers in this folder) and the launch itself.
struct SharedArray {
  unsigned char* data;
  size_t size;
};
struct LaunchConfig {
  const char* name;
  const void* func;
  dim3 grid, block;
  size_t dynamic_smem;
  SharedArray smem;
};
void run(const LaunchConfig& cfg, const std::function<void()>& body);

template <typename... P, typename... A>
void launch(SharedArray smem, const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t dynamic_smem,
            A&&... args) {
  // A launch copies its arguments (kernel parameters are passed by value).
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  run(LaunchConfig{name, reinterpret_cast<const void*>(kernel), grid, block, dynamic_smem, smem},
      [&] { std::apply(kernel, params); });
}

}  // namespace cuda_emu

// ---- built-in variables ------------------------------------------------------------------------
#define threadIdx (::cuda_emu::self()->thread_idx)
#define blockIdx (::cuda_emu::self()->block_idx)
#define blockDim (::cuda_emu::self()->block_dim)
#define gridDim (::cuda_emu::self()->grid_dim)
constexpr int warpSize = 32;

// ---- intrinsics ---------------------------------------------------------------------------------
inline void __syncthreads() { ::cuda_emu::syncthreads(); }
inline int __syncthreads_or(int p) { return ::cuda_emu::syncthreads_reduce(0, p); }
inline int __syncthreads_and(int p) { return ::cuda_emu::syncthreads_reduce(1, p); }
inline int __syncthreads_count(int p) { return ::cuda_emu::syncthreads_reduce(2, p); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::cuda_emu::warp_op(::cuda_emu::kSyncwarp, mask, 0, 0, 32); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::cuda_emu::from_bits<T>(::cuda_emu::warp_op(::cuda_emu::kShflXor, mask, ::cuda_emu::to_bits(v), lane_mask, width));
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return ::cuda_emu::from_bits<T>(::cuda_emu::warp_op(::cuda_emu::kShfl, mask, ::cuda_emu::to_bits(v), src_lane, width));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::cuda_emu::from_bits<T>(
      ::cuda_emu::warp_op(::cuda_emu::kShflDown, mask, ::cuda_emu::to_bits(v), static_cast<int>(delta), width));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::cuda_emu::from_bits<T>(
      ::cuda_emu::warp_op(::cuda_emu::kShflUp, mask, ::cuda_emu::to_bits(v), static_cast<int>(delta), width));
}
inline unsigned __ballot_sync(unsigned mask, int p) {
  return static_cast<unsigned>(::cuda_emu::warp_op(::cuda_emu::kBallot, mask, p != 0, 0, 32));
}
inline int __any_sync(unsigned mask, int p) { return static_cast<int>(::cuda_emu::warp_op(::cuda_emu::kAny, mask, p != 0, 0, 32)); }
inline int __all_sync(unsigned mask, int p) { return static_cast<int>(::cuda_emu::warp_op(::cuda_emu::kAll, mask, p != 0, 0, 32)); }

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// Atomics: the emulated threads never run at the same time, and blocks run one after the other. Not
// instrumented: an atomic is no race.
template <typename T>
CUDA_EMU_NOT_INSTRUMENTED T atomicExch(T* addr, T v) {
  const T old = *addr;
  *addr = v;
  return old;
}
template <typename T>
CUDA_EMU_NOT_INSTRUMENTED T atomicAdd(T* addr, T v) {
  const T old = *addr;
  *addr = old + v;
  return old;
}
template <typename T>
CUDA_EMU_NOT_INSTRUMENTED T atomicMax(T* addr, T v) {
  const T old = *addr;
  *addr = old < v ? v : old;
  return old;
}
template <typename T>
CUDA_EMU_NOT_INSTRUMENTED T atomicMin(T* addr, T v) {
  const T old = *addr;
  *addr = v < old ? v : old;
  return old;
}
template <typename T>
CUDA_EMU_NOT_INSTRUMENTED T atomicCAS(T* addr, T compare, T v) {
  const T old = *addr;
  if (old == compare) *addr = v;
  return old;
}

template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  return ::cuda_emu::set_function_attribute(reinterpret_cast<const void*>(func), attr, value);
}
