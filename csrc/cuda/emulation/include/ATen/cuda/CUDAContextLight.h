// CUDA emulation stand-in for ATen/cuda/CUDAContextLight.h (see csrc/cuda/emulation/cuda_emu.h).
#pragma once

#include "cuda/emulation/cuda_emu.h"

namespace at {
namespace cuda {

inline const cudaDeviceProp* getCurrentDeviceProperties() { return ::cuda_emu::device_properties(); }
inline const cudaDeviceProp* getDeviceProperties(int) { return ::cuda_emu::device_properties(); }

}  // namespace cuda
}  // namespace at
