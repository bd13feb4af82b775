// One rollout step of policy inference as one op (see act.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace trpo_ext {

// Normalizes raw observations ((obs - obs_mean) * obs_inv_std, clamped to +-obs_clip; skipped when
// obs_mean is None), runs the MLP policy (params in MLPPolicy.parameters() order) and picks actions:
// categorical: a sample of softmax(logits) (argmax when deterministic), int64 (N,), or with
// `segments` one per segment, (N, S); with `action_mask` (bool (N, K), True = allowed) of the masked
// logits, so a masked class is never returned;
// bernoulli: 0/1 of the logits' dtype, 1 with probability σ(x) (when x > 0 if deterministic), (N, K);
// gaussian: mean + exp(log_std) * randn (the mean when deterministic), (N, k).
// Returns (the policy's input observations, actions).
std::tuple<at::Tensor, at::Tensor> mlp_act(const at::Tensor& obs, const std::optional<at::Tensor>& obs_mean,
                                           const std::optional<at::Tensor>& obs_inv_std, double obs_clip,
                                           at::TensorList params, c10::string_view kind,
                                           c10::string_view activation, bool deterministic,
                                           std::optional<at::Generator> generator, at::OptionalIntArrayRef segments,
                                           const std::optional<at::Tensor>& action_mask);

}  // namespace trpo_ext
