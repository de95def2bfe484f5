// How csrc/cuda/*.cu launch their kernels and register their ops: one place that nvcc and the CUDA
// emulation (csrc/cuda/emulation, LEARNEDOPT_CUDA_EMULATION) expand differently, so that the
// kernels and launchers themselves are the same source in both builds.
#pragma once

#include <cstddef>
#include <utility>

#include <torch/library.h>

#ifdef LEARNEDOPT_CUDA_EMULATION
#include "cuda/emulation/cuda_emu.h"
#else
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#endif

namespace learnedopt {

// kernel<<<grid, block, dynamic_smem, stream>>>(args...), then the launch error check. `name`
// names the kernel in the emulation's messages.
template <typename... P, typename... A>
inline void launch_kernel(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t dynamic_smem,
                          cudaStream_t stream, A&&... args) {
#ifdef LEARNEDOPT_CUDA_EMULATION
  (void)stream;
  ::cuda_emu::launch(cuda_emu_shared_array(), name, kernel, grid, block, dynamic_smem, std::forward<A>(args)...);
#else
  (void)name;
  kernel<<<grid, block, dynamic_smem, stream>>>(std::forward<A>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

}  // namespace learnedopt

// TORCH_LIBRARY_IMPL of the CUDA kernels: for the CUDA key of the learnedopt ops, or in the emulation
// for the CPU key of the learnedopt_emu ops (the same schemas; see emulation/registration.cpp).
#ifdef LEARNEDOPT_CUDA_EMULATION
#define LEARNEDOPT_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(learnedopt_emu, CPU, m)
#else
#define LEARNEDOPT_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(learnedopt, CUDA, m)
#endif
