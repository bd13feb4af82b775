#include "fisher.h"

#include <cmath>
#include <string>

namespace trpo_ext {
namespace {

// p'Ap <= kBreakdownEps * p'p ends the solve: the direction has no usable curvature.
constexpr double kBreakdownEps = 1e-20;

PolicyKind parse_kind(c10::string_view kind) {
  if (kind == "categorical") return PolicyKind::Categorical;
  if (kind == "gaussian") return PolicyKind::Gaussian;
  TORCH_CHECK_VALUE(false, "trpo_ext: kind must be 'categorical' or 'gaussian', got '",
                    std::string(kind), "'");
}

Activation parse_activation(c10::string_view activation) {
  if (activation == "tanh") return Activation::Tanh;
  if (activation == "relu") return Activation::Relu;
  TORCH_CHECK_VALUE(false, "trpo_ext: activation must be 'tanh' or 'relu', got '",
                    std::string(activation), "'");
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& obs) {
  TORCH_CHECK_TYPE(t.scalar_type() == obs.scalar_type(), "trpo_ext: ", name, " must have obs's dtype ",
                   obs.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == obs.device(), "trpo_ext: ", name, " must be on obs's device ",
                    obs.device(), ", got ", t.device());
}

// Checks obs and the parameter list against each other; returns the number of parameters.
int64_t check_mlp(const at::Tensor& obs, at::TensorList params, PolicyKind kind) {
  TORCH_CHECK_TYPE(obs.scalar_type() == at::kFloat || obs.scalar_type() == at::kDouble,
                   "trpo_ext: obs must be float32 or float64, got ", obs.scalar_type());
  TORCH_CHECK_VALUE(obs.dim() == 2, "trpo_ext: obs must have shape (N, obs_dim), got ", obs.sizes());
  TORCH_CHECK_VALUE(obs.size(0) > 0, "trpo_ext: obs is an empty batch (N = 0)");
  const int64_t extra = kind == PolicyKind::Gaussian ? 1 : 0;
  const int64_t n_params = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(n_params >= 2 + extra && (n_params - extra) % 2 == 0,
                    "trpo_ext: params must be [W1, b1, ..., WL, bL", extra ? ", log_std" : "",
                    "], got ", n_params, " tensors");
  int64_t width = obs.size(1), numel = 0;
  for (int64_t l = 0; l < (n_params - extra) / 2; ++l) {
    const at::Tensor& W = params[2 * l];
    const at::Tensor& b = params[2 * l + 1];
    check_like(W, "params (a weight)", obs);
    check_like(b, "params (a bias)", obs);
    TORCH_CHECK_VALUE(W.dim() == 2 && W.size(1) == width, "trpo_ext: params[", 2 * l,
                      "] (weight of layer ", l, ") must have shape (out, ", width, "), got ", W.sizes());
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == W.size(0), "trpo_ext: params[", 2 * l + 1,
                      "] (bias of layer ", l, ") must have shape (", W.size(0), "), got ", b.sizes());
    width = W.size(0);
    numel += W.numel() + b.numel();
  }
  if (extra) {
    const at::Tensor& log_std = params[n_params - 1];
    check_like(log_std, "params (log_std)", obs);
    TORCH_CHECK_VALUE(log_std.dim() == 1 && log_std.size(0) == width,
                      "trpo_ext: params[-1] (log_std) must have shape (", width, "), got ", log_std.sizes());
    numel += width;
  }
  return numel;
}

void check_vector(const at::Tensor& v, const char* name, const at::Tensor& obs, int64_t numel) {
  check_like(v, name, obs);
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == numel, "trpo_ext: ", name,
                    " must be a flat vector of length ", numel, " (the parameter count), got shape ",
                    v.sizes());
}

void check_damping(double damping) {
  TORCH_CHECK_VALUE(std::isfinite(damping) && damping >= 0, "trpo_ext: damping must be finite and >= 0, got ",
                    damping);
}

at::Tensor flat_view(const at::Tensor& flat, int64_t offset, at::IntArrayRef shape) {
  return flat.narrow(0, offset, c10::multiply_integers(shape)).view(shape);
}

}  // namespace

MlpCache build_mlp_cache(const at::Tensor& obs, at::TensorList params, PolicyKind kind,
                         Activation act) {
  MlpCache c;
  c.kind = kind;
  c.batch = obs.size(0);
  const int64_t n_layers = (static_cast<int64_t>(params.size()) - (kind == PolicyKind::Gaussian)) / 2;
  int64_t offset = 0;
  at::Tensor h = obs.contiguous();
  for (int64_t l = 0; l < n_layers; ++l) {
    const at::Tensor W = params[2 * l].contiguous();
    const at::Tensor& b = params[2 * l + 1];
    c.weights.push_back(W);
    c.inputs.push_back(h);
    c.offsets.push_back(offset);
    offset += W.numel();
    c.offsets.push_back(offset);
    offset += b.numel();
    // The output layer's tangent is kept feature-major, (K, N): with K small, MKL runs its GEMMs
    // about twice as fast in that orientation as (N, K).
    c.tangents.push_back(l + 1 < n_layers ? at::empty({c.batch, W.size(0)}, obs.options())
                                          : at::empty({W.size(0), c.batch}, obs.options()));
    if (l + 1 < n_layers) {
      at::Tensor z = at::addmm(b, h, W.t());
      at::Tensor d = at::empty_like(z);
      TRPO_EXT_DISPATCH(z, activation_forward_, z, d, act);
      c.act_grad.push_back(d);
      h = z;
    } else if (kind == PolicyKind::Categorical) {
      c.probs = at::softmax(at::addmm(b, h, W.t()), 1);
    }
  }
  c.offsets.push_back(offset);
  if (kind == PolicyKind::Gaussian) {
    c.out_scale = (at::exp(params.back() * -2.0) / static_cast<double>(c.batch)).unsqueeze(1);
  }
  c.ones = at::ones({c.batch}, obs.options());
  return c;
}

void mlp_fvp_into(MlpCache& c, const at::Tensor& v, at::Tensor& out, double damping) {
  const int64_t n_layers = static_cast<int64_t>(c.weights.size());
  const int64_t last = n_layers - 1;
  // JVP: tangent_l = h_l Wdot_l' + hdot_l W_l' + bdot_l, times act'(z_l) on hidden layers.
  for (int64_t l = 0; l < last; ++l) {
    const at::Tensor& W = c.weights[l];
    at::Tensor& t = c.tangents[l];
    at::addmm_out(t, flat_view(v, c.offsets[2 * l + 1], {W.size(0)}), c.inputs[l],
                  flat_view(v, c.offsets[2 * l], W.sizes()).t());
    if (l > 0) t.addmm_(c.tangents[l - 1], W.t());
    t.mul_(c.act_grad[l]);
  }
  // The output layer, feature-major: u' = Wdot_L h_L' + W_L hdot_L' + bdot_L.
  const at::Tensor& W_out = c.weights[last];
  at::Tensor& u_t = c.tangents[last];
  at::addmm_out(u_t, flat_view(v, c.offsets[2 * last + 1], {W_out.size(0), 1}),
                flat_view(v, c.offsets[2 * last], W_out.sizes()), c.inputs[last].t());
  if (last > 0) u_t.addmm_(W_out, c.tangents[last - 1].t());
  // Output Fisher, divided by N.
  if (c.kind == PolicyKind::Categorical) {
    at::Tensor u = u_t.t();  // (N, K) view
    TRPO_EXT_DISPATCH(u, categorical_fisher_, c.probs, u, 1.0 / static_cast<double>(c.batch));
  } else {
    u_t.mul_(c.out_scale);
  }
  // VJP, straight into the output vector's slices.
  for (int64_t l = last; l >= 0; --l) {
    const at::Tensor& W = c.weights[l];
    // g_l' (K, N) for the output layer, g_l (N, out) below it.
    const at::Tensor g_t = l == last ? c.tangents[l] : c.tangents[l].t();
    at::Tensor out_W = flat_view(out, c.offsets[2 * l], W.sizes());
    at::Tensor out_b = flat_view(out, c.offsets[2 * l + 1], {W.size(0)});
    at::mm_out(out_W, g_t, c.inputs[l]);
    at::mv_out(out_b, g_t, c.ones);
    if (l > 0) {
      at::Tensor& g_prev = c.tangents[l - 1];
      at::mm_out(g_prev, g_t.t(), W);
      g_prev.mul_(c.act_grad[l - 1]);
    }
  }
  if (c.kind == PolicyKind::Gaussian) {
    // log_std is state-independent: its block of F is exactly 2 I.
    const int64_t k = c.out_scale.size(0);
    out.narrow(0, c.offsets.back(), k).copy_(v.narrow(0, c.offsets.back(), k)).mul_(2.0);
  }
  if (damping != 0.0) out.add_(v, damping);
}

at::Tensor mlp_fvp(const at::Tensor& obs, at::TensorList params, const at::Tensor& v,
                   c10::string_view kind, c10::string_view activation, double damping) {
  const PolicyKind k = parse_kind(kind);
  const Activation act = parse_activation(activation);
  check_vector(v, "v", obs, check_mlp(obs, params, k));
  check_damping(damping);
  MlpCache cache = build_mlp_cache(obs, params, k, act);
  at::Tensor out = at::empty_like(v, at::MemoryFormat::Contiguous);
  mlp_fvp_into(cache, v.contiguous(), out, damping);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_cg(
    const at::Tensor& obs, at::TensorList params, const at::Tensor& b_in, c10::string_view kind,
    c10::string_view activation, double damping, int64_t iters, double rtol) {
  const PolicyKind k = parse_kind(kind);
  const Activation act = parse_activation(activation);
  check_vector(b_in, "b", obs, check_mlp(obs, params, k));
  check_damping(damping);
  TORCH_CHECK_VALUE(iters >= 1, "trpo_ext: iters must be >= 1, got ", iters);
  TORCH_CHECK_VALUE(std::isfinite(rtol) && rtol >= 0, "trpo_ext: rtol must be finite and >= 0, got ", rtol);

  MlpCache cache = build_mlp_cache(obs, params, k, act);
  // The workspace of the solve, made once: nothing below allocates inside the loop.
  const at::Tensor b = b_in.contiguous();
  at::Tensor x = at::zeros_like(b);
  at::Tensor r = b.clone();
  at::Tensor p = b.clone();
  at::Tensor Ap = at::empty_like(b);
  at::Tensor state = at::empty({kStateSize}, b.options().dtype(at::kDouble));
  const bool host_loop = !b.is_cuda();
  const double* host_state = host_loop ? state.data_ptr<double>() : nullptr;

  TRPO_EXT_DISPATCH(b, cg_start, b, state, rtol);
  for (int64_t i = 0; i < iters; ++i) {
    // On the CPU reading the state is free, so a converged solve stops early; on a GPU the loop
    // runs to `iters` with frozen (masked) updates and never waits for the host.
    if (host_loop && host_state[kActive] == 0.0) break;
    mlp_fvp_into(cache, p, Ap, damping);
    TRPO_EXT_DISPATCH(b, cg_dots, p, Ap, state);
    TRPO_EXT_DISPATCH(b, cg_update_, x, r, p, Ap, state, kBreakdownEps);
    TRPO_EXT_DISPATCH(b, cg_direction_, p, r, state);
  }
  // x'Ax = x'(b - r): the step size needs no extra FVP.
  at::Tensor xAx = TRPO_EXT_DISPATCH(b, dot64, x, at::sub_out(Ap, b, r));
  return {x, state[kIters].to(at::kLong), state[kRs].sqrt(), xAx};
}

}  // namespace trpo_ext
