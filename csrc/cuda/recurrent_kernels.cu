// CUDA kernels of the recurrent steps in kernels.h (TRPO_EXT_DECLARE_RECURRENT_KERNELS), with the
// contract of csrc/cpu/recurrent_kernels.cpp: one thread per (row, unit) of a step, running the
// cell formulas of elementwise.h.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "elementwise.h"
#include "kernels.h"
#include "launch.cuh"

namespace trpo_ext {
namespace cuda {
namespace {

template <typename scalar_t>
__global__ void lstm_step_kernel(scalar_t* g, scalar_t* hp, scalar_t* cp, scalar_t* tc, scalar_t* o,
                                 const scalar_t* k, int64_t B, int64_t H, int64_t t) {
  grid_stride(B * H, [&](int64_t i) {
    const int64_t b = i / H, j = i % H, row = t * B + b, next = row + B;
    scalar_t c, h;
    ew::lstm_unit(g + row * 4 * H, H, j, cp[row * H + j], c, tc[row * H + j], h);
    o[row * H + j] = h;
    hp[next * H + j] = k[b] * h;
    cp[next * H + j] = k[b] * c;
  });
}

template <typename scalar_t>
__global__ void gru_step_kernel(const scalar_t* x, const scalar_t* hj, scalar_t* g, scalar_t* hp, scalar_t* o,
                                const scalar_t* k, int64_t B, int64_t H, int64_t t) {
  grid_stride(B * H, [&](int64_t i) {
    const int64_t b = i / H, j = i % H, row = t * B + b, next = row + B, G = 3 * H;
    const scalar_t h = ew::gru_unit(g + row * G, x + row * G, hj + row * G, H, j, hp[row * H + j]);
    o[row * H + j] = h;
    hp[next * H + j] = k[b] * h;
  });
}

template <typename scalar_t>
__global__ void lstm_jvp_step_kernel(const scalar_t* a, const scalar_t* g, const scalar_t* cp, const scalar_t* tc,
                                     scalar_t* hs, scalar_t* cs, scalar_t* hd, const scalar_t* k, int64_t B,
                                     int64_t H, int64_t t) {
  grid_stride(B * H, [&](int64_t i) {
    const int64_t b = i / H, j = i % H, row = t * B + b;
    scalar_t c_dot, h;
    ew::lstm_unit_jvp(a + row * 4 * H, g + row * 4 * H, H, j, cp[row * H + j], tc[row * H + j], cs[i], c_dot, h);
    hd[row * H + j] = h;
    hs[i] = k[b] * h;
    cs[i] = k[b] * c_dot;
  });
}

template <typename scalar_t>
__global__ void gru_jvp_step_kernel(const scalar_t* ax, const scalar_t* ah, const scalar_t* g, const scalar_t* hj,
                                    const scalar_t* hp, scalar_t* hs, scalar_t* hd, const scalar_t* k, int64_t B,
                                    int64_t H, int64_t t) {
  grid_stride(B * H, [&](int64_t i) {
    const int64_t b = i / H, j = i % H, row = t * B + b, G = 3 * H;
    const scalar_t h = ew::gru_unit_jvp(ax + row * G, ah + row * G, g + row * G, H, j, hj[row * G + 2 * H + j],
                                        hp[row * H + j], hs[i]);
    hd[row * H + j] = h;
    hs[i] = k[b] * h;
  });
}

// k: keep from step t (k[b] step t's, k[B + b] step t+1's).
template <typename scalar_t>
__global__ void lstm_vjp_step_kernel(const scalar_t* go, const scalar_t* hs, scalar_t* cs, const scalar_t* g,
                                     const scalar_t* cp, const scalar_t* tc, scalar_t* ab, const scalar_t* k,
                                     int64_t B, int64_t H, int64_t t) {
  grid_stride(B * H, [&](int64_t i) {
    const int64_t b = i / H, j = i % H, row = t * B + b;
    const scalar_t h_bar = go[row * H + j] + k[B + b] * hs[i];
    cs[i] = k[b] * ew::lstm_unit_vjp(ab + row * 4 * H, g + row * 4 * H, H, j, cp[row * H + j], tc[row * H + j],
                                     h_bar, cs[i]);
  });
}

template <typename scalar_t>
__global__ void gru_vjp_step_kernel(const scalar_t* go, scalar_t* hs, const scalar_t* g, const scalar_t* hj,
                                    const scalar_t* hp, scalar_t* xb, scalar_t* hb, const scalar_t* k, int64_t B,
                                    int64_t H, int64_t t) {
  grid_stride(B * H, [&](int64_t i) {
    const int64_t b = i / H, j = i % H, row = t * B + b, G = 3 * H;
    const scalar_t h_bar = go[row * H + j] + k[b] * hs[i];
    hs[i] = ew::gru_unit_vjp(xb + row * G, hb + row * G, g + row * G, H, j, hj[row * G + 2 * H + j],
                             hp[row * H + j], h_bar);
  });
}

}  // namespace

void lstm_step_(at::Tensor& gates, at::Tensor& h_prev, at::Tensor& c_prev, at::Tensor& tanh_c, at::Tensor& out,
                const at::Tensor& keep, int64_t t) {
  const c10::cuda::CUDAGuard guard(gates.device());
  const int64_t B = keep.size(1), H = out.size(1);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_step_", [&] {
    launch(B * H, lstm_step_kernel<scalar_t>, gates.data_ptr<scalar_t>(), h_prev.data_ptr<scalar_t>(),
           c_prev.data_ptr<scalar_t>(), tanh_c.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
           keep.const_data_ptr<scalar_t>() + (t + 1) * B, B, H, t);
  });
}

void gru_step_(const at::Tensor& x_proj, const at::Tensor& h_proj, at::Tensor& gates, at::Tensor& h_prev,
               at::Tensor& out, const at::Tensor& keep, int64_t t) {
  const c10::cuda::CUDAGuard guard(gates.device());
  const int64_t B = keep.size(1), H = out.size(1);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "gru_step_", [&] {
    launch(B * H, gru_step_kernel<scalar_t>, x_proj.const_data_ptr<scalar_t>(), h_proj.const_data_ptr<scalar_t>(),
           gates.data_ptr<scalar_t>(), h_prev.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
           keep.const_data_ptr<scalar_t>() + (t + 1) * B, B, H, t);
  });
}

void lstm_jvp_step_(const at::Tensor& a, const at::Tensor& gates, const at::Tensor& c_prev, const at::Tensor& tanh_c,
                    at::Tensor& h_state, at::Tensor& c_state, at::Tensor& h_dot, const at::Tensor& keep, int64_t t) {
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t B = keep.size(1), H = h_dot.size(1);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "lstm_jvp_step_", [&] {
    launch(B * H, lstm_jvp_step_kernel<scalar_t>, a.const_data_ptr<scalar_t>(), gates.const_data_ptr<scalar_t>(),
           c_prev.const_data_ptr<scalar_t>(), tanh_c.const_data_ptr<scalar_t>(), h_state.data_ptr<scalar_t>(),
           c_state.data_ptr<scalar_t>(), h_dot.data_ptr<scalar_t>(), keep.const_data_ptr<scalar_t>() + (t + 1) * B, B,
           H, t);
  });
}

void gru_jvp_step_(const at::Tensor& ax, const at::Tensor& ah, const at::Tensor& gates, const at::Tensor& h_proj,
                   const at::Tensor& h_prev, at::Tensor& h_state, at::Tensor& h_dot, const at::Tensor& keep,
                   int64_t t) {
  const c10::cuda::CUDAGuard guard(ax.device());
  const int64_t B = keep.size(1), H = h_dot.size(1);
  AT_DISPATCH_FLOATING_TYPES(ax.scalar_type(), "gru_jvp_step_", [&] {
    launch(B * H, gru_jvp_step_kernel<scalar_t>, ax.const_data_ptr<scalar_t>(), ah.const_data_ptr<scalar_t>(),
           gates.const_data_ptr<scalar_t>(), h_proj.const_data_ptr<scalar_t>(), h_prev.const_data_ptr<scalar_t>(),
           h_state.data_ptr<scalar_t>(), h_dot.data_ptr<scalar_t>(), keep.const_data_ptr<scalar_t>() + (t + 1) * B, B,
           H, t);
  });
}

void lstm_vjp_step_(const at::Tensor& g_out, const at::Tensor& h_state, at::Tensor& c_state, const at::Tensor& gates,
                    const at::Tensor& c_prev, const at::Tensor& tanh_c, at::Tensor& a_bar, const at::Tensor& keep,
                    int64_t t) {
  const c10::cuda::CUDAGuard guard(g_out.device());
  const int64_t B = keep.size(1), H = g_out.size(1);
  AT_DISPATCH_FLOATING_TYPES(g_out.scalar_type(), "lstm_vjp_step_", [&] {
    launch(B * H, lstm_vjp_step_kernel<scalar_t>, g_out.const_data_ptr<scalar_t>(), h_state.const_data_ptr<scalar_t>(),
           c_state.data_ptr<scalar_t>(), gates.const_data_ptr<scalar_t>(), c_prev.const_data_ptr<scalar_t>(),
           tanh_c.const_data_ptr<scalar_t>(), a_bar.data_ptr<scalar_t>(), keep.const_data_ptr<scalar_t>() + t * B, B,
           H, t);
  });
}

void gru_vjp_step_(const at::Tensor& g_out, at::Tensor& h_state, const at::Tensor& gates, const at::Tensor& h_proj,
                   const at::Tensor& h_prev, at::Tensor& ax_bar, at::Tensor& ah_bar, const at::Tensor& keep,
                   int64_t t) {
  const c10::cuda::CUDAGuard guard(g_out.device());
  const int64_t B = keep.size(1), H = g_out.size(1);
  AT_DISPATCH_FLOATING_TYPES(g_out.scalar_type(), "gru_vjp_step_", [&] {
    launch(B * H, gru_vjp_step_kernel<scalar_t>, g_out.const_data_ptr<scalar_t>(), h_state.data_ptr<scalar_t>(),
           gates.const_data_ptr<scalar_t>(), h_proj.const_data_ptr<scalar_t>(), h_prev.const_data_ptr<scalar_t>(),
           ax_bar.data_ptr<scalar_t>(), ah_bar.data_ptr<scalar_t>(), keep.const_data_ptr<scalar_t>() + (t + 1) * B, B,
           H, t);
  });
}

}  // namespace cuda
}  // namespace trpo_ext
