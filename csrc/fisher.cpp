#include "fisher.h"

#include <cmath>
#include <string>

#include "kernels.h"

namespace trpo_ext {
namespace {

// p'Ap <= kBreakdownEps * p'p ends the solve: the direction has no usable curvature.
constexpr double kBreakdownEps = 1e-20;

// The most CG iterations a solve may be asked for: trpo_ext.config.MAX_ITERATIONS, the bound of
// cg_iters on the Python side (tests/test_errors.py checks that the two agree).
constexpr int64_t kMaxCgIters = 10000;

at::Tensor flat_view(const at::Tensor& flat, int64_t offset, at::IntArrayRef shape) {
  return flat.narrow(0, offset, c10::multiply_integers(shape)).view(shape);
}

}  // namespace

void check_vector(const at::Tensor& v, const char* name, const at::Tensor& obs, int64_t numel) {
  check_dtype_device(v, name, obs.scalar_type(), obs.device(), "obs's");
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == numel, "trpo_ext: ", name,
                    " must be a flat vector of length ", numel, " (the parameter count), got shape ",
                    v.sizes());
}

// b: a flat vector of the parameter count, or (numel, C) columns with C >= 1.
void check_rhs(const at::Tensor& b, const char* name, const at::Tensor& obs, int64_t numel) {
  check_dtype_device(b, name, obs.scalar_type(), obs.device(), "obs's");
  TORCH_CHECK_VALUE((b.dim() == 1 && b.size(0) == numel) || (b.dim() == 2 && b.size(0) == numel && b.size(1) >= 1),
                    "trpo_ext: ", name, " must be a flat vector of length ", numel, " (the parameter count) or a (",
                    numel, ", C) matrix of C >= 1 such columns, got shape ", b.sizes());
}

void check_damping(double damping) {
  TORCH_CHECK_VALUE(std::isfinite(damping) && damping >= 0, "trpo_ext: damping must be finite and >= 0, got ",
                    damping);
}

void check_cg_settings(double damping, int64_t iters, double rtol) {
  check_damping(damping);
  TORCH_CHECK_VALUE(iters >= 1 && iters <= kMaxCgIters, "trpo_ext: iters must be >= 1 and <= ", kMaxCgIters,
                    ", got ", iters);
  TORCH_CHECK_VALUE(std::isfinite(rtol) && rtol >= 0, "trpo_ext: rtol must be finite and >= 0, got ", rtol);
}

MlpCache build_mlp_cache(const at::Tensor& obs, at::TensorList params, const ActionDist& dist, Activation act,
                         const std::optional<at::Tensor>& action_mask, bool with_outputs, double mean_over,
                         GroupSum group_sum) {
  MlpCache c;
  c.dist = dist;
  const MlpKind kind = dist.kind;
  c.batch = obs.size(0);
  c.mean_over = mean_over > 0 ? mean_over : static_cast<double>(c.batch);
  c.group_sum = std::move(group_sum);
  const int64_t n_layers = (static_cast<int64_t>(params.size()) - (kind == MlpKind::Gaussian)) / 2;
  // The Gaussian FVP needs no mean, only the output layer's input.
  const at::Tensor out = apply_action_mask(
      mlp_forward(obs.contiguous(), params, n_layers, act, &c.inputs, &c.act_grad,
                  /*with_output=*/with_outputs || kind != MlpKind::Gaussian),
      action_mask);
  if (with_outputs) c.outputs = out;
  int64_t offset = 0;
  for (int64_t l = 0; l < n_layers; ++l) {
    const at::Tensor W = params[2 * l].contiguous();
    c.weights.push_back(W);
    c.offsets.push_back(offset);
    offset += W.numel();
    c.offsets.push_back(offset);
    offset += W.size(0);  // the bias
    // The output layer's tangent is kept feature-major, (K, N): with K small, MKL runs its GEMMs
    // about twice as fast in that orientation as (N, K).
    c.tangents.push_back(l + 1 < n_layers ? at::empty({c.batch, W.size(0)}, obs.options())
                                          : at::empty({W.size(0), c.batch}, obs.options()));
  }
  c.offsets.push_back(offset);
  // Transposed views, made once per solve rather than once per product.
  for (int64_t l = 0; l < n_layers; ++l) {
    c.weights_t.push_back(c.weights[l].t());
    c.tangents_t.push_back(c.tangents[l].t());
  }
  c.inputs_t_last = c.inputs.back().t();
  if (kind == MlpKind::Categorical) {
    for (int64_t s = 0; s < dist.count(); ++s) {
      c.probs.push_back(at::softmax(dist.segment(out, s), 1).contiguous());
      c.out_segments_t.push_back(dist.segment(c.tangents_t.back(), s));
    }
  } else if (kind == MlpKind::Bernoulli) {
    c.out_scale = (at::sigmoid(out) * at::sigmoid(-out)).div_(c.mean_over).t().contiguous();
  } else {
    c.out_scale = (at::exp(params.back() * -2.0) / c.mean_over).unsqueeze(1);
  }
  c.ones = at::ones({c.batch}, obs.options());
  return c;
}

FlatSlices& MlpCache::slices(const at::Tensor& flat) {
  // A solve passes the same few buffers (p, Ap, g) again and again: their views are made once. A
  // cached view keeps its storage alive, so a new tensor can never reuse a cached address.
  for (auto& [key, numel, views] : slice_cache) {
    if (key == flat.data_ptr() && numel == flat.numel()) return views;
  }
  FlatSlices views;
  const int64_t n_layers = static_cast<int64_t>(weights.size());
  for (int64_t l = 0; l < n_layers; ++l) {
    const at::Tensor& W = weights[l];
    views.W.push_back(flat_view(flat, offsets[2 * l], W.sizes()));
    views.b.push_back(flat_view(flat, offsets[2 * l + 1], {W.size(0)}));
  }
  views.b_column = views.b.back().unsqueeze(1);
  if (dist.kind == MlpKind::Gaussian) views.log_std = flat.narrow(0, offsets.back(), out_scale.size(0));
  slice_cache.emplace_back(flat.data_ptr(), flat.numel(), std::move(views));
  return std::get<2>(slice_cache.back());
}

void mlp_fvp_into(MlpCache& c, const at::Tensor& v, at::Tensor& out, double damping) {
  const int64_t last = static_cast<int64_t>(c.weights.size()) - 1;
  const FlatSlices& dir = c.slices(v);
  // JVP: tangent_l = h_l Wdot_l' + hdot_l W_l' + bdot_l, times act'(z_l) on hidden layers.
  for (int64_t l = 0; l < last; ++l) {
    at::Tensor& t = c.tangents[l];
    at::addmm_out(t, dir.b[l], c.inputs[l], dir.W[l].t());
    if (l > 0) t.addmm_(c.tangents[l - 1], c.weights_t[l]);
    if (l == 0 && c.input_tangent.defined()) t.addmm_(c.input_tangent, c.weights_t[0]);
    t.mul_(c.act_grad[l]);
  }
  // The output layer, feature-major: u' = Wdot_L h_L' + W_L hdot_L' + bdot_L.
  at::Tensor& u_t = c.tangents[last];
  at::addmm_out(u_t, dir.b_column, dir.W[last], c.inputs_t_last);
  if (last > 0) u_t.addmm_(c.weights[last], c.tangents_t[last - 1]);
  if (last == 0 && c.input_tangent.defined()) u_t.addmm_(c.weights[0], c.input_tangent.t());
  // Output Fisher, divided by N. Categorical: block diagonal, each segment's diag(p) - p p' on its
  // own columns (a masked class has p = 0: its row and column of the block are 0). Gaussian and
  // bernoulli: diagonal.
  if (c.dist.kind == MlpKind::Categorical) {
    for (size_t s = 0; s < c.probs.size(); ++s) {
      TRPO_EXT_DISPATCH(u_t, categorical_fisher_, c.probs[s], c.out_segments_t[s], 1.0 / c.mean_over);
    }
  } else {
    u_t.mul_(c.out_scale);
  }
  mlp_vjp_into(c, out);
  if (c.group_sum.active()) {
    // The network's slices are the prefix of the vector; log_std's block below needs no states.
    at::Tensor network = out.narrow(0, 0, c.offsets.back());
    c.group_sum(network);
  }
  if (c.dist.kind == MlpKind::Gaussian) {
    // log_std is state-independent: its block of F is exactly 2 I.
    at::mul_out(c.slices(out).log_std, dir.log_std, 2.0);
  }
  if (damping != 0.0) out.add_(v, damping);
}

void mlp_vjp_into(MlpCache& c, at::Tensor& out) {
  const int64_t last = static_cast<int64_t>(c.weights.size()) - 1;
  FlatSlices& grad = c.slices(out);
  // Straight into the output vector's slices; the tangents are reused as cotangents.
  for (int64_t l = last; l >= 0; --l) {
    // g_l' (K, N) for the output layer, g_l (N, out) below it.
    const at::Tensor& g_t = l == last ? c.tangents[l] : c.tangents_t[l];
    at::mm_out(grad.W[l], g_t, c.inputs[l]);
    at::mv_out(grad.b[l], g_t, c.ones);
    if (l > 0) {
      at::Tensor& g_prev = c.tangents[l - 1];
      at::mm_out(g_prev, l == last ? c.tangents_t[l] : c.tangents[l], c.weights[l]);
      g_prev.mul_(c.act_grad[l - 1]);
    } else if (c.input_cotangent.defined()) {
      at::mm_out(c.input_cotangent, l == last ? c.tangents_t[l] : c.tangents[l], c.weights[l]);
    }
  }
}

namespace {

// The block layout's index and views for C columns (MlpCache's multi-column fields). Each layer's
// weight tangent is stored (out, C, in) and its bias (out, C): read as (out·C, in) and (out·C),
// row o·C + c is column c's row o, which makes every product below one GEMM with a feature-major
// (out, C, N) result. log_std's C slices are (C, K).
void ensure_columns(MlpCache& c, int64_t columns) {
  if (c.columns == columns) return;
  const bool gaussian = c.dist.kind == MlpKind::Gaussian;
  const int64_t n_layers = static_cast<int64_t>(c.weights.size());
  const int64_t k = gaussian ? c.out_scale.size(0) : 0;
  const int64_t numel = c.offsets.back() + k;
  // Built on the device with ATen calls (no host copy: a CUDA graph may be capturing the solve).
  const at::TensorOptions opts = c.inputs[0].options(), longs = opts.dtype(at::kLong);
  const at::Tensor column_base = at::arange(columns, longs).mul_(numel);  // (C): where each column starts
  std::vector<at::Tensor> parts;
  for (int64_t l = 0; l < n_layers; ++l) {
    const int64_t out = c.weights[l].size(0), in = c.weights[l].size(1);
    const at::Tensor rows = at::arange(out, longs).view({out, 1, 1});
    parts.push_back((column_base.view({1, columns, 1}) + rows * in + at::arange(in, longs).view({1, 1, in}))
                        .add_(c.offsets[2 * l]).view(-1));
    parts.push_back((column_base.view({1, columns}) + rows.view({out, 1})).add_(c.offsets[2 * l + 1]).view(-1));
  }
  if (gaussian) {
    parts.push_back((column_base.view({columns, 1}) + at::arange(k, longs).view({1, k})).add_(c.offsets.back())
                        .view(-1));
  }
  c.block_index = at::cat(parts);
  c.v_block = at::empty({columns * numel}, opts);
  c.out_block = at::empty({columns * numel}, opts);
  c.column_tangents.clear();
  c.column_act_grad.clear();
  c.inputs_t.clear();
  c.W_dot.clear(), c.b_dot.clear(), c.W_bar.clear(), c.b_bar.clear();
  for (int64_t l = 0; l < n_layers; ++l) {
    const int64_t out = c.weights[l].size(0), in = c.weights[l].size(1);
    c.column_tangents.push_back(at::empty({out * columns, c.batch}, opts));
    c.inputs_t.push_back(c.inputs[l].t());
    // act'(z_l) feature-major, (out, 1, N): broadcast over the columns with N contiguous.
    if (l + 1 < n_layers) c.column_act_grad.push_back(c.act_grad[l].t().contiguous().unsqueeze(1));
    c.W_dot.push_back(c.v_block.narrow(0, columns * c.offsets[2 * l], columns * out * in).view({out * columns, in}));
    c.b_dot.push_back(c.v_block.narrow(0, columns * c.offsets[2 * l + 1], columns * out).unsqueeze(1));
    c.W_bar.push_back(c.out_block.narrow(0, columns * c.offsets[2 * l], columns * out * in).view({out * columns, in}));
    c.b_bar.push_back(c.out_block.narrow(0, columns * c.offsets[2 * l + 1], columns * out));
  }
  if (gaussian) {
    c.log_std_dot = c.v_block.narrow(0, columns * c.offsets.back(), columns * k);
    c.log_std_bar = c.out_block.narrow(0, columns * c.offsets.back(), columns * k);
  }
  c.columns = columns;
}

}  // namespace

void mlp_fvp_columns_into(MlpCache& c, const at::Tensor& v, at::Tensor& out, double damping) {
  TORCH_CHECK(!c.input_tangent.defined(), "trpo_ext: mlp_fvp_columns_into has no input tangent (a head's products "
              "are one column at a time)");
  const int64_t columns = v.size(0), n = c.batch;
  ensure_columns(c, columns);
  at::index_select_out(c.v_block, v.view(-1), 0, c.block_index);
  const int64_t last = static_cast<int64_t>(c.weights.size()) - 1;
  // JVP, all columns at once and feature-major, tangent_l (out, C, N):
  //   [Wdot_l rows] h_l' + bdot_l (one GEMM), + W_l hdot_l read as (in, C·N) (one GEMM), times act'(z_l).
  for (int64_t l = 0; l <= last; ++l) {
    at::Tensor& t = c.column_tangents[l];
    const int64_t out_l = c.weights[l].size(0), in_l = c.weights[l].size(1);
    at::addmm_out(t, c.b_dot[l], c.W_dot[l], c.inputs_t[l]);
    if (l > 0) {
      t.view({out_l, columns * n}).addmm_(c.weights[l], c.column_tangents[l - 1].view({in_l, columns * n}));
    }
    if (l < last) t.view({out_l, columns, n}).mul_(c.column_act_grad[l]);
  }
  // The output Fisher on each column's (K, N) block, divided by N (as mlp_fvp_into).
  at::Tensor u = c.column_tangents[last].view({-1, columns, n});  // (K, C, N)
  if (c.dist.kind == MlpKind::Categorical) {
    for (int64_t col = 0; col < columns; ++col) {
      const at::Tensor u_col = u.select(1, col).t();  // (N, K), strided
      for (size_t s = 0; s < c.probs.size(); ++s) {
        at::Tensor block = c.dist.segment(u_col, static_cast<int64_t>(s));
        TRPO_EXT_DISPATCH(u, categorical_fisher_, c.probs[s], block, 1.0 / c.mean_over);
      }
    }
  } else {
    u.mul_(c.out_scale.unsqueeze(1));  // gaussian (K, 1, 1), bernoulli (K, 1, N)
  }
  // VJP, all columns at once: Wbar = G h_l (one GEMM into the (out·C, in) block), bbar = G 1,
  // G_{l-1} = W_l' G read as (out, C·N) (one GEMM), times act'(z_{l-1}).
  for (int64_t l = last; l >= 0; --l) {
    const at::Tensor& g = c.column_tangents[l];
    const int64_t out_l = c.weights[l].size(0), in_l = c.weights[l].size(1);
    at::mm_out(c.W_bar[l], g, c.inputs[l]);
    at::mv_out(c.b_bar[l], g, c.ones);
    if (l > 0) {
      at::Tensor prev = c.column_tangents[l - 1].view({in_l, columns * n});
      at::mm_out(prev, c.weights_t[l], g.view({out_l, columns * n}));
      prev.view({in_l, columns, n}).mul_(c.column_act_grad[l - 1]);
    }
  }
  if (c.group_sum.active()) {
    at::Tensor network = c.out_block.narrow(0, 0, columns * c.offsets.back());
    c.group_sum(network);
  }
  if (c.dist.kind == MlpKind::Gaussian) at::mul_out(c.log_std_bar, c.log_std_dot, 2.0);
  out.view(-1).index_copy_(0, c.block_index, c.out_block);
  if (damping != 0.0) out.add_(v, damping);
}

at::Tensor mlp_fvp(const at::Tensor& obs, at::TensorList params, const at::Tensor& v,
                   c10::string_view kind, c10::string_view activation, double damping,
                   at::OptionalIntArrayRef segments, const std::optional<at::Tensor>& action_mask) {
  const MlpKind k = parse_kind(kind);
  const Activation act = parse_activation(activation);
  const MlpShape shape = check_mlp(obs, params, k, ObsRule::Match);
  const ActionDist dist = parse_action_dist(k, segments, shape.out_width);
  check_vector(v, "v", obs, shape.numel);
  check_damping(damping);
  check_action_mask(action_mask, "action_mask", dist, obs, "obs");
  MlpCache cache = build_mlp_cache(obs, params, dist, act, action_mask);
  at::Tensor out = at::empty_like(v, at::MemoryFormat::Contiguous);
  mlp_fvp_into(cache, v.contiguous(), out, damping);
  return out;
}

CgResult cg_solve_with(CgProduct product, const at::Tensor& b_in, int64_t iters, double rtol) {
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
    product(p, Ap);
    TRPO_EXT_DISPATCH(b, cg_dots, p, Ap, state);
    TRPO_EXT_DISPATCH(b, cg_update_, x, r, p, Ap, state, kBreakdownEps);
    TRPO_EXT_DISPATCH(b, cg_direction_, p, r, state);
  }
  // x'Ax = x'(b - r): the step size needs no extra FVP.
  at::Tensor xAx = TRPO_EXT_DISPATCH(b, dot64, x, at::sub_out(Ap, b, r));
  return {x, state[kIters].to(at::kLong), state[kRs].sqrt(), xAx};
}

CgResult cg_solve_cached(MlpCache& cache, const at::Tensor& b, double damping, int64_t iters, double rtol) {
  return cg_solve_with([&](const at::Tensor& v, at::Tensor& out) { mlp_fvp_into(cache, v, out, damping); }, b,
                       iters, rtol);
}

CgResult cg_solve_columns(MlpCache& cache, const at::Tensor& b_in, double damping, int64_t iters, double rtol) {
  const at::Tensor b = b_in.contiguous();
  const int64_t columns = b.size(0);
  at::Tensor x = at::zeros_like(b);
  at::Tensor r = b.clone();
  at::Tensor p = b.clone();
  at::Tensor Ap = at::empty_like(b);
  at::Tensor state = at::empty({columns, kStateSize}, b.options().dtype(at::kDouble));
  // Each column's rows and state, as the kernels take them (contiguous rows of the (C, ·) tensors).
  std::vector<at::Tensor> xs, rs, ps, Aps, states;
  for (int64_t col = 0; col < columns; ++col) {
    xs.push_back(x[col]), rs.push_back(r[col]), ps.push_back(p[col]), Aps.push_back(Ap[col]);
    states.push_back(state[col]);
  }
  const bool host_loop = !b.is_cuda();
  const double* host_state = host_loop ? state.data_ptr<double>() : nullptr;
  auto any_active = [&] {
    for (int64_t col = 0; col < columns; ++col) {
      if (host_state[col * kStateSize + kActive] != 0.0) return true;
    }
    return false;
  };

  for (int64_t col = 0; col < columns; ++col) TRPO_EXT_DISPATCH(b, cg_start, b[col], states[col], rtol);
  for (int64_t i = 0; i < iters; ++i) {
    // As cg_solve_cached: the CPU stops once every column has; a GPU runs `iters` masked iterations.
    if (host_loop && !any_active()) break;
    mlp_fvp_columns_into(cache, p, Ap, damping);
    for (int64_t col = 0; col < columns; ++col) {
      TRPO_EXT_DISPATCH(b, cg_dots, ps[col], Aps[col], states[col]);
      TRPO_EXT_DISPATCH(b, cg_update_, xs[col], rs[col], ps[col], Aps[col], states[col], kBreakdownEps);
      TRPO_EXT_DISPATCH(b, cg_direction_, ps[col], rs[col], states[col]);
    }
  }
  at::sub_out(Ap, b, r);
  std::vector<at::Tensor> xAx;
  for (int64_t col = 0; col < columns; ++col) xAx.push_back(TRPO_EXT_DISPATCH(b, dot64, xs[col], Aps[col]));
  return {x, state.select(1, kIters).to(at::kLong), state.select(1, kRs).sqrt(), at::stack(xAx)};
}

CgResult mlp_cg(const at::Tensor& obs, at::TensorList params, const at::Tensor& b, c10::string_view kind,
                c10::string_view activation, double damping, int64_t iters, double rtol,
                at::OptionalIntArrayRef segments, const std::optional<at::Tensor>& action_mask) {
  const MlpKind k = parse_kind(kind);
  const Activation act = parse_activation(activation);
  const MlpShape shape = check_mlp(obs, params, k, ObsRule::Match);
  const ActionDist dist = parse_action_dist(k, segments, shape.out_width);
  check_rhs(b, "b", obs, shape.numel);
  check_cg_settings(damping, iters, rtol);
  check_action_mask(action_mask, "action_mask", dist, obs, "obs");
  MlpCache cache = build_mlp_cache(obs, params, dist, act, action_mask);
  if (b.dim() == 1) return cg_solve_cached(cache, b, damping, iters, rtol);
  auto [x, used, residual, xAx] = cg_solve_columns(cache, b.t(), damping, iters, rtol);
  return {x.t().contiguous(), used, residual, xAx};
}

}  // namespace trpo_ext
