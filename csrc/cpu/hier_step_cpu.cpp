// CPU kernel of the hierarchical optimizer step (learnedopt::hier_step_, see registration.cpp).
//
// Work items are fixed runs of ITEM coordinates of one parameter (never dependent on the thread
// count). Three passes, each an at::parallel_for over the items:
//   1. finiteness: is every g / grad_scale of a parameter finite? (a NaN/inf never reaches a state)
//   2. per coordinate (hier_math.h coord_step): momenta, mean squares, features, the LSTM cell, the
//      read-outs, new decays and log-lr, u = exp(step log-lr + offset) * d — in place in the state —
//      and the item's partial sums (h', features, d^2, log-lr'). A tile of TILE coordinates is
//      converted to the compute type, run on SIMD vectors along the coordinates and written back.
//   3. the update p -= lr / rms(d) * u, with rms(d) from the per-parameter sums of pass 2, summed in
//      item order (deterministic).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "checks.h"
#include "cpu/vec_math.h"
#include "hier_math.h"
#include "ops.h"

namespace learnedopt {
namespace {

using at::vec::Vectorized;
using namespace hier;

constexpr int64_t ITEM = 1024;  // coordinates per work item
constexpr int64_t TILE = 64;    // coordinates per compute tile (its scratch ~ 12 KB stays in L1)

struct Item {
  int64_t param, r0, rows;
};

// The compute tile of one run of coordinates, in the compute type acc_t, "row-major by quantity":
// st[r][i] is state row r of the tile's coordinate i.
template <typename acc_t>
struct Tile {
  alignas(64) acc_t st[ROWS][TILE];
  alignas(64) acc_t feat[F][TILE];
  alignas(64) acc_t g[TILE];
  alignas(64) acc_t d[TILE];
};

// Pass 2's maths on a full tile (padding lanes compute on zeros and are never stored or summed).
template <typename acc_t>
void compute_tile(Tile<acc_t>& t, const Vectorized<acc_t>* w, const acc_t* bias, acc_t mean_log_lr) {
  // w: the packed weights, each broadcast to a vector (the gate FMAs then read them as memory
  // operands: no broadcast instruction per FMA)
  // Two vectors at a time (VecPair, vec_math.h): 8 independent FMA chains in the LSTM cell.
  using V = VecPair<Vectorized<acc_t>>;
  constexpr int64_t VS = V::size();
  static_assert(TILE % VS == 0, "a tile is a whole number of vector pairs");
  V bias_v[G4];
  for (int q = 0; q < G4; ++q) bias_v[q] = V(bias[q]);
  const V mll(mean_log_lr);
  for (int64_t i = 0; i < TILE; i += VS) {
    V st[ROWS], feat[F], d;
    for (int r = 0; r < ROWS; ++r) st[r] = V::loadu(&t.st[r][i]);
    coord_step<V>(w, bias_v, mll, V::loadu(&t.g[i]), st, feat, d);
    for (int r = 0; r < ROWS; ++r) st[r].store(&t.st[r][i]);
    for (int k = 0; k < F; ++k) feat[k].store(&t.feat[k][i]);
    d.store(&t.d[i]);
  }
}

// Sum of the first m values of a tile row: SIMD lanes (zero-filled past m), then the lanes in order.
template <typename acc_t>
double tile_sum(const acc_t* x, int64_t m) {
  using V = Vectorized<acc_t>;
  constexpr int64_t VS = V::size();
  V acc(acc_t(0));
  for (int64_t i = 0; i < m; i += VS) acc = acc + V::loadu(x + i, std::min<int64_t>(VS, m - i));
  acc_t lanes[VS];
  acc.store(lanes);
  double s = 0.0;
  for (int64_t l = 0; l < VS; ++l) s += double(lanes[l]);
  return s;
}

template <typename acc_t>
struct Run {
  const std::vector<Item>& items;
  TensorList grads, states;
  const std::vector<Tensor>& P;  // contiguous parameters
  const Vectorized<acc_t>* w;    // packed weights, broadcast
  const std::vector<acc_t>& bias;  // [T, 4H]: b + coord_bias
  acc_t mean_log_lr, inv_scale;
  const std::vector<char>& ok;
  std::vector<double>& partial;  // [items, K]

  // Pass 2 for one item: scalar_t the gradient's dtype, state_t the state's.
  template <typename scalar_t, typename state_t>
  void coord_pass(int64_t k, Tile<acc_t>& t) const {
    const Item& it = items[k];
    const int64_t n = states[it.param].size(1);
    state_t* s = states[it.param].mutable_data_ptr<state_t>();
    const scalar_t* g = grads[it.param].const_data_ptr<scalar_t>();
    double* sums = &partial[k * K];
    const acc_t* b = &bias[it.param * G4];
    for (int64_t c0 = it.r0; c0 < it.r0 + it.rows; c0 += TILE) {
      const int64_t m = std::min<int64_t>(TILE, it.r0 + it.rows - c0);
      for (int r = 0; r < ROWS; ++r) {
        const state_t* src = s + r * n + c0;
        for (int64_t i = 0; i < m; ++i) t.st[r][i] = acc_t(src[i]);
        for (int64_t i = m; i < TILE; ++i) t.st[r][i] = acc_t(0);
      }
      for (int64_t i = 0; i < m; ++i) t.g[i] = acc_t(g[c0 + i]) * inv_scale;
      for (int64_t i = m; i < TILE; ++i) t.g[i] = acc_t(0);
      compute_tile<acc_t>(t, w, b, mean_log_lr);
      for (int r = 0; r < ROWS; ++r) {
        state_t* dst = s + r * n + c0;
        for (int64_t i = 0; i < m; ++i) dst[i] = state_t(t.st[r][i]);
      }
      // partial sums, in a fixed order (SIMD lanes, then the lanes in order)
      for (int j = 0; j < H; ++j) sums[K_H + j] += tile_sum(t.st[R_H + j], m);
      for (int f = 0; f < F; ++f) sums[K_FEAT + f] += tile_sum(t.feat[f], m);
      for (int64_t i = 0; i < m; ++i) t.d[i] *= t.d[i];
      sums[K_D2] += tile_sum(t.d, m);
      sums[K_LOG_LR] += tile_sum(t.st[R_LOG_LR], m);
    }
  }
};

template <typename F_>
void dispatch_param_state(at::ScalarType pt, at::ScalarType st, const F_& f) {
  // (gradient/parameter dtype, state dtype) pairs the op accepts (see check_hier_step)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pt, "hier_step", [&] {
    using param_t = scalar_t;
    if (st == at::kDouble) {
      if constexpr (std::is_same_v<param_t, double>) f(param_t(), double());
    } else if (st == at::kBFloat16) {
      if constexpr (!std::is_same_v<param_t, double>) f(param_t(), at::BFloat16());
    } else {
      if constexpr (!std::is_same_v<param_t, double>) f(param_t(), float());
    }
  });
}

template <typename acc_t>
void step_impl(TensorList params, TensorList grads, TensorList states, const Tensor& coord_bias,
               double mean_log_lr, const Tensor& weights, c10::ArrayRef<double> lrs, double inv_scale,
               const std::vector<int64_t>& idx, const Tensor& sums_out) {
  std::vector<Tensor> P, G;
  std::vector<Item> items;
  for (size_t j = 0; j < idx.size(); ++j) {
    const int64_t i = idx[j];
    P.push_back(params[i].is_contiguous() ? params[i] : params[i].contiguous());
    G.push_back(grads[i].contiguous());
    for (int64_t r0 = 0; r0 < params[i].numel(); r0 += ITEM)
      items.push_back({int64_t(j), r0, std::min(ITEM, params[i].numel() - r0)});
  }
  std::vector<Tensor> S;
  for (int64_t i : idx) S.push_back(states[i]);
  const int64_t n_items = int64_t(items.size()), T = int64_t(idx.size());

  // Pass 1: finiteness of g / grad_scale.
  std::vector<char> item_ok(n_items, 1);
  at::parallel_for(0, n_items, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const Item& it = items[k];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G[it.param].scalar_type(), "hier_step_check", [&] {
        const scalar_t* g = G[it.param].const_data_ptr<scalar_t>() + it.r0;
        bool ok = true;
        for (int64_t r = 0; r < it.rows; ++r) ok &= std::isfinite(acc_t(g[r]) * acc_t(inv_scale));
        item_ok[k] = ok;
      });
    }
  });
  std::vector<char> ok(T, 1);
  for (int64_t k = 0; k < n_items; ++k) ok[items[k].param] &= item_ok[k];

  // Pass 2: the per-coordinate step.
  const Tensor wt = weights.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* w = wt.const_data_ptr<acc_t>();
  const Tensor cb = coord_bias.to(at::kDouble).contiguous();
  const double* cbp = cb.const_data_ptr<double>();
  std::vector<acc_t> bias(T * G4);
  for (int64_t j = 0; j < T; ++j)
    for (int q = 0; q < G4; ++q) bias[j * G4 + q] = acc_t(double(w[W_B + q]) + cbp[idx[j] * G4 + q]);
  std::vector<double> partial(n_items * K, 0.0);
  std::vector<Vectorized<acc_t>> wv(NUM_WEIGHTS);
  for (int k = 0; k < NUM_WEIGHTS; ++k) wv[k] = Vectorized<acc_t>(w[k]);
  Run<acc_t> run{items, G, S, P, wv.data(), bias, acc_t(mean_log_lr), acc_t(inv_scale), ok, partial};
  at::parallel_for(0, n_items, 1, [&](int64_t k0, int64_t k1) {
    auto tile = std::make_unique<Tile<acc_t>>();
    for (int64_t k = k0; k < k1; ++k) {
      const Item& it = items[k];
      if (!ok[it.param]) continue;
      dispatch_param_state(G[it.param].scalar_type(), S[it.param].scalar_type(), [&](auto p, auto s) {
        run.template coord_pass<decltype(p), decltype(s)>(k, *tile);
      });
    }
  });

  // Per-parameter sums, in item order; the direction's RMS.
  std::vector<double> sums(T * K, 0.0);
  for (int64_t k = 0; k < n_items; ++k)
    for (int q = 0; q < K_STEPPED; ++q) sums[items[k].param * K + q] += partial[k * K + q];
  std::vector<acc_t> scale(T, acc_t(0));
  for (int64_t j = 0; j < T; ++j) {
    sums[j * K + K_STEPPED] = ok[j] ? 1.0 : 0.0;
    const double n = double(P[j].numel());
    if (ok[j]) scale[j] = acc_t(lrs[idx[j]] / std::sqrt(sums[j * K + K_D2] / n + RMS_EPS));
  }

  // Pass 3: p -= lr / rms(d) * u.
  at::parallel_for(0, n_items, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const Item& it = items[k];
      if (!ok[it.param]) continue;
      const acc_t sc = scale[it.param];
      const int64_t n = S[it.param].size(1);
      dispatch_param_state(P[it.param].scalar_type(), S[it.param].scalar_type(), [&](auto p_, auto s_) {
        using param_t = decltype(p_);
        using state_t = decltype(s_);
        param_t* p = P[it.param].mutable_data_ptr<param_t>() + it.r0;
        const state_t* u = S[it.param].const_data_ptr<state_t>() + R_U * n + it.r0;
        for (int64_t r = 0; r < it.rows; ++r) p[r] = param_t(acc_t(p[r]) - sc * acc_t(u[r]));
      });
    }
  });
  for (size_t j = 0; j < idx.size(); ++j)
    if (ok[j] && !P[j].is_same(params[idx[j]])) params[idx[j]].copy_(P[j]);
  auto out = sums_out.accessor<float, 2>();
  for (int64_t j = 0; j < T; ++j)
    for (int q = 0; q < K; ++q) out[idx[j]][q] = float(sums[j * K + q]);
}

Tensor hier_step_cpu(TensorList params, TensorList grads, TensorList states, const Tensor& coord_bias,
                     const Tensor& mean_log_lr, const Tensor& weights, c10::ArrayRef<double> lrs,
                     const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf) {
  const char* op = "learnedopt::hier_step_";
  check_hier_step(op, params, grads, states, coord_bias, mean_log_lr, weights, lrs, grad_scale, found_inf, ROWS, G4,
                  NUM_WEIGHTS);
  at::AutoDispatchBelowADInplaceOrView guard;
  const int64_t T = int64_t(params.size());
  Tensor sums = at::zeros({T, K}, weights.options());
  if (found_inf.has_value() && found_inf->defined() && found_inf->item<double>() != 0.0) return sums;
  double inv_scale = 1.0;
  if (grad_scale.has_value() && grad_scale->defined()) inv_scale = 1.0 / grad_scale->item<double>();
  const double mll = mean_log_lr.item<double>();
  std::vector<int64_t> f32, f64;
  for (int64_t i = 0; i < T; ++i) {
    if (params[i].numel() == 0) continue;
    (params[i].scalar_type() == at::kDouble ? f64 : f32).push_back(i);
  }
  if (!f32.empty()) step_impl<float>(params, grads, states, coord_bias, mll, weights, lrs, inv_scale, f32, sums);
  if (!f64.empty()) step_impl<double>(params, grads, states, coord_bias, mll, weights, lrs, inv_scale, f64, sums);
  return sums;
}

}  // namespace

TORCH_LIBRARY_IMPL(learnedopt, CPU, m) { m.impl("hier_step_", &hier_step_cpu); }

}  // namespace learnedopt
