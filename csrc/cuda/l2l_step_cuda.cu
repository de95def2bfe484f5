// CUDA kernels of the L2L optimizer step (learnedopt::l2l_step_, same semantics and argument checks
// as cpu/l2l_step_cpu.cpp and learnedopt.reference.l2l_step_).
//
// Per group of parameters with one dtype (compute and state in acc_t: double for double parameters,
// float otherwise), two kernels on the current stream, no host synchronisation:
//   1. l2l_finite_kernel: flags[t] = 1 when the gradient the network reads, g' = g / grad_scale +
//      weight_decay * p, has a non-finite element anywhere in tensor t;
//   2. l2l_step_kernel: one thread per coordinate, blocks of T rows of one tensor. Unless the
//      tensor is flagged or *found_inf != 0 (then the block leaves parameter and state untouched),
//      a block loads its state rows [T, W] (W = 2 * sum H; per row h_0, c_0, h_1, c_1, ...) as one
//      flat coalesced range into shared memory, each thread preprocesses its g', runs the layers
//      (lstm_device.cuh's for_each_unit + lstm_math.h's lstm_unit_forward, in place in its state
//      row), the read-out y = w_out h_top + b_out and p += lr * update_scale * y, and the block stores
//      the state rows back as one flat range.
// The weights of all layers and the read-out are packed once per call into one opmath buffer
// (layout per layer as coord_lstm_cuda.cu: W [4][Hp][Kp], B [4][Hp]; then w_out [H_top], b_out) and
// staged in shared memory when they fit, else read from global memory (L1/L2-resident).
// Tensors are handed to the kernels by value in fixed-size argument structs, kMaxTensors at a time
// (as torch's multi_tensor_apply): no metadata copies to the device.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cuda/device_scalar.cuh"
#include "cuda/lstm_device.cuh"
#include "lstm_math.h"
#include "cuda/launch.cuh"
#include "ops.h"

namespace learnedopt {
namespace {

constexpr int kMaxLayers = 8;    // layers of the network the fused step supports
constexpr int kMaxTensors = 32;  // tensors per launch

struct NetGeometry {
  int L;                          // layers
  int I0;                         // network input size (2 with log/sign preprocessing, else 1)
  int W;                          // state width per row, 2 * sum H
  int SW;                         // row stride of the state tile: W | 1 (odd)
  int SKmax;                      // row stride of the [x | h] tile: max over layers of Kp + 1
  Geometry g[kMaxLayers];         // per layer
  int64_t woff[kMaxLayers];       // offset of layer l's W [4][Hp][Kp] in the packed weights
  int64_t boff[kMaxLayers];       // offset of layer l's B [4][Hp]
  int soff[kMaxLayers];           // offset of layer l's h in a state row (its c follows at + H)
  int64_t out_off;                // offset of w_out [H_top] (then b_out)
  int Htop;                       // read-out input size
  int64_t packed_elems;           // total opmath elements of the packed weights
  int64_t packed_padded;          // the same rounded up to 4 (the state tile follows it, 16-byte aligned)
};

template <typename acc_t>
struct StepScalars {
  acc_t lr_scale;       // lr * update_scale
  acc_t weight_decay;
  acc_t p;              // log/sign preprocessing parameter
  acc_t exp_p;          // e^p
  bool log_sign;
  const double* grad_scale;  // float64 device scalar or null (1 / grad_scale is taken in double, as the CPU op)
  const double* found_inf;   // float64 device scalar or null (nonzero skips the step, as the CPU op's item<double>())
};

template <typename scalar_t, typename acc_t>
struct TensorChunk {
  scalar_t* p[kMaxTensors];        // contiguous [numel]
  const scalar_t* g[kMaxTensors];  // contiguous [numel]
  acc_t* s[kMaxTensors];           // contiguous [numel, W]
  int64_t numel[kMaxTensors];
  int flag[kMaxTensors];           // index into the flags buffer
  int64_t block_start[kMaxTensors + 1];  // first block of each tensor; block_start[n] = blocks
  int n;
};

// The tensor of block `blk` (block_start is increasing; n <= kMaxTensors).
template <typename C>
__device__ __forceinline__ int tensor_of_block(const C& ch, int64_t blk) {
  int t = 0;
  while (t + 1 < ch.n && ch.block_start[t + 1] <= blk) ++t;
  return t;
}

template <typename acc_t>
__device__ __forceinline__ acc_t inverse_scale(const StepScalars<acc_t>& sc) {
  // 1 / grad_scale in double, rounded to acc_t: the CPU op's acc_t(1.0 / grad_scale.item<double>())
  return sc.grad_scale ? static_cast<acc_t>(1.0 / *sc.grad_scale) : acc_t(1);
}

template <typename acc_t>
__device__ __forceinline__ bool is_finite(acc_t v) {
  return ::isfinite(v);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(256) l2l_finite_kernel(const TensorChunk<scalar_t, acc_t> ch,
                                                         const StepScalars<acc_t> sc, int rows_per_block,
                                                         int* __restrict__ flags) {
  const int t = tensor_of_block(ch, blockIdx.x);
  const int64_t r0 = (int64_t(blockIdx.x) - ch.block_start[t]) * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < ch.numel[t] ? r0 + rows_per_block : ch.numel[t];
  const acc_t inv = inverse_scale(sc);
  bool bad = false;
  for (int64_t r = r0 + threadIdx.x; r < r1; r += blockDim.x)
    bad |= !is_finite(l2l_net_input_grad<acc_t>(ch.g[t][r], ch.p[t][r], inv, sc.weight_decay));
  if (__syncthreads_or(bad) && threadIdx.x == 0) atomicExch(flags + ch.flag[t], 1);
}

// Dynamic shared memory (opmath): [packed weights (kSmemWeights only)] [state tile T x SW]
// [x | h tile T x SKmax].
template <typename scalar_t, typename acc_t, bool kSmemWeights>
__global__ void __launch_bounds__(kMaxThreads) l2l_step_kernel(const TensorChunk<scalar_t, acc_t> ch,
                                                              const StepScalars<acc_t> sc, const NetGeometry net,
                                                              const acc_t* __restrict__ packed,
                                                              const int* __restrict__ flags) {
  using idx_t = std::conditional_t<kSmemWeights, int, int64_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sm = reinterpret_cast<acc_t*>(smem_raw);
  const int T = blockDim.x;
  const int tid = threadIdx.x;
  const int t = tensor_of_block(ch, blockIdx.x);
  // Skipped tensors (and steps) leave parameter and state untouched: uniform over the block.
  if (flags[ch.flag[t]] != 0 || (sc.found_inf != nullptr && *sc.found_inf != 0.0)) return;

  const acc_t* wts = packed;
  acc_t* st = sm;
  if constexpr (kSmemWeights) {
    for (int64_t e = tid; e < net.packed_elems; e += T) sm[e] = packed[e];
    wts = sm;
    st = sm + net.packed_padded;
  }
  acc_t* xh = st + T * net.SW;

  const int64_t r0 = (int64_t(blockIdx.x) - ch.block_start[t]) * T;
  const int64_t rem = ch.numel[t] - r0;
  const int nr = rem < T ? static_cast<int>(rem) : T;
  acc_t* s_glob = ch.s[t] + r0 * net.W;
  for (int e = tid; e < nr * net.W; e += T) {
    const int r = e / net.W;
    st[r * net.SW + (e - r * net.W)] = s_glob[e];
  }
  __syncthreads();

  if (tid < nr) {
    const int64_t row = r0 + tid;
    const scalar_t p_old = ch.p[t][row];
    const acc_t gp = l2l_net_input_grad<acc_t>(ch.g[t][row], p_old, inverse_scale(sc), sc.weight_decay);
    acc_t x[2];
    if (sc.log_sign) {
      const LogSign<acc_t> ls = log_sign_preprocess(gp, sc.p, sc.exp_p);
      x[0] = ls.log_part;
      x[1] = ls.sign_part;
    } else {
      x[0] = gp;
      x[1] = acc_t(0);
    }
    acc_t* srow = st + tid * net.SW;
    acc_t* xr = xh + tid * net.SKmax;
    for (int l = 0; l < net.L; ++l) {
      const Geometry& G = net.g[l];
      const acc_t* in = l == 0 ? x : srow + net.soff[l - 1];  // input: x, or the new h of layer l-1
      for (int k = 0; k < G.I; ++k) xr[k] = in[k];
      acc_t* hl = srow + net.soff[l];
      acc_t* cl = hl + G.H;
      for (int k = 0; k < G.H; ++k) xr[G.I + k] = hl[k];  // the old h, read by every unit
      for (int k = G.K; k < G.Kp; ++k) xr[k] = acc_t(0);
      for_each_unit<idx_t>(wts + net.woff[l], wts + net.boff[l], xr, G,
                           [&](int j, acc_t zi, acc_t zf, acc_t zg, acc_t zo) {
                             const LstmUnit<acc_t> u = lstm_unit_forward(zi, zf, zg, zo, cl[j]);
                             cl[j] = u.c_new;
                             hl[j] = u.h_new;
                           });
    }
    const acc_t* top = net.L ? srow + net.soff[net.L - 1] : x;
    const acc_t* wo = wts + net.out_off;
    acc_t y = wo[net.Htop];  // b_out
    for (int k = 0; k < net.Htop; ++k) y = y + wo[k] * top[k];
    ch.p[t][row] = static_cast<scalar_t>(static_cast<acc_t>(p_old) + sc.lr_scale * y);
  }
  __syncthreads();
  for (int e = tid; e < nr * net.W; e += T) {
    const int r = e / net.W;
    s_glob[e] = st[r * net.SW + (e - r * net.W)];
  }
}

NetGeometry make_net(const char* op, const std::vector<CellDims>& dims, bool log_sign) {
  TORCH_CHECK(static_cast<int>(dims.size()) <= kMaxLayers, op, ": the CUDA step supports at most ", kMaxLayers,
              " LSTM layers, got ", dims.size());
  NetGeometry n{};
  n.L = static_cast<int>(dims.size());
  n.I0 = log_sign ? 2 : 1;
  int64_t off = 0, I = n.I0, width = 0, skmax = 1;
  for (int l = 0; l < n.L; ++l) {
    const Geometry G = make_geometry(op, I, dims[l].H);
    n.g[l] = G;
    n.woff[l] = off;
    off += 4 * int64_t(G.Hp) * G.Kp;
    n.boff[l] = off;
    off += 4 * int64_t(G.Hp);
    off = round_up(off, kKAlign);  // the next layer's W starts 16-byte aligned (float)
    n.soff[l] = static_cast<int>(width);
    width += 2 * G.H;
    skmax = std::max<int64_t>(skmax, G.Kp + 1);
    I = G.H;
  }
  TORCH_CHECK(width < (int64_t(1) << 24), op, ": the LSTM state is too wide for the CUDA step");
  n.W = static_cast<int>(width);
  n.SW = static_cast<int>(width | 1);
  n.SKmax = static_cast<int>(skmax | 1);
  n.Htop = static_cast<int>(I);
  n.out_off = off;
  n.packed_elems = off + I + 1;
  n.packed_padded = round_up(n.packed_elems, 4);
  return n;
}

// The packed opmath weights (layout at the top of the file) on the weights' device.
Tensor pack_weights(const NetGeometry& n, TensorList w_ih, TensorList w_hh, TensorList b, const Tensor& w_out,
                    const Tensor& b_out, at::ScalarType opm) {
  Tensor packed = at::zeros({n.packed_elems}, w_out.options().dtype(opm));
  for (int l = 0; l < n.L; ++l) {
    const Geometry& G = n.g[l];
    Tensor W = packed.narrow(0, n.woff[l], 4 * int64_t(G.Hp) * G.Kp).view({4, G.Hp, G.Kp});
    W.narrow(1, 0, G.H).narrow(2, 0, G.I).copy_(w_ih[l].reshape({4, G.H, G.I}));
    W.narrow(1, 0, G.H).narrow(2, G.I, G.H).copy_(w_hh[l].reshape({4, G.H, G.H}));
    packed.narrow(0, n.boff[l], 4 * int64_t(G.Hp)).view({4, G.Hp}).narrow(1, 0, G.H).copy_(b[l].reshape({4, G.H}));
  }
  packed.narrow(0, n.out_off, n.Htop).copy_(w_out.reshape({n.Htop}));
  packed.narrow(0, n.out_off + n.Htop, 1).copy_(b_out.reshape({1}));
  return packed;
}

struct StepPlan {
  int threads;
  int64_t smem_bytes;
  bool smem_weights;
};

StepPlan make_step_plan(const char* op, const NetGeometry& n, int64_t acc_size) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t optin = static_cast<int64_t>(prop->sharedMemPerBlockOptin);
  const int64_t row = int64_t(n.SW) + n.SKmax;  // opmath elements per row of the tiles
  const int64_t wts = n.packed_padded;
  for (int t = kMaxThreads; t >= 32; t /= 2) {
    const int64_t bytes = (wts + t * row) * acc_size;
    if (bytes <= optin) return {t, bytes, true};
  }
  for (int t = kMaxThreads; t >= 32; t /= 2) {
    const int64_t bytes = t * row * acc_size;
    if (bytes <= optin) return {t, bytes, false};
  }
  TORCH_CHECK(false, op, ": the LSTM state of one coordinate (", row * acc_size, " bytes) is too large for the "
              "CUDA step (", optin, " bytes of shared memory per block)");
  return {};
}

template <typename scalar_t, typename acc_t>
void step_group(const char* op, const std::vector<int64_t>& idx, TensorList params, TensorList grads,
                TensorList states, const NetGeometry& net, const Tensor& packed, const StepScalars<acc_t>& sc) {
  const StepPlan plan = make_step_plan(op, net, sizeof(acc_t));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kFiniteRows = 4096, kFiniteThreads = 256;
  // Contiguous working copies of non-contiguous parameters and gradients.
  std::vector<Tensor> P, G;
  for (int64_t i : idx) {
    P.push_back(params[i].is_contiguous() ? params[i] : params[i].contiguous());
    G.push_back(grads[i].contiguous());
  }
  Tensor flags = at::zeros({static_cast<int64_t>(idx.size())}, params[idx[0]].options().dtype(at::kInt));
  auto fill = [&](size_t j0, size_t j1, int rows_per_block) {
    TensorChunk<scalar_t, acc_t> ch{};
    ch.n = static_cast<int>(j1 - j0);
    int64_t blocks = 0;
    for (size_t j = j0; j < j1; ++j) {
      const int k = static_cast<int>(j - j0);
      ch.p[k] = P[j].mutable_data_ptr<scalar_t>();
      ch.g[k] = G[j].const_data_ptr<scalar_t>();
      ch.s[k] = states[idx[j]].mutable_data_ptr<acc_t>();
      ch.numel[k] = P[j].numel();
      ch.flag[k] = static_cast<int>(j);
      ch.block_start[k] = blocks;
      blocks += ceil_div(P[j].numel(), rows_per_block);
    }
    ch.block_start[ch.n] = blocks;
    TORCH_CHECK(blocks <= INT_MAX, op, ": too many coordinates for one launch");
    return ch;
  };
  for (size_t j0 = 0; j0 < idx.size(); j0 += kMaxTensors) {
    const size_t j1 = std::min(idx.size(), j0 + kMaxTensors);
    const auto ch = fill(j0, j1, kFiniteRows);
    launch_kernel("l2l_finite_kernel", l2l_finite_kernel<scalar_t, acc_t>, static_cast<unsigned>(ch.block_start[ch.n]),
                  kFiniteThreads, 0, stream, ch, sc, kFiniteRows, flags.mutable_data_ptr<int>());
  }
  auto kernel = plan.smem_weights ? &l2l_step_kernel<scalar_t, acc_t, true> : &l2l_step_kernel<scalar_t, acc_t, false>;
  if (plan.smem_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(plan.smem_bytes)));
  }
  for (size_t j0 = 0; j0 < idx.size(); j0 += kMaxTensors) {
    const size_t j1 = std::min(idx.size(), j0 + kMaxTensors);
    const auto ch = fill(j0, j1, plan.threads);
    launch_kernel("l2l_step_kernel", kernel, static_cast<unsigned>(ch.block_start[ch.n]), plan.threads,
                  static_cast<size_t>(plan.smem_bytes), stream, ch, sc, net, packed.const_data_ptr<acc_t>(),
                  flags.const_data_ptr<int>());
  }
  for (size_t j = 0; j < idx.size(); ++j)
    if (!P[j].is_same(params[idx[j]])) params[idx[j]].copy_(P[j]);
}

void l2l_step_cuda(TensorList params, TensorList grads, TensorList states, TensorList w_ih, TensorList w_hh,
                   TensorList b, const Tensor& w_out, const Tensor& b_out, double lr, double weight_decay,
                   double update_scale, double p, bool log_sign, const std::optional<Tensor>& grad_scale,
                   const std::optional<Tensor>& found_inf) {
  const char* op = "learnedopt::l2l_step_";
  const auto dims = check_l2l_step(op, params, grads, states, w_ih, w_hh, b, w_out, b_out, log_sign);
  TORCH_CHECK(p > 0, op, ": p must be > 0, got ", p);
  check_amp_scalars(op, grad_scale, found_inf, w_out.device());
  at::AutoDispatchBelowADInplaceOrView guard;
  if (params.empty()) return;
  const c10::cuda::CUDAGuard device_guard(w_out.device());
  const NetGeometry net = make_net(op, dims, log_sign);
  std::vector<Tensor> keep;
  const double* gs = device_scalar_f64(grad_scale, keep);
  const double* fi = device_scalar_f64(found_inf, keep);
  for (const auto& group : nonempty_params_by_dtype(params)) {
    const at::ScalarType dt = group.first;
    const std::vector<int64_t>& idx = group.second;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "learnedopt_l2l_step_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const Tensor packed = pack_weights(net, w_ih, w_hh, b, w_out, b_out, c10::CppTypeToScalarType<acc_t>::value);
      StepScalars<acc_t> sc{};
      sc.lr_scale = static_cast<acc_t>(lr * update_scale);
      sc.weight_decay = static_cast<acc_t>(weight_decay);
      sc.p = static_cast<acc_t>(p);
      sc.exp_p = static_cast<acc_t>(std::exp(p));
      sc.log_sign = log_sign;
      sc.grad_scale = gs;
      sc.found_inf = fi;
      step_group<scalar_t, acc_t>(op, idx, params, grads, states, net, packed, sc);
    });
  }
}

}  // namespace

LEARNEDOPT_CUDA_IMPL(m) { m.impl("l2l_step_", &l2l_step_cuda); }

}  // namespace learnedopt
