// CPU kernels of the coordinatewise LSTM ops.
//
// The N coordinates are cut into blocks of a fixed number of rows (it depends only on H, never on
// the thread count). Each block runs start to finish on one thread with its scratch in cache:
//   gates   = b + x_blk W_ih^T + h_blk W_hh^T          (BLAS, through at::addmm)
//   per-unit maths of lstm_math.h on SIMD vectors      (at::vec)
// Backward recomputes the gates of a block instead of storing them (4H numbers per coordinate),
// then dz = dL/d(gates), dx = dz W_ih, dh = dz W_hh, and writes the block's weight-gradient
// partials dz^T x, dz^T h, sum(dz) into its own slot. The partials are summed in block order
// afterwards: the weight gradients are deterministic and independent of the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "cpu/vec_math.h"
#include "ops.h"

namespace learnedopt {
namespace {

using at::vec::Vectorized;

// Rows per block: the gate scratch of a block (rows x 4H) stays around 256 KB for float32.
int64_t rows_per_block(int64_t max_H) {
  return std::clamp<int64_t>(65536 / (4 * max_H), 16, 1024);
}

// gates [B, 4H]: pre-activations in, activated (i, f, g, o) out. Writes c_new, h_new and
// tanh(c_new) where the pointer is non-null. All row-major, contiguous.
template <typename scalar_t>
void pointwise_forward(int64_t B, int64_t H, scalar_t* gates, const scalar_t* c, scalar_t* c_new,
                       scalar_t* h_new, scalar_t* tanh_c_new) {
  using V = Vectorized<scalar_t>;
  constexpr int64_t VS = V::size();
  for (int64_t r = 0; r < B; ++r) {
    scalar_t* z = gates + r * 4 * H;
    const int64_t o = r * H;
    for (int64_t j = 0; j < H; j += VS) {
      const int64_t n = std::min<int64_t>(VS, H - j);
      const auto u = lstm_unit_forward(V::loadu(z + j, n), V::loadu(z + H + j, n),
                                       V::loadu(z + 2 * H + j, n), V::loadu(z + 3 * H + j, n),
                                       V::loadu(c + o + j, n));
      u.i.store(z + j, n);
      u.f.store(z + H + j, n);
      u.g.store(z + 2 * H + j, n);
      u.o.store(z + 3 * H + j, n);
      if (c_new) u.c_new.store(c_new + o + j, n);
      if (h_new) u.h_new.store(h_new + o + j, n);
      if (tanh_c_new) u.tanh_c_new.store(tanh_c_new + o + j, n);
    }
  }
}

// From activated gates [B, 4H], old cell c, tanh(c_new) and incoming dh_new, dc_new (all [B, H])
// to dz [B, 4H] (gradient of the pre-activations) and dc [B, H]. dc_new may be null (zero).
template <typename scalar_t>
void pointwise_backward(int64_t B, int64_t H, const scalar_t* act, const scalar_t* c,
                        const scalar_t* tanh_c_new, const scalar_t* dh_new, const scalar_t* dc_new,
                        scalar_t* dz, scalar_t* dc) {
  using V = Vectorized<scalar_t>;
  constexpr int64_t VS = V::size();
  for (int64_t r = 0; r < B; ++r) {
    const scalar_t* a = act + r * 4 * H;
    scalar_t* d = dz + r * 4 * H;
    const int64_t o = r * H;
    for (int64_t j = 0; j < H; j += VS) {
      const int64_t n = std::min<int64_t>(VS, H - j);
      LstmUnit<V> u;
      u.i = V::loadu(a + j, n);
      u.f = V::loadu(a + H + j, n);
      u.g = V::loadu(a + 2 * H + j, n);
      u.o = V::loadu(a + 3 * H + j, n);
      u.tanh_c_new = V::loadu(tanh_c_new + o + j, n);
      const V dcn = dc_new ? V::loadu(dc_new + o + j, n) : V(scalar_t(0));
      const auto g = lstm_unit_backward(u, V::loadu(c + o + j, n), V::loadu(dh_new + o + j, n), dcn);
      g.dzi.store(d + j, n);
      g.dzf.store(d + H + j, n);
      g.dzg.store(d + 2 * H + j, n);
      g.dzo.store(d + 3 * H + j, n);
      g.dc.store(dc + o + j, n);
    }
  }
}

// Sums parts [nblocks, ...] over blocks, in block order, into out (shape parts.shape[1:]).
void sum_parts_in_order(const Tensor& parts, const Tensor& out) {
  const int64_t nb = parts.size(0);
  const int64_t M = out.numel();
  AT_DISPATCH_FLOATING_TYPES(parts.scalar_type(), "learnedopt_sum_parts", [&] {
    const scalar_t* p = parts.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, M, 256, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        scalar_t acc = 0;
        for (int64_t k = 0; k < nb; ++k) acc += p[k * M + m];
        o[m] = acc;
      }
    });
  });
}

// at::*_out take the output by non-const reference; these take views (rvalues) of larger tensors.
void mm_into(Tensor out, const Tensor& a, const Tensor& b) { at::mm_out(out, a, b); }
// out = self + a @ b
void addmm_into(Tensor out, const Tensor& self, const Tensor& a, const Tensor& b) { at::addmm_out(out, self, a, b); }
// out = sum of a's rows
void sum_rows_into(Tensor out, const Tensor& a) { at::sum_out(out, a, {0}); }

// One layer's weights, views of a block's rows, and its per-block scratch.
struct Layer {
  Tensor w_ih, w_hh, b;   // [4H, I], [4H, H], [4H] (contiguous)
  Tensor h, c;            // [N, H] old state (contiguous)
  int64_t H;
};

// gates_blk = b + z_blk W_ih^T + h_blk W_hh^T; then the activations and new state.
template <typename scalar_t>
void layer_forward_block(const Layer& L, const Tensor& z_blk, const Tensor& h_blk, const Tensor& c_blk,
                         const Tensor& gates_blk, scalar_t* c_new, scalar_t* h_new, scalar_t* tanh_c_new) {
  addmm_into(gates_blk, L.b, z_blk, L.w_ih.t());
  gates_blk.addmm_(h_blk, L.w_hh.t());
  pointwise_forward<scalar_t>(z_blk.size(0), L.H, gates_blk.mutable_data_ptr<scalar_t>(),
                              c_blk.const_data_ptr<scalar_t>(), c_new, h_new, tanh_c_new);
}

CellDims check_and_dims(const Tensor& x, const Tensor& h, const Tensor& c, const Tensor& w_ih,
                        const Tensor& w_hh, const Tensor& b, const char* op) {
  return check_cell(op, x, h, c, w_ih, w_hh, b);
}

std::tuple<Tensor, Tensor> coord_lstm_cpu(const Tensor& x_, const Tensor& h_, const Tensor& c_,
                                          const Tensor& w_ih_, const Tensor& w_hh_, const Tensor& b_) {
  const auto d = check_and_dims(x_, h_, c_, w_ih_, w_hh_, b_, "learnedopt::coord_lstm");
  at::AutoDispatchBelowADInplaceOrView guard;
  const Tensor x = x_.contiguous();
  const Layer L{w_ih_.contiguous(), w_hh_.contiguous(), b_.contiguous(), h_.contiguous(), c_.contiguous(), d.H};
  Tensor h_new = at::empty({d.N, d.H}, x.options());
  Tensor c_new = at::empty({d.N, d.H}, x.options());
  if (d.N == 0) return {h_new, c_new};
  const int64_t rpb = rows_per_block(d.H);
  const int64_t nblocks = (d.N + rpb - 1) / rpb;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "learnedopt_coord_lstm_cpu", [&] {
    at::parallel_for(0, nblocks, 1, [&](int64_t k0, int64_t k1) {
      Tensor gates = at::empty({rpb, 4 * d.H}, x.options());
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t r0 = k * rpb, B = std::min(rpb, d.N - r0);
        layer_forward_block<scalar_t>(L, x.narrow(0, r0, B), L.h.narrow(0, r0, B), L.c.narrow(0, r0, B),
                                      gates.narrow(0, 0, B), c_new.mutable_data_ptr<scalar_t>() + r0 * d.H,
                                      h_new.mutable_data_ptr<scalar_t>() + r0 * d.H, nullptr);
      }
    });
  });
  return {h_new, c_new};
}

CellGrads coord_lstm_backward_cpu(const Tensor& grad_h_new, const Tensor& grad_c_new, const Tensor& x_,
                                  const Tensor& h_, const Tensor& c_, const Tensor& w_ih_,
                                  const Tensor& w_hh_, const Tensor& b_) {
  const char* op = "learnedopt::coord_lstm_backward";
  const auto d = check_and_dims(x_, h_, c_, w_ih_, w_hh_, b_, op);
  check_grad(op, "grad_h_new", grad_h_new, h_, "h");
  check_grad(op, "grad_c_new", grad_c_new, c_, "c");
  at::AutoDispatchBelowADInplaceOrView guard;
  const Tensor x = x_.contiguous();
  const Layer L{w_ih_.contiguous(), w_hh_.contiguous(), b_.contiguous(), h_.contiguous(), c_.contiguous(), d.H};
  const Tensor dhn = grad_h_new.contiguous(), dcn = grad_c_new.contiguous();
  Tensor dx = at::empty({d.N, d.I}, x.options());
  Tensor dh = at::empty({d.N, d.H}, x.options());
  Tensor dc = at::empty({d.N, d.H}, x.options());
  const int64_t rpb = rows_per_block(d.H);
  const int64_t nblocks = (d.N + rpb - 1) / rpb;
  const auto wopt = L.w_ih.options();
  Tensor p_ih = at::zeros({std::max<int64_t>(nblocks, 1), 4 * d.H, d.I}, wopt);
  Tensor p_hh = at::zeros({std::max<int64_t>(nblocks, 1), 4 * d.H, d.H}, wopt);
  Tensor p_b = at::zeros({std::max<int64_t>(nblocks, 1), 4 * d.H}, wopt);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "learnedopt_coord_lstm_backward_cpu", [&] {
    at::parallel_for(0, nblocks, 1, [&](int64_t k0, int64_t k1) {
      Tensor gates = at::empty({rpb, 4 * d.H}, x.options());
      Tensor dz = at::empty({rpb, 4 * d.H}, x.options());
      Tensor tc = at::empty({rpb, d.H}, x.options());
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t r0 = k * rpb, B = std::min(rpb, d.N - r0);
        const Tensor xb = x.narrow(0, r0, B), hb = L.h.narrow(0, r0, B), cb = L.c.narrow(0, r0, B);
        const Tensor gb = gates.narrow(0, 0, B), dzb = dz.narrow(0, 0, B);
        layer_forward_block<scalar_t>(L, xb, hb, cb, gb, nullptr, nullptr, tc.mutable_data_ptr<scalar_t>());
        pointwise_backward<scalar_t>(B, d.H, gb.const_data_ptr<scalar_t>(), cb.const_data_ptr<scalar_t>(),
                                     tc.const_data_ptr<scalar_t>(), dhn.const_data_ptr<scalar_t>() + r0 * d.H,
                                     dcn.const_data_ptr<scalar_t>() + r0 * d.H, dzb.mutable_data_ptr<scalar_t>(),
                                     dc.mutable_data_ptr<scalar_t>() + r0 * d.H);
        mm_into(dx.narrow(0, r0, B), dzb, L.w_ih);
        mm_into(dh.narrow(0, r0, B), dzb, L.w_hh);
        mm_into(p_ih[k], dzb.t(), xb);
        mm_into(p_hh[k], dzb.t(), hb);
        sum_rows_into(p_b[k], dzb);
      }
    });
  });
  Tensor dw_ih = at::empty_like(L.w_ih), dw_hh = at::empty_like(L.w_hh), db = at::empty_like(L.b);
  sum_parts_in_order(p_ih, dw_ih);
  sum_parts_in_order(p_hh, dw_hh);
  sum_parts_in_order(p_b, db);
  return {dx, dh, dc, dw_ih, dw_hh, db};
}

std::vector<Layer> make_layers(TensorList h, TensorList c, TensorList w_ih, TensorList w_hh, TensorList b,
                               const std::vector<CellDims>& dims) {
  std::vector<Layer> layers;
  for (size_t l = 0; l < dims.size(); ++l)
    layers.push_back({w_ih[l].contiguous(), w_hh[l].contiguous(), b[l].contiguous(), h[l].contiguous(),
                      c[l].contiguous(), dims[l].H});
  return layers;
}

int64_t max_hidden(const std::vector<CellDims>& dims) {
  int64_t m = 1;
  for (const auto& d : dims) m = std::max(m, d.H);
  return m;
}

StackOut coord_lstm_stack_cpu(const Tensor& x_, TensorList h, TensorList c, TensorList w_ih, TensorList w_hh,
                              TensorList b, const Tensor& w_out_, const Tensor& b_out_) {
  const auto dims = check_stack("learnedopt::coord_lstm_stack", x_, h, c, w_ih, w_hh, b, w_out_, b_out_);
  at::AutoDispatchBelowADInplaceOrView guard;
  const Tensor x = x_.contiguous(), w_out = w_out_.contiguous(), b_out = b_out_.contiguous();
  const auto layers = make_layers(h, c, w_ih, w_hh, b, dims);
  const int64_t N = x.size(0), nL = static_cast<int64_t>(layers.size()), maxH = max_hidden(dims);
  std::vector<Tensor> h_new, c_new;
  for (const auto& L : layers) {
    h_new.push_back(at::empty({N, L.H}, x.options()));
    c_new.push_back(at::empty({N, L.H}, x.options()));
  }
  Tensor y = at::empty({N, w_out.size(0)}, x.options());
  if (N == 0) return {y, h_new, c_new};
  const int64_t rpb = rows_per_block(maxH);
  const int64_t nblocks = (N + rpb - 1) / rpb;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "learnedopt_coord_lstm_stack_cpu", [&] {
    at::parallel_for(0, nblocks, 1, [&](int64_t k0, int64_t k1) {
      Tensor gates = at::empty({rpb * 4 * maxH}, x.options());
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t r0 = k * rpb, B = std::min(rpb, N - r0);
        Tensor z = x.narrow(0, r0, B);
        for (int64_t l = 0; l < nL; ++l) {
          const auto& L = layers[l];
          Tensor hn = h_new[l].narrow(0, r0, B);
          layer_forward_block<scalar_t>(L, z, L.h.narrow(0, r0, B), L.c.narrow(0, r0, B),
                                        gates.narrow(0, 0, B * 4 * L.H).view({B, 4 * L.H}),
                                        c_new[l].mutable_data_ptr<scalar_t>() + r0 * L.H,
                                        hn.mutable_data_ptr<scalar_t>(), nullptr);
          z = hn;
        }
        addmm_into(y.narrow(0, r0, B), b_out, z, w_out.t());
      }
    });
  });
  return {y, h_new, c_new};
}

StackGrads coord_lstm_stack_backward_cpu(const Tensor& grad_y_, TensorList grad_h_new, TensorList grad_c_new,
                                         const Tensor& x_, TensorList h, TensorList c, TensorList w_ih,
                                         TensorList w_hh, TensorList b, const Tensor& w_out_, const Tensor& b_out_) {
  const char* op = "learnedopt::coord_lstm_stack_backward";
  const auto dims = check_stack(op, x_, h, c, w_ih, w_hh, b, w_out_, b_out_);
  const int64_t N = x_.size(0), nL = static_cast<int64_t>(dims.size()), maxH = max_hidden(dims);
  check_defined(op, "grad_y", grad_y_);
  TORCH_CHECK(grad_y_.dim() == 2 && grad_y_.size(0) == N && grad_y_.size(1) == w_out_.size(0), op,
              ": grad_y must have shape [N, O] = [", N, ", ", w_out_.size(0), "], got ", shape_str(grad_y_));
  check_device(op, "grad_y", grad_y_, x_, "x");
  check_same_dtype(op, "grad_y", grad_y_, x_, "x");
  TORCH_CHECK(static_cast<int64_t>(grad_h_new.size()) == nL && static_cast<int64_t>(grad_c_new.size()) == nL,
              op, ": grad_h_new and grad_c_new must hold one tensor per layer (", nL, "), got lengths ",
              grad_h_new.size(), " and ", grad_c_new.size());
  for (int64_t l = 0; l < nL; ++l) {
    check_grad(op, indexed("grad_h_new", l), grad_h_new[l], h[l], indexed("h", l).c_str());
    check_grad(op, indexed("grad_c_new", l), grad_c_new[l], c[l], indexed("c", l).c_str());
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  const Tensor x = x_.contiguous(), w_out = w_out_.contiguous(), b_out = b_out_.contiguous();
  const Tensor grad_y = grad_y_.contiguous();
  const auto layers = make_layers(h, c, w_ih, w_hh, b, dims);
  std::vector<Tensor> ghn, gcn, dh, dc, dw_ih, dw_hh, db, p_ih, p_hh, p_b;
  const int64_t rpb = rows_per_block(maxH);
  const int64_t nblocks = (N + rpb - 1) / rpb, nparts = std::max<int64_t>(nblocks, 1);
  for (int64_t l = 0; l < nL; ++l) {
    const auto& L = layers[l];
    ghn.push_back(grad_h_new[l].contiguous());
    gcn.push_back(grad_c_new[l].contiguous());
    dh.push_back(at::empty({N, L.H}, x.options()));
    dc.push_back(at::empty({N, L.H}, x.options()));
    p_ih.push_back(at::zeros({nparts, 4 * L.H, L.w_ih.size(1)}, L.w_ih.options()));
    p_hh.push_back(at::zeros({nparts, 4 * L.H, L.H}, L.w_ih.options()));
    p_b.push_back(at::zeros({nparts, 4 * L.H}, L.w_ih.options()));
  }
  Tensor dx = at::empty_like(x);
  Tensor p_wout = at::zeros({nparts, w_out.size(0), w_out.size(1)}, w_out.options());
  Tensor p_bout = at::zeros({nparts, w_out.size(0)}, w_out.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "learnedopt_coord_lstm_stack_backward_cpu", [&] {
    at::parallel_for(0, nblocks, 1, [&](int64_t k0, int64_t k1) {
      // Per-layer scratch of one block: activated gates, tanh(c_new), h_new, dL/dh_new.
      std::vector<Tensor> act, tc, hn, dhn;
      for (const auto& L : layers) {
        act.push_back(at::empty({rpb, 4 * L.H}, x.options()));
        tc.push_back(at::empty({rpb, L.H}, x.options()));
        hn.push_back(at::empty({rpb, L.H}, x.options()));
        dhn.push_back(at::empty({rpb, L.H}, x.options()));
      }
      Tensor dz = at::empty({rpb * 4 * maxH}, x.options());
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t r0 = k * rpb, B = std::min(rpb, N - r0);
        // Recompute the forward pass of the block, keeping what backward needs.
        Tensor z = x.narrow(0, r0, B);
        for (int64_t l = 0; l < nL; ++l) {
          const auto& L = layers[l];
          layer_forward_block<scalar_t>(L, z, L.h.narrow(0, r0, B), L.c.narrow(0, r0, B), act[l].narrow(0, 0, B),
                                        nullptr, hn[l].mutable_data_ptr<scalar_t>(), tc[l].mutable_data_ptr<scalar_t>());
          z = hn[l].narrow(0, 0, B);
        }
        // Read-out: y = h_top w_out^T + b_out.
        const Tensor gy = grad_y.narrow(0, r0, B);
        addmm_into(dhn[nL - 1].narrow(0, 0, B), ghn[nL - 1].narrow(0, r0, B), gy, w_out);
        mm_into(p_wout[k], gy.t(), z);
        sum_rows_into(p_bout[k], gy);
        for (int64_t l = nL - 1; l >= 0; --l) {
          const auto& L = layers[l];
          const Tensor hb = L.h.narrow(0, r0, B), cb = L.c.narrow(0, r0, B);
          const Tensor dzb = dz.narrow(0, 0, B * 4 * L.H).view({B, 4 * L.H});
          pointwise_backward<scalar_t>(B, L.H, act[l].const_data_ptr<scalar_t>(), cb.const_data_ptr<scalar_t>(),
                                       tc[l].const_data_ptr<scalar_t>(), dhn[l].const_data_ptr<scalar_t>(),
                                       gcn[l].const_data_ptr<scalar_t>() + r0 * L.H,
                                       dzb.mutable_data_ptr<scalar_t>(),
                                       dc[l].mutable_data_ptr<scalar_t>() + r0 * L.H);
          const Tensor zin = l == 0 ? x.narrow(0, r0, B) : hn[l - 1].narrow(0, 0, B);
          mm_into(p_ih[l][k], dzb.t(), zin);
          mm_into(p_hh[l][k], dzb.t(), hb);
          sum_rows_into(p_b[l][k], dzb);
          mm_into(dh[l].narrow(0, r0, B), dzb, L.w_hh);
          if (l == 0) {
            mm_into(dx.narrow(0, r0, B), dzb, L.w_ih);
          } else {
            addmm_into(dhn[l - 1].narrow(0, 0, B), ghn[l - 1].narrow(0, r0, B), dzb, L.w_ih);
          }
        }
      }
    });
  });
  for (int64_t l = 0; l < nL; ++l) {
    dw_ih.push_back(at::empty_like(layers[l].w_ih));
    dw_hh.push_back(at::empty_like(layers[l].w_hh));
    db.push_back(at::empty_like(layers[l].b));
    sum_parts_in_order(p_ih[l], dw_ih[l]);
    sum_parts_in_order(p_hh[l], dw_hh[l]);
    sum_parts_in_order(p_b[l], db[l]);
  }
  Tensor dw_out = at::empty_like(w_out), db_out = at::empty_like(b_out);
  sum_parts_in_order(p_wout, dw_out);
  sum_parts_in_order(p_bout, db_out);
  return {dx, dh, dc, dw_ih, dw_hh, db, dw_out, db_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(learnedopt, CPU, m) {
  m.impl("coord_lstm", &coord_lstm_cpu);
  m.impl("coord_lstm_backward", &coord_lstm_backward_cpu);
  m.impl("coord_lstm_stack", &coord_lstm_stack_cpu);
  m.impl("coord_lstm_stack_backward", &coord_lstm_stack_backward_cpu);
}

}  // namespace learnedopt
