// The TRPO policy step's two halves for an MLP policy, each one op: the direction (the surrogate's
// gradient and the CG solve, from one forward pass) and a line-search trial (the KL and the
// surrogate at a candidate θ). The formulas are docs/design.md's "The trust-region step"; all of it
// is ATen calls, so it runs on every device the other ops do.
#include "step.h"

#include <cmath>

#include "fisher.h"
#include "mlp.h"

namespace trpo_ext {
namespace {

// Checks the batch against obs: advantages (N) with obs's dtype; actions int64 classes in [0, K)
// (categorical) or (N, K) with obs's dtype (gaussian).
void check_batch(const at::Tensor& obs, const at::Tensor& actions, const at::Tensor& advantages, MlpKind kind,
                 int64_t width) {
  const int64_t n = obs.size(0);
  check_dtype_device(advantages, "advantages", obs.scalar_type(), obs.device(), "obs's");
  TORCH_CHECK_VALUE(advantages.dim() == 1 && advantages.size(0) == n, "trpo_ext: advantages must have shape (", n,
                    "), got ", advantages.sizes());
  if (kind == MlpKind::Categorical) {
    TORCH_CHECK_TYPE(actions.scalar_type() == at::kLong, "trpo_ext: actions must be int64 class indices, got ",
                     actions.scalar_type());
    check_dtype_device(actions, "actions", at::kLong, obs.device(), "obs's");
    TORCH_CHECK_VALUE(actions.dim() == 1 && actions.size(0) == n, "trpo_ext: actions must have shape (", n,
                      "), got ", actions.sizes());
    // One host read per call: an index out of range would be undefined behaviour in a scatter or gather.
    const auto [lo, hi] = at::aminmax(actions);
    TORCH_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < width,
                      "trpo_ext: actions must be class indices in [0, ", width, "), got values in [",
                      lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
  } else {
    check_dtype_device(actions, "actions", obs.scalar_type(), obs.device(), "obs's");
    TORCH_CHECK_VALUE(actions.dim() == 2 && actions.size(0) == n && actions.size(1) == width,
                      "trpo_ext: actions must have shape (", n, ", ", width, "), got ", actions.sizes());
  }
}

// out = the gradient of the surrogate mean(π/π_old · A) at θ = θ_old, flat (log_std included); the
// cache holds `outputs`.
void surrogate_grad_into(MlpCache& c, const at::Tensor& actions, const at::Tensor& advantages, at::Tensor& out) {
  // At θ_old every ratio π/π_old is 1, so ∇ mean(ratio · A) = mean(A ∇log π(a|s)); its cotangent on
  // the network's output, divided by N like the Fisher's:
  //   categorical: A (onehot(a) - p) / N;   gaussian mean: A (a - mean) e^{-2 log_std} / N,
  //   and for log_std itself: mean(A ((a - mean)^2 e^{-2 log_std} - 1)).
  at::Tensor& u_t = c.tangents.back();  // (K, N)
  const at::Tensor weight = advantages.unsqueeze(0) / c.mean_over;  // (1, N)
  if (c.kind == MlpKind::Categorical) {
    at::mul_out(u_t, c.probs.t(), weight).neg_();
    u_t.t().scatter_add_(1, actions.unsqueeze(1), weight.t());
  } else {
    const at::Tensor diff_t = (actions - c.outputs).t();  // (K, N)
    at::mul_out(u_t, diff_t, c.out_scale).mul_(advantages.unsqueeze(0));
    const int64_t k = c.out_scale.size(0);
    at::Tensor out_log_std = out.narrow(0, c.offsets.back(), k);
    at::mv_out(out_log_std, (diff_t * u_t), c.ones).sub_(weight.sum());
  }
  mlp_vjp_into(c, out);
}

// The batch sizes summed over the group's ranks (one reduction), or the local ones without a group.
std::vector<double> total_counts(const GroupSum& group_sum, std::vector<double> counts, const at::Tensor& like) {
  if (!group_sum.active()) return counts;
  at::Tensor t = at::tensor(counts, at::kDouble).to(like.device());
  group_sum(t);
  t = t.cpu();
  return {t.data_ptr<double>(), t.data_ptr<double>() + t.numel()};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_policy_direction(
    const at::Tensor& obs, at::TensorList params, const at::Tensor& actions, const at::Tensor& advantages,
    const std::optional<at::Tensor>& fvp_obs, c10::string_view kind, c10::string_view activation, double damping,
    int64_t iters, double rtol, std::optional<c10::string_view> group) {
  const MlpKind k = parse_kind(kind);
  const Activation act = parse_activation(activation);
  const MlpShape shape = check_mlp(obs, params, k, ObsRule::Match);
  check_batch(obs, actions, advantages, k, shape.out_width);
  if (fvp_obs.has_value()) {
    check_dtype_device(*fvp_obs, "fvp_obs", obs.scalar_type(), obs.device(), "obs's");
    TORCH_CHECK_VALUE(fvp_obs->dim() == 2 && fvp_obs->size(0) > 0 && fvp_obs->size(1) == obs.size(1),
                      "trpo_ext: fvp_obs must have shape (M, ", obs.size(1), ") with M > 0, got ", fvp_obs->sizes());
  }
  check_cg_settings(damping, iters, rtol);
  const GroupSum group_sum(group);
  // Data-parallel: every mean below is over all ranks' states, each rank adding its own.
  const auto totals = total_counts(group_sum, {static_cast<double>(obs.size(0)),
                                               static_cast<double>(fvp_obs ? fvp_obs->size(0) : obs.size(0))}, obs);

  // One forward pass serves the gradient, the distribution parameters and (without fvp_obs) the solve.
  MlpCache cache = build_mlp_cache(obs, params, k, act, /*with_outputs=*/true, totals[0], group_sum);
  at::Tensor g = at::empty({shape.numel}, obs.options());
  surrogate_grad_into(cache, actions.contiguous(), advantages.contiguous(), g);
  group_sum(g);
  at::Tensor dist_params = cache.outputs;
  if (fvp_obs.has_value()) cache = build_mlp_cache(*fvp_obs, params, k, act, false, totals[1], group_sum);
  auto [x, used, residual, xAx] = cg_solve_cached(cache, g, damping, iters, rtol);
  return {g, x, used, residual, xAx, dist_params};
}


std::tuple<at::Tensor, at::Tensor> mlp_policy_trial(const at::Tensor& obs, at::TensorList params,
                                                    const at::Tensor& actions, const at::Tensor& advantages,
                                                    const at::Tensor& old_dist_params,
                                                    const std::optional<at::Tensor>& old_log_std,
                                                    c10::string_view kind, c10::string_view activation,
                                                    std::optional<c10::string_view> group) {
  const MlpKind k = parse_kind(kind);
  const Activation act = parse_activation(activation);
  const MlpShape shape = check_mlp(obs, params, k, ObsRule::Match);
  check_batch(obs, actions, advantages, k, shape.out_width);
  check_dtype_device(old_dist_params, "old_dist_params", obs.scalar_type(), obs.device(), "obs's");
  TORCH_CHECK_VALUE(old_dist_params.dim() == 2 && old_dist_params.size(0) == obs.size(0) &&
                        old_dist_params.size(1) == shape.out_width,
                    "trpo_ext: old_dist_params must have shape (", obs.size(0), ", ", shape.out_width, "), got ",
                    old_dist_params.sizes());
  TORCH_CHECK_VALUE(old_log_std.has_value() == (k == MlpKind::Gaussian),
                    "trpo_ext: old_log_std must be given for a gaussian policy and only then");
  if (old_log_std.has_value()) {
    check_dtype_device(*old_log_std, "old_log_std", obs.scalar_type(), obs.device(), "obs's");
    TORCH_CHECK_VALUE(old_log_std->dim() == 1 && old_log_std->size(0) == shape.out_width,
                      "trpo_ext: old_log_std must have shape (", shape.out_width, "), got ", old_log_std->sizes());
  }

  const at::Tensor out = mlp_forward(obs.contiguous(), params, shape.n_layers, act);
  at::Tensor kl, log_ratio;  // KL(old ‖ new) per state; log π_new(a|s) - log π_old(a|s)
  if (k == MlpKind::Categorical) {
    const at::Tensor new_lp = at::log_softmax(out, 1), old_lp = at::log_softmax(old_dist_params, 1);
    kl = (old_lp.exp() * (old_lp - new_lp)).sum(1);
    const at::Tensor a = actions.unsqueeze(1);
    log_ratio = (new_lp.gather(1, a) - old_lp.gather(1, a)).squeeze(1);
  } else {
    // Per dimension: log(σ_new/σ_old) + (σ_old² + (μ_old - μ_new)²) / (2 σ_new²) - 1/2, summed.
    const at::Tensor& log_std = params.back();
    const at::Tensor log_std_diff = log_std - *old_log_std;
    const at::Tensor new_inv_var = at::exp(log_std * -2.0), old_inv_var = at::exp(*old_log_std * -2.0);
    kl = ((at::exp(*old_log_std * 2.0) + (old_dist_params - out).square()) * new_inv_var * 0.5).sum(1)
             .add_(log_std_diff.sum() - 0.5 * static_cast<double>(shape.out_width));
    log_ratio = (((actions - old_dist_params).square() * old_inv_var - (actions - out).square() * new_inv_var) * 0.5)
                    .sum(1)
                    .sub_(log_std_diff.sum());
  }
  // The improvement over θ_old, where every ratio is 1: mean((π/π_old - 1) A), with expm1 for the
  // small log-ratios of a trust region. Sums in float64, divided by the number of states (of all
  // ranks: one reduction carries both sums and the count).
  at::Tensor sums = at::stack({at::sum(kl, at::kDouble), at::sum(at::expm1(log_ratio) * advantages, at::kDouble),
                               at::scalar_tensor(static_cast<double>(obs.size(0)), kl.options().dtype(at::kDouble))});
  const GroupSum group_sum(group);
  group_sum(sums);
  return {sums[0] / sums[2], sums[1] / sums[2]};
}

}  // namespace trpo_ext
