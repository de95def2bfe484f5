// CUDA emulation stand-in for c10/cuda/CUDAException.h (see csrc/cuda/emulation/cuda_emu.h).
#pragma once

#include <c10/util/Exception.h>

#include "cuda/emulation/cuda_emu.h"

#define C10_CUDA_CHECK(EXPR)                                                                   \
  do {                                                                                         \
    const cudaError_t __err = (EXPR);                                                          \
    TORCH_CHECK(__err == cudaSuccess, "CUDA error (emulated): ", cudaGetErrorString(__err)); \
  } while (0)

// The emulated launch reports its errors itself (a c10::Error from the launch).
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
