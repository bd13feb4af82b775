// Policy inference for one rollout step as one op: observation normalization, the MLP forward pass
// and action sampling. In Python these are about fifteen small torch calls per step (plus
// nn.Module dispatch and torch.multinomial's per-row set-up), which at a batch of a few envs cost
// as much as stepping a cheap environment; here they are one dispatcher call.
#include "act.h"

#include <algorithm>

#include "distribution.h"
#include "kernels.h"
#include "mlp.h"

namespace trpo_ext {
namespace {

bool all_contiguous(at::TensorList tensors) {
  return std::all_of(tensors.begin(), tensors.end(), [](const at::Tensor& t) { return t.is_contiguous(); });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mlp_act(const at::Tensor& obs, const std::optional<at::Tensor>& obs_mean,
                                           const std::optional<at::Tensor>& obs_inv_std, double obs_clip,
                                           at::TensorList params, c10::string_view kind,
                                           c10::string_view activation, bool deterministic,
                                           std::optional<at::Generator> generator, at::OptionalIntArrayRef segments,
                                           const std::optional<at::Tensor>& action_mask) {
  const MlpKind k = parse_kind(kind);
  const Activation act = parse_activation(activation);
  const MlpShape shape = check_mlp(obs, params, k, ObsRule::Convert);
  const ActionDist dist = parse_action_dist(k, segments, shape.out_width);
  TORCH_CHECK_VALUE(obs_mean.has_value() == obs_inv_std.has_value(),
                    "trpo_ext: obs_mean and obs_inv_std must be given together");
  // NaN fails the comparison too; inf clips nothing.
  TORCH_CHECK_VALUE(obs_clip > 0, "trpo_ext: obs_clip must be > 0 (inf: no clipping), got ", obs_clip);
  check_action_mask(action_mask, "action_mask", dist, obs, "obs");

  // A fresh tensor even when obs already has the weights' dtype: an op's output must not alias its input.
  at::Tensor x = obs.to(shape.dtype, /*non_blocking=*/false, /*copy=*/true).contiguous();
  if (obs_mean.has_value()) {
    for (const auto& [s, name] : {std::pair{&*obs_mean, "obs_mean"}, std::pair{&*obs_inv_std, "obs_inv_std"}}) {
      check_dtype_device(*s, name, shape.dtype, obs.device(), "params[0]'s");
      TORCH_CHECK_VALUE(s->dim() == 1 && s->size(0) == obs.size(1), "trpo_ext: ", name, " must have shape (",
                        obs.size(1), "), got ", s->sizes());
    }
    TRPO_EXT_DISPATCH(x, normalize_rows_, x, obs_mean->contiguous(), obs_inv_std->contiguous(), obs_clip);
  }
  // A rollout step's few rows on the CPU: plain loops instead of a GEMM per layer (kernels.h).
  at::Tensor logits;
  if (x.is_cpu() && x.size(0) <= cpu::kSmallBatchRows && all_contiguous(params)) {
    logits = at::empty({x.size(0), shape.out_width}, x.options());
    cpu::mlp_forward_rows(x, params, shape.n_layers, act, logits);
  } else {
    logits = mlp_forward(x, params, shape.n_layers, act);
  }
  // A masked class's logit is kMaskedLogit: probability exactly 0, so it is never drawn nor the argmax.
  const at::Tensor out = apply_action_mask(logits, action_mask);
  const int64_t n = out.size(0);

  at::Tensor actions;
  if (k == MlpKind::Categorical) {
    // Each segment's class on its own, segment s in row s of `classes`.
    at::Tensor classes;  // (S, N)
    if (deterministic) {
      std::vector<at::Tensor> modes;
      for (int64_t s = 0; s < dist.count(); ++s) modes.push_back(dist.segment(out, s).argmax(-1));
      classes = at::stack(modes);
    } else {
      // Inverse-CDF sampling, the same per-row algorithm on every device (elementwise.h); without
      // segments u is the same draw as at::rand({N}).
      const at::Tensor u = at::rand({dist.count(), n}, generator, out.options());
      classes = at::empty({dist.count(), n}, out.options().dtype(at::kLong));
      for (int64_t s = 0; s < dist.count(); ++s) {
        at::Tensor drawn = classes[s];
        TRPO_EXT_DISPATCH(out, sample_categorical_, dist.segment(out, s).contiguous(), u[s], drawn);
      }
    }
    actions = dist.segmented ? classes.t().contiguous() : classes[0];
  } else if (k == MlpKind::Bernoulli) {
    // 0/1 in the logits' dtype: on when u < σ(x), or in the mode when x > 0 (σ(x) > 1/2).
    const at::Tensor on =
        deterministic ? out.gt(0) : at::rand(out.sizes(), generator, out.options()).lt(at::sigmoid(out));
    actions = on.to(out.scalar_type());
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
