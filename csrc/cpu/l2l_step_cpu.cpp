// CPU kernel of the L2L optimizer step (learnedopt::l2l_step_, see registration.cpp): per
// parameter and block of coordinates, preprocess the gradient straight into the block's unit-major
// input tile, run the LSTM stack of cpu/lstm_blocks.h, write the new state back into the
// parameter's state rows and add the read-out to the parameter. Every (parameter, block) pair is one
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
  // Weights in the compute dtype; the layers' h/c are set per parameter (column views of its state).
  std::vector<Layer> base;
  for (int64_t l = 0; l < L; ++l)
    base.push_back(make_layer(Tensor(), Tensor(), w_ih[l].to(sdt), w_hh[l].to(sdt), b[l].to(sdt), dims[l]));
  const Tensor w_out = w_out_.to(sdt).contiguous(), b_out = b_out_.to(sdt);
  const int64_t Htop = L ? dims[L - 1].H : I0;
  const acc_t bo = b_out.item<acc_t>();
  const int64_t rpb = rows_per_block(L ? max_hidden(base) : 1);

  // Contiguous working copies of non-contiguous parameters (copied back at the end).
  std::vector<Tensor> P, G;
  std::vector<std::vector<Layer>> layers;
  std::vector<int64_t> numels;
  for (int64_t i : idx) {
    P.push_back(params[i].is_contiguous() ? params[i] : params[i].contiguous());
    G.push_back(grads[i].contiguous());
    numels.push_back(params[i].numel());
    std::vector<Layer> ls = base;
    int64_t off = 0;
    for (int64_t l = 0; l < L; ++l) {
      ls[l].h = states[i].narrow(1, off, dims[l].H);
      ls[l].c = states[i].narrow(1, off + dims[l].H, dims[l].H);
      off += 2 * dims[l].H;
    }
    layers.push_back(std::move(ls));
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

  // Pass 2: the update.
  auto scratch = per_thread_scratch(base, rpb, opt, /*backward=*/false);
  // Per thread: the read-out y of a block [rpb], and (without layers) its input x [2 * rpb].
  std::vector<Tensor> ytile;
  for (int t = 0; t < at::get_num_threads(); ++t) ytile.push_back(at::empty({3 * rpb}, opt));
  const acc_t step = acc_t(lr * update_scale), pp = acc_t(p_pre), exp_p = std::exp(acc_t(p_pre));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[idx[0]].scalar_type(), "l2l_step_update", [&] {
    at::parallel_for(0, n_items, 1, [&](int64_t k0, int64_t k1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      const int tid = at::get_thread_num();
      BlockScratch& bs = scratch[tid];
      acc_t* y = ytile[tid].mutable_data_ptr<acc_t>();
      for (int64_t k = k0; k < k1; ++k) {
        const Item& it = items[k];
        if (!param_ok[it.param]) continue;
        const int64_t B = it.rows;
        scalar_t* p = P[it.param].mutable_data_ptr<scalar_t>() + it.r0;
        const scalar_t* g = G[it.param].const_data_ptr<scalar_t>() + it.r0;
        // The network's input, unit-major: layer 0's zT rows [0, I0) (or the read-out input).
        acc_t* x = L ? bs.layer[0].zT.mutable_data_ptr<acc_t>() : y + rpb;
        for (int64_t r = 0; r < B; ++r) {
          const acc_t gv = l2l_net_input_grad<acc_t>(g[r], p[r], acc_t(inv_scale), acc_t(weight_decay));
          if (log_sign) {
            const auto ls = log_sign_preprocess(gv, pp, exp_p);
            x[r] = ls.log_part;
            x[B + r] = ls.sign_part;
          } else {
            x[r] = gv;
          }
        }
        const acc_t* top;  // [Htop, B] unit-major input of the read-out
        if (L) {
          const auto& ls = layers[it.param];
          layers_forward_block<acc_t>(ls, bs, it.r0, B, Tensor());
          for (int64_t l = 0; l < L; ++l) {
            scatter_rows_T<acc_t>(bs.layer[l].hnT, ls[l].h, it.r0, B);
            scatter_rows_T<acc_t>(bs.layer[l].cnT, ls[l].c, it.r0, B);
          }
          top = bs.layer[L - 1].hnT.const_data_ptr<acc_t>();
        } else {
          top = x;
        }
        const acc_t* wo = w_out.const_data_ptr<acc_t>();
        for (int64_t r = 0; r < B; ++r) y[r] = bo;
        for (int64_t j = 0; j < Htop; ++j) {
          const acc_t w = wo[j];
          const acc_t* t = top + j * B;
          for (int64_t r = 0; r < B; ++r) y[r] += w * t[r];
        }
        for (int64_t r = 0; r < B; ++r) p[r] = scalar_t(acc_t(p[r]) + step * y[r]);
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
