// Fisher-vector products of MLP policies and the conjugate-gradient solve (DESIGN §2), written once
// in ATen for every device: dense GEMMs go to MKL/oneDNN or cuBLAS, the fused kernels of kernels.h
// do what sits between them.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "mlp.h"

namespace trpo_ext {

// Everything an FVP needs that does not depend on the vector: computed once per solve.
struct MlpCache {
  MlpKind kind;  // Categorical or Gaussian
  int64_t batch = 0;
  std::vector<at::Tensor> weights;  // W_l, (out_l, in_l), contiguous
  std::vector<at::Tensor> inputs;   // h_l, the input of layer l (h_0 = obs)
  std::vector<at::Tensor> act_grad; // act'(z_l) for the hidden layers
  at::Tensor probs;                 // categorical: softmax(logits), (N, K)
  at::Tensor out_scale;             // Gaussian: exp(-2 log_std) / N, (K, 1)
  std::vector<int64_t> offsets;     // flat offsets: W_l at [2l], b_l at [2l+1], log_std at [2L]
  // Workspace reused by every product: per-layer tangents (JVP), then cotangents (VJP); (N, out_l)
  // for hidden layers, (K, N) for the output layer.
  std::vector<at::Tensor> tangents;
  at::Tensor ones;                  // (N), turns bias gradients into GEMVs
};

// obs and params as check_mlp accepted them (obs contiguous or not).
MlpCache build_mlp_cache(const at::Tensor& obs, at::TensorList params, MlpKind kind, Activation act);

// out = (F + damping I) v, all flat; `out` must not alias `v`.
void mlp_fvp_into(MlpCache& cache, const at::Tensor& v, at::Tensor& out, double damping);

at::Tensor mlp_fvp(const at::Tensor& obs, at::TensorList params, const at::Tensor& v,
                   c10::string_view kind, c10::string_view activation, double damping);

// Returns (x, iterations (int64), residual norm (float64), x'(F + damping I)x (float64)).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_cg(
    const at::Tensor& obs, at::TensorList params, const at::Tensor& b, c10::string_view kind,
    c10::string_view activation, double damping, int64_t iters, double rtol);

}  // namespace trpo_ext
