// A GradScaler scalar (grad_scale / found_inf, checked by check_amp_scalars) as a float64 device
// pointer for the CUDA step kernels: 1 / grad_scale is then taken in double and a tiny nonzero found_inf
// is not flushed to 0, as the CPU ops' item<double>(). A no-op for float64, a device op otherwise; never
// a host read. Null when absent; `keep` holds the converted tensor until the kernels are queued.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace learnedopt {

inline const double* device_scalar_f64(const std::optional<at::Tensor>& t, std::vector<at::Tensor>& keep) {
  if (!t.has_value() || !t->defined()) return nullptr;
  keep.push_back(t->to(at::kDouble).contiguous());
  return keep.back().const_data_ptr<double>();
}

}  // namespace learnedopt
