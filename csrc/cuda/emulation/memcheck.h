// The CUDA emulation's memory checker (memcheck.cpp), like compute-sanitizer's racecheck and
// memcheck: every load and store of the emulated device code is seen, because the emulation's
// translation units are compiled with GCC's ThreadSanitizer instrumentation (-fsanitize=thread),
// whose callbacks (__tsan_read4, __tsan_write8, ...) this library defines itself — no ThreadSanitizer
// runtime is linked. During a launch, an access by device code is
//   * on a fiber's stack or in the emulator's own structures: ignored;
//   * in shared memory (the emulation library's thread-local storage: static __shared__ variables and
//     the translation units' dynamic shared memory): checked against shadow memory for races — two
//     threads touch the same byte between the same two synchronisations, one of them writing — for
//     reads of bytes no thread of the block wrote, and for accesses past the dynamic shared memory the
//     launch asked for;
//   * anywhere else (global memory): checked against the red zones that the emulation's CPU allocator
//     puts before and after every tensor storage — an access just outside a storage fails.
// A failure stops the launch with a message naming the kernel, the thread, the address and the
// other thread. Off by set_memcheck(false) (the emulated tests then rely on the two thread schedules).
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda/emulation/cuda_emu.h"

namespace cuda_emu {

// Fails the running emulated thread (runtime.cpp): the launch stops with `what`.
[[noreturn]] void fail_device(const char* what);

namespace memcheck {

bool enabled();
void set_enabled(bool on);
// Whether the library was built with the instrumentation (else the checker sees no access).
bool instrumented();

// What the runtime tells the checker. `stacks`: the fibers' stacks; `ignore`: the emulator's own
// memory that device code reads (the threads' ThreadState); `shared`: the launch's dynamic shared
// memory and the size it asked for.
struct LaunchInfo {
  const char* kernel;
  dim3 block;
  const void* stacks;
  size_t stacks_bytes;
  const void* ignore;
  size_t ignore_bytes;
  const unsigned char* dynamic_smem;
  size_t dynamic_bytes, dynamic_capacity;
};
void launch_begin(const LaunchInfo& info);
void launch_end();
void block_begin(uint3 block_idx);
void barrier();                         // a __syncthreads released every thread of the block
void warp_synced(int warp, unsigned mask);  // a warp intrinsic completed for the lanes of `mask`
void enter(int thread, int warp);        // the scheduler runs this thread (linear index in the block)
void leave();

// Accesses (the instrumentation's callbacks call these).
void access(const void* addr, size_t bytes, bool write);

}  // namespace memcheck
}  // namespace cuda_emu
