// Fisher-vector products of MLP policies and the conjugate-gradient solve (docs/design.md), written once
// in ATen for every device: dense GEMMs go to MKL/oneDNN or cuBLAS, the fused kernels of kernels.h
// do what sits between them.
#pragma once

#include <ATen/ATen.h>

#include <c10/util/FunctionRef.h>

#include <deque>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "collective.h"
#include "distribution.h"
#include "mlp.h"

namespace trpo_ext {

// Views of a flat vector in parameters() order, one per parameter tensor.
struct FlatSlices {
  std::vector<at::Tensor> W, b;  // (out_l, in_l) and (out_l) per layer
  at::Tensor b_column;           // the output layer's bias as a (K, 1) column
  at::Tensor log_std;            // Gaussian only
};

// Everything an FVP needs that does not depend on the vector: computed once per solve.
struct MlpCache {
  ActionDist dist;  // the policy's kind (not Value) and a categorical's segments
  int64_t batch = 0;
  // The number of states the Fisher averages over: this batch's size, or with data-parallel ranks
  // the size of all their batches together (each rank's products are then partial sums).
  double mean_over = 0;
  GroupSum group_sum;  // sums each product over the ranks (a no-op in one process)
  std::vector<at::Tensor> weights;  // W_l, (out_l, in_l), contiguous
  std::vector<at::Tensor> inputs;   // h_l, the input of layer l (h_0 = obs)
  std::vector<at::Tensor> act_grad; // act'(z_l) for the hidden layers
  at::Tensor outputs;               // the output layer's result (masked logits or mean), (N, K), when asked for
  // Categorical: each segment's softmax of the (masked) logits, contiguous (N, K_s), as the Fisher
  // kernel wants it.
  std::vector<at::Tensor> probs;
  // The diagonal output Fisher divided by N: gaussian exp(-2 log_std), (K, 1); bernoulli
  // p (1 - p) = σ(x) σ(-x), (K, N) (that form stays accurate where σ saturates).
  at::Tensor out_scale;
  std::vector<int64_t> offsets;     // flat offsets: W_l at [2l], b_l at [2l+1], log_std at [2L]
  // Workspace reused by every product: per-layer tangents (JVP), then cotangents (VJP); (N, out_l)
  // for hidden layers, (K, N) for the output layer.
  std::vector<at::Tensor> tangents;
  at::Tensor ones;                  // (N), turns bias gradients into GEMVs
  std::vector<at::Tensor> weights_t, tangents_t;  // transposed views of weights and tangents
  std::vector<at::Tensor> out_segments_t;  // categorical: segment s of tangents_t.back(), (N, K_s) views
  at::Tensor inputs_t_last;         // the output layer's input, transposed
  // Keyed on the vector's address and length: views of one buffer at different offsets (a recurrent
  // policy's RNN prefix and head suffix, csrc/recurrent.cpp) or lengths never share an entry. A deque:
  // references stay valid as it grows.
  std::deque<std::tuple<const void*, int64_t, FlatSlices>> slice_cache;
  // A head on another network's features (csrc/recurrent.cpp), single-column products only. When
  // defined, input_tangent (N, in) is the tangent of the input h_0, added at layer 0 (hdot_0 W_0'), and
  // the VJP writes the input's cotangent (g_0 W_0, (N, in)) into input_cotangent. They may be one
  // tensor: the tangent is dead once the JVP has run. Undefined for an MLP policy (h_0 = obs is data).
  at::Tensor input_tangent, input_cotangent;
  // The multi-column products (mlp_fvp_columns_into), made on first use for `columns` columns. The
  // C columns of a (C, P) vector are gathered into a block layout in which each parameter's C
  // slices lie together (`block_index`: block position -> (C, P) position; a weight's as (out, C, in)),
  // so that a layer's weight tangents of all columns are one (out·C, in) matrix and each Jacobian
  // product of a layer is one GEMM for all columns. Tangents are feature-major (out_l·C, N).
  int64_t columns = 0;
  at::Tensor block_index, v_block, out_block;
  std::vector<at::Tensor> column_tangents;
  std::vector<at::Tensor> column_act_grad;  // act'(z_l) feature-major, (out_l, 1, N)
  std::vector<at::Tensor> inputs_t;         // h_l', (in_l, N) views
  std::vector<at::Tensor> W_dot, b_dot, W_bar, b_bar;  // views of v_block / out_block: (out·C, in), (out·C[, 1])
  at::Tensor log_std_dot, log_std_bar;                 // Gaussian: (C·K)

  // The views of `flat` (a contiguous vector of the parameter count), made on first use.
  FlatSlices& slices(const at::Tensor& flat);
};

// obs and params as check_mlp accepted them (obs contiguous or not), and action_mask as
// check_action_mask did (the logits are masked before anything reads them). `with_outputs` keeps the
// output layer's result in `outputs` (the Gaussian FVP does not need the mean, so it is skipped
// otherwise). `mean_over` > 0 and `group_sum` make the products data-parallel: each rank's product is
// its batch's sum divided by mean_over, summed over the ranks by group_sum.
MlpCache build_mlp_cache(const at::Tensor& obs, at::TensorList params, const ActionDist& dist, Activation act,
                         const std::optional<at::Tensor>& action_mask, bool with_outputs = false,
                         double mean_over = 0, GroupSum group_sum = GroupSum());

// out = (F + damping I) v, all flat; `out` must not alias `v`. One reduction when the cache has a group.
void mlp_fvp_into(MlpCache& cache, const at::Tensor& v, at::Tensor& out, double damping);

// out = (F + damping I) v for C vectors at once: v and out (C, P), contiguous, not aliased. One
// GEMM per Jacobian product and layer for all C columns; one reduction when the cache has a group.
void mlp_fvp_columns_into(MlpCache& cache, const at::Tensor& v, at::Tensor& out, double damping);

// The VJP of the output cotangent held in cache.tangents.back() ((K, N)) into out's network slices
// (everything but log_std); the other tangents are overwritten.
void mlp_vjp_into(MlpCache& cache, at::Tensor& out);

// (x, iterations (int64), residual norm (float64), x'(F + damping I)x (float64)).
using CgResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// out = A v for flat vectors (out not aliasing v): the product a CG solve runs on.
using CgProduct = c10::function_ref<void(const at::Tensor& v, at::Tensor& out)>;

// The checks of a flat vector v (length numel, obs's dtype and device), of a right-hand side b (the
// same, or (numel, C) columns with C >= 1) and of damping (finite, >= 0), naming the argument.
void check_vector(const at::Tensor& v, const char* name, const at::Tensor& obs, int64_t numel);
void check_rhs(const at::Tensor& b, const char* name, const at::Tensor& obs, int64_t numel);
void check_damping(double damping);

// ValueError unless damping is finite and >= 0, 1 <= iters <= kMaxCgIters (fisher.cpp) and rtol finite and >= 0.
void check_cg_settings(double damping, int64_t iters, double rtol);

// CG on A x = b (b flat) with `product` computing A p: the loop of every one-column solve (§3), its
// kernels and state slots. The settings already checked.
CgResult cg_solve_with(CgProduct product, const at::Tensor& b, int64_t iters, double rtol);

// CG on (F + damping I) x = b with the cache's products; the settings already checked.
CgResult cg_solve_cached(MlpCache& cache, const at::Tensor& b, double damping, int64_t iters, double rtol);

// C independent CG solves, one per row of b (C, P), sharing each product (mlp_fvp_columns_into):
// (x (C, P), iterations (C), residual norms (C), x'Ax (C)). Each column runs the recursion of
// cg_solve_cached with its own state; a column that has converged or broken down is frozen while
// the others go on.
CgResult cg_solve_columns(MlpCache& cache, const at::Tensor& b, double damping, int64_t iters, double rtol);

// `segments` and `action_mask` (categorical only) as distribution.h describes them.
at::Tensor mlp_fvp(const at::Tensor& obs, at::TensorList params, const at::Tensor& v,
                   c10::string_view kind, c10::string_view activation, double damping,
                   at::OptionalIntArrayRef segments, const std::optional<at::Tensor>& action_mask);

// b: a flat vector (P), or C right-hand sides as the columns of a (P, C) matrix, solved together
// (cg_solve_columns): x (P, C) and the scalars (C).
CgResult mlp_cg(const at::Tensor& obs, at::TensorList params, const at::Tensor& b, c10::string_view kind,
                c10::string_view activation, double damping, int64_t iters, double rtol,
                at::OptionalIntArrayRef segments, const std::optional<at::Tensor>& action_mask);

}  // namespace trpo_ext
