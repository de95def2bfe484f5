// The CUDA emulation's runtime: launches, the fibers of a block, barriers and warp rendezvous,
// launch-limit checks (see cuda_emu.h for the model).
#include "cuda/emulation/cuda_emu.h"

#include <c10/util/Exception.h>

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "cuda/emulation/emu_control.h"
#include "cuda/emulation/memcheck.h"

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}
cudaError_t cudaGetLastError() { return cudaSuccess; }
cudaError_t cudaPeekAtLastError() { return cudaSuccess; }

namespace cuda_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;  // per emulated thread (kernels keep small arrays only)
constexpr unsigned char kPoison = 0xFF;      // fill of shared memory: NaN for float and double
constexpr size_t kGuardBytes = 4096;         // checked for writes after the requested dynamic shared memory

enum class State { kRunning, kBarrier, kWarp, kDone, kFailed };

struct Fiber : ThreadState {
  ucontext_t ctx;
  State state = State::kRunning;
  int lane = 0, warp = 0;
  // at a barrier: the reduction and its operand; after it, the result
  int reduce_kind = -1, predicate = 0, reduce_result = 0;
  // at a warp intrinsic
  WarpOp op = kSyncwarp;
  unsigned mask = 0;
  uint64_t bits = 0, result = 0;
  int param = 0, width = 32;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  const std::function<void()>* body = nullptr;
  const char* name = nullptr;
  std::string error;  // set by the first failure; the launch then stops
};

thread_local Block* g_block = nullptr;
thread_local Fiber* g_self = nullptr;

std::mutex g_mutex;  // the registry of function attributes and the control state
std::unordered_map<const void*, int> g_max_dynamic_smem;
Control g_control;

[[noreturn]] CUDA_EMU_NOT_INSTRUMENTED void fail_in_thread(const std::string& what) {
  Fiber* f = g_self;
  if (g_block->error.empty()) {
    std::ostringstream os;
    os << what << " (in thread (" << f->thread_idx.x << "," << f->thread_idx.y << "," << f->thread_idx.z
       << ") of block (" << f->block_idx.x << "," << f->block_idx.y << "," << f->block_idx.z << "))";
    g_block->error = os.str();
  }
  f->state = State::kFailed;
  swapcontext(&f->ctx, &g_block->scheduler);
  std::abort();  // a failed fiber is never resumed
}

CUDA_EMU_NOT_INSTRUMENTED void yield() { swapcontext(&g_self->ctx, &g_block->scheduler); }

CUDA_EMU_NOT_INSTRUMENTED void fiber_main() {
  try {
    (*g_block->body)();
  } catch (const std::exception& e) {
    fail_in_thread(std::string("an exception in device code: ") + e.what());
  }
  g_self->state = State::kDone;
  swapcontext(&g_self->ctx, &g_block->scheduler);
  std::abort();
}

std::string state_name(const Fiber& f) {
  switch (f.state) {
    case State::kRunning: return "running";
    case State::kBarrier: return "at __syncthreads";
    case State::kWarp: return "at a warp intrinsic";
    case State::kDone: return "exited";
    case State::kFailed: return "failed";
  }
  return "?";
}

// Lanes that a warp intrinsic of `f` involves (its mask, within the block's threads).
bool lane_exists(const Block& b, int warp, int lane) { return size_t(warp) * 32 + lane < b.fibers.size(); }

// Completes the warp intrinsics whose lanes have all arrived. Returns whether one completed; sets
// the block's error where a lane of a mask cannot take part.
bool resolve_warps(Block& b) {
  bool released = false;
  const int warps = static_cast<int>((b.fibers.size() + 31) / 32);
  for (int w = 0; w < warps; ++w) {
    Fiber* lanes[32] = {};
    for (int l = 0; l < 32; ++l)
      if (lane_exists(b, w, l)) lanes[l] = &b.fibers[size_t(w) * 32 + l];
    for (int l = 0; l < 32; ++l) {
      Fiber* f = lanes[l];
      if (!f || f->state != State::kWarp) continue;
      bool ready = true;
      for (int o = 0; o < 32 && ready; ++o) {
        if (!(f->mask >> o & 1u)) continue;
        Fiber* g = lanes[o];
        std::ostringstream os;
        if (!g) {
          os << "warp intrinsic: mask 0x" << std::hex << f->mask << std::dec << " names lane " << o
             << ", which this block (" << b.fibers.size() << " threads) does not have";
        } else if (g->state == State::kDone || g->state == State::kBarrier || g->state == State::kFailed) {
          os << "warp intrinsic: lane " << o << " of mask 0x" << std::hex << f->mask << std::dec
             << " does not take part (it is " << state_name(*g) << ")";
        } else if (g->state == State::kWarp && (g->mask != f->mask || g->op != f->op)) {
          os << "warp intrinsic: lanes " << l << " and " << o << " are at different intrinsics or masks (0x"
             << std::hex << f->mask << " and 0x" << g->mask << std::dec << ")";
        } else if (g->state != State::kWarp) {
          ready = false;  // cannot happen after a full pass; kept for safety
          continue;
        }
        if (!os.str().empty()) {
          if (b.error.empty()) b.error = os.str() + " (warp " + std::to_string(w) + " of block " +
                                         std::to_string(f->block_idx.x) + ")";
          return false;
        }
      }
      if (!ready) continue;
      // every lane of the mask is here: compute each one's result
      const unsigned mask = f->mask;
      unsigned ballot = 0;
      for (int o = 0; o < 32; ++o)
        if ((mask >> o & 1u) && lanes[o]->bits) ballot |= 1u << o;
      for (int o = 0; o < 32; ++o) {
        if (!(mask >> o & 1u)) continue;
        Fiber* g = lanes[o];
        const int width = g->width;
        const int base = o / width * width;
        int src = o;
        switch (g->op) {
          case kShflXor: src = base + ((o - base) ^ g->param); break;
          case kShfl: src = base + (g->param % width + width) % width; break;
          case kShflDown: src = (o - base) + g->param < width ? o + g->param : o; break;
          case kShflUp: src = (o - base) - g->param >= 0 ? o - g->param : o; break;
          default: break;
        }
        if (g->op == kShflXor || g->op == kShfl || g->op == kShflDown || g->op == kShflUp) {
          if (src < 0 || src >= 32 || !(mask >> src & 1u)) {
            std::ostringstream os;
            os << "warp shuffle: lane " << o << " reads lane " << src << ", which is not in mask 0x" << std::hex
               << mask;
            if (b.error.empty()) b.error = os.str();
            return false;
          }
          g->result = lanes[src]->bits;
        } else if (g->op == kBallot) {
          g->result = ballot;
        } else if (g->op == kAny) {
          g->result = ballot != 0;
        } else if (g->op == kAll) {
          g->result = ballot == mask;
        } else {
          g->result = 0;
        }
      }
      for (int o = 0; o < 32; ++o)
        if (mask >> o & 1u) lanes[o]->state = State::kRunning;
      memcheck::warp_synced(w, mask);
      released = true;
    }
  }
  return released;
}

// Releases a barrier all live threads have reached. Returns whether it did.
bool resolve_barrier(Block& b) {
  int at = 0, live = 0, kind = -1, acc_or = 0, acc_and = 1, count = 0;
  for (auto& f : b.fibers) {
    if (f.state == State::kDone) continue;
    ++live;
    if (f.state != State::kBarrier) continue;
    ++at;
    if (kind == -1) kind = f.reduce_kind;
    if (f.reduce_kind != kind) {
      if (b.error.empty())
        b.error = "__syncthreads: the threads of one block wait at different barriers (plain and _or/_and/_count)";
      return false;
    }
    acc_or |= f.predicate != 0;
    acc_and &= f.predicate != 0;
    count += f.predicate != 0;
  }
  if (live == 0 || at != live) return false;
  const int result = kind == 0 ? acc_or : kind == 1 ? acc_and : count;
  for (auto& f : b.fibers) {
    if (f.state != State::kBarrier) continue;
    f.reduce_result = result;
    f.state = State::kRunning;
  }
  memcheck::barrier();
  return true;
}

std::string describe_deadlock(const Block& b) {
  std::ostringstream os;
  os << "the block's threads cannot go on (a barrier or a warp intrinsic that not all of them reach):";
  int shown = 0;
  for (size_t i = 0; i < b.fibers.size() && shown < 8; ++i) {
    const Fiber& f = b.fibers[i];
    if (f.state == State::kDone) continue;
    os << " thread " << i << " " << state_name(f) << ";";
    ++shown;
  }
  return os.str();
}

struct Stacks {
  unsigned char* base = nullptr;
  size_t bytes = 0;
  ~Stacks() {
    if (base) munmap(base, bytes);
  }
  unsigned char* get(size_t threads) {
    const size_t need = threads * kStackBytes;
    if (need > bytes) {
      if (base) munmap(base, bytes);
      void* p = mmap(nullptr, need, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      TORCH_CHECK(p != MAP_FAILED, "cuda emulation: cannot map ", need, " bytes of fiber stacks");
      base = static_cast<unsigned char*>(p);
      bytes = need;
    }
    return base;
  }
};

void check_config(const LaunchConfig& c) {
  const cudaDeviceProp* p = device_properties();
  const uint64_t threads = uint64_t(c.block.x) * c.block.y * c.block.z;
  TORCH_CHECK(c.grid.x >= 1 && c.grid.y >= 1 && c.grid.z >= 1, "cuda emulation: launch of ", c.name, " with grid (",
              c.grid.x, ", ", c.grid.y, ", ", c.grid.z, "): every dimension must be >= 1 (a GPU refuses it: ",
              "invalid configuration argument)");
  TORCH_CHECK(c.grid.x <= unsigned(p->maxGridSize[0]) && c.grid.y <= unsigned(p->maxGridSize[1]) &&
                  c.grid.z <= unsigned(p->maxGridSize[2]),
              "cuda emulation: launch of ", c.name, " with grid (", c.grid.x, ", ", c.grid.y, ", ", c.grid.z,
              ") exceeds sm_90's (", p->maxGridSize[0], ", ", p->maxGridSize[1], ", ", p->maxGridSize[2], ")");
  TORCH_CHECK(threads >= 1 && threads <= unsigned(p->maxThreadsPerBlock) && c.block.x <= unsigned(p->maxThreadsDim[0]) &&
                  c.block.y <= unsigned(p->maxThreadsDim[1]) && c.block.z <= unsigned(p->maxThreadsDim[2]),
              "cuda emulation: launch of ", c.name, " with block (", c.block.x, ", ", c.block.y, ", ", c.block.z,
              "): at most ", p->maxThreadsPerBlock, " threads (", p->maxThreadsDim[0], ", ", p->maxThreadsDim[1], ", ",
              p->maxThreadsDim[2], ") per block");
  size_t limit = kDefaultDynamicSharedBytes;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_max_dynamic_smem.find(c.func);
    if (it != g_max_dynamic_smem.end()) limit = std::max<size_t>(limit, size_t(it->second));
  }
  TORCH_CHECK(c.dynamic_smem <= limit, "cuda emulation: launch of ", c.name, " asks for ", c.dynamic_smem,
              " bytes of dynamic shared memory; its limit is ", limit,
              " (48 KiB unless cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize) raised it)");
  Resources res;
  bool known = false;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_control.resources.find(c.name);
    if (it != g_control.resources.end()) {
      res = it->second;
      known = true;
    }
  }
  if (known) {
    // sm_90 allocates registers per warp in units of 256 (a thread's count rounded up to 8).
    const uint64_t per_warp = (uint64_t(res.registers) * 32 + 255) / 256 * 256;
    const uint64_t warps = (threads + 31) / 32;
    TORCH_CHECK(per_warp * warps <= uint64_t(p->regsPerBlock), "cuda emulation: launch of ", c.name, " with ",
                threads, " threads: too many resources requested for launch (", res.registers,
                " registers per thread, ptxas: ", per_warp * warps, " per block, sm_90 has ", p->regsPerBlock, ")");
    TORCH_CHECK(res.max_threads == 0 || threads <= uint64_t(res.max_threads), "cuda emulation: launch of ", c.name,
                " with ", threads, " threads per block exceeds its __launch_bounds__ (", res.max_threads,
                "; a GPU refuses the launch: too many resources requested for launch)");
    TORCH_CHECK(res.static_smem <= p->sharedMemPerBlock, "cuda emulation: ", c.name, " has ", res.static_smem,
                " bytes of static shared memory; sm_90 allows ", p->sharedMemPerBlock);
    TORCH_CHECK(res.static_smem + c.dynamic_smem <= p->sharedMemPerBlockOptin, "cuda emulation: launch of ", c.name,
                ": ", res.static_smem, " bytes of static and ", c.dynamic_smem,
                " of dynamic shared memory exceed sm_90's ", p->sharedMemPerBlockOptin, " per block");
  }
  TORCH_CHECK(c.dynamic_smem == 0 || (c.smem.data && c.dynamic_smem <= c.smem.size), "cuda emulation: launch of ",
              c.name, ": ", c.dynamic_smem, " bytes of dynamic shared memory, but its translation unit provides ",
              c.smem.size);
}

}  // namespace

[[noreturn]] CUDA_EMU_NOT_INSTRUMENTED void fail_device(const char* what) { fail_in_thread(what); }

CUDA_EMU_NOT_INSTRUMENTED ThreadState* self() {
  TORCH_CHECK(g_self != nullptr, "cuda emulation: device code (threadIdx, blockIdx, ...) used outside a kernel launch");
  return g_self;
}

const cudaDeviceProp* device_properties() {
  static const cudaDeviceProp prop = [] {
    cudaDeviceProp p{};
    std::strncpy(p.name, "NVIDIA H200 (emulated)", sizeof(p.name) - 1);
    p.major = 9;
    p.minor = 0;
    p.multiProcessorCount = 132;
    p.maxThreadsPerBlock = 1024;
    p.maxThreadsPerMultiProcessor = 2048;
    p.warpSize = 32;
    p.maxThreadsDim[0] = 1024;
    p.maxThreadsDim[1] = 1024;
    p.maxThreadsDim[2] = 64;
    p.maxGridSize[0] = 2147483647;
    p.maxGridSize[1] = 65535;
    p.maxGridSize[2] = 65535;
    p.regsPerBlock = 65536;
    p.regsPerMultiprocessor = 65536;
    p.sharedMemPerBlock = 48 * 1024;
    p.sharedMemPerBlockOptin = kMaxDynamicSharedBytes;
    p.sharedMemPerMultiprocessor = 228 * 1024;
    p.reservedSharedMemPerBlock = 1024;
    return p;
  }();
  return &prop;
}

cudaError_t set_function_attribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || size_t(value) > kMaxDynamicSharedBytes) return cudaErrorInvalidValue;
    std::lock_guard<std::mutex> lock(g_mutex);
    g_max_dynamic_smem[func] = value;
  }
  return cudaSuccess;
}

CUDA_EMU_NOT_INSTRUMENTED void syncthreads() {
  Fiber* f = static_cast<Fiber*>(self());
  f->reduce_kind = 3;
  f->predicate = 0;
  f->state = State::kBarrier;
  yield();
}

CUDA_EMU_NOT_INSTRUMENTED int syncthreads_reduce(int kind, int predicate) {
  Fiber* f = static_cast<Fiber*>(self());
  f->reduce_kind = kind;
  f->predicate = predicate;
  f->state = State::kBarrier;
  yield();
  return f->reduce_result;
}

CUDA_EMU_NOT_INSTRUMENTED uint64_t warp_op(WarpOp op, unsigned mask, uint64_t bits, int param, int width) {
  Fiber* f = static_cast<Fiber*>(self());
  if (!(mask >> f->lane & 1u)) {
    std::ostringstream os;
    os << "warp intrinsic: the calling lane " << f->lane << " is not in its mask 0x" << std::hex << mask;
    fail_in_thread(os.str());
  }
  if (width < 1 || width > 32 || (width & (width - 1))) fail_in_thread("warp shuffle: width must be a power of 2 <= 32");
  f->op = op;
  f->mask = mask;
  f->bits = bits;
  f->param = param;
  f->width = width;
  f->state = State::kWarp;
  yield();
  return f->result;
}

void run(const LaunchConfig& cfg, const std::function<void()>& body) {
  TORCH_CHECK(g_block == nullptr, "cuda emulation: a kernel launched from device code (not supported)");
  check_config(cfg);
  const Schedule schedule = [] {
    std::lock_guard<std::mutex> lock(g_mutex);
    return g_control.schedule;
  }();
  const size_t threads = size_t(cfg.block.x) * cfg.block.y * cfg.block.z;
  thread_local Stacks stacks;
  unsigned char* stack_base = stacks.get(threads);
  Block block;
  block.body = &body;
  block.name = cfg.name;
  block.fibers.resize(threads);
  memcheck::launch_begin(memcheck::LaunchInfo{cfg.name, cfg.block, stack_base, threads * kStackBytes,
                                              block.fibers.data(), threads * sizeof(Fiber), cfg.smem.data,
                                              cfg.dynamic_smem, cfg.smem.size});
  struct EndLaunch {
    ~EndLaunch() { memcheck::launch_end(); }
  } end_launch;
  const uint64_t blocks = uint64_t(cfg.grid.x) * cfg.grid.y * cfg.grid.z;
  for (uint64_t bi = 0; bi < blocks; ++bi) {
    const uint3 bidx{unsigned(bi % cfg.grid.x), unsigned(bi / cfg.grid.x % cfg.grid.y),
                     unsigned(bi / (uint64_t(cfg.grid.x) * cfg.grid.y))};
    // poison what the block may use and the guard band after it
    if (cfg.smem.data) std::memset(cfg.smem.data, kPoison, std::min(cfg.smem.size, cfg.dynamic_smem + kGuardBytes));
    for (size_t t = 0; t < threads; ++t) {
      Fiber& f = block.fibers[t];
      f = Fiber();
      f.thread_idx = uint3{unsigned(t % cfg.block.x), unsigned(t / cfg.block.x % cfg.block.y),
                           unsigned(t / (size_t(cfg.block.x) * cfg.block.y))};
      f.block_idx = bidx;
      f.block_dim = cfg.block;
      f.grid_dim = cfg.grid;
      f.lane = static_cast<int>(t % 32);
      f.warp = static_cast<int>(t / 32);
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = stack_base + t * kStackBytes;
      f.ctx.uc_stack.ss_size = kStackBytes;
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, fiber_main, 0);
    }
    g_block = &block;
    memcheck::block_begin(bidx);
    for (;;) {
      bool any_live = false;
      for (size_t k = 0; k < threads; ++k) {
        const size_t t = schedule == Schedule::kReverse ? threads - 1 - k : k;
        Fiber& f = block.fibers[t];
        if (f.state != State::kRunning) continue;
        g_self = &f;
        memcheck::enter(static_cast<int>(t), f.warp);
        swapcontext(&block.scheduler, &f.ctx);
        memcheck::leave();
        g_self = nullptr;
        if (!block.error.empty()) break;
      }
      if (!block.error.empty()) break;
      for (auto& f : block.fibers) any_live |= f.state != State::kDone;
      if (!any_live) break;
      if (resolve_warps(block)) continue;
      if (!block.error.empty()) break;
      if (resolve_barrier(block)) continue;
      if (block.error.empty()) block.error = describe_deadlock(block);
      break;
    }
    g_block = nullptr;
    g_self = nullptr;
    TORCH_CHECK(block.error.empty(), "cuda emulation: ", cfg.name, " (grid ", cfg.grid.x, ", block ", cfg.block.x,
                "): ", block.error);
    if (cfg.smem.data && cfg.dynamic_smem < cfg.smem.size) {
      const unsigned char* tail = cfg.smem.data + cfg.dynamic_smem;
      const size_t n = std::min<size_t>(cfg.smem.size - cfg.dynamic_smem, kGuardBytes);
      for (size_t i = 0; i < n; ++i)
        TORCH_CHECK(tail[i] == kPoison, "cuda emulation: ", cfg.name, " wrote shared memory at byte ",
                    cfg.dynamic_smem + i, " of block (", bidx.x, ", ", bidx.y, ", ", bidx.z, "), past the ",
                    cfg.dynamic_smem, " bytes of dynamic shared memory it asked for");
    }
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  g_control.launches.push_back(LaunchRecord{cfg.name, cfg.grid.x, cfg.block.x, cfg.dynamic_smem});
}

Control& control() { return g_control; }
std::mutex& control_mutex() { return g_mutex; }

}  // namespace cuda_emu
