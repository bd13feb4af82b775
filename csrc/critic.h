// The critic's regression, one op (see critic.cpp).
#pragma once

#include <ATen/ATen.h>

namespace trpo_ext {

// Runs Adam on mean((V(obs[idx]) - returns[idx])^2) for every minibatch of every epoch: order is an
// int64 (epochs, N) tensor of permutations, minibatches are consecutive slices of batch_size.
// params, exp_avg, exp_avg_sq and steps (torch.optim.Adam's state) are updated in place.
// Returns the mean minibatch loss (float64, 0-dim).
at::Tensor mlp_value_fit(const at::Tensor& obs, const at::Tensor& returns, at::TensorList params,
                         at::TensorList exp_avg, at::TensorList exp_avg_sq, at::TensorList steps,
                         const at::Tensor& order, int64_t batch_size, double lr, double beta1, double beta2,
                         double eps, c10::string_view activation);

}  // namespace trpo_ext
