// CUDA implementations of the fused kernels in kernels.h, with the contract of csrc/cpu/kernels.cpp
// and its arithmetic: both run the formulas of elementwise.h.
//
// The CG kernels never read the state on the host: every thread reads the scalars it needs from the
// float64 `state` tensor, and a single-thread kernel does the scalar update, so a whole solve runs
// without a host sync and can be captured in a CUDA graph. Reductions go block-wise in float64,
// then atomically into their state slot; the order of calls in fisher.cpp (cg_start once, then
// cg_dots, cg_update_, cg_direction_ per iteration) keeps those slots zeroed before each use:
// cg_start zeroes the whole state and the scalar update at the end of cg_update_ re-zeroes the
// per-iteration slots (pAp, pp, rsnew).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cub/block/block_reduce.cuh>

#include <algorithm>

#include "elementwise.h"
#include "kernels.h"
#include "launch.cuh"
#include "mlp.h"

namespace trpo_ext {
namespace cuda {
namespace {

using BlockSum = cub::BlockReduce<double, kBlock>;

// Adds the block's sum of `value` to *dst. Every thread of the block must call it; each call in a
// kernel needs its own temp storage.
__device__ void block_accumulate(double value, double* dst, BlockSum::TempStorage& temp) {
  const double total = BlockSum(temp).Sum(value);
  if (threadIdx.x == 0) atomicAdd(dst, total);
}

// h = act(z) in place, and d = act'(z) when kGrad.
template <typename scalar_t, typename Op, bool kGrad>
__global__ void activation_forward_kernel(scalar_t* z, scalar_t* d, int64_t n) {
  grid_stride(n, [&](int64_t i) {
    const scalar_t h = Op::value(z[i]);
    z[i] = h;
    if constexpr (kGrad) d[i] = Op::grad(h);
  });
}

// One row per thread: K is small (the number of actions), and with fisher.cpp's transposed u
// (stride 1 between rows) neighbouring threads touch neighbouring elements of u.
template <typename scalar_t>
__global__ void categorical_fisher_kernel(const scalar_t* p, scalar_t* u, int64_t rows, int64_t k,
                                          int64_t su0, int64_t su1, scalar_t scale) {
  grid_stride(rows, [&](int64_t row) { ew::categorical_fisher_row(p + row * k, u + row * su0, k, su1, scale); });
}

// *out += a'b in float64.
template <typename scalar_t>
__global__ void dot_kernel(const scalar_t* a, const scalar_t* b, int64_t n, double* out) {
  __shared__ BlockSum::TempStorage temp;
  double acc = 0.0;
  grid_stride(n, [&](int64_t i) { acc += double(a[i]) * double(b[i]); });
  block_accumulate(acc, out, temp);
}

// state[kPAp] += p'Ap, state[kPP] += p'p in one pass.
template <typename scalar_t>
__global__ void cg_dots_kernel(const scalar_t* p, const scalar_t* Ap, int64_t n, double* state) {
  __shared__ BlockSum::TempStorage temp[2];
  double pAp = 0.0, pp = 0.0;
  grid_stride(n, [&](int64_t i) {
    const double pi = p[i];
    pAp += pi * double(Ap[i]);
    pp += pi * pi;
  });
  block_accumulate(pAp, state + kPAp, temp[0]);
  block_accumulate(pp, state + kPP, temp[1]);
}

__global__ void cg_start_finalize_kernel(double* state, double rtol) { ew::cg_start_scalars(state, rtol); }

// x += a p, r -= a Ap, state[kRsNew] += r'r; a no-op (uniformly across the grid, so the block
// reduction is never half-entered) when the step is not taken.
template <typename scalar_t>
__global__ void cg_update_kernel(scalar_t* x, scalar_t* r, const scalar_t* p, const scalar_t* Ap,
                                 int64_t n, double* state, double eps) {
  if (!ew::cg_step_ok(state, eps)) return;
  __shared__ BlockSum::TempStorage temp;
  const scalar_t a = static_cast<scalar_t>(state[kRs] / state[kPAp]);
  double rr = 0.0;
  grid_stride(n, [&](int64_t i) { rr += ew::cg_step(x[i], r[i], p[i], Ap[i], a); });
  block_accumulate(rr, state + kRsNew, temp);
}

// The scalar half of cg_update_, after its vector kernel has finished; re-zeroes the slots that
// the next iteration accumulates into.
__global__ void cg_update_finalize_kernel(double* state, double eps) {
  ew::cg_update_scalars(state, ew::cg_step_ok(state, eps));
}

template <typename scalar_t>
__global__ void cg_direction_kernel(scalar_t* p, const scalar_t* r, int64_t n, const double* state) {
  if (!ew::cg_active(state)) return;
  const scalar_t beta = static_cast<scalar_t>(state[kBeta]);
  grid_stride(n, [&](int64_t i) { p[i] = ew::cg_direction(r[i], p[i], beta); });
}

// x (n rows of d) normalized in place, one element per thread.
template <typename scalar_t>
__global__ void normalize_rows_kernel(scalar_t* x, const scalar_t* mean, const scalar_t* inv_std, int64_t numel,
                                      int64_t d, scalar_t clip) {
  grid_stride(numel, [&](int64_t i) {
    const int64_t j = i % d;
    x[i] = ew::normalize_obs(x[i], mean[j], inv_std[j], clip);
  });
}

// One row per thread, the CPU's inverse-CDF algorithm.
template <typename scalar_t>
__global__ void sample_categorical_kernel(const scalar_t* logits, const scalar_t* u, int64_t* actions, int64_t rows,
                                          int64_t k) {
  grid_stride(rows, [&](int64_t i) { actions[i] = ew::categorical_sample_row(logits + i * k, k, u[i]); });
}

template <typename scalar_t>
__global__ void sample_gaussian_kernel(const scalar_t* mean, const scalar_t* log_std, scalar_t* noise, int64_t numel,
                                       int64_t k) {
  grid_stride(numel, [&](int64_t i) { noise[i] = ew::gaussian_sample(mean[i], log_std[i % k], noise[i]); });
}

}  // namespace

void activation_forward_(at::Tensor& z, at::Tensor& d, Activation act) {
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t n = z.numel();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "activation_forward_", [&] {
    visit_activation(act, [&](auto op) {
      using Op = decltype(op);
      scalar_t* zp = z.data_ptr<scalar_t>();
      if (d.defined()) {
        launch(n, activation_forward_kernel<scalar_t, Op, true>, zp, d.data_ptr<scalar_t>(), n);
      } else {
        launch(n, activation_forward_kernel<scalar_t, Op, false>, zp, static_cast<scalar_t*>(nullptr), n);
      }
    });
  });
}

void categorical_fisher_(const at::Tensor& p, at::Tensor& u, double scale) {
  const c10::cuda::CUDAGuard guard(u.device());
  const int64_t rows = u.size(0);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "categorical_fisher_", [&] {
    launch(rows, categorical_fisher_kernel<scalar_t>, p.const_data_ptr<scalar_t>(), u.data_ptr<scalar_t>(),
           rows, u.size(1), u.stride(0), u.stride(1), static_cast<scalar_t>(scale));
  });
}

at::Tensor dot64(const at::Tensor& a, const at::Tensor& b) {
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t n = a.numel();
  at::Tensor result = at::zeros({}, a.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "dot64", [&] {
    launch(n, dot_kernel<scalar_t>, a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), n,
           result.data_ptr<double>());
  });
  return result;
}

void cg_start(const at::Tensor& b, at::Tensor& state, double rtol) {
  const c10::cuda::CUDAGuard guard(b.device());
  const int64_t n = b.numel();
  state.zero_();
  double* s = state.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(b.scalar_type(), "cg_start", [&] {
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    launch(n, dot_kernel<scalar_t>, bp, bp, n, s + kRs);
  });
  cg_start_finalize_kernel<<<1, 1, 0, at::cuda::getCurrentCUDAStream()>>>(s, rtol);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void cg_dots(const at::Tensor& p, const at::Tensor& Ap, at::Tensor& state) {
  const c10::cuda::CUDAGuard guard(p.device());
  const int64_t n = p.numel();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "cg_dots", [&] {
    launch(n, cg_dots_kernel<scalar_t>, p.const_data_ptr<scalar_t>(), Ap.const_data_ptr<scalar_t>(), n,
           state.data_ptr<double>());
  });
}

void cg_update_(at::Tensor& x, at::Tensor& r, const at::Tensor& p, const at::Tensor& Ap,
                at::Tensor& state, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  double* s = state.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cg_update_", [&] {
    launch(n, cg_update_kernel<scalar_t>, x.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(),
           p.const_data_ptr<scalar_t>(), Ap.const_data_ptr<scalar_t>(), n, s, eps);
  });
  cg_update_finalize_kernel<<<1, 1, 0, at::cuda::getCurrentCUDAStream()>>>(s, eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void cg_direction_(at::Tensor& p, const at::Tensor& r, const at::Tensor& state) {
  const c10::cuda::CUDAGuard guard(p.device());
  const int64_t n = p.numel();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "cg_direction_", [&] {
    launch(n, cg_direction_kernel<scalar_t>, p.data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), n,
           state.const_data_ptr<double>());
  });
}

void normalize_rows_(at::Tensor& x, const at::Tensor& mean, const at::Tensor& inv_std, double clip) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t numel = x.numel();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "normalize_rows_", [&] {
    launch(numel, normalize_rows_kernel<scalar_t>, x.data_ptr<scalar_t>(), mean.const_data_ptr<scalar_t>(),
           inv_std.const_data_ptr<scalar_t>(), numel, x.size(1), static_cast<scalar_t>(clip));
  });
}

void sample_categorical_(const at::Tensor& logits, const at::Tensor& u, at::Tensor& actions) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "sample_categorical_", [&] {
    launch(rows, sample_categorical_kernel<scalar_t>, logits.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(),
           actions.data_ptr<int64_t>(), rows, logits.size(1));
  });
}

void sample_gaussian_(const at::Tensor& mean, const at::Tensor& log_std, at::Tensor& noise) {
  const c10::cuda::CUDAGuard guard(mean.device());
  const int64_t numel = mean.numel();
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "sample_gaussian_", [&] {
    launch(numel, sample_gaussian_kernel<scalar_t>, mean.const_data_ptr<scalar_t>(), log_std.const_data_ptr<scalar_t>(),
           noise.data_ptr<scalar_t>(), numel, mean.size(1));
  });
}

}  // namespace cuda
}  // namespace trpo_ext
