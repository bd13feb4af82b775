#include "recurrent.h"

#include <string>

#include "kernels.h"

namespace trpo_ext {
namespace {

RnnCell parse_cell(c10::string_view cell) {
  if (cell == "lstm") return RnnCell::Lstm;
  if (cell == "gru") return RnnCell::Gru;
  TORCH_CHECK_VALUE(false, "trpo_ext: cell must be 'lstm' or 'gru', got '", std::string(cell), "'");
}

struct RnnShape {
  int64_t steps = 0, batch = 0, layers = 0, hidden = 0;
  int64_t numel = 0;  // the whole flat vector's length
  MlpShape head;
};

const char* const kRnnParamNames[] = {"weight_ih", "weight_hh", "bias_ih", "bias_hh"};

// Every check of rnn_fvp / rnn_cg's network arguments, before anything is computed (docs/design.md §2).
RnnShape check_rnn(const at::Tensor& obs, const at::Tensor& starts, at::TensorList initial_state,
                   at::TensorList params, RnnCell cell, MlpKind kind) {
  TORCH_CHECK_TYPE(obs.scalar_type() == at::kFloat || obs.scalar_type() == at::kDouble,
                   "trpo_ext: obs must be float32 or float64, got ", obs.scalar_type());
  TORCH_CHECK_VALUE(obs.dim() == 3 && obs.size(0) >= 1 && obs.size(1) >= 1,
                    "trpo_ext: obs must have shape (T, B, obs_dim) with T, B >= 1, got ", obs.sizes());
  RnnShape shape;
  shape.steps = obs.size(0), shape.batch = obs.size(1);
  const at::ScalarType dtype = obs.scalar_type();
  const at::Device device = obs.device();
  TORCH_CHECK_TYPE(starts.scalar_type() == at::kBool, "trpo_ext: episode_starts must be bool, got ",
                   starts.scalar_type());
  TORCH_CHECK_TYPE(starts.device() == device, "trpo_ext: episode_starts must be on obs's device ", device, ", got ",
                   starts.device());
  TORCH_CHECK_VALUE(starts.dim() == 2 && starts.size(0) == shape.steps && starts.size(1) == shape.batch,
                    "trpo_ext: episode_starts must have shape (", shape.steps, ", ", shape.batch, ") (T, B), got ",
                    starts.sizes());
  const size_t n_state = cell == RnnCell::Lstm ? 2 : 1;
  TORCH_CHECK_VALUE(initial_state.size() == n_state, "trpo_ext: initial_state must be ",
                    cell == RnnCell::Lstm ? "[h, c] for cell 'lstm'" : "[h] for cell 'gru'", ", got ",
                    initial_state.size(), " tensors");
  for (size_t i = 0; i < n_state; ++i) {
    const at::Tensor& s = initial_state[i];
    check_dtype_device(s, [&] { return c10::str("initial_state[", i, "]"); }, dtype, device, "obs's");
    TORCH_CHECK_VALUE(s.dim() == 3 && s.size(0) >= 1 && s.size(1) == shape.batch && s.size(2) >= 1 &&
                          s.sizes() == initial_state[0].sizes(),
                      "trpo_ext: initial_state[", i, "] must have shape (layers, ", shape.batch,
                      ", hidden) with layers, hidden >= 1", i > 0 ? ", as initial_state[0]" : "", ", got ", s.sizes());
  }
  shape.layers = initial_state[0].size(0), shape.hidden = initial_state[0].size(2);
  const int64_t L = shape.layers, H = shape.hidden, G = (cell == RnnCell::Lstm ? 4 : 3) * H;
  const int64_t extra = kind == MlpKind::Gaussian ? 1 : 0;
  const int64_t n_params = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(n_params >= 4 * L + 2 + extra && (n_params - 4 * L - extra) % 2 == 0,
                    "trpo_ext: params must be [weight_ih, weight_hh, bias_ih, bias_hh] for each of the ", L,
                    " recurrent layers (initial_state's first dimension), then the head's [W1, b1, ..., WL, bL]",
                    extra ? " and log_std" : "", ", got ", n_params, " tensors");
  int64_t width = obs.size(2);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t expected[4][2] = {{G, width}, {G, H}, {G, -1}, {G, -1}};
    for (int64_t i = 0; i < 4; ++i) {
      const at::Tensor& p = params[4 * l + i];
      auto name = [&] { return c10::str("params[", 4 * l + i, "] (", kRnnParamNames[i], " of recurrent layer ", l, ")"); };
      check_dtype_device(p, name, dtype, device, "obs's");
      const bool ok = expected[i][1] < 0 ? p.dim() == 1 && p.size(0) == G
                                         : p.dim() == 2 && p.size(0) == G && p.size(1) == expected[i][1];
      TORCH_CHECK_VALUE(ok, "trpo_ext: ", name(), " must have shape (", G,
                        expected[i][1] < 0 ? std::string() : c10::str(", ", expected[i][1]), ") for a ",
                        cell == RnnCell::Lstm ? "LSTM" : "GRU", " of ", H, " units, got ", p.sizes());
      shape.numel += p.numel();
    }
    width = H;
  }
  shape.head = check_mlp(at::empty({1, H}, obs.options()), params.slice(4 * L), kind, ObsRule::Match, 4 * L);
  shape.numel += shape.head.numel;
  return shape;
}

RnnCache build_rnn_cache(const at::Tensor& rows, const at::Tensor& starts, at::TensorList initial_state,
                         at::TensorList params, const RnnShape& shape, RnnCell cell, const ActionDist& dist,
                         Activation act, const std::optional<at::Tensor>& action_mask, double mean_over,
                         GroupSum group_sum) {
  RnnCache c;
  c.cell = cell;
  c.group_sum = std::move(group_sum);
  const int64_t T = shape.steps, B = shape.batch, H = shape.hidden, L = shape.layers;
  const int64_t G = (cell == RnnCell::Lstm ? 4 : 3) * H;
  c.steps = T, c.batch = B, c.hidden = H, c.gate_width = G;
  const at::TensorOptions opts = rows.options();
  c.keep = at::ones({T + 1, B}, opts);
  c.keep.narrow(0, 0, T).copy_(starts.logical_not());
  at::Tensor x = rows;
  int64_t offset = 0;
  for (int64_t k = 0; k < L; ++k) {
    RnnLayerCache layer;
    layer.W_ih = params[4 * k].contiguous(), layer.W_hh = params[4 * k + 1].contiguous();
    layer.W_ih_t = layer.W_ih.t(), layer.W_hh_t = layer.W_hh.t();
    const at::Tensor &b_ih = params[4 * k + 2], &b_hh = params[4 * k + 3];
    layer.input = x;
    layer.offset = offset;
    offset += layer.W_ih.numel() + layer.W_hh.numel() + 2 * G;
    layer.outputs = at::empty({T * B, H}, opts);
    layer.h_prev = at::empty({(T + 1) * B, H}, opts);
    layer.h_prev_steps = layer.h_prev.narrow(0, 0, T * B);
    const at::Tensor keep0 = c.keep[0].unsqueeze(1);
    at::Tensor h0 = layer.h_prev.narrow(0, 0, B);
    at::mul_out(h0, initial_state[0].select(0, k), keep0);
    if (cell == RnnCell::Lstm) {
      layer.c_prev = at::empty({(T + 1) * B, H}, opts);
      at::Tensor c0 = layer.c_prev.narrow(0, 0, B);
      at::mul_out(c0, initial_state[1].select(0, k), keep0);
      layer.tanh_c = at::empty({T * B, H}, opts);
      layer.gates = at::addmm(b_ih + b_hh, x, layer.W_ih_t);  // every step's input projection in one GEMM
      for (int64_t t = 0; t < T; ++t) {
        layer.gates.narrow(0, t * B, B).addmm_(layer.h_prev.narrow(0, t * B, B), layer.W_hh_t);
        TRPO_EXT_DISPATCH(x, lstm_step_, layer.gates, layer.h_prev, layer.c_prev, layer.tanh_c, layer.outputs, c.keep,
                          t);
      }
      layer.bias_dot = at::empty({G}, opts);
    } else {
      const at::Tensor x_proj = at::addmm(b_ih, x, layer.W_ih_t);
      layer.h_proj = at::empty({T * B, G}, opts);
      layer.gates = at::empty({T * B, G}, opts);
      for (int64_t t = 0; t < T; ++t) {
        at::Tensor h_proj_t = layer.h_proj.narrow(0, t * B, B);
        at::addmm_out(h_proj_t, b_hh, layer.h_prev.narrow(0, t * B, B), layer.W_hh_t);
        TRPO_EXT_DISPATCH(x, gru_step_, x_proj, layer.h_proj, layer.gates, layer.h_prev, layer.outputs, c.keep, t);
      }
      layer.ah = at::empty({T * B, G}, opts);
      for (int64_t t = 0; t < T; ++t) layer.ah_steps.push_back(layer.ah.narrow(0, t * B, B));
    }
    layer.a = at::empty({T * B, G}, opts);
    for (int64_t t = 0; t < T; ++t) layer.a_steps.push_back(layer.a.narrow(0, t * B, B));
    layer.tangent = at::empty({T * B, H}, opts);
    x = layer.outputs;
    c.layers.push_back(std::move(layer));
  }
  c.numel = offset;
  c.head_numel = shape.head.numel;
  // The head averages over mean_over states (all ranks' rows); its products are summed with the RNN's here.
  c.head = build_mlp_cache(x, params.slice(4 * L), dist, act, action_mask, false, mean_over);
  // The head's input is the last layer's output: its tangent comes from the JVP through time, and
  // its cotangent goes back into the same buffer.
  c.head.input_tangent = c.head.input_cotangent = c.layers.back().tangent;
  c.h_state = at::empty({B, H}, opts);
  c.c_state = at::empty({B, H}, opts);
  c.ones = at::ones({T * B}, opts);
  return c;
}

// The tangent of every layer's outputs for the direction `dir`, forward in time, into layers[k].tangent.
void rnn_jvp(RnnCache& c, const RnnSlices& dir) {
  const int64_t T = c.steps;
  for (size_t k = 0; k < c.layers.size(); ++k) {
    RnnLayerCache& L = c.layers[k];
    // The terms that do not recur, for all steps at once: x Wdot_ih' + h_prev Wdot_hh' + bdot (+ xdot W_ih').
    if (c.cell == RnnCell::Lstm) {
      at::add_out(L.bias_dot, dir.b_ih[k], dir.b_hh[k]);
      at::addmm_out(L.a, L.bias_dot, L.input, dir.W_ih[k].t());
      L.a.addmm_(L.h_prev_steps, dir.W_hh[k].t());
      if (k > 0) L.a.addmm_(c.layers[k - 1].tangent, L.W_ih_t);
      c.h_state.zero_(), c.c_state.zero_();
      for (int64_t t = 0; t < T; ++t) {
        if (t > 0) L.a_steps[t].addmm_(c.h_state, L.W_hh_t);  // hdot_prev W_hh' (0 before step 0)
        TRPO_EXT_DISPATCH(L.a, lstm_jvp_step_, L.a, L.gates, L.c_prev, L.tanh_c, c.h_state, c.c_state, L.tangent,
                          c.keep, t);
      }
    } else {
      at::addmm_out(L.a, dir.b_ih[k], L.input, dir.W_ih[k].t());
      if (k > 0) L.a.addmm_(c.layers[k - 1].tangent, L.W_ih_t);
      at::addmm_out(L.ah, dir.b_hh[k], L.h_prev_steps, dir.W_hh[k].t());
      c.h_state.zero_();
      for (int64_t t = 0; t < T; ++t) {
        if (t > 0) L.ah_steps[t].addmm_(c.h_state, L.W_hh_t);
        TRPO_EXT_DISPATCH(L.a, gru_jvp_step_, L.a, L.ah, L.gates, L.h_proj, L.h_prev, c.h_state, L.tangent, c.keep, t);
      }
    }
  }
}

// Back through time from the cotangent of the last layer's outputs (in layers.back().tangent) into
// `grad`'s slices; each layer leaves its input's cotangent in the layer below's `tangent`.
void rnn_vjp(RnnCache& c, RnnSlices& grad) {
  const int64_t T = c.steps;
  for (int64_t k = static_cast<int64_t>(c.layers.size()) - 1; k >= 0; --k) {
    RnnLayerCache& L = c.layers[k];
    const at::Tensor& ah = c.cell == RnnCell::Lstm ? L.a : L.ah;  // the recurrent projection's cotangent
    c.h_state.zero_();
    if (c.cell == RnnCell::Lstm) {
      c.c_state.zero_();
      for (int64_t t = T - 1; t >= 0; --t) {
        TRPO_EXT_DISPATCH(L.a, lstm_vjp_step_, L.tangent, c.h_state, c.c_state, L.gates, L.c_prev, L.tanh_c, L.a,
                          c.keep, t);
        if (t > 0) at::mm_out(c.h_state, L.a_steps[t], L.W_hh);
      }
    } else {
      for (int64_t t = T - 1; t >= 0; --t) {
        TRPO_EXT_DISPATCH(L.a, gru_vjp_step_, L.tangent, c.h_state, L.gates, L.h_proj, L.h_prev, L.a, L.ah, c.keep, t);
        if (t > 0) c.h_state.addmm_(L.ah_steps[t], L.W_hh);
      }
    }
    // The weights' cotangents over all steps at once.
    at::mm_out(grad.W_ih[k], L.a.t(), L.input);
    at::mv_out(grad.b_ih[k], L.a.t(), c.ones);
    at::mm_out(grad.W_hh[k], ah.t(), L.h_prev_steps);
    at::mv_out(grad.b_hh[k], ah.t(), c.ones);
    if (k > 0) at::mm_out(c.layers[k - 1].tangent, L.a, L.W_ih);
  }
}

// What rnn_fvp and rnn_cg share: parsing, every check, and the forward pass.
RnnCache checked_cache(const at::Tensor& obs, const at::Tensor& starts, at::TensorList initial_state,
                       at::TensorList params, const at::Tensor& vector, bool rhs, c10::string_view cell,
                       c10::string_view kind, c10::string_view activation, at::OptionalIntArrayRef segments,
                       const std::optional<at::Tensor>& action_mask, double mean_over = 0,
                       std::optional<c10::string_view> group = std::nullopt) {
  const RnnCell c = parse_cell(cell);
  const MlpKind k = parse_kind(kind);
  const Activation act = parse_activation(activation);
  const RnnShape shape = check_rnn(obs, starts, initial_state, params, c, k);
  const ActionDist dist = parse_action_dist(k, segments, shape.head.out_width);
  if (rhs) {
    check_rhs(vector, "b", obs, shape.numel);
  } else {
    check_vector(vector, "v", obs, shape.numel);
  }
  const at::Tensor rows = obs.reshape({shape.steps * shape.batch, obs.size(2)}).contiguous();
  check_action_mask(action_mask, "action_mask", dist, rows, "obs (T·B rows)");
  TORCH_CHECK_VALUE(std::isfinite(mean_over) && mean_over >= 0, "trpo_ext: mean_over must be finite and >= 0, got ",
                    mean_over);
  return build_rnn_cache(rows, starts, initial_state, params, shape, c, dist, act, action_mask, mean_over,
                         GroupSum(group));
}

}  // namespace

RnnSlices& RnnCache::slices(const at::Tensor& flat) {
  for (auto& [key, n, views] : slice_cache) {
    if (key == flat.data_ptr() && n == flat.numel()) return views;
  }
  RnnSlices views;
  for (const RnnLayerCache& L : layers) {
    const int64_t G = L.W_ih.size(0);
    int64_t at = L.offset;
    views.W_ih.push_back(flat.narrow(0, at, L.W_ih.numel()).view(L.W_ih.sizes()));
    at += L.W_ih.numel();
    views.W_hh.push_back(flat.narrow(0, at, L.W_hh.numel()).view(L.W_hh.sizes()));
    at += L.W_hh.numel();
    views.b_ih.push_back(flat.narrow(0, at, G));
    views.b_hh.push_back(flat.narrow(0, at + G, G));
  }
  slice_cache.emplace_back(flat.data_ptr(), flat.numel(), std::move(views));
  return std::get<2>(slice_cache.back());
}

void rnn_fvp_into(RnnCache& c, const at::Tensor& v, at::Tensor& out, double damping) {
  rnn_jvp(c, c.slices(v));
  // The head's JVP from the RNN's output tangent, its output Fisher and VJP (fisher.cpp), on the
  // flat vectors' suffix: its slices and the log_std block (state-independent: never summed over ranks).
  const at::Tensor v_head = v.narrow(0, c.numel, c.head_numel);
  at::Tensor out_head = out.narrow(0, c.numel, c.head_numel);
  mlp_fvp_into(c.head, v_head, out_head, 0.0);
  rnn_vjp(c, c.slices(out));
  if (c.group_sum.active()) {  // the RNN's and the head network's slices: one reduction
    at::Tensor network = out.narrow(0, 0, c.numel + c.head.offsets.back());
    c.group_sum(network);
  }
  if (damping != 0.0) out.add_(v, damping);
}

at::Tensor rnn_fvp(const at::Tensor& obs, const at::Tensor& episode_starts, at::TensorList initial_state,
                   at::TensorList params, const at::Tensor& v, c10::string_view cell, c10::string_view kind,
                   c10::string_view activation, double damping, at::OptionalIntArrayRef segments,
                   const std::optional<at::Tensor>& action_mask) {
  check_damping(damping);
  RnnCache cache = checked_cache(obs, episode_starts, initial_state, params, v, false, cell, kind, activation,
                                 segments, action_mask);
  at::Tensor out = at::empty_like(v, at::MemoryFormat::Contiguous);
  rnn_fvp_into(cache, v.contiguous(), out, damping);
  return out;
}

CgResult rnn_cg(const at::Tensor& obs, const at::Tensor& episode_starts, at::TensorList initial_state,
                at::TensorList params, const at::Tensor& b, c10::string_view cell, c10::string_view kind,
                c10::string_view activation, double damping, int64_t iters, double rtol,
                at::OptionalIntArrayRef segments, const std::optional<at::Tensor>& action_mask, double mean_over,
                std::optional<c10::string_view> group) {
  check_cg_settings(damping, iters, rtol);
  RnnCache cache = checked_cache(obs, episode_starts, initial_state, params, b, true, cell, kind, activation,
                                 segments, action_mask, mean_over, group);
  auto product = [&](const at::Tensor& v, at::Tensor& out) { rnn_fvp_into(cache, v, out, damping); };
  if (b.dim() == 1) return cg_solve_with(product, b, iters, rtol);
  std::vector<at::Tensor> xs, used, residual, xAx;
  for (int64_t col = 0; col < b.size(1); ++col) {
    auto [x, n, r, e] = cg_solve_with(product, b.select(1, col), iters, rtol);
    xs.push_back(x), used.push_back(n), residual.push_back(r), xAx.push_back(e);
  }
  return {at::stack(xs, 1), at::stack(used), at::stack(residual), at::stack(xAx)};
}

}  // namespace trpo_ext
