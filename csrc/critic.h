// The critic's regression, one op (see critic.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace trpo_ext {

// Runs Adam on mean((V(obs[idx]) - returns[idx])^2) for every minibatch of every epoch: order is an
// int64 (epochs, N) tensor of permutations, minibatches are consecutive slices of batch_size.
// params, exp_avg, exp_avg_sq and steps (torch.optim.Adam's state) are updated in place.
// Returns the mean minibatch loss (float64, 0-dim). Refused before anything is written: lr, beta1,
// beta2 or eps outside torch.optim.Adam's ranges (lr and eps finite), and a tensor the op writes
// sharing memory with another argument.
// With `group` (a torch.distributed process group's name) every rank passes its own rows and order
// (the same number of rows on every rank) and each step uses the gradient of the ranks' minibatches
// together: one reduction per minibatch, one for the loss; every rank then makes the same steps.
at::Tensor mlp_value_fit(const at::Tensor& obs, const at::Tensor& returns, at::TensorList params,
                         at::TensorList exp_avg, at::TensorList exp_avg_sq, at::TensorList steps,
                         const at::Tensor& order, int64_t batch_size, double lr, double beta1, double beta2,
                         double eps, c10::string_view activation, std::optional<c10::string_view> group);

}  // namespace trpo_ext
