// CPU implementations of the fused kernels in kernels.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "kernels.h"

namespace trpo_ext {
namespace cpu {
namespace {

constexpr int64_t kGrain = 16384;

template <typename scalar_t, typename F>
double reduce_sum(int64_t n, const F& term) {
  return at::parallel_reduce(
      0, n, kGrain, 0.0,
      [&](int64_t begin, int64_t end, double acc) {
        for (int64_t i = begin; i < end; ++i) acc += term(i);
        return acc;
      },
      std::plus<double>());
}

}  // namespace

void activation_forward_(at::Tensor& z, at::Tensor& d, Activation act) {
  if (act == Activation::Tanh) {
    // ATen's tanh is vectorised for the host CPU (AVX2/AVX-512); a scalar std::tanh loop here
    // costs more than all the GEMMs of an FVP at N = 2048.
    z.tanh_();
    d.fill_(1).addcmul_(z, z, -1);  // d = 1 - h^2
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "activation_forward_", [&] {
    scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* dp = d.data_ptr<scalar_t>();
    at::parallel_for(0, z.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const bool on = zp[i] > scalar_t(0);
        zp[i] = on ? zp[i] : scalar_t(0);
        dp[i] = on ? scalar_t(1) : scalar_t(0);
      }
    });
  });
}

void categorical_fisher_(const at::Tensor& p, at::Tensor& u, double scale) {
  const int64_t rows = u.size(0), k = u.size(1);
  const int64_t su0 = u.stride(0), su1 = u.stride(1);  // u may be a transposed view
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "categorical_fisher_", [&] {
    const scalar_t* pp = p.data_ptr<scalar_t>();
    scalar_t* up = u.data_ptr<scalar_t>();
    const scalar_t s = static_cast<scalar_t>(scale);
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / k), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* pr = pp + row * k;
        scalar_t* ur = up + row * su0;
        scalar_t pu = 0;
        for (int64_t j = 0; j < k; ++j) pu += pr[j] * ur[j * su1];
        for (int64_t j = 0; j < k; ++j) ur[j * su1] = s * pr[j] * (ur[j * su1] - pu);
      }
    });
  });
}

at::Tensor dot64(const at::Tensor& a, const at::Tensor& b) {
  double result = 0.0;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "dot64", [&] {
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    result = reduce_sum<scalar_t>(a.numel(), [&](int64_t i) { return double(ap[i]) * double(bp[i]); });
  });
  return at::scalar_tensor(result, a.options().dtype(at::kDouble));
}

void cg_start(const at::Tensor& b, at::Tensor& state, double rtol) {
  double* s = state.data_ptr<double>();
  for (int64_t i = 0; i < kStateSize; ++i) s[i] = 0.0;
  s[kRs] = dot64(b, b).item<double>();
  s[kTol2] = rtol * rtol * s[kRs];
  s[kActive] = s[kRs] > s[kTol2] ? 1.0 : 0.0;
}

void cg_dots(const at::Tensor& p, const at::Tensor& Ap, at::Tensor& state) {
  double* s = state.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "cg_dots", [&] {
    const scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* ap = Ap.data_ptr<scalar_t>();
    s[kPAp] = reduce_sum<scalar_t>(p.numel(), [&](int64_t i) { return double(pp[i]) * double(ap[i]); });
    s[kPP] = reduce_sum<scalar_t>(p.numel(), [&](int64_t i) { return double(pp[i]) * double(pp[i]); });
  });
}

void cg_update_(at::Tensor& x, at::Tensor& r, const at::Tensor& p, const at::Tensor& Ap,
                at::Tensor& state, double eps) {
  double* s = state.data_ptr<double>();
  // A NaN in p'Ap fails this test too, so a poisoned direction never reaches x.
  if (!(s[kActive] != 0.0 && s[kPAp] > eps * s[kPP])) {
    s[kActive] = 0.0;
    s[kBeta] = 0.0;
    return;
  }
  const double alpha = s[kRs] / s[kPAp];
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cg_update_", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* rp = r.data_ptr<scalar_t>();
    const scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* ap = Ap.data_ptr<scalar_t>();
    const scalar_t a = static_cast<scalar_t>(alpha);
    s[kRsNew] = reduce_sum<scalar_t>(x.numel(), [&](int64_t i) {
      xp[i] += a * pp[i];
      rp[i] -= a * ap[i];
      return double(rp[i]) * double(rp[i]);
    });
  });
  s[kIters] += 1.0;
  s[kBeta] = s[kRsNew] / s[kRs];
  s[kRs] = s[kRsNew];
  s[kActive] = s[kRs] > s[kTol2] ? 1.0 : 0.0;
}

void cg_direction_(at::Tensor& p, const at::Tensor& r, const at::Tensor& state) {
  const double* s = state.data_ptr<double>();
  if (s[kActive] == 0.0) return;
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "cg_direction_", [&] {
    scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* rp = r.data_ptr<scalar_t>();
    const scalar_t beta = static_cast<scalar_t>(s[kBeta]);
    at::parallel_for(0, p.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) pp[i] = rp[i] + beta * pp[i];
    });
  });
}

}  // namespace cpu
}  // namespace trpo_ext
