// CPU implementations of the fused kernels in kernels.h: at::parallel_for loops around the formulas
// of elementwise.h (the same ones the CUDA kernels run).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "elementwise.h"
#include "kernels.h"

namespace trpo_ext {
namespace cpu {
namespace {

constexpr int64_t kGrain = 16384;

// Rows per task when each row has `width` elements (width >= 1 after check_mlp; max() guards 0).
int64_t row_grain(int64_t width) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, width)); }

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

// d[i] = Op::grad(h[i]) for h = act(z) already in place.
template <typename scalar_t, typename Op>
void activation_grad_loop(const scalar_t* h, scalar_t* d, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) d[i] = Op::grad(h[i]);
  });
}

}  // namespace

void activation_forward_(at::Tensor& z, at::Tensor& d, Activation act) {
  const int64_t n = z.numel();
  if (act == Activation::Tanh) {
    // The value through ATen's tanh, vectorised for the host CPU (AVX2/AVX-512): a scalar std::tanh
    // loop here costs more than all the GEMMs of an FVP at N = 2048. It computes ew::TanhAct::value
    // to rounding; the derivative is ew::TanhAct::grad, as everywhere.
    z.tanh_();
    if (d.defined()) {
      AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "activation_forward_", [&] {
        activation_grad_loop<scalar_t, ew::TanhAct>(z.const_data_ptr<scalar_t>(), d.data_ptr<scalar_t>(), n);
      });
    }
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "activation_forward_", [&] {
    visit_activation(act, [&](auto op) {
      using Op = decltype(op);
      scalar_t* zp = z.data_ptr<scalar_t>();
      scalar_t* dp = d.defined() ? d.data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
        if (dp) {
          for (int64_t i = begin; i < end; ++i) {
            const scalar_t h = Op::value(zp[i]);
            zp[i] = h;
            dp[i] = Op::grad(h);
          }
        } else {
          for (int64_t i = begin; i < end; ++i) zp[i] = Op::value(zp[i]);
        }
      });
    });
  });
}

void categorical_fisher_(const at::Tensor& p, at::Tensor& u, double scale) {
  const int64_t rows = u.size(0), k = u.size(1);
  const int64_t su0 = u.stride(0), su1 = u.stride(1);  // u may be a transposed view
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "categorical_fisher_", [&] {
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    scalar_t* up = u.data_ptr<scalar_t>();
    const scalar_t s = static_cast<scalar_t>(scale);
    at::parallel_for(0, rows, row_grain(k), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) ew::categorical_fisher_row(pp + row * k, up + row * su0, k, su1, s);
    });
  });
}

at::Tensor dot64(const at::Tensor& a, const at::Tensor& b) {
  double result = 0.0;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "dot64", [&] {
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    result = reduce_sum<scalar_t>(a.numel(), [&](int64_t i) { return double(ap[i]) * double(bp[i]); });
  });
  return at::scalar_tensor(result, a.options().dtype(at::kDouble));
}

void cg_start(const at::Tensor& b, at::Tensor& state, double rtol) {
  double* s = state.data_ptr<double>();
  for (int64_t i = 0; i < kStateSize; ++i) s[i] = 0.0;
  s[kRs] = dot64(b, b).item<double>();
  ew::cg_start_scalars(s, rtol);
}

void cg_dots(const at::Tensor& p, const at::Tensor& Ap, at::Tensor& state) {
  double* s = state.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "cg_dots", [&] {
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    const scalar_t* ap = Ap.const_data_ptr<scalar_t>();
    s[kPAp] = reduce_sum<scalar_t>(p.numel(), [&](int64_t i) { return double(pp[i]) * double(ap[i]); });
    s[kPP] = reduce_sum<scalar_t>(p.numel(), [&](int64_t i) { return double(pp[i]) * double(pp[i]); });
  });
}

void cg_update_(at::Tensor& x, at::Tensor& r, const at::Tensor& p, const at::Tensor& Ap,
                at::Tensor& state, double eps) {
  double* s = state.data_ptr<double>();
  const bool ok = ew::cg_step_ok(s, eps);
  if (ok) {
    const double alpha = s[kRs] / s[kPAp];
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cg_update_", [&] {
      scalar_t* xp = x.data_ptr<scalar_t>();
      scalar_t* rp = r.data_ptr<scalar_t>();
      const scalar_t* pp = p.const_data_ptr<scalar_t>();
      const scalar_t* ap = Ap.const_data_ptr<scalar_t>();
      const scalar_t a = static_cast<scalar_t>(alpha);
      s[kRsNew] = reduce_sum<scalar_t>(x.numel(), [&](int64_t i) { return ew::cg_step(xp[i], rp[i], pp[i], ap[i], a); });
    });
  }
  ew::cg_update_scalars(s, ok);
}

void cg_direction_(at::Tensor& p, const at::Tensor& r, const at::Tensor& state) {
  const double* s = state.const_data_ptr<double>();
  if (!ew::cg_active(s)) return;
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "cg_direction_", [&] {
    scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    const scalar_t beta = static_cast<scalar_t>(s[kBeta]);
    at::parallel_for(0, p.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) pp[i] = ew::cg_direction(rp[i], pp[i], beta);
    });
  });
}

void normalize_rows_(at::Tensor& x, const at::Tensor& mean, const at::Tensor& inv_std, double clip) {
  const int64_t n = x.size(0), d = x.size(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "normalize_rows_", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* mp = mean.const_data_ptr<scalar_t>();
    const scalar_t* sp = inv_std.const_data_ptr<scalar_t>();
    const scalar_t c = static_cast<scalar_t>(clip);
    at::parallel_for(0, n, row_grain(d), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* row = xp + i * d;
        for (int64_t j = 0; j < d; ++j) row[j] = ew::normalize_obs(row[j], mp[j], sp[j], c);
      }
    });
  });
}

void sample_categorical_(const at::Tensor& logits, const at::Tensor& u, at::Tensor& actions) {
  const int64_t n = logits.size(0), k = logits.size(1);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "sample_categorical_", [&] {
    const scalar_t* lp = logits.const_data_ptr<scalar_t>();
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    int64_t* ap = actions.data_ptr<int64_t>();
    at::parallel_for(0, n, row_grain(k), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) ap[i] = ew::categorical_sample_row(lp + i * k, k, up[i]);
    });
  });
}

void mlp_forward_rows(const at::Tensor& x, at::TensorList params, int64_t n_layers, Activation act, at::Tensor& out) {
  const int64_t n = x.size(0);
  int64_t widest = 0;
  for (int64_t l = 0; l + 1 < n_layers; ++l) widest = std::max(widest, params[2 * l].size(0));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_forward_rows", [&] {
    visit_activation(act, [&](auto op) {
      using Op = decltype(op);
      // Layer by layer over all rows: z_i = b + sum_k h_ik W[:, k], through the layer's transpose so
      // that the inner loop is an axpy over contiguous output units (no reduction to reorder).
      std::vector<scalar_t> hidden[2] = {std::vector<scalar_t>(n * widest), std::vector<scalar_t>(n * widest)};
      std::vector<scalar_t> wt;
      const scalar_t* in = x.const_data_ptr<scalar_t>();
      int64_t width = x.size(1);
      for (int64_t l = 0; l < n_layers; ++l) {
        const scalar_t* w = params[2 * l].const_data_ptr<scalar_t>();
        const scalar_t* b = params[2 * l + 1].const_data_ptr<scalar_t>();
        const int64_t units = params[2 * l].size(0);
        wt.resize(width * units);
        for (int64_t j = 0; j < units; ++j)
          for (int64_t k = 0; k < width; ++k) wt[k * units + j] = w[j * width + k];
        const bool last = l + 1 == n_layers;
        scalar_t* dst = last ? out.data_ptr<scalar_t>() : hidden[l % 2].data();
        for (int64_t i = 0; i < n; ++i) {
          scalar_t* z = dst + i * units;
          std::copy(b, b + units, z);
          for (int64_t k = 0; k < width; ++k) {
            const scalar_t h = in[i * width + k];
            const scalar_t* col = wt.data() + k * units;
            for (int64_t j = 0; j < units; ++j) z[j] += h * col[j];
          }
          if (!last) {
            for (int64_t j = 0; j < units; ++j) z[j] = Op::value(z[j]);
          }
        }
        in = dst;
        width = units;
      }
    });
  });
}

void sample_gaussian_(const at::Tensor& mean, const at::Tensor& log_std, at::Tensor& noise) {
  const int64_t n = mean.size(0), k = mean.size(1);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "sample_gaussian_", [&] {
    const scalar_t* mp = mean.const_data_ptr<scalar_t>();
    const scalar_t* lp = log_std.const_data_ptr<scalar_t>();
    scalar_t* np = noise.data_ptr<scalar_t>();
    at::parallel_for(0, n, row_grain(k), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t j = 0; j < k; ++j) np[i * k + j] = ew::gaussian_sample(mp[i * k + j], lp[j], np[i * k + j]);
      }
    });
  });
}

}  // namespace cpu
}  // namespace trpo_ext
