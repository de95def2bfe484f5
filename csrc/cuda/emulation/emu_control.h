// What the tests control and read of the CUDA emulation (through the learnedopt_emu ops of
// registration.cpp): the thread schedule of the blocks and the record of launches.
#pragma once

#include <cstddef>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace cuda_emu {

// The order in which a block's threads run between two synchronisation points.
enum class Schedule { kForward = 0, kReverse = 1 };

struct LaunchRecord {
  std::string name;
  unsigned grid, block;
  size_t dynamic_smem;
};

// What ptxas says a kernel needs (resources.py): the largest over its template instances.
struct Resources {
  int registers = 0;      // per thread
  size_t static_smem = 0;  // bytes of static __shared__ per block
  int max_threads = 0;     // the kernel's __launch_bounds__ (PTX .maxntid); 0: none
};

struct Control {
  Schedule schedule = Schedule::kForward;
  std::vector<LaunchRecord> launches;
  std::unordered_map<std::string, Resources> resources;  // by kernel name (launch_kernel's name)
};

Control& control();
std::mutex& control_mutex();

}  // namespace cuda_emu
