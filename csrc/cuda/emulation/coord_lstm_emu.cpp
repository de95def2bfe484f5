// csrc/cuda/coord_lstm_cuda.cu compiled by the host compiler against the CUDA emulation (cuda_emu.h).
#include "cuda/emulation/prelude.h"

#include "cuda/coord_lstm_cuda.cu"
