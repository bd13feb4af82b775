// Policy inference for one rollout step as one op: observation normalization, the MLP forward pass
// and action sampling. In Python these are about fifteen small torch calls per step (plus
// nn.Module dispatch and torch.multinomial's per-row set-up), which at a batch of a few envs cost
// as much as stepping a cheap environment; here they are one dispatcher call.
#include "act.h"

#include "kernels.h"
#include "mlp.h"

namespace trpo_ext {

std::tuple<at::Tensor, at::Tensor> mlp_act(const at::Tensor& obs, const std::optional<at::Tensor>& obs_mean,
                                           const std::optional<at::Tensor>& obs_inv_std, double obs_clip,
                                           at::TensorList params, c10::string_view kind,
                                           c10::string_view activation, bool deterministic,
                                           std::optional<at::Generator> generator) {
  const MlpKind k = parse_kind(kind);
  const Activation act = parse_activation(activation);
  const MlpShape shape = check_mlp(obs, params, k, ObsRule::Convert);
  TORCH_CHECK_VALUE(obs_mean.has_value() == obs_inv_std.has_value(),
                    "trpo_ext: obs_mean and obs_inv_std must be given together");

  // A fresh tensor even when obs already has the weights' dtype: an op's output must not alias its input.
  at::Tensor x = obs.to(shape.dtype, /*non_blocking=*/false, /*copy=*/true).contiguous();
  if (obs_mean.has_value()) {
    for (const auto& [s, name] : {std::pair{&*obs_mean, "obs_mean"}, std::pair{&*obs_inv_std, "obs_inv_std"}}) {
      check_dtype_device(*s, name, shape.dtype, obs.device(), "params[0]'s");
      TORCH_CHECK_VALUE(s->dim() == 1 && s->size(0) == obs.size(1), "trpo_ext: ", name, " must have shape (",
                        obs.size(1), "), got ", s->sizes());
    }
    TORCH_CHECK_VALUE(obs_clip > 0, "trpo_ext: obs_clip must be > 0, got ", obs_clip);
    TRPO_EXT_DISPATCH(x, normalize_rows_, x, obs_mean->contiguous(), obs_inv_std->contiguous(), obs_clip);
  }
  const at::Tensor out = mlp_forward(x, params, shape.n_layers, act);

  at::Tensor actions;
  if (k == MlpKind::Categorical) {
    if (deterministic) {
      actions = out.argmax(-1);
    } else {
      // Inverse-CDF sampling, the same per-row algorithm on every device (elementwise.h).
      const at::Tensor u = at::rand({out.size(0)}, generator, out.options());
      actions = at::empty({out.size(0)}, out.options().dtype(at::kLong));
      TRPO_EXT_DISPATCH(out, sample_categorical_, out, u, actions);
    }
  } else if (deterministic) {
    actions = out;
  } else {
    // The same draw as torch.randn(mean.shape, generator=...) in Python.
    actions = at::randn(out.sizes(), generator, out.options());
    TRPO_EXT_DISPATCH(out, sample_gaussian_, out, params[params.size() - 1].contiguous(), actions);
  }
  return {x, actions};
}

}  // namespace trpo_ext
