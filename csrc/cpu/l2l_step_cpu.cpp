// CPU kernel of the L2L optimizer step (learnedopt::l2l_step_, see registration.cpp): per
// parameter and block of coordinates, preprocess the gradient straight into the block's unit-major
// tile, bring the block's state rows in with one transpose, run the LSTM layers in the tile (the
// matrix products and cell maths of cpu/lstm_blocks.h and lstm_math.h), add the read-out to the
// parameter and write the new state back with one transpose. Every (parameter, block) pair is one
// work item of a single at::parallel_for over the whole list.
#include <torch/library.h>

#include <cmath>

#include "cpu/lstm_blocks.h"

namespace learnedopt {
namespace {

using namespace cpu;

// (parameter, first row, rows) of every work item.
struct Item {
  int64_t param, r0, rows;
};

std::vector<Item> make_items(const std::vector<int64_t>& numels, int64_t rpb) {
  std::vector<Item> items;
  for (size_t i = 0; i < numels.size(); ++i)
    for (int64_t r0 = 0; r0 < numels[i]; r0 += rpb) items.push_back({int64_t(i), r0, std::min(rpb, numels[i] - r0)});
  return items;
}

// Per-thread scratch of the update pass, for blocks of up to `rows` coordinates.
//   tile  [(I0 + S) * rows]: the block's unit-major tile, rows x (I0), then the parameter's state rows
//         in their stored order h_0, c_0, h_1, c_1, ... (S = 2 * sum of H), row stride B
//   gates [4 * max H * rows], cnew [sum of H * rows] (each layer's c_new), y [rows] (read-out)
struct StepScratch {
  Tensor tile, gates, cnew, y;
};

// The block's forward, in the tile. Layer l multiplies [input | h_l] (rows [hrow_l - I_l, hrow_l + H_l))
// by [W_ih | W_hh]: for l = 0 that is x and h_0; for l > 0 it is the rows of c_{l-1} and h_l, because
// the pointwise pass of layer l-1 writes its h_new over its old c (element by element, right after
// reading it) and its c_new to cnew. So no input is copied between layers, and the whole state of a
// block comes in with one transpose of its [B, S] rows (and goes back with one): four transposes of
// 20-column slices cost twice as much, measured at 1e6 coordinates, S = 80.
// Returns the tile row of the top layer's h_new (the read-out's input); S = 0 (no layers): row 0, x.
template <typename acc_t>
int64_t forward_block(const std::vector<Layer>& layers, StepScratch& sc, int64_t I0, int64_t B) {
  acc_t* T = sc.tile.mutable_data_ptr<acc_t>();
  acc_t* gates = sc.gates.mutable_data_ptr<acc_t>();
  acc_t* cnew = sc.cnew.mutable_data_ptr<acc_t>();
  int64_t hrow = I0, top = 0;
  for (const Layer& L : layers) {
    const int64_t H = L.H, M = H * B;
    acc_t* c = T + (hrow + H) * B;  // old c in, h_new out
    layer_forward<acc_t>(L, T + (hrow - L.I) * B, B, gates, /*gbuf=*/gates, c, cnew, /*h_new=*/c,
                         /*tanh_c_new=*/nullptr);
    top = hrow + H;
    cnew += M;
    hrow += 2 * H;
  }
  return top;
}

// After forward_block: h_new and c_new of every layer to their state rows h_l, c_l of the tile.
template <typename acc_t>
void state_rows_in_place(const std::vector<Layer>& layers, StepScratch& sc, int64_t I0, int64_t B) {
  acc_t* T = sc.tile.mutable_data_ptr<acc_t>();
  const acc_t* cnew = sc.cnew.const_data_ptr<acc_t>();
  int64_t hrow = I0;
  for (const Layer& L : layers) {
    const int64_t M = L.H * B;
    std::copy(T + (hrow + L.H) * B, T + (hrow + L.H) * B + M, T + hrow * B);
    std::copy(cnew, cnew + M, T + (hrow + L.H) * B);
    cnew += M;
    hrow += 2 * L.H;
  }
}

// One group of parameters whose state (and compute) dtype is acc_t (float or double).
template <typename acc_t>
void step_group(const std::vector<int64_t>& idx, TensorList params, TensorList grads, TensorList states,
                const std::vector<CellDims>& dims, TensorList w_ih, TensorList w_hh, TensorList b,
                const Tensor& w_out_, const Tensor& b_out_, double lr, double weight_decay, double update_scale,
                double p_pre, bool log_sign, double inv_scale) {
  const auto sdt = c10::CppTypeToScalarType<acc_t>::value;
  const auto opt = at::TensorOptions().dtype(sdt);
  const int64_t L = static_cast<int64_t>(dims.size());
  const int64_t I0 = log_sign ? 2 : 1;
  // Weights in the compute dtype (the layers' h/c members stay unused: the state comes per block).
  std::vector<Layer> layers;
  int64_t S = 0, sumH = 0;
  for (int64_t l = 0; l < L; ++l) {
    layers.push_back(make_layer(Tensor(), Tensor(), w_ih[l].to(sdt), w_hh[l].to(sdt), b[l].to(sdt), dims[l]));
    S += 2 * dims[l].H;
    sumH += dims[l].H;
  }
  const Tensor w_out = w_out_.to(sdt).contiguous(), b_out = b_out_.to(sdt);
  const int64_t Htop = L ? dims[L - 1].H : I0;
  const acc_t bo = b_out.item<acc_t>();
  const int64_t maxH = max_hidden(layers);  // 1 without layers
  const int64_t rpb = rows_per_block(maxH);

  // Contiguous working copies of non-contiguous parameters (copied back at the end).
  std::vector<Tensor> P, G;
  std::vector<int64_t> numels;
  for (int64_t i : idx) {
    P.push_back(params[i].is_contiguous() ? params[i] : params[i].contiguous());
    G.push_back(grads[i].contiguous());
    numels.push_back(params[i].numel());
  }
  const auto items = make_items(numels, rpb);
  const int64_t n_items = static_cast<int64_t>(items.size());

  // Pass 1: is every g' of a parameter finite? (A NaN/inf gradient must not reach the state.)
  std::vector<char> item_ok(n_items, 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[idx[0]].scalar_type(), "l2l_step_check", [&] {
    at::parallel_for(0, n_items, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const Item& it = items[k];
        const scalar_t* g = G[it.param].const_data_ptr<scalar_t>() + it.r0;
        const scalar_t* p = P[it.param].const_data_ptr<scalar_t>() + it.r0;
        bool ok = true;
        for (int64_t r = 0; r < it.rows; ++r)
          ok &= std::isfinite(l2l_net_input_grad<acc_t>(g[r], p[r], acc_t(inv_scale), acc_t(weight_decay)));
        item_ok[k] = ok;
      }
    });
  });
  std::vector<char> param_ok(P.size(), 1);
  for (int64_t k = 0; k < n_items; ++k) param_ok[items[k].param] &= item_ok[k];

  // Pass 2: the update. Scratch is allocated here, by the calling thread (see per_thread_scratch).
  std::vector<StepScratch> scratch;
  for (int t = 0; t < at::get_num_threads(); ++t)
    scratch.push_back({at::empty({(I0 + S) * rpb}, opt), at::empty({4 * maxH * rpb}, opt),
                       at::empty({std::max<int64_t>(sumH, 1) * rpb}, opt), at::empty({rpb}, opt)});
  // e^p in double, rounded once: the reference's g * math.exp(p) (exp of p rounded to float is off by
  // an ulp for most non-integer p).
  const acc_t step = acc_t(lr * update_scale), pp = acc_t(p_pre), exp_p = acc_t(std::exp(p_pre));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[idx[0]].scalar_type(), "l2l_step_update", [&] {
    at::parallel_for(0, n_items, 1, [&](int64_t k0, int64_t k1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      StepScratch& sc = scratch[at::get_thread_num()];
      acc_t* T = sc.tile.mutable_data_ptr<acc_t>();
      acc_t* y = sc.y.mutable_data_ptr<acc_t>();
      for (int64_t k = k0; k < k1; ++k) {
        const Item& it = items[k];
        if (!param_ok[it.param]) continue;
        const int64_t B = it.rows;
        scalar_t* p = P[it.param].mutable_data_ptr<scalar_t>() + it.r0;
        const scalar_t* g = G[it.param].const_data_ptr<scalar_t>() + it.r0;
        acc_t* state = S ? states[idx[it.param]].mutable_data_ptr<acc_t>() + it.r0 * S : nullptr;
        // The network's input, unit-major: tile rows [0, I0).
        for (int64_t r = 0; r < B; ++r) {
          const acc_t gv = l2l_net_input_grad<acc_t>(g[r], p[r], acc_t(inv_scale), acc_t(weight_decay));
          if (log_sign) {
            const auto ls = log_sign_preprocess(gv, pp, exp_p);
            T[r] = ls.log_part;
            T[B + r] = ls.sign_part;
          } else {
            T[r] = gv;
          }
        }
        if (S) transpose_block(state, S, T + I0 * B, B, B, S);  // state rows -> tile rows [I0, I0 + S)
        const acc_t* top = T + forward_block<acc_t>(layers, sc, I0, B) * B;  // [Htop, B]
        const acc_t* wo = w_out.const_data_ptr<acc_t>();
        for (int64_t r = 0; r < B; ++r) y[r] = bo;
        for (int64_t j = 0; j < Htop; ++j) {
          const acc_t w = wo[j];
          const acc_t* t = top + j * B;
          for (int64_t r = 0; r < B; ++r) y[r] += w * t[r];
        }
        for (int64_t r = 0; r < B; ++r) p[r] = scalar_t(acc_t(p[r]) + step * y[r]);
        if (S) {
          state_rows_in_place<acc_t>(layers, sc, I0, B);
          transpose_block(T + I0 * B, B, state, S, S, B);
        }
      }
    });
  });
  for (size_t j = 0; j < idx.size(); ++j)
    if (!P[j].is_same(params[idx[j]])) params[idx[j]].copy_(P[j]);
}

void l2l_step_cpu(TensorList params, TensorList grads, TensorList states, TensorList w_ih, TensorList w_hh,
                  TensorList b, const Tensor& w_out, const Tensor& b_out, double lr, double weight_decay,
                  double update_scale, double p, bool log_sign, const std::optional<Tensor>& grad_scale,
                  const std::optional<Tensor>& found_inf) {
  const char* op = "learnedopt::l2l_step_";
  const auto dims = check_l2l_step(op, params, grads, states, w_ih, w_hh, b, w_out, b_out, log_sign);
  TORCH_CHECK(p > 0, op, ": p must be > 0, got ", p);
  check_amp_scalars(op, grad_scale, found_inf, w_out.device());
  at::AutoDispatchBelowADInplaceOrView guard;
  if (found_inf.has_value() && found_inf->defined() && found_inf->item<double>() != 0.0) return;
  double inv_scale = 1.0;
  if (grad_scale.has_value() && grad_scale->defined()) inv_scale = 1.0 / grad_scale->item<double>();
  // One group per parameter dtype; float64 parameters compute in float64, all others in float32.
  for (const auto& group : nonempty_params_by_dtype(params)) {
    const at::ScalarType dt = group.first;
    const std::vector<int64_t>& idx = group.second;
    if (dt == at::kDouble) {
      step_group<double>(idx, params, grads, states, dims, w_ih, w_hh, b, w_out, b_out, lr, weight_decay,
                         update_scale, p, log_sign, inv_scale);
    } else {
      step_group<float>(idx, params, grads, states, dims, w_ih, w_hh, b, w_out, b_out, lr, weight_decay,
                        update_scale, p, log_sign, inv_scale);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(learnedopt, CPU, m) { m.impl("l2l_step_", &l2l_step_cpu); }

}  // namespace learnedopt
