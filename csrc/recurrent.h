// Fisher-vector products through time for a recurrent policy (trpo_ext.recurrent.RecurrentPolicy):
// a stack of nn.LSTM / nn.GRU layers, the MLP head of fisher.h on the last layer's outputs, the
// action distribution (docs/design.md §12). Written once in ATen for every device, like fisher.cpp:
// the GEMMs over all steps go to MKL / cuBLAS, one GEMM and one fused step kernel (kernels.h) per
// step and layer carry the recursion.
#pragma once

#include <ATen/ATen.h>

#include <deque>
#include <optional>
#include <tuple>
#include <vector>

#include "fisher.h"

namespace trpo_ext {

enum class RnnCell { Lstm, Gru };

// One layer's forward pass, kept for every product of a solve, and its workspace. T·B rows, time-major.
struct RnnLayerCache {
  at::Tensor W_ih, W_hh, W_ih_t, W_hh_t;  // contiguous (G, D), (G, H), and transposed views
  at::Tensor input;   // (T·B, D): the observations, or the previous layer's outputs
  at::Tensor outputs; // (T·B, H): h_t
  at::Tensor h_prev, c_prev;  // ((T+1)·B, H): block t the state before step t after its reset (c: LSTM)
  at::Tensor h_prev_steps;    // the first T blocks of h_prev, (T·B, H)
  at::Tensor gates;   // (T·B, G) activations: i, f, g, o (LSTM) or r, z, n (GRU)
  at::Tensor tanh_c;  // LSTM: tanh(c_t), (T·B, H)
  at::Tensor h_proj;  // GRU: h_prev W_hh' + b_hh, (T·B, 3H)
  // Workspace: the gates' (LSTM) or the input projection's (GRU) pre-activation tangents, then their
  // cotangents, (T·B, G); GRU also the recurrent projection's (ah). `tangent`: the outputs' tangent
  // (T·B, H), then their cotangent.
  at::Tensor a, ah, tangent;
  std::vector<at::Tensor> a_steps, ah_steps;  // block t of a and ah, (B, G) views
  at::Tensor bias_dot;  // LSTM: bdot_ih + bdot_hh, (G)
  int64_t offset = 0;   // where weight_ih starts in the flat vector
};

// Views of a flat vector's RNN part: per layer weight_ih, weight_hh, bias_ih, bias_hh.
struct RnnSlices {
  std::vector<at::Tensor> W_ih, W_hh, b_ih, b_hh;
};

struct RnnCache {
  RnnCell cell;
  int64_t steps = 0, batch = 0, hidden = 0, gate_width = 0;
  int64_t numel = 0;      // the RNN's parameters (the flat vector's prefix)
  int64_t head_numel = 0; // the head's (and log_std's): the suffix
  at::Tensor keep;        // ((T+1), B) of the dtype: 0 where a step starts an episode, row T 1
  std::vector<RnnLayerCache> layers;
  at::Tensor h_state, c_state;  // (B, H): the step-to-step carry of a tangent or cotangent
  at::Tensor ones;              // (T·B): bias gradients as GEMVs
  MlpCache head;                // on the last layer's outputs; its input tangent / cotangent is layers.back().tangent
  GroupSum group_sum;           // data-parallel: sums each product's network slices over the ranks
  std::deque<std::tuple<const void*, int64_t, RnnSlices>> slice_cache;  // keyed as MlpCache's

  RnnSlices& slices(const at::Tensor& flat);
};

// out = (F + damping I) v, flat in parameters() order; `out` must not alias `v`.
void rnn_fvp_into(RnnCache& cache, const at::Tensor& v, at::Tensor& out, double damping);

// obs (T, B, D) float; episode_starts (T, B) bool; initial_state [h] (GRU) or [h, c] (LSTM), each
// (L, B, H); params: per layer weight_ih, weight_hh, bias_ih, bias_hh, then the head's W1, b1, ...,
// WL, bL, then log_std (gaussian); action_mask (T·B, K), rows time-major.
at::Tensor rnn_fvp(const at::Tensor& obs, const at::Tensor& episode_starts, at::TensorList initial_state,
                   at::TensorList params, const at::Tensor& v, c10::string_view cell, c10::string_view kind,
                   c10::string_view activation, double damping, at::OptionalIntArrayRef segments,
                   const std::optional<at::Tensor>& action_mask);

// CG on (F + damping I) x = b, the loop of cg_solve_with on one forward pass. b flat (P), or (P, C):
// C solves one after the other on the same forward pass (x (P, C), the scalars (C)). Data-parallel
// (as mlp_cg's direction): `mean_over` > 0 the states of all ranks together, `group` the process group
// whose ranks' products are summed (one reduction per product).
CgResult rnn_cg(const at::Tensor& obs, const at::Tensor& episode_starts, at::TensorList initial_state,
                at::TensorList params, const at::Tensor& b, c10::string_view cell, c10::string_view kind,
                c10::string_view activation, double damping, int64_t iters, double rtol,
                at::OptionalIntArrayRef segments, const std::optional<at::Tensor>& action_mask, double mean_over = 0,
                std::optional<c10::string_view> group = std::nullopt);

}  // namespace trpo_ext
