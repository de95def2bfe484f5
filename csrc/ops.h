// Signatures of the op implementations (the same for every device; see registration.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

namespace learnedopt {

using at::Tensor;
using at::TensorList;

using CellGrads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using StackOut = std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>>;
using StackGrads = std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                              std::vector<Tensor>, std::vector<Tensor>, Tensor, Tensor>;

}  // namespace learnedopt
