// Policy inference for one rollout step as one op: observation normalization, the MLP forward pass
// and action sampling. In Python these are about fifteen small torch calls per step (plus
// nn.Module dispatch and torch.multinomial's per-row set-up), which at a batch of a few envs cost
// as much as stepping a cheap environment; here they are one dispatcher call.
#include "act.h"

#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>

namespace trpo_ext {
namespace {

// x <- clamp((x - mean) * inv_std, -clip, clip), row by row (x contiguous (N, D)).
template <typename scalar_t>
void normalize_rows(at::Tensor& x, const at::Tensor& mean, const at::Tensor& inv_std, double clip) {
  const int64_t n = x.size(0), d = x.size(1);
  scalar_t* px = x.data_ptr<scalar_t>();
  const scalar_t* pm = mean.const_data_ptr<scalar_t>();
  const scalar_t* ps = inv_std.const_data_ptr<scalar_t>();
  const scalar_t hi = static_cast<scalar_t>(clip), lo = -hi;
  for (int64_t i = 0; i < n; ++i) {
    scalar_t* row = px + i * d;
    for (int64_t j = 0; j < d; ++j) {
      const scalar_t v = (row[j] - pm[j]) * ps[j];
      row[j] = v < lo ? lo : (v > hi ? hi : v);  // NaN passes through, as with at::clamp
    }
  }
}

// actions[i] = the first class k with softmax(logits[i])[0..k] summed > u[i] (if rounding leaves the
// total at or below u, the last class of nonzero probability): inverse-CDF sampling from each row's
// categorical distribution. A class whose probability underflows to 0 is never picked.
template <typename scalar_t>
void sample_categorical_rows(const at::Tensor& logits, const at::Tensor& u, at::Tensor& actions) {
  const int64_t n = logits.size(0), k = logits.size(1);
  const scalar_t* pl = logits.const_data_ptr<scalar_t>();
  const scalar_t* pu = u.const_data_ptr<scalar_t>();
  int64_t* pa = actions.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* row = pl + i * k;
    const scalar_t max = *std::max_element(row, row + k);
    scalar_t total = 0;
    for (int64_t j = 0; j < k; ++j) total += std::exp(row[j] - max);
    const scalar_t target = pu[i] * total;  // compare unnormalized: sum_j<=a exp(l_j - max) > u * total
    scalar_t cum = 0;
    int64_t a = -1, last_positive = 0;
    for (int64_t j = 0; j < k; ++j) {
      const scalar_t e = std::exp(row[j] - max);
      if (e > 0) last_positive = j;
      cum += e;
      if (a < 0 && cum > target && e > 0) a = j;
    }
    if (a < 0) a = last_positive;
    pa[i] = a;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mlp_act(const at::Tensor& obs, const std::optional<at::Tensor>& obs_mean,
                                           const std::optional<at::Tensor>& obs_inv_std, double obs_clip,
                                           at::TensorList params, c10::string_view kind,
                                           c10::string_view activation, bool deterministic,
                                           std::optional<at::Generator> generator) {
  const bool gaussian = kind == "gaussian";
  TORCH_CHECK_VALUE(gaussian || kind == "categorical", "trpo_ext: kind must be 'categorical' or 'gaussian', got '",
                    std::string(kind), "'");
  const bool tanh_act = activation == "tanh";
  TORCH_CHECK_VALUE(tanh_act || activation == "relu", "trpo_ext: activation must be 'tanh' or 'relu', got '",
                    std::string(activation), "'");
  const size_t n_params = params.size();
  TORCH_CHECK_VALUE(n_params >= (gaussian ? 3u : 2u) && (n_params - (gaussian ? 1 : 0)) % 2 == 0,
                    "trpo_ext: params must be [W1, b1, ..., WL, bL", gaussian ? ", log_std" : "", "], got ",
                    n_params, " tensors");
  const int64_t n_layers = static_cast<int64_t>(n_params - (gaussian ? 1 : 0)) / 2;
  const at::ScalarType dtype = params[0].scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, "trpo_ext: params must be float32 or float64, got ",
                   dtype);
  TORCH_CHECK_TYPE(!at::isComplexType(obs.scalar_type()), "trpo_ext: obs must be a real tensor (floating point, "
                   "integer or bool; it is converted to the weights' dtype), got ", obs.scalar_type());
  TORCH_CHECK_VALUE(obs.dim() == 2, "trpo_ext: obs must have shape (N, obs_dim), got ", obs.sizes());
  TORCH_CHECK_VALUE(obs.device() == params[0].device(), "trpo_ext: obs is on ", obs.device(),
                    " but the policy is on ", params[0].device());
  int64_t width = obs.size(1);
  for (int64_t l = 0; l < n_layers; ++l) {
    const at::Tensor& W = params[2 * l];
    const at::Tensor& b = params[2 * l + 1];
    TORCH_CHECK_VALUE(W.dim() == 2 && W.size(1) == width && b.dim() == 1 && b.size(0) == W.size(0),
                      "trpo_ext: params[", 2 * l, "] / params[", 2 * l + 1, "] do not chain from width ", width);
    TORCH_CHECK_TYPE(W.scalar_type() == dtype && b.scalar_type() == dtype && W.device() == obs.device() &&
                         b.device() == obs.device(),
                     "trpo_ext: params[", 2 * l, "] / params[", 2 * l + 1, "] must share params[0]'s dtype and device");
    width = W.size(0);
  }
  if (gaussian) {
    const at::Tensor& log_std = params[n_params - 1];
    TORCH_CHECK_VALUE(log_std.dim() == 1 && log_std.size(0) == width && log_std.scalar_type() == dtype &&
                          log_std.device() == obs.device(),
                      "trpo_ext: log_std (the last param) must be a (", width, ",) tensor like the weights");
  }
  TORCH_CHECK_VALUE(obs_mean.has_value() == obs_inv_std.has_value(),
                    "trpo_ext: obs_mean and obs_inv_std must be given together");

  // A fresh tensor even when obs already has the weights' dtype: an op's output must not alias its input.
  at::Tensor x = obs.to(dtype, /*non_blocking=*/false, /*copy=*/true).contiguous();
  if (obs_mean.has_value()) {
    for (const at::Tensor* s : {&*obs_mean, &*obs_inv_std}) {
      TORCH_CHECK_VALUE(s->dim() == 1 && s->size(0) == obs.size(1) && s->scalar_type() == dtype &&
                            s->device() == obs.device(),
                        "trpo_ext: obs_mean and obs_inv_std must be (", obs.size(1), ",) tensors like the weights, got ",
                        s->sizes());
    }
    TORCH_CHECK_VALUE(obs_clip > 0, "trpo_ext: obs_clip must be > 0, got ", obs_clip);
    if (x.is_cpu()) {
      AT_DISPATCH_FLOATING_TYPES(dtype, "mlp_act_normalize", [&] {
        normalize_rows<scalar_t>(x, obs_mean->contiguous(), obs_inv_std->contiguous(), obs_clip);
      });
    } else {
      x.sub_(*obs_mean).mul_(*obs_inv_std).clamp_(-obs_clip, obs_clip);
    }
  }
  at::Tensor out = x;
  for (int64_t l = 0; l < n_layers; ++l) {
    out = at::addmm(params[2 * l + 1], out, params[2 * l].t());
    if (l + 1 < n_layers) tanh_act ? out.tanh_() : out.clamp_min_(0);
  }

  at::Tensor actions;
  if (!gaussian) {
    if (deterministic) {
      actions = out.argmax(-1);
    } else {
      // Inverse-CDF sampling: the first class whose cumulative probability exceeds u ~ U[0, 1).
      const at::Tensor u = at::rand({out.size(0)}, generator, out.options());
      if (out.is_cpu()) {
        actions = at::empty({out.size(0)}, out.options().dtype(at::kLong));
        AT_DISPATCH_FLOATING_TYPES(dtype, "mlp_act_sample", [&] {
          sample_categorical_rows<scalar_t>(out.contiguous(), u, actions);
        });
      } else {
        // Unnormalized, as on the CPU: count the classes whose cumulative weight is <= u * total
        // (a zero-probability prefix is skipped even when u == 0); the clamp guards rounding at u ~ 1.
        const at::Tensor weights = (out - std::get<0>(out.max(-1, true))).exp_();
        const at::Tensor cdf = weights.cumsum(-1);
        const at::Tensor target = cdf.narrow(1, out.size(1) - 1, 1) * u.unsqueeze(1);
        actions = cdf.le(target).sum(-1).clamp_max_(out.size(1) - 1);
      }
    }
  } else if (deterministic) {
    actions = out;
  } else {
    // The same draw as torch.randn(mean.shape, generator=...) in Python.
    const at::Tensor noise = at::randn(out.sizes(), generator, out.options());
    actions = noise.mul_(params[n_params - 1].exp()).add_(out);
  }
  return {x, actions};
}

}  // namespace trpo_ext
