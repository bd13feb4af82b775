// The TRPO policy step's two halves for an MLP policy, each one op: the direction (the surrogate's
// gradient and the CG solve, from one forward pass) and a line-search trial (the KL and the
// surrogate at a candidate θ). The formulas are docs/design.md's "The trust-region step"; all of it
// is ATen calls, so it runs on every device the other ops do.
#include "step.h"

#include <cmath>

#include "distribution.h"
#include "fisher.h"
#include "mlp.h"

namespace trpo_ext {
namespace {

// Checks the batch against obs: advantages (N), or (N, C) with C >= 1 (C surrogates at once: a
// constrained step's reward and cost advantages), with obs's dtype, the actions as check_actions
// wants them (the mask already checked).
void check_batch(const at::Tensor& obs, const at::Tensor& actions, const at::Tensor& advantages,
                 const ActionDist& dist, const std::optional<at::Tensor>& action_mask) {
  const int64_t n = obs.size(0);
  check_dtype_device(advantages, "advantages", obs.scalar_type(), obs.device(), "obs's");
  TORCH_CHECK_VALUE((advantages.dim() == 1 || (advantages.dim() == 2 && advantages.size(1) >= 1)) &&
                        advantages.size(0) == n,
                    "trpo_ext: advantages must have shape (", n, ") or (", n, ", C) with C >= 1, got ",
                    advantages.sizes());
  check_actions(actions, dist, obs, action_mask);
}

// out = the gradient of the surrogate mean(π/π_old · A) at θ = θ_old, flat (log_std included); the
// cache holds `outputs`.
void surrogate_grad_into(MlpCache& c, const at::Tensor& actions, const at::Tensor& advantages, at::Tensor& out) {
  // At θ_old every ratio π/π_old is 1, so ∇ mean(ratio · A) = mean(A ∇log π(a|s)); its cotangent on
  // the network's output, divided by N like the Fisher's:
  //   categorical: A (onehot(a) - p) / N in each segment (a masked class: p = 0 and never taken, so 0);
  //   bernoulli: A (a - p) / N with p = σ(logits);
  //   gaussian mean: A (a - mean) e^{-2 log_std} / N,
  //   and for log_std itself: mean(A ((a - mean)^2 e^{-2 log_std} - 1)).
  at::Tensor& u_t = c.tangents.back();  // (K, N)
  const at::Tensor weight = advantages.unsqueeze(0) / c.mean_over;  // (1, N)
  if (c.dist.kind == MlpKind::Categorical) {
    const at::Tensor weight_column = weight.t();  // (N, 1)
    for (int64_t s = 0; s < c.dist.count(); ++s) at::mul_out(c.out_segments_t[s], c.probs[s], weight_column).neg_();
    c.tangents_t.back().scatter_add_(1, taken_columns(c.dist, actions),
                                     weight_column.expand({c.batch, c.dist.count()}));
  } else if (c.dist.kind == MlpKind::Bernoulli) {
    at::mul_out(u_t, (actions - at::sigmoid(c.outputs)).t(), weight);
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
    int64_t iters, double rtol, std::optional<c10::string_view> group, at::OptionalIntArrayRef segments,
    const std::optional<at::Tensor>& action_mask, const std::optional<at::Tensor>& fvp_action_mask) {
  const MlpKind k = parse_kind(kind);
  const Activation act = parse_activation(activation);
  const MlpShape shape = check_mlp(obs, params, k, ObsRule::Match);
  const ActionDist dist = parse_action_dist(k, segments, shape.out_width);
  check_action_mask(action_mask, "action_mask", dist, obs, "obs");
  check_batch(obs, actions, advantages, dist, action_mask);
  if (fvp_obs.has_value()) {
    check_dtype_device(*fvp_obs, "fvp_obs", obs.scalar_type(), obs.device(), "obs's");
    TORCH_CHECK_VALUE(fvp_obs->dim() == 2 && fvp_obs->size(0) > 0 && fvp_obs->size(1) == obs.size(1),
                      "trpo_ext: fvp_obs must have shape (M, ", obs.size(1), ") with M > 0, got ", fvp_obs->sizes());
  }
  // fvp_obs's states are other rows than obs's: a masked Fisher needs their own masks.
  const bool needs_fvp_mask = fvp_obs.has_value() && action_mask.has_value();
  TORCH_CHECK_VALUE(fvp_action_mask.has_value() == needs_fvp_mask, "trpo_ext: fvp_action_mask ",
                    needs_fvp_mask ? "must be given when fvp_obs and action_mask are (the masks of fvp_obs's rows)"
                                   : "is only for fvp_obs's rows when action_mask is given too");
  if (needs_fvp_mask) check_action_mask(fvp_action_mask, "fvp_action_mask", dist, *fvp_obs, "fvp_obs");
  check_cg_settings(damping, iters, rtol);
  const GroupSum group_sum(group);
  // Data-parallel: every mean below is over all ranks' states, each rank adding its own.
  const auto totals = total_counts(group_sum, {static_cast<double>(obs.size(0)),
                                               static_cast<double>(fvp_obs ? fvp_obs->size(0) : obs.size(0))}, obs);

  // One forward pass serves the gradient, the distribution parameters and (without fvp_obs) the solve.
  MlpCache cache = build_mlp_cache(obs, params, dist, act, action_mask, /*with_outputs=*/true, totals[0], group_sum);
  const at::Tensor taken = actions.contiguous();
  at::Tensor dist_params = cache.outputs;  // masked logits with a mask: the old distribution as it was sampled
  if (advantages.dim() == 1) {
    at::Tensor g = at::empty({shape.numel}, obs.options());
    surrogate_grad_into(cache, taken, advantages.contiguous(), g);
    group_sum(g);
    if (fvp_obs.has_value()) {
      cache = build_mlp_cache(*fvp_obs, params, dist, act, fvp_action_mask, false, totals[1], group_sum);
    }
    auto [x, used, residual, xAx] = cg_solve_cached(cache, g, damping, iters, rtol);
    return {g, x, used, residual, xAx, dist_params};
  }
  // C surrogates: C gradients (the rows of g), then one C-column solve on the same cache.
  const int64_t columns = advantages.size(1);
  at::Tensor g = at::empty({columns, shape.numel}, obs.options());
  for (int64_t col = 0; col < columns; ++col) {
    at::Tensor row = g[col];
    surrogate_grad_into(cache, taken, advantages.select(1, col).contiguous(), row);
  }
  group_sum(g);
  if (fvp_obs.has_value()) {
    cache = build_mlp_cache(*fvp_obs, params, dist, act, fvp_action_mask, false, totals[1], group_sum);
  }
  auto [x, used, residual, xAx] = cg_solve_columns(cache, g, damping, iters, rtol);
  return {g.t().contiguous(), x.t().contiguous(), used, residual, xAx, dist_params};
}


std::tuple<at::Tensor, at::Tensor> mlp_policy_trial(const at::Tensor& obs, at::TensorList params,
                                                    const at::Tensor& actions, const at::Tensor& advantages,
                                                    const at::Tensor& old_dist_params,
                                                    const std::optional<at::Tensor>& old_log_std,
                                                    c10::string_view kind, c10::string_view activation,
                                                    std::optional<c10::string_view> group,
                                                    at::OptionalIntArrayRef segments,
                                                    const std::optional<at::Tensor>& action_mask) {
  const MlpKind k = parse_kind(kind);
  const Activation act = parse_activation(activation);
  const MlpShape shape = check_mlp(obs, params, k, ObsRule::Match);
  const ActionDist dist = parse_action_dist(k, segments, shape.out_width);
  check_action_mask(action_mask, "action_mask", dist, obs, "obs");
  check_batch(obs, actions, advantages, dist, action_mask);
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
  if (k != MlpKind::Gaussian) {
    // Categorical (segments included) and bernoulli alike: KL = Σ_outcomes p_old (log p_old - log p_new)
    // over the log-probability table, log π(a|s) the sum of the taken outcomes' entries. The mask
    // applies to the new logits; the old ones came masked from the direction, and masking them again
    // changes nothing.
    const at::Tensor new_lp = log_prob_table(dist, apply_action_mask(out, action_mask));
    const at::Tensor old_lp = log_prob_table(dist, apply_action_mask(old_dist_params, action_mask));
    kl = (old_lp.exp() * (old_lp - new_lp)).sum(1);
    log_ratio = (new_lp - old_lp).gather(1, taken_columns(dist, actions)).sum(1);
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
  // With (N, C) advantages, C improvements (one per column) from the same log-ratios.
  const at::Tensor ratio_minus_one = at::expm1(log_ratio);
  const at::Tensor improvement_sums =
      advantages.dim() == 1 ? at::sum(ratio_minus_one * advantages, at::kDouble).reshape({1})
                            : at::sum(ratio_minus_one.unsqueeze(1) * advantages, {0}, false, at::kDouble);
  at::Tensor sums = at::cat({at::sum(kl, at::kDouble).reshape({1}), improvement_sums,
                             at::full({1}, static_cast<double>(obs.size(0)), kl.options().dtype(at::kDouble))});
  const GroupSum group_sum(group);
  group_sum(sums);
  const at::Tensor count = sums[-1];
  const at::Tensor improvement = sums.narrow(0, 1, improvement_sums.size(0)) / count;
  return {sums[0] / count, advantages.dim() == 1 ? improvement[0] : improvement};
}

}  // namespace trpo_ext
