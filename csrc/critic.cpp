// The value-network regression of a TRPO update as one op: every epoch and minibatch of
// "Adam on mean((V(s) - R)^2)" for an MLP critic, with the forward pass, the analytic backward pass
// and the Adam step in ATen calls. The Python loop it replaces (autograd + torch.optim per
// minibatch) spends most of its time in per-op overhead at these sizes.
#include "critic.h"

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "collective.h"
#include "mlp.h"

namespace trpo_ext {
namespace {

// Adam's settings, torch.optim.Adam's ranges (NaN fails every comparison, so it is refused too).
void check_adam_settings(double lr, double beta1, double beta2, double eps) {
  TORCH_CHECK_VALUE(std::isfinite(lr) && lr >= 0, "trpo_ext: lr must be finite and >= 0, got ", lr);
  TORCH_CHECK_VALUE(beta1 >= 0 && beta1 < 1, "trpo_ext: beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0 && beta2 < 1, "trpo_ext: beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "trpo_ext: eps must be finite and >= 0, got ", eps);
}

// Whether two tensors may share memory: the byte ranges their elements span on one device intersect
// (exact for the dense tensors the op writes; for a strided one, any element within its span counts).
bool share_memory(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || a.device() != b.device()) return false;
  auto span = [](const at::Tensor& t) {
    int64_t last = 0;  // ATen strides are >= 0
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const auto first = reinterpret_cast<std::uintptr_t>(t.data_ptr());
    return std::pair{first, first + static_cast<std::uintptr_t>((last + 1) * t.element_size())};
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  return a0 < b1 && b0 < a1;
}

// ValueError when a tensor the op writes (params, exp_avg, exp_avg_sq, steps) shares memory with
// another one it writes, or with one it reads (obs, returns, order): an update would then overwrite
// another's state, or the data of later minibatches.
void check_no_aliasing(const at::Tensor& obs, const at::Tensor& returns, const at::Tensor& order,
                       at::TensorList params, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                       at::TensorList steps) {
  const int64_t n_layers = static_cast<int64_t>(params.size()) / 2;
  std::vector<std::pair<const at::Tensor*, std::string>> written;
  for (size_t i = 0; i < params.size(); ++i) {
    written.emplace_back(&params[i], param_name(static_cast<int64_t>(i), n_layers));
    written.emplace_back(&exp_avg[i], c10::str("exp_avg[", i, "]"));
    written.emplace_back(&exp_avg_sq[i], c10::str("exp_avg_sq[", i, "]"));
    written.emplace_back(&steps[i], c10::str("steps[", i, "]"));
  }
  for (size_t i = 0; i < written.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      TORCH_CHECK_VALUE(!share_memory(*written[i].first, *written[j].first), "trpo_ext: ", written[j].second,
                        " and ", written[i].second, " share memory: the op updates params, exp_avg, exp_avg_sq and "
                        "steps in place, so each must be a tensor of its own");
    }
  }
  const std::pair<const at::Tensor*, const char*> read_only[] = {
      {&obs, "obs"}, {&returns, "returns"}, {&order, "order"}};
  for (const auto& [read, name] : read_only) {
    for (const auto& [t, written_name] : written) {
      TORCH_CHECK_VALUE(!share_memory(*read, *t), "trpo_ext: ", name, " shares memory with ", written_name,
                        ", which the op updates in place: pass a copy");
    }
  }
}

// The arguments besides the network (check_mlp's job): everything the loop reads or writes densely.
void check_fit_args(const at::Tensor& obs, const at::Tensor& returns, at::TensorList params,
                    at::TensorList exp_avg, at::TensorList exp_avg_sq, at::TensorList steps,
                    const at::Tensor& order, int64_t batch_size) {
  check_dtype_device(returns, "returns", obs.scalar_type(), obs.device(), "obs's");
  TORCH_CHECK_VALUE(returns.dim() == 1 && returns.size(0) == obs.size(0), "trpo_ext: returns must have shape (",
                    obs.size(0), "), got ", returns.sizes());
  const size_t n = params.size();
  TORCH_CHECK_VALUE(exp_avg.size() == n && exp_avg_sq.size() == n && steps.size() == n,
                    "trpo_ext: exp_avg, exp_avg_sq and steps need one tensor per parameter (", n, "), got ",
                    exp_avg.size(), ", ", exp_avg_sq.size(), " and ", steps.size());
  const int64_t n_layers = static_cast<int64_t>(n) / 2;
  for (size_t i = 0; i < n; ++i) {
    const int64_t ii = static_cast<int64_t>(i);
    // Updated in place by the fused Adam kernel, which walks them as flat dense arrays.
    check_dense(params[i], [&] { return param_name(ii, n_layers); });
    for (const auto& [state, what] : {std::pair{&exp_avg[i], "exp_avg"}, std::pair{&exp_avg_sq[i], "exp_avg_sq"}}) {
      auto name = [&] { return c10::str(what, "[", i, "]"); };
      check_dtype_device(*state, name, obs.scalar_type(), obs.device(), "obs's");
      TORCH_CHECK_VALUE(state->sizes() == params[i].sizes(), "trpo_ext: ", name(), " must have the shape of ",
                        param_name(ii, n_layers), ", ", params[i].sizes(), ", got ", state->sizes());
      check_dense(*state, name);
    }
    const at::Tensor& step = steps[i];
    TORCH_CHECK_TYPE(step.scalar_type() == at::kFloat || step.scalar_type() == at::kDouble, "trpo_ext: steps[", i,
                     "] must be a float32 or float64 tensor, got ", step.scalar_type());
    TORCH_CHECK_VALUE(step.numel() == 1 && step.dim() <= 1, "trpo_ext: steps[", i,
                      "] must be a 0-dim or 1-element tensor, got shape ", step.sizes());
  }
  TORCH_CHECK_TYPE(order.scalar_type() == at::kLong, "trpo_ext: order must be int64, got ", order.scalar_type());
  TORCH_CHECK_TYPE(order.device() == obs.device(), "trpo_ext: order must be on obs's device ", obs.device(), ", got ",
                   order.device());
  TORCH_CHECK_VALUE(order.dim() == 2 && order.size(1) == obs.size(0),
                    "trpo_ext: order must be an int64 (epochs, N) tensor of permutations, got ", order.sizes());
  if (order.numel() > 0) {
    // One host read per call: an index out of range would be an IndexError from index_select on the
    // CPU and a device-side assert (a dead CUDA context) on a GPU.
    const auto [lo, hi] = at::aminmax(order);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
    TORCH_CHECK_VALUE(lo_v >= 0 && hi_v < obs.size(0), "trpo_ext: order must hold row indices in [0, ", obs.size(0),
                      "), got values in [", lo_v, ", ", hi_v, "]");
  }
  TORCH_CHECK_VALUE(batch_size >= 1, "trpo_ext: batch_size must be >= 1, got ", batch_size);
  check_no_aliasing(obs, returns, order, params, exp_avg, exp_avg_sq, steps);
}

}  // namespace

at::Tensor mlp_value_fit(const at::Tensor& obs, const at::Tensor& returns, at::TensorList params,
                         at::TensorList exp_avg, at::TensorList exp_avg_sq, at::TensorList steps,
                         const at::Tensor& order, int64_t batch_size, double lr, double beta1, double beta2,
                         double eps, c10::string_view activation, std::optional<c10::string_view> group) {
  const Activation act = parse_activation(activation);
  const GroupSum group_sum(group);
  const int64_t n_layers = check_mlp(obs, params, MlpKind::Value, ObsRule::Match).n_layers;
  check_fit_args(obs, returns, params, exp_avg, exp_avg_sq, steps, order, batch_size);
  check_adam_settings(lr, beta1, beta2, eps);
  const int64_t n = obs.size(0);
  const at::Tensor obs_c = obs.contiguous();
  const at::Tensor returns_c = returns.contiguous().unsqueeze(1);
  // The gradients are views of one flat buffer, so a data-parallel step reduces them in one call;
  // its last slot carries the minibatch's row count.
  int64_t numel = 0;
  for (const at::Tensor& p : params) numel += p.numel();
  at::Tensor flat_grad = at::empty({numel + 1}, obs.options());
  std::vector<at::Tensor> grads;
  int64_t offset = 0;
  for (const at::Tensor& p : params) {
    grads.push_back(flat_grad.narrow(0, offset, p.numel()).view(p.sizes()));
    offset += p.numel();
  }
  std::vector<at::Tensor> inputs;     // h_l, the input of layer l, for this minibatch
  std::vector<at::Tensor> act_grads;  // act'(z_l) of the hidden layers, for this minibatch
  at::Tensor loss_sum = at::zeros({}, obs.options().dtype(at::kDouble));
  int64_t n_batches = 0;
  // The fused Adam kernel wants its step counts on the parameters' device (torch keeps them on the
  // CPU for the unfused optimizer): work on device copies, write them back at the end. The kernel
  // only reads them, so when every parameter has taken as many steps (always, after steps taken
  // together) one tensor stands for all and each Adam step increments it once: a _foreach_add_
  // over the list cost 32 µs per step on the CPU, 14% of the whole fit.
  std::vector<at::Tensor> device_steps;
  for (const at::Tensor& step : steps) {
    device_steps.push_back(step.reshape({}).to(obs.device(), at::kFloat, false, true));
  }
  const bool shared_count = at::stack(device_steps).eq(device_steps[0]).all().item<bool>();
  if (shared_count) std::fill(device_steps.begin() + 1, device_steps.end(), device_steps[0]);

  for (int64_t epoch = 0; epoch < order.size(0); ++epoch) {
    const at::Tensor perm = order[epoch];
    for (int64_t start = 0; start < n; start += batch_size) {
      const int64_t b = std::min(batch_size, n - start);
      const at::Tensor idx = perm.narrow(0, start, b);
      at::Tensor out = mlp_forward(obs_c.index_select(0, idx), params, n_layers, act, &inputs, &act_grads);
      // Loss mean((v - R)^2) and its gradient 2 (v - R) / b.
      at::Tensor diff = out.sub_(returns_c.index_select(0, idx));
      loss_sum.add_(diff.pow(2).mean());
      ++n_batches;
      // The gradient of the mean over this minibatch; data-parallel, of the sum, divided by all
      // ranks' rows once the sums have arrived.
      at::Tensor g = group_sum.active() ? diff.mul_(2.0) : diff.mul_(2.0 / static_cast<double>(b));
      // Backward.
      for (int64_t l = n_layers - 1; l >= 0; --l) {
        at::mm_out(grads[2 * l], g.t(), inputs[l]);
        at::sum_out(grads[2 * l + 1], g, {0});
        if (l > 0) g = at::mm(g, params[2 * l]).mul_(act_grads[l - 1]);
      }
      if (group_sum.active()) {
        flat_grad[numel].fill_(static_cast<double>(b));
        group_sum(flat_grad);
        flat_grad.narrow(0, 0, numel).div_(flat_grad[numel]);
      }
      // Adam, through the kernel torch.optim.Adam(fused=True) uses (no weight decay, no amsgrad).
      if (shared_count) {
        device_steps[0].add_(1);
      } else {
        at::_foreach_add_(device_steps, 1);
      }
      at::_fused_adam_(params, grads, exp_avg, exp_avg_sq, {}, device_steps, lr, beta1, beta2, 0.0, eps, false,
                       false);
    }
  }
  for (size_t i = 0; i < steps.size(); ++i) steps[i].copy_(device_steps[i].reshape(steps[i].sizes()));
  at::Tensor loss = n_batches ? loss_sum / static_cast<double>(n_batches) : loss_sum;
  if (group_sum.active()) {  // the mean over the ranks
    at::Tensor sums = at::stack({loss, at::ones({}, loss.options())});
    group_sum(sums);
    loss = sums[0] / sums[1];
  }
  return loss;
}

}  // namespace trpo_ext
