// The CUDA emulation's memory checker: see memcheck.h. Three parts: the callbacks of GCC's
// ThreadSanitizer instrumentation (every load and store of the emulation's translation units), the
// shadow memory of shared memory (races, reads of bytes the block never wrote, accesses past the
// dynamic shared memory), and a CPU allocator whose tensor storages have red zones (global memory
// out of bounds).
#include "cuda/emulation/memcheck.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>
#include <link.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

namespace cuda_emu {
namespace memcheck {
namespace {

// ---- global memory: tensor storages with red zones -------------------------------------------------
constexpr size_t kLeadBytes = 64;  // before every storage (keeps c10's 64-byte alignment)
constexpr size_t kTailBytes = 64;  // at least, after every storage (then up to the next 64 bytes)

struct Storage {
  uintptr_t raw, begin, end, raw_end;  // [raw, begin) and [end, raw_end) are red zones
};

std::mutex g_storage_mutex;
std::map<uintptr_t, Storage>& storages() {  // by raw
  static auto* m = new std::map<uintptr_t, Storage>();  // never destroyed: deleters run at exit
  return *m;
}

void free_storage(void* user) {
  if (!user) return;
  const auto u = reinterpret_cast<uintptr_t>(user);
  {
    std::lock_guard<std::mutex> lock(g_storage_mutex);
    storages().erase(u - kLeadBytes);
  }
  c10::free_cpu(reinterpret_cast<void*>(u - kLeadBytes));
}

// The CPU allocator of the processes that load the emulation: c10's allocation, with red zones.
struct RedZoneAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, &free_storage, c10::Device(c10::DeviceType::CPU)};
    const size_t tail = (n + 63) / 64 * 64 - n + kTailBytes;
    void* raw = c10::alloc_cpu(kLeadBytes + n + tail);
    const auto r = reinterpret_cast<uintptr_t>(raw);
    {
      std::lock_guard<std::mutex> lock(g_storage_mutex);
      storages()[r] = Storage{r, r + kLeadBytes, r + kLeadBytes + n, r + kLeadBytes + n + tail};
    }
    void* user = reinterpret_cast<void*>(r + kLeadBytes);
    return {user, user, &free_storage, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &free_storage; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
};

// Installed when the library loads, unless LEARNEDOPT_CUDA_EMU_REDZONES=0.
const bool g_redzones = [] {
  const char* env = std::getenv("LEARNEDOPT_CUDA_EMU_REDZONES");
  if (env && std::strcmp(env, "0") == 0) return false;
  static RedZoneAllocator allocator;
  c10::SetCPUAllocator(&allocator, /*priority=*/1);
  return true;
}();

// ---- the shadow of shared memory ------------------------------------------------------------------
constexpr uint16_t kManyReaders = 0xFFFF;

struct Cell {
  uint32_t w_epoch = 0, r_epoch = 0;  // 0: never
  uint16_t w_thread = 0, r_thread = 0;
  uint16_t w_warp_sync = 0, r_warp_sync = 0;
};

// The host thread's checker (blocks run on the host thread that launched them).
struct Checker {
  bool active = false;      // device code of a launch runs on this host thread
  bool in_check = false;    // re-entrance guard (a message being written, a library call instrumented)
  bool tls_known = false;
  uintptr_t tls_begin = 0, tls_size = 0;
  std::vector<Cell> shadow;  // one per byte of the thread-local storage
  LaunchInfo info{};
  uintptr_t stacks = 0, stacks_bytes = 0, ignore = 0, ignore_bytes = 0;
  uintptr_t dyn = 0, dyn_bytes = 0, dyn_capacity = 0;
  std::vector<Storage> snapshot;  // sorted by raw
  size_t last_storage = 0;
  uint3 block_idx{};
  uint32_t epoch = 0, block_first_epoch = 0;
  std::vector<uint16_t> warp_sync;  // per warp: completed full-warp synchronisations in this block
  int thread = -1, warp = -1;
};

// A pointer: constant-initialised thread-local storage has no (instrumented) initialisation wrapper.
thread_local Checker* t_checker = nullptr;

CUDA_EMU_NOT_INSTRUMENTED Checker& checker() {
  if (!t_checker) t_checker = new Checker();  // one per host thread that launches; kept until exit
  return *t_checker;
}
std::atomic<int> g_running{0};  // launches in progress in the process: the callbacks' first filter
std::atomic<bool> g_instrumented{false};  // an instrumented translation unit has started (__tsan_init)
// On unless LEARNEDOPT_CUDA_EMU_MEMCHECK=0 (or set_memcheck(false)).
std::atomic<bool> g_enabled{[] {
  const char* env = std::getenv("LEARNEDOPT_CUDA_EMU_MEMCHECK");
  return !(env && std::strcmp(env, "0") == 0);
}()};

struct TlsQuery {
  uintptr_t base;
  size_t memsz;
};

int find_tls(dl_phdr_info* info, size_t, void* data) {
  auto* q = static_cast<TlsQuery*>(data);
  if (info->dlpi_addr != q->base) return 0;
  for (int i = 0; i < info->dlpi_phnum; ++i)
    if (info->dlpi_phdr[i].p_type == PT_TLS) q->memsz = info->dlpi_phdr[i].p_memsz;
  return 1;
}

// This library's thread-local storage for the calling thread (static __shared__ and the dynamic
// shared memory of every translation unit live there).
void locate_tls(Checker& c) {
  if (c.tls_known) return;
  c.tls_known = true;
  Dl_info self{};
  TORCH_CHECK(dladdr(reinterpret_cast<void*>(&locate_tls), &self) && self.dli_fname,
              "cuda emulation memcheck: dladdr failed");
  TlsQuery q{reinterpret_cast<uintptr_t>(self.dli_fbase), 0};
  dl_iterate_phdr(&find_tls, &q);
  void* handle = dlopen(self.dli_fname, RTLD_NOW | RTLD_NOLOAD);
  TORCH_CHECK(handle, "cuda emulation memcheck: cannot find its own library ", self.dli_fname);
  void* block = nullptr;
  const int rc = dlinfo(handle, RTLD_DI_TLS_DATA, &block);
  dlclose(handle);
  TORCH_CHECK(rc == 0 && block && q.memsz > 0, "cuda emulation memcheck: cannot locate the library's thread-local ",
              "storage (", q.memsz, " bytes)");
  c.tls_begin = reinterpret_cast<uintptr_t>(block);
  c.tls_size = q.memsz;
  c.shadow.assign(q.memsz, Cell{});
}

std::string thread_name(const Checker& c, int t) {
  const dim3 b = c.info.block;
  std::ostringstream os;
  os << "thread (" << t % b.x << "," << t / b.x % b.y << "," << t / (b.x * b.y) << ")";
  return os.str();
}

[[noreturn]] CUDA_EMU_NOT_INSTRUMENTED void report(Checker& c, const std::string& what) {
  c.active = false;  // the message below runs instrumented library code
  std::ostringstream os;
  os << "memcheck: " << what;
  const std::string msg = os.str();
  fail_device(msg.c_str());
}

CUDA_EMU_NOT_INSTRUMENTED std::string where_shared(const Checker& c, uintptr_t a) {
  std::ostringstream os;
  if (a >= c.dyn && a < c.dyn + c.dyn_capacity)
    os << "byte " << a - c.dyn << " of dynamic shared memory";
  else
    os << "static __shared__ storage (thread-local offset " << a - c.tls_begin << ")";
  return os.str();
}

// Whether an earlier access by thread `t` (at `epoch`, after `sync` full-warp synchronisations of
// its warp) and one by the running thread happen between the same two synchronisations.
CUDA_EMU_NOT_INSTRUMENTED bool concurrent(const Checker& c, uint16_t t, uint32_t epoch, uint16_t sync) {
  if (epoch != c.epoch || t == c.thread) return false;
  if (t / 32 == c.warp && c.warp_sync[c.warp] != sync) return false;  // a __syncwarp of both lanes between them
  return true;
}

CUDA_EMU_NOT_INSTRUMENTED void shared_access(Checker& c, uintptr_t a, size_t n, bool write) {
  if (c.dyn_bytes < c.dyn_capacity && a + n > c.dyn + c.dyn_bytes && a < c.dyn + c.dyn_capacity) {
    std::ostringstream os;
    os << (write ? "writes" : "reads") << " " << n << " bytes at byte " << a - c.dyn << " of dynamic shared memory, "
       << "past the " << c.dyn_bytes << " bytes the launch asked for";
    report(c, os.str());
  }
  const uint16_t me = static_cast<uint16_t>(c.thread);
  const uint16_t sync = c.warp_sync[c.warp];
  for (size_t i = 0; i < n; ++i) {
    const uintptr_t byte = a + i - c.tls_begin;
    if (byte >= c.tls_size) continue;
    Cell& cell = c.shadow[byte];
    if (concurrent(c, cell.w_thread, cell.w_epoch, cell.w_warp_sync)) {
      std::ostringstream os;
      os << (write ? "writes " : "reads ") << where_shared(c, a + i) << ", which " << thread_name(c, cell.w_thread)
         << " wrote since the last __syncthreads (a shared-memory race: a barrier missing?)";
      report(c, os.str());
    }
    if (!write) {
      if (cell.w_epoch < c.block_first_epoch) {
        std::ostringstream os;
        os << "reads " << where_shared(c, a + i) << ", which no thread of this block has written";
        report(c, os.str());
      }
      if (cell.r_epoch != c.epoch) {
        cell.r_epoch = c.epoch;
        cell.r_thread = me;
        cell.r_warp_sync = sync;
      } else if (cell.r_thread != me) {
        cell.r_thread = kManyReaders;
      }
      continue;
    }
    if (cell.r_epoch == c.epoch &&
        (cell.r_thread == kManyReaders || concurrent(c, cell.r_thread, cell.r_epoch, cell.r_warp_sync))) {
      std::ostringstream os;
      os << "writes " << where_shared(c, a + i) << ", which "
         << (cell.r_thread == kManyReaders ? std::string("several threads") : thread_name(c, cell.r_thread))
         << " read since the last __syncthreads (a shared-memory race: a barrier missing?)";
      report(c, os.str());
    }
    cell.w_epoch = c.epoch;
    cell.w_thread = me;
    cell.w_warp_sync = sync;
  }
}

CUDA_EMU_NOT_INSTRUMENTED void global_access(Checker& c, uintptr_t a, size_t n, bool write) {
  const std::vector<Storage>& s = c.snapshot;
  if (s.empty()) return;
  const Storage* hit = nullptr;
  if (c.last_storage < s.size() && a >= s[c.last_storage].raw && a < s[c.last_storage].raw_end) {
    hit = &s[c.last_storage];
  } else {
    size_t lo = 0, hi = s.size();  // the last storage with raw <= a
    while (hi - lo > 1) {
      const size_t mid = (lo + hi) / 2;
      if (s[mid].raw <= a) lo = mid; else hi = mid;
    }
    if (s[lo].raw <= a && a < s[lo].raw_end) {
      hit = &s[lo];
      c.last_storage = lo;
    }
  }
  if (!hit || (a >= hit->begin && a + n <= hit->end)) return;
  std::ostringstream os;
  os << (write ? "writes " : "reads ") << n << " bytes of global memory at " << reinterpret_cast<void*>(a) << ", ";
  if (a < hit->begin)
    os << hit->begin - a << " bytes before the start of";
  else
    os << a - hit->end << " bytes past the end of";
  os << " a tensor storage of " << hit->end - hit->begin << " bytes (out of bounds)";
  report(c, os.str());
}

}  // namespace

bool enabled() { return g_enabled.load(); }
bool instrumented() { return g_instrumented.load(); }
void set_enabled(bool on) { g_enabled.store(on); }

void launch_begin(const LaunchInfo& info) {
  Checker& c = checker();
  c.info.kernel = nullptr;
  c.active = false;
  if (!g_enabled.load()) return;
  locate_tls(c);
  c.info = info;
  c.stacks = reinterpret_cast<uintptr_t>(info.stacks);
  c.stacks_bytes = info.stacks_bytes;
  c.ignore = reinterpret_cast<uintptr_t>(info.ignore);
  c.ignore_bytes = info.ignore_bytes;
  c.dyn = reinterpret_cast<uintptr_t>(info.dynamic_smem);
  c.dyn_bytes = info.dynamic_bytes;
  c.dyn_capacity = info.dynamic_smem ? info.dynamic_capacity : 0;
  c.snapshot.clear();
  {
    std::lock_guard<std::mutex> lock(g_storage_mutex);
    for (const auto& kv : storages()) c.snapshot.push_back(kv.second);
  }
  c.last_storage = 0;
  const size_t threads = size_t(info.block.x) * info.block.y * info.block.z;
  c.warp_sync.assign((threads + 31) / 32, 0);
  g_running.fetch_add(1);
  c.in_check = false;
}

void launch_end() {
  Checker& c = checker();
  if (c.info.kernel == nullptr) return;
  c.info.kernel = nullptr;
  c.active = false;
  g_running.fetch_sub(1);
}

CUDA_EMU_NOT_INSTRUMENTED void block_begin(uint3 block_idx) {
  Checker& c = checker();
  c.block_idx = block_idx;
  c.epoch += 1;
  c.block_first_epoch = c.epoch;
  for (auto& w : c.warp_sync) w = 0;
}

CUDA_EMU_NOT_INSTRUMENTED void barrier() { checker().epoch += 1; }

CUDA_EMU_NOT_INSTRUMENTED void warp_synced(int warp, unsigned mask) {
  Checker& c = checker();
  if (warp < 0 || size_t(warp) >= c.warp_sync.size()) return;
  const size_t threads = size_t(c.info.block.x) * c.info.block.y * c.info.block.z;
  const size_t lanes = std::min<size_t>(32, threads - size_t(warp) * 32);
  const unsigned full = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
  if ((mask & full) == full) c.warp_sync[warp] += 1;  // partial masks do not order the lanes (conservative)
}

CUDA_EMU_NOT_INSTRUMENTED void enter(int thread, int warp) {
  Checker& c = checker();
  if (c.info.kernel == nullptr) return;
  c.thread = thread;
  c.warp = warp;
  c.active = true;
}

CUDA_EMU_NOT_INSTRUMENTED void leave() { checker().active = false; }

CUDA_EMU_NOT_INSTRUMENTED void access(const void* addr, size_t bytes, bool write) {
  if (g_running.load(std::memory_order_relaxed) == 0) return;
  Checker* cp = t_checker;
  if (!cp || !cp->active || cp->in_check) return;
  Checker& c = *cp;
  const auto a = reinterpret_cast<uintptr_t>(addr);
  if (a - c.stacks < c.stacks_bytes || a - c.ignore < c.ignore_bytes) return;
  c.in_check = true;
  if (a - c.tls_begin < c.tls_size)
    shared_access(c, a, bytes, write);
  else
    global_access(c, a, bytes, write);
  c.in_check = false;
}

}  // namespace memcheck
}  // namespace cuda_emu

// ---- the instrumentation's callbacks (GCC -fsanitize=thread) ---------------------------------------
// No ThreadSanitizer runtime is linked: these definitions are the ones the emulation's instrumented
// code calls. Plain accesses are only reported; atomics are performed here (sequentially consistent).
#define CUDA_EMU_TSAN extern "C" CUDA_EMU_NOT_INSTRUMENTED __attribute__((used))

// Called by the constructor of every instrumented translation unit: a library built without
// -fsanitize=thread never calls it, and then the checker sees nothing (instrumented() says so).
CUDA_EMU_TSAN void __tsan_init() { cuda_emu::memcheck::g_instrumented.store(true); }
CUDA_EMU_TSAN void __tsan_func_entry(void*) {}
CUDA_EMU_TSAN void __tsan_func_exit() {}
CUDA_EMU_TSAN void __tsan_vptr_update(void**, void*) {}
CUDA_EMU_TSAN void __tsan_vptr_read(void**) {}
CUDA_EMU_TSAN void __tsan_read_range(void* a, unsigned long n) { cuda_emu::memcheck::access(a, n, false); }
CUDA_EMU_TSAN void __tsan_write_range(void* a, unsigned long n) { cuda_emu::memcheck::access(a, n, true); }

#define CUDA_EMU_TSAN_ACCESS(N)                                                                        \
  CUDA_EMU_TSAN void __tsan_read##N(void* a) { cuda_emu::memcheck::access(a, N, false); }              \
  CUDA_EMU_TSAN void __tsan_write##N(void* a) { cuda_emu::memcheck::access(a, N, true); }              \
  CUDA_EMU_TSAN void __tsan_unaligned_read##N(void* a) { cuda_emu::memcheck::access(a, N, false); }    \
  CUDA_EMU_TSAN void __tsan_unaligned_write##N(void* a) { cuda_emu::memcheck::access(a, N, true); }    \
  CUDA_EMU_TSAN void __tsan_volatile_read##N(void* a) { cuda_emu::memcheck::access(a, N, false); }     \
  CUDA_EMU_TSAN void __tsan_volatile_write##N(void* a) { cuda_emu::memcheck::access(a, N, true); }
CUDA_EMU_TSAN_ACCESS(1)
CUDA_EMU_TSAN_ACCESS(2)
CUDA_EMU_TSAN_ACCESS(4)
CUDA_EMU_TSAN_ACCESS(8)
CUDA_EMU_TSAN_ACCESS(16)

#define CUDA_EMU_SEQ __ATOMIC_SEQ_CST
#define CUDA_EMU_TSAN_ATOMIC(N, T)                                                                                  \
  CUDA_EMU_TSAN T __tsan_atomic##N##_load(const volatile T* a, int) { return __atomic_load_n(a, CUDA_EMU_SEQ); }    \
  CUDA_EMU_TSAN void __tsan_atomic##N##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, CUDA_EMU_SEQ); }   \
  CUDA_EMU_TSAN T __tsan_atomic##N##_exchange(volatile T* a, T v, int) {                                           \
    return __atomic_exchange_n(a, v, CUDA_EMU_SEQ);                                                                 \
  }                                                                                                                 \
  CUDA_EMU_TSAN T __tsan_atomic##N##_fetch_add(volatile T* a, T v, int) {                                          \
    return __atomic_fetch_add(a, v, CUDA_EMU_SEQ);                                                                  \
  }                                                                                                                 \
  CUDA_EMU_TSAN T __tsan_atomic##N##_fetch_sub(volatile T* a, T v, int) {                                          \
    return __atomic_fetch_sub(a, v, CUDA_EMU_SEQ);                                                                  \
  }                                                                                                                 \
  CUDA_EMU_TSAN T __tsan_atomic##N##_fetch_and(volatile T* a, T v, int) {                                          \
    return __atomic_fetch_and(a, v, CUDA_EMU_SEQ);                                                                  \
  }                                                                                                                 \
  CUDA_EMU_TSAN T __tsan_atomic##N##_fetch_or(volatile T* a, T v, int) {                                           \
    return __atomic_fetch_or(a, v, CUDA_EMU_SEQ);                                                                   \
  }                                                                                                                 \
  CUDA_EMU_TSAN T __tsan_atomic##N##_fetch_xor(volatile T* a, T v, int) {                                          \
    return __atomic_fetch_xor(a, v, CUDA_EMU_SEQ);                                                                  \
  }                                                                                                                 \
  CUDA_EMU_TSAN T __tsan_atomic##N##_fetch_nand(volatile T* a, T v, int) {                                         \
    return __atomic_fetch_nand(a, v, CUDA_EMU_SEQ);                                                                 \
  }                                                                                                                 \
  CUDA_EMU_TSAN int __tsan_atomic##N##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {               \
    return __atomic_compare_exchange_n(a, c, v, false, CUDA_EMU_SEQ, CUDA_EMU_SEQ);                                 \
  }                                                                                                                 \
  CUDA_EMU_TSAN int __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                 \
    return __atomic_compare_exchange_n(a, c, v, true, CUDA_EMU_SEQ, CUDA_EMU_SEQ);                                  \
  }                                                                                                                 \
  CUDA_EMU_TSAN T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                     \
    __atomic_compare_exchange_n(a, &c, v, false, CUDA_EMU_SEQ, CUDA_EMU_SEQ);                                       \
    return c;                                                                                                       \
  }
CUDA_EMU_TSAN_ATOMIC(8, unsigned char)
CUDA_EMU_TSAN_ATOMIC(16, unsigned short)
CUDA_EMU_TSAN_ATOMIC(32, unsigned int)
CUDA_EMU_TSAN_ATOMIC(64, unsigned long long)

CUDA_EMU_TSAN void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(CUDA_EMU_SEQ); }
CUDA_EMU_TSAN void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(CUDA_EMU_SEQ); }
