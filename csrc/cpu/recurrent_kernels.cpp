// CPU loops of the recurrent step kernels in kernels.h (TRPO_EXT_DECLARE_RECURRENT_KERNELS): one
// row (sequence) of H units per iteration, around the cell formulas of elementwise.h that the CUDA
// kernels run too.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "elementwise.h"
#include "kernels.h"

namespace trpo_ext {
namespace cpu {
namespace {

// Calls body(b) for the B rows of a step; rows of H units, at least a few thousand elements a task.
template <typename F>
void for_rows(int64_t B, int64_t H, const F& body) {
  at::parallel_for(0, B, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H)), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) body(b);
  });
}

}  // namespace

void lstm_step_(at::Tensor& gates, at::Tensor& h_prev, at::Tensor& c_prev, at::Tensor& tanh_c, at::Tensor& out,
                const at::Tensor& keep, int64_t t) {
  const int64_t B = keep.size(1), H = out.size(1);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_step_", [&] {
    scalar_t *g = gates.data_ptr<scalar_t>(), *hp = h_prev.data_ptr<scalar_t>(), *cp = c_prev.data_ptr<scalar_t>();
    scalar_t *tc = tanh_c.data_ptr<scalar_t>(), *o = out.data_ptr<scalar_t>();
    const scalar_t* k = keep.const_data_ptr<scalar_t>() + (t + 1) * B;
    for_rows(B, H, [&](int64_t b) {
      const int64_t row = t * B + b, next = row + B;
      for (int64_t j = 0; j < H; ++j) {
        scalar_t c, h;
        ew::lstm_unit(g + row * 4 * H, H, j, cp[row * H + j], c, tc[row * H + j], h);
        o[row * H + j] = h;
        hp[next * H + j] = k[b] * h;
        cp[next * H + j] = k[b] * c;
      }
    });
  });
}

void gru_step_(const at::Tensor& x_proj, const at::Tensor& h_proj, at::Tensor& gates, at::Tensor& h_prev,
               at::Tensor& out, const at::Tensor& keep, int64_t t) {
  const int64_t B = keep.size(1), H = out.size(1);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "gru_step_", [&] {
    const scalar_t *x = x_proj.const_data_ptr<scalar_t>(), *hj = h_proj.const_data_ptr<scalar_t>();
    scalar_t *g = gates.data_ptr<scalar_t>(), *hp = h_prev.data_ptr<scalar_t>(), *o = out.data_ptr<scalar_t>();
    const scalar_t* k = keep.const_data_ptr<scalar_t>() + (t + 1) * B;
    for_rows(B, H, [&](int64_t b) {
      const int64_t row = t * B + b, next = row + B, G = 3 * H;
      for (int64_t j = 0; j < H; ++j) {
        const scalar_t h = ew::gru_unit(g + row * G, x + row * G, hj + row * G, H, j, hp[row * H + j]);
        o[row * H + j] = h;
        hp[next * H + j] = k[b] * h;
      }
    });
  });
}

void lstm_jvp_step_(const at::Tensor& a, const at::Tensor& gates, const at::Tensor& c_prev, const at::Tensor& tanh_c,
                    at::Tensor& h_state, at::Tensor& c_state, at::Tensor& h_dot, const at::Tensor& keep, int64_t t) {
  const int64_t B = keep.size(1), H = h_dot.size(1);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "lstm_jvp_step_", [&] {
    const scalar_t *ap = a.const_data_ptr<scalar_t>(), *g = gates.const_data_ptr<scalar_t>();
    const scalar_t *cp = c_prev.const_data_ptr<scalar_t>(), *tc = tanh_c.const_data_ptr<scalar_t>();
    scalar_t *hs = h_state.data_ptr<scalar_t>(), *cs = c_state.data_ptr<scalar_t>(), *hd = h_dot.data_ptr<scalar_t>();
    const scalar_t* k = keep.const_data_ptr<scalar_t>() + (t + 1) * B;
    for_rows(B, H, [&](int64_t b) {
      const int64_t row = t * B + b;
      for (int64_t j = 0; j < H; ++j) {
        scalar_t c_dot, h;
        ew::lstm_unit_jvp(ap + row * 4 * H, g + row * 4 * H, H, j, cp[row * H + j], tc[row * H + j], cs[b * H + j],
                          c_dot, h);
        hd[row * H + j] = h;
        hs[b * H + j] = k[b] * h;
        cs[b * H + j] = k[b] * c_dot;
      }
    });
  });
}

void gru_jvp_step_(const at::Tensor& ax, const at::Tensor& ah, const at::Tensor& gates, const at::Tensor& h_proj,
                   const at::Tensor& h_prev, at::Tensor& h_state, at::Tensor& h_dot, const at::Tensor& keep,
                   int64_t t) {
  const int64_t B = keep.size(1), H = h_dot.size(1), G = 3 * H;
  AT_DISPATCH_FLOATING_TYPES(ax.scalar_type(), "gru_jvp_step_", [&] {
    const scalar_t *x = ax.const_data_ptr<scalar_t>(), *r = ah.const_data_ptr<scalar_t>();
    const scalar_t *g = gates.const_data_ptr<scalar_t>(), *hj = h_proj.const_data_ptr<scalar_t>();
    const scalar_t* hp = h_prev.const_data_ptr<scalar_t>();
    scalar_t *hs = h_state.data_ptr<scalar_t>(), *hd = h_dot.data_ptr<scalar_t>();
    const scalar_t* k = keep.const_data_ptr<scalar_t>() + (t + 1) * B;
    for_rows(B, H, [&](int64_t b) {
      const int64_t row = t * B + b;
      for (int64_t j = 0; j < H; ++j) {
        const scalar_t h = ew::gru_unit_jvp(x + row * G, r + row * G, g + row * G, H, j, hj[row * G + 2 * H + j],
                                            hp[row * H + j], hs[b * H + j]);
        hd[row * H + j] = h;
        hs[b * H + j] = k[b] * h;
      }
    });
  });
}

void lstm_vjp_step_(const at::Tensor& g_out, const at::Tensor& h_state, at::Tensor& c_state, const at::Tensor& gates,
                    const at::Tensor& c_prev, const at::Tensor& tanh_c, at::Tensor& a_bar, const at::Tensor& keep,
                    int64_t t) {
  const int64_t B = keep.size(1), H = g_out.size(1);
  AT_DISPATCH_FLOATING_TYPES(g_out.scalar_type(), "lstm_vjp_step_", [&] {
    const scalar_t *go = g_out.const_data_ptr<scalar_t>(), *hs = h_state.const_data_ptr<scalar_t>();
    const scalar_t *g = gates.const_data_ptr<scalar_t>(), *cp = c_prev.const_data_ptr<scalar_t>();
    const scalar_t* tc = tanh_c.const_data_ptr<scalar_t>();
    scalar_t *cs = c_state.data_ptr<scalar_t>(), *ab = a_bar.data_ptr<scalar_t>();
    const scalar_t* k = keep.const_data_ptr<scalar_t>() + t * B;  // k[b]: step t's, k[B + b]: step t+1's
    for_rows(B, H, [&](int64_t b) {
      const int64_t row = t * B + b;
      for (int64_t j = 0; j < H; ++j) {
        const scalar_t h_bar = go[row * H + j] + k[B + b] * hs[b * H + j];
        cs[b * H + j] = k[b] * ew::lstm_unit_vjp(ab + row * 4 * H, g + row * 4 * H, H, j, cp[row * H + j],
                                                 tc[row * H + j], h_bar, cs[b * H + j]);
      }
    });
  });
}

void gru_vjp_step_(const at::Tensor& g_out, at::Tensor& h_state, const at::Tensor& gates, const at::Tensor& h_proj,
                   const at::Tensor& h_prev, at::Tensor& ax_bar, at::Tensor& ah_bar, const at::Tensor& keep,
                   int64_t t) {
  const int64_t B = keep.size(1), H = g_out.size(1), G = 3 * H;
  AT_DISPATCH_FLOATING_TYPES(g_out.scalar_type(), "gru_vjp_step_", [&] {
    const scalar_t *go = g_out.const_data_ptr<scalar_t>(), *g = gates.const_data_ptr<scalar_t>();
    const scalar_t *hj = h_proj.const_data_ptr<scalar_t>(), *hp = h_prev.const_data_ptr<scalar_t>();
    scalar_t *hs = h_state.data_ptr<scalar_t>(), *xb = ax_bar.data_ptr<scalar_t>(), *hb = ah_bar.data_ptr<scalar_t>();
    const scalar_t* k = keep.const_data_ptr<scalar_t>() + (t + 1) * B;
    for_rows(B, H, [&](int64_t b) {
      const int64_t row = t * B + b;
      for (int64_t j = 0; j < H; ++j) {
        const scalar_t h_bar = go[row * H + j] + k[b] * hs[b * H + j];
        hs[b * H + j] = ew::gru_unit_vjp(xb + row * G, hb + row * G, g + row * G, H, j, hj[row * G + 2 * H + j],
                                         hp[row * H + j], h_bar);
      }
    });
  });
}

}  // namespace cpu
}  // namespace trpo_ext
