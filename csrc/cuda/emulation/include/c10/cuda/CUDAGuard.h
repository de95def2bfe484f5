// CUDA emulation stand-in for c10/cuda/CUDAGuard.h (see csrc/cuda/emulation/cuda_emu.h).
#pragma once

#include <c10/core/Device.h>

#include "cuda/emulation/cuda_emu.h"

namespace c10 {
namespace cuda {

// The emulated kernels run on the CPU tensors they are given: there is no device to switch to.
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
};

}  // namespace cuda
}  // namespace c10
