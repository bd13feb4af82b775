// The value-network regression of a TRPO update as one op: every epoch and minibatch of
// "Adam on mean((V(s) - R)^2)" for an MLP critic, with the forward pass, the analytic backward pass
// and the Adam step in ATen calls. The Python loop it replaces (autograd + torch.optim per
// minibatch) spends most of its time in per-op overhead at these sizes.
#include "critic.h"

namespace trpo_ext {
namespace {

void check_fit_args(const at::Tensor& obs, const at::Tensor& returns, at::TensorList params,
                    at::TensorList exp_avg, at::TensorList exp_avg_sq, at::TensorList steps,
                    const at::Tensor& order, int64_t batch_size) {
  TORCH_CHECK_TYPE(obs.scalar_type() == at::kFloat || obs.scalar_type() == at::kDouble,
                   "trpo_ext: obs must be float32 or float64, got ", obs.scalar_type());
  TORCH_CHECK_VALUE(obs.dim() == 2 && obs.size(0) > 0, "trpo_ext: obs must have shape (N, obs_dim), N > 0, got ",
                    obs.sizes());
  TORCH_CHECK_VALUE(returns.dim() == 1 && returns.size(0) == obs.size(0), "trpo_ext: returns must have shape (",
                    obs.size(0), "), got ", returns.sizes());
  TORCH_CHECK_TYPE(returns.scalar_type() == obs.scalar_type(), "trpo_ext: returns must have obs's dtype");
  const size_t n = params.size();
  TORCH_CHECK_VALUE(n >= 2 && n % 2 == 0, "trpo_ext: params must be [W1, b1, ..., WL, bL], got ", n, " tensors");
  TORCH_CHECK_VALUE(exp_avg.size() == n && exp_avg_sq.size() == n && steps.size() == n,
                    "trpo_ext: exp_avg, exp_avg_sq and steps need one tensor per parameter");
  int64_t width = obs.size(1);
  for (size_t l = 0; l < n / 2; ++l) {
    const at::Tensor& W = params[2 * l];
    TORCH_CHECK_VALUE(W.dim() == 2 && W.size(1) == width && params[2 * l + 1].dim() == 1 &&
                          params[2 * l + 1].size(0) == W.size(0),
                      "trpo_ext: params[", 2 * l, "] / params[", 2 * l + 1, "] do not chain from width ", width);
    width = W.size(0);
  }
  TORCH_CHECK_VALUE(width == 1, "trpo_ext: the critic's last layer must have one output, got ", width);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK_TYPE(params[i].scalar_type() == obs.scalar_type() && params[i].device() == obs.device() &&
                         params[i].is_contiguous(),
                     "trpo_ext: params[", i, "] must be contiguous with obs's dtype and device");
    TORCH_CHECK_VALUE(exp_avg[i].sizes() == params[i].sizes() && exp_avg_sq[i].sizes() == params[i].sizes(),
                      "trpo_ext: Adam state ", i, " does not match its parameter's shape");
  }
  TORCH_CHECK_VALUE(order.dim() == 2 && order.size(1) == obs.size(0) && order.scalar_type() == at::kLong,
                    "trpo_ext: order must be an int64 (epochs, N) tensor of permutations, got ", order.sizes());
  TORCH_CHECK_VALUE(batch_size >= 1, "trpo_ext: batch_size must be >= 1, got ", batch_size);
}

}  // namespace

at::Tensor mlp_value_fit(const at::Tensor& obs, const at::Tensor& returns, at::TensorList params,
                         at::TensorList exp_avg, at::TensorList exp_avg_sq, at::TensorList steps,
                         const at::Tensor& order, int64_t batch_size, double lr, double beta1, double beta2,
                         double eps, c10::string_view activation) {
  const bool tanh_act = activation == "tanh";
  TORCH_CHECK_VALUE(tanh_act || activation == "relu", "trpo_ext: activation must be 'tanh' or 'relu', got '",
                    std::string(activation), "'");
  check_fit_args(obs, returns, params, exp_avg, exp_avg_sq, steps, order, batch_size);
  const int64_t n = obs.size(0), n_layers = static_cast<int64_t>(params.size()) / 2;
  const at::Tensor obs_c = obs.contiguous();
  const at::Tensor returns_c = returns.contiguous().unsqueeze(1);
  std::vector<at::Tensor> grads;
  for (const at::Tensor& p : params) grads.push_back(at::empty_like(p));
  std::vector<at::Tensor> inputs(n_layers);  // h_l, the input of layer l, for this minibatch
  at::Tensor loss_sum = at::zeros({}, obs.options().dtype(at::kDouble));
  int64_t n_batches = 0;
  // The fused Adam kernel wants its step counts on the parameters' device (torch keeps them on the
  // CPU for the unfused optimizer): work on device copies, write them back at the end.
  std::vector<at::Tensor> device_steps;
  for (const at::Tensor& step : steps) device_steps.push_back(step.to(obs.device(), at::kFloat, false, true));

  for (int64_t epoch = 0; epoch < order.size(0); ++epoch) {
    const at::Tensor perm = order[epoch];
    for (int64_t start = 0; start < n; start += batch_size) {
      const int64_t b = std::min(batch_size, n - start);
      const at::Tensor idx = perm.narrow(0, start, b);
      // Forward, keeping each layer's input.
      inputs[0] = obs_c.index_select(0, idx);
      at::Tensor out;
      for (int64_t l = 0; l < n_layers; ++l) {
        out = at::addmm(params[2 * l + 1], inputs[l], params[2 * l].t());
        if (l + 1 < n_layers) inputs[l + 1] = tanh_act ? out.tanh_() : out.clamp_min_(0);
      }
      // Loss mean((v - R)^2) and its gradient 2 (v - R) / b.
      at::Tensor diff = out.sub_(returns_c.index_select(0, idx));
      loss_sum.add_(diff.pow(2).mean());
      ++n_batches;
      at::Tensor g = diff.mul_(2.0 / static_cast<double>(b));
      // Backward.
      for (int64_t l = n_layers - 1; l >= 0; --l) {
        at::mm_out(grads[2 * l], g.t(), inputs[l]);
        at::sum_out(grads[2 * l + 1], g, {0});
        if (l > 0) {
          const at::Tensor& h = inputs[l];
          at::Tensor act_grad = tanh_act ? 1 - h * h : h.gt(0).to(h.scalar_type());
          g = at::mm(g, params[2 * l]).mul_(act_grad);
        }
      }
      // Adam, through the kernel torch.optim.Adam(fused=True) uses (no weight decay, no amsgrad).
      at::_foreach_add_(device_steps, 1);
      at::_fused_adam_(params, grads, exp_avg, exp_avg_sq, {}, device_steps, lr, beta1, beta2, 0.0, eps, false,
                       false);
    }
  }
  for (size_t i = 0; i < steps.size(); ++i) steps[i].copy_(device_steps[i]);
  return n_batches ? loss_sum / static_cast<double>(n_batches) : loss_sum;
}

}  // namespace trpo_ext
