// The library of the CUDA emulation, learnedopt._cuda_emu: the learnedopt ops under the namespace
// learnedopt_emu (the same schemas, schemas.h), whose CPU kernels are the CUDA kernels of csrc/cuda
// compiled by the host compiler against cuda_emu.h; and the ops with which tests steer it.
#ifndef LEARNEDOPT_NO_PYTHON
#include <Python.h>
#endif
#include <torch/library.h>

#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>

#include "cuda/emulation/emu_control.h"
#include "cuda/emulation/memcheck.h"
#include "schemas.h"

#ifndef LEARNEDOPT_NO_PYTHON
extern "C" {
PyMODINIT_FUNC PyInit__cuda_emu(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_cuda_emu",
      "learnedopt's CUDA kernels run on the CPU by the CUDA emulation (test infrastructure; "
      "reach them via torch.ops.learnedopt_emu)",
      -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

namespace {

void set_schedule(int64_t schedule) {
  TORCH_CHECK(schedule == 0 || schedule == 1, "learnedopt_emu::set_schedule: schedule must be 0 (forward thread ",
              "order) or 1 (reverse), got ", schedule);
  std::lock_guard<std::mutex> lock(cuda_emu::control_mutex());
  cuda_emu::control().schedule = static_cast<cuda_emu::Schedule>(schedule);
}

// One line per launch since the last clear: "name grid block dynamic_smem".
std::string launches(bool clear) {
  std::lock_guard<std::mutex> lock(cuda_emu::control_mutex());
  std::ostringstream os;
  for (const auto& r : cuda_emu::control().launches)
    os << r.name << " " << r.grid << " " << r.block << " " << r.dynamic_smem << "\n";
  if (clear) cuda_emu::control().launches.clear();
  return os.str();
}

// Replaces the kernels' resources (resources.py's numbers): lines "name registers static_smem
// [max_threads]" (max_threads: the kernel's __launch_bounds__; absent or 0: none).
void set_resources(const std::string& table) {
  std::unordered_map<std::string, cuda_emu::Resources> res;
  std::istringstream lines(table);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    std::istringstream in(line);
    std::string name;
    cuda_emu::Resources r;
    in >> name >> r.registers >> r.static_smem;
    TORCH_CHECK(!in.fail(), "learnedopt_emu::set_resources: expected lines 'name registers static_smem [max_threads]', ",
                "got '", line, "'");
    if (!(in >> r.max_threads)) r.max_threads = 0;
    res[name] = r;
  }
  std::lock_guard<std::mutex> lock(cuda_emu::control_mutex());
  cuda_emu::control().resources = std::move(res);
}

}  // namespace

TORCH_LIBRARY(learnedopt_emu, m) {
  learnedopt::define_ops(m);
  m.def("set_schedule(int schedule) -> ()", &set_schedule);
  m.def("launches(bool clear=False) -> str", &launches);
  m.def("set_resources(str table) -> ()", &set_resources);
  m.def("memcheck_instrumented() -> bool", [] { return cuda_emu::memcheck::instrumented(); });
  // The memory checker (memcheck.h): on by default; returns whether it was on.
  m.def("set_memcheck(bool on) -> bool", [](bool on) {
    const bool was = cuda_emu::memcheck::enabled();
    cuda_emu::memcheck::set_enabled(on);
    return was;
  });
}
