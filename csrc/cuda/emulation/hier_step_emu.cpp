// csrc/cuda/hier_step_cuda.cu compiled by the host compiler against the CUDA emulation (cuda_emu.h).
#include "cuda/emulation/prelude.h"

#include "cuda/hier_step_cuda.cu"
