#include "mlp.h"

#include "kernels.h"

namespace trpo_ext {
namespace {

std::string activation_list() {
  std::string out;
  for (const char* name : kActivationNames) {
    if (!out.empty()) out += ", ";
    out += "'";
    out += name;
    out += "'";
  }
  return out;
}

const char* kind_params(MlpKind kind) {
  return kind == MlpKind::Gaussian ? "[W1, b1, ..., WL, bL, log_std]" : "[W1, b1, ..., WL, bL]";
}

}  // namespace

Activation parse_activation(c10::string_view activation) {
  for (size_t i = 0; i < std::size(kActivationNames); ++i) {
    if (activation == kActivationNames[i]) return static_cast<Activation>(i);
  }
  TORCH_CHECK_VALUE(false, "trpo_ext: activation must be one of ", activation_list(), ", got '",
                    std::string(activation), "'");
}

MlpKind parse_kind(c10::string_view kind) {
  if (kind == "categorical") return MlpKind::Categorical;
  if (kind == "gaussian") return MlpKind::Gaussian;
  if (kind == "bernoulli") return MlpKind::Bernoulli;
  TORCH_CHECK_VALUE(false, "trpo_ext: kind must be 'categorical', 'gaussian' or 'bernoulli', got '",
                    std::string(kind), "'");
}

std::string param_name(int64_t index, int64_t n_layers, int64_t first) {
  if (index >= 2 * n_layers) return c10::str("params[", first + index, "] (log_std)");
  return c10::str("params[", first + index, "] (", index % 2 ? "bias" : "weight", first > 0 ? " of head layer " : " of layer ",
                  index / 2, ")");
}

MlpShape check_mlp(const at::Tensor& obs, at::TensorList params, MlpKind kind, ObsRule rule, int64_t first) {
  const int64_t extra = kind == MlpKind::Gaussian ? 1 : 0;
  const int64_t n_params = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(n_params >= 2 + extra && (n_params - extra) % 2 == 0, "trpo_ext: params must be ",
                    kind_params(kind), ", got ", n_params, " tensors");
  MlpShape shape;
  shape.n_layers = (n_params - extra) / 2;
  const char* like;
  if (rule == ObsRule::Match) {
    TORCH_CHECK_TYPE(obs.scalar_type() == at::kFloat || obs.scalar_type() == at::kDouble,
                     "trpo_ext: obs must be float32 or float64, got ", obs.scalar_type());
    shape.dtype = obs.scalar_type();
    like = "obs's";
  } else {
    TORCH_CHECK_TYPE(!at::isComplexType(obs.scalar_type()), "trpo_ext: obs must be a real tensor (floating point, "
                     "integer or bool; it is converted to the weights' dtype), got ", obs.scalar_type());
    shape.dtype = params[0].scalar_type();
    TORCH_CHECK_TYPE(shape.dtype == at::kFloat || shape.dtype == at::kDouble, "trpo_ext: ", param_name(0, shape.n_layers, first),
                     " must be float32 or float64, got ", shape.dtype);
    like = "params[0]'s";
  }
  TORCH_CHECK_VALUE(obs.dim() == 2, "trpo_ext: obs must have shape (N, obs_dim), got ", obs.sizes());
  TORCH_CHECK_VALUE(rule == ObsRule::Convert || obs.size(0) > 0, "trpo_ext: obs is an empty batch (N = 0)");
  const at::Device device = obs.device();
  int64_t width = obs.size(1);
  for (int64_t l = 0; l < shape.n_layers; ++l) {
    const at::Tensor& W = params[2 * l];
    const at::Tensor& b = params[2 * l + 1];
    check_dtype_device(W, [&] { return param_name(2 * l, shape.n_layers, first); }, shape.dtype, device, like);
    check_dtype_device(b, [&] { return param_name(2 * l + 1, shape.n_layers, first); }, shape.dtype, device, like);
    TORCH_CHECK_VALUE(W.dim() == 2 && W.size(1) == width, "trpo_ext: ", param_name(2 * l, shape.n_layers, first),
                      " must have shape (out, ", width, "), got ", W.sizes());
    TORCH_CHECK_VALUE(W.size(0) > 0, "trpo_ext: ", param_name(2 * l, shape.n_layers, first),
                      " has 0 output units (shape ", W.sizes(), "): every layer needs at least one");
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == W.size(0), "trpo_ext: ", param_name(2 * l + 1, shape.n_layers, first),
                      " must have shape (", W.size(0), "), got ", b.sizes());
    width = W.size(0);
    shape.numel += W.numel() + b.numel();
  }
  if (kind == MlpKind::Gaussian) {
    const at::Tensor& log_std = params[n_params - 1];
    check_dtype_device(log_std, [&] { return param_name(n_params - 1, shape.n_layers, first); }, shape.dtype, device, like);
    TORCH_CHECK_VALUE(log_std.dim() == 1 && log_std.size(0) == width, "trpo_ext: ",
                      param_name(n_params - 1, shape.n_layers, first), " must have shape (", width, "), got ",
                      log_std.sizes());
    shape.numel += width;
  } else if (kind == MlpKind::Value) {
    TORCH_CHECK_VALUE(width == 1, "trpo_ext: the critic's last layer must have one output, got ", width, " (",
                      param_name(2 * shape.n_layers - 2, shape.n_layers, first), ")");
  }
  shape.out_width = width;
  return shape;
}

at::Tensor mlp_forward(const at::Tensor& x, at::TensorList params, int64_t n_layers, Activation act,
                       std::vector<at::Tensor>* inputs, std::vector<at::Tensor>* act_grads, bool with_output) {
  if (inputs) inputs->clear();
  if (act_grads) act_grads->clear();
  at::Tensor h = x;
  for (int64_t l = 0; l < n_layers; ++l) {
    if (inputs) inputs->push_back(h);
    if (l + 1 == n_layers && !with_output) return at::Tensor();
    at::Tensor z = at::addmm(params[2 * l + 1], h, params[2 * l].t());
    if (l + 1 < n_layers) {
      at::Tensor d = act_grads ? at::empty_like(z) : at::Tensor();
      TRPO_EXT_DISPATCH(z, activation_forward_, z, d, act);
      if (act_grads) act_grads->push_back(std::move(d));
    }
    h = std::move(z);
  }
  return h;
}

}  // namespace trpo_ext
