// The learnedopt ops (schemas in schemas.h). Kernels register themselves for the CPU dispatch key
// in cpu/*.cpp and for the CUDA key in cuda/*.cu (only built when CUDA is).
#ifndef LEARNEDOPT_NO_PYTHON
#include <Python.h>
#endif
#include <torch/library.h>

#include "schemas.h"

// Importing learnedopt._C loads this library so that the static registrations below run. It holds
// no Python functions: everything is reached through torch.ops.learnedopt.*. The CMake build (for
// C++ users, loaded with torch.ops.load_library or linked) defines LEARNEDOPT_NO_PYTHON: no module
// init function, no Python headers needed.
#ifndef LEARNEDOPT_NO_PYTHON
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "learnedopt's C++/CUDA kernels (reach them via torch.ops.learnedopt)",
      -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif  // LEARNEDOPT_NO_PYTHON

TORCH_LIBRARY(learnedopt, m) { learnedopt::define_ops(m); }
