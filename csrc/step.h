// The two halves of a TRPO policy step on an MLP policy, as ops (see step.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace trpo_ext {

// The direction from one forward pass on obs: (g, x, iterations (int64), residual norm (float64),
// x'(F + damping I)x (float64), the output layer's result (logits or mean), (N, K)), where g is the
// surrogate's gradient at θ_old and x solves (F + damping I) x = g by CG, with the Fisher on fvp_obs
// when given (else on obs). With `group` (a torch.distributed process group's name) each rank passes
// its shard of the batch and every rank gets the result for all shards together: 2 + (CG iterations)
// reductions (the batch sizes, the gradient, one per product). `segments` and `action_mask` (obs's
// rows; the result's logits are the masked ones) as distribution.h describes them; fvp_action_mask
// masks fvp_obs's rows and is given exactly when fvp_obs and action_mask are.
// With advantages (N, C) (C surrogates, e.g. a constrained step's reward and cost advantages), g and
// x are (P, C), one column per surrogate, solved together by one C-column CG on the same forward
// pass (cg_solve_columns), and iterations, residual norm and x'Ax are (C).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_policy_direction(
    const at::Tensor& obs, at::TensorList params, const at::Tensor& actions, const at::Tensor& advantages,
    const std::optional<at::Tensor>& fvp_obs, c10::string_view kind, c10::string_view activation, double damping,
    int64_t iters, double rtol, std::optional<c10::string_view> group, at::OptionalIntArrayRef segments,
    const std::optional<at::Tensor>& action_mask, const std::optional<at::Tensor>& fvp_action_mask);

// One line-search trial at the parameters `params`: (mean KL(old ‖ new), the surrogate's improvement
// mean((π/π_old - 1) · A) over the old policy),
// both 0-dim float64, for the old policy given by its output on obs (old_dist_params, (N, K)) and,
// for a Gaussian, its log_std. With `group`, over all ranks' shards: one reduction. `segments` and
// `action_mask` as for mlp_policy_direction (the mask applies to the new logits). With advantages
// (N, C), the improvement is (C), one per column.
std::tuple<at::Tensor, at::Tensor> mlp_policy_trial(const at::Tensor& obs, at::TensorList params,
                                                    const at::Tensor& actions, const at::Tensor& advantages,
                                                    const at::Tensor& old_dist_params,
                                                    const std::optional<at::Tensor>& old_log_std,
                                                    c10::string_view kind, c10::string_view activation,
                                                    std::optional<c10::string_view> group,
                                                    at::OptionalIntArrayRef segments,
                                                    const std::optional<at::Tensor>& action_mask);

}  // namespace trpo_ext
