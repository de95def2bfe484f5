// CPU kernels of the coordinatewise LSTM ops (see cpu/lstm_blocks.h for how a block is computed).
#include <torch/library.h>

#include "cpu/lstm_blocks.h"

namespace learnedopt {
namespace {

using namespace cpu;

std::tuple<Tensor, Tensor> coord_lstm_cpu(const Tensor& x_, const Tensor& h_, const Tensor& c_,
                                          const Tensor& w_ih_, const Tensor& w_hh_, const Tensor& b_) {
  const auto d = check_cell("learnedopt::coord_lstm", x_, h_, c_, w_ih_, w_hh_, b_);
  at::AutoDispatchBelowADInplaceOrView guard;
  const Tensor x = x_.contiguous();
  const std::vector<Layer> layers{make_layer(h_, c_, w_ih_, w_hh_, b_, d)};
  const int64_t rpb = rows_per_block(d.H);
  auto scratch = per_thread_scratch(layers, rpb, x.options(), /*backward=*/false);
  Tensor h_new = at::empty({d.N, d.H}, x.options());
  Tensor c_new = at::empty({d.N, d.H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "learnedopt_coord_lstm_cpu", [&] {
    at::parallel_for(0, num_blocks(d.N, rpb), 1, [&](int64_t k0, int64_t k1) {
      // Dispatcher thread-local state (below autograd) is not inherited by the pool's threads.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      BlockScratch& bs = scratch[at::get_thread_num()];
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t r0 = k * rpb, B = std::min(rpb, d.N - r0);
        layers_forward_block<scalar_t>(layers, bs, r0, B, x);
        scatter_rows_T<scalar_t>(bs.layer[0].hnT, h_new, r0, B);
        scatter_rows_T<scalar_t>(bs.layer[0].cnT, c_new, r0, B);
      }
    });
  });
  return {h_new, c_new};
}

CellGrads coord_lstm_backward_cpu(const Tensor& grad_h_new, const Tensor& grad_c_new, const Tensor& x_,
                                  const Tensor& h_, const Tensor& c_, const Tensor& w_ih_,
                                  const Tensor& w_hh_, const Tensor& b_) {
  const char* op = "learnedopt::coord_lstm_backward";
  const auto d = check_cell_backward(op, grad_h_new, grad_c_new, x_, h_, c_, w_ih_, w_hh_, b_);
  at::AutoDispatchBelowADInplaceOrView guard;
  const Tensor x = x_.contiguous();
  const std::vector<Layer> layers{make_layer(h_, c_, w_ih_, w_hh_, b_, d)};
  const int64_t rpb = rows_per_block(d.H);
  const int64_t nb = num_blocks(d.N, rpb);
  auto scratch = per_thread_scratch(layers, rpb, x.options(), /*backward=*/true);
  auto g = make_grad_buffers(layers, x, {grad_h_new}, {grad_c_new}, std::max<int64_t>(nb, 1));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "learnedopt_coord_lstm_backward_cpu", [&] {
    at::parallel_for(0, nb, 1, [&](int64_t k0, int64_t k1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      BlockScratch& bs = scratch[at::get_thread_num()];
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t r0 = k * rpb, B = std::min(rpb, d.N - r0);
        layers_forward_block<scalar_t>(layers, bs, r0, B, x);
        gather_rows_T<scalar_t>(g.ghn[0], r0, B, bs.dhnT[0]);
        layers_backward_block<scalar_t>(layers, bs, k, r0, B, g);
      }
    });
  });
  std::vector<Tensor> dw_ih, dw_hh, db;
  finish_weight_grads(layers, g, dw_ih, dw_hh, db);
  return {g.dx, g.dh[0], g.dc[0], dw_ih[0], dw_hh[0], db[0]};
}

StackOut coord_lstm_stack_cpu(const Tensor& x_, TensorList h, TensorList c, TensorList w_ih, TensorList w_hh,
                              TensorList b, const Tensor& w_out_, const Tensor& b_out_) {
  const auto dims = check_stack("learnedopt::coord_lstm_stack", x_, h, c, w_ih, w_hh, b, w_out_, b_out_);
  at::AutoDispatchBelowADInplaceOrView guard;
  const Tensor x = x_.contiguous(), w_out = w_out_.contiguous(), b_out = b_out_.contiguous();
  const auto layers = make_layers(h, c, w_ih, w_hh, b, dims);
  const int64_t N = x.size(0), nL = static_cast<int64_t>(layers.size());
  std::vector<Tensor> h_new, c_new;
  for (const auto& L : layers) {
    h_new.push_back(at::empty({N, L.H}, x.options()));
    c_new.push_back(at::empty({N, L.H}, x.options()));
  }
  Tensor y = at::empty({N, w_out.size(0)}, x.options());
  const int64_t rpb = rows_per_block(max_hidden(layers));
  auto scratch = per_thread_scratch(layers, rpb, x.options(), /*backward=*/false);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "learnedopt_coord_lstm_stack_cpu", [&] {
    at::parallel_for(0, num_blocks(N, rpb), 1, [&](int64_t k0, int64_t k1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      BlockScratch& bs = scratch[at::get_thread_num()];
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t r0 = k * rpb, B = std::min(rpb, N - r0);
        layers_forward_block<scalar_t>(layers, bs, r0, B, x);
        for (int64_t l = 0; l < nL; ++l) {
          scatter_rows_T<scalar_t>(bs.layer[l].hnT, h_new[l], r0, B);
          scatter_rows_T<scalar_t>(bs.layer[l].cnT, c_new[l], r0, B);
        }
        addmm_into(y.narrow(0, r0, B), b_out, h_new[nL - 1].narrow(0, r0, B), w_out.t());
      }
    });
  });
  return {y, h_new, c_new};
}

StackGrads coord_lstm_stack_backward_cpu(const Tensor& grad_y_, TensorList grad_h_new, TensorList grad_c_new,
                                         const Tensor& x_, TensorList h, TensorList c, TensorList w_ih,
                                         TensorList w_hh, TensorList b, const Tensor& w_out_, const Tensor& b_out_) {
  const char* op = "learnedopt::coord_lstm_stack_backward";
  const auto dims =
      check_stack_backward(op, grad_y_, grad_h_new, grad_c_new, x_, h, c, w_ih, w_hh, b, w_out_, b_out_);
  const int64_t N = x_.size(0), nL = static_cast<int64_t>(dims.size());
  at::AutoDispatchBelowADInplaceOrView guard;
  const Tensor x = x_.contiguous(), w_out = w_out_.contiguous(), b_out = b_out_.contiguous();
  const Tensor grad_y = grad_y_.contiguous();
  const auto layers = make_layers(h, c, w_ih, w_hh, b, dims);
  const int64_t rpb = rows_per_block(max_hidden(layers));
  const int64_t nb = num_blocks(N, rpb), nparts = std::max<int64_t>(nb, 1);
  auto scratch = per_thread_scratch(layers, rpb, x.options(), /*backward=*/true);
  auto g = make_grad_buffers(layers, x, grad_h_new, grad_c_new, nparts);
  Tensor p_wout = at::zeros({nparts, w_out.size(0), w_out.size(1)}, w_out.options());
  Tensor p_bout = at::zeros({nparts, w_out.size(0)}, w_out.options());
  const Layer& top = layers[nL - 1];
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "learnedopt_coord_lstm_stack_backward_cpu", [&] {
    at::parallel_for(0, nb, 1, [&](int64_t k0, int64_t k1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      BlockScratch& bs = scratch[at::get_thread_num()];
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t r0 = k * rpb, B = std::min(rpb, N - r0);
        layers_forward_block<scalar_t>(layers, bs, r0, B, x);
        // Read-out y = h_top w_out^T + b_out: dL/dh_top = grad_h_new[top] + grad_y w_out.
        const Tensor gy = grad_y.narrow(0, r0, B);
        const Tensor h_topT = tile(bs.layer[nL - 1].hnT, top.H, B);
        addmm_into(tile(bs.dhnT[nL - 1], top.H, B), g.ghn[nL - 1].narrow(0, r0, B).t(), w_out.t(), gy.t());
        mm_into(p_wout[k], gy.t(), h_topT.t());
        sum_into(p_bout[k], gy, 0);
        layers_backward_block<scalar_t>(layers, bs, k, r0, B, g);
      }
    });
  });
  std::vector<Tensor> dw_ih, dw_hh, db;
  finish_weight_grads(layers, g, dw_ih, dw_hh, db);
  Tensor dw_out = at::empty_like(w_out), db_out = at::empty_like(b_out);
  sum_parts_in_order(p_wout, dw_out);
  sum_parts_in_order(p_bout, db_out);
  return {g.dx, g.dh, g.dc, dw_ih, dw_hh, db, dw_out, db_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(learnedopt, CPU, m) {
  m.impl("coord_lstm", &coord_lstm_cpu);
  m.impl("coord_lstm_backward", &coord_lstm_backward_cpu);
  m.impl("coord_lstm_stack", &coord_lstm_stack_cpu);
  m.impl("coord_lstm_stack_backward", &coord_lstm_stack_backward_cpu);
}

}  // namespace learnedopt
