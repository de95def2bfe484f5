// CUDA emulation stand-in for c10/cuda/CUDAStream.h (see csrc/cuda/emulation/cuda_emu.h).
#pragma once

#include "cuda/emulation/cuda_emu.h"

namespace c10 {
namespace cuda {

// Launches run to completion where they are made: one stream, in order.
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(int = -1) { return CUDAStream{}; }

}  // namespace cuda
}  // namespace c10
