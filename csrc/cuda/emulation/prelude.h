// What every emulated translation unit (the *_emu.cpp wrappers of csrc/cuda/*.cu) includes first:
// the emulation header, and the dynamic shared memory of the unit's kernels. A .cu declares it as
// `extern __shared__ __align__(16) unsigned char smem_raw[];` inside a kernel of namespace
// learnedopt's anonymous namespace; this definition is the array that declaration names (227 KiB
// per host thread: sm_90's largest; each launch uses, poisons and guards the size it asks for).
#pragma once

#include "cuda/emulation/cuda_emu.h"

namespace learnedopt {
namespace {
thread_local __attribute__((aligned(16))) unsigned char smem_raw[::cuda_emu::kMaxDynamicSharedBytes + 4096];
// The array, for launch_kernel (cuda/launch.cuh).
inline ::cuda_emu::SharedArray cuda_emu_shared_array() { return {smem_raw, sizeof(smem_raw)}; }
}  // namespace
}  // namespace learnedopt
