// Fused element-wise kernels that sit between the GEMMs of the FVP and the CG loop, and those of
// rollout inference. Each has a CPU loop (csrc/cpu/kernels.cpp) and a CUDA kernel
// (csrc/cuda/kernels.cu) with the same contract, both built on the formulas of elementwise.h;
// `TRPO_EXT_DISPATCH` picks by the device of the first tensor, so the orchestration in fisher.cpp,
// act.cpp and critic.cpp never branches on the device. Tensors are contiguous unless said otherwise.
#pragma once

#include <ATen/ATen.h>

#include "elementwise.h"
#include "mlp.h"

namespace trpo_ext {

#define TRPO_EXT_DECLARE_KERNELS                                                                  \
  /* h = act(z) in place of z; d = act'(z) unless d is undefined. */                              \
  void activation_forward_(at::Tensor& z, at::Tensor& d, Activation act);                        \
  /* Categorical output Fisher, row by row, in place: u <- scale * (p*u - p (p'u)), in the form  */ \
  /* of elementwise.h that stays accurate when a probability rounds to 1. p is a                */ \
  /* contiguous (N, K); u is (N, K) with any strides (fisher.cpp passes a transposed view).     */ \
  void categorical_fisher_(const at::Tensor& p, at::Tensor& u, double scale);                    \
  /* Zeroes the state, then rs = b'b, tol2 = rtol^2 rs, active = rs > tol2. */                    \
  void cg_start(const at::Tensor& b, at::Tensor& state, double rtol);                            \
  /* pAp = p'Ap, pp = p'p (float64 accumulation). */                                               \
  void cg_dots(const at::Tensor& p, const at::Tensor& Ap, at::Tensor& state);                    \
  /* If active and pAp > eps pp: x += a p, r -= a Ap (a = rs / pAp), then the scalar update;    */ \
  /* otherwise the solve is frozen (active = 0) and x, r are untouched.                        */ \
  void cg_update_(at::Tensor& x, at::Tensor& r, const at::Tensor& p, const at::Tensor& Ap,       \
                  at::Tensor& state, double eps);                                                \
  /* If still active: p = r + beta p. */                                                           \
  void cg_direction_(at::Tensor& p, const at::Tensor& r, const at::Tensor& state);               \
  /* a'b accumulated in float64, as a 0-dim float64 tensor on the inputs' device. */              \
  at::Tensor dot64(const at::Tensor& a, const at::Tensor& b);                                    \
  /* x (N, D) <- clamp((x - mean) * inv_std, -clip, clip), mean and inv_std (D). */                \
  void normalize_rows_(at::Tensor& x, const at::Tensor& mean, const at::Tensor& inv_std, double clip); \
  /* actions[i] (int64) = the inverse-CDF sample of softmax(logits[i]) at u[i] (logits (N, K),   */ \
  /* K >= 1, u (N) in [0, 1) of logits' dtype). */                                                   \
  void sample_categorical_(const at::Tensor& logits, const at::Tensor& u, at::Tensor& actions);   \
  /* noise (N, K) <- mean + exp(log_std) * noise, mean (N, K), log_std (K). */                      \
  void sample_gaussian_(const at::Tensor& mean, const at::Tensor& log_std, at::Tensor& noise);    \
  TRPO_EXT_DECLARE_RECURRENT_KERNELS

// Step t of a recurrent layer (csrc/recurrent.cpp, elementwise.h's cell formulas), over B rows of H
// units. Tensors of T steps are time-major ((T·B, width), block t = rows [t·B, (t+1)·B)); keep is
// ((T + 1), B) of the dtype, 0 where step t starts an episode (row T: 1); h_prev and c_prev are
// ((T + 1)·B, H), block t the state before step t after its reset. A (B, H) *_state carries a
// tangent or cotangent from one step to the next.
#define TRPO_EXT_DECLARE_RECURRENT_KERNELS                                                            \
  /* LSTM forward: gates[t] pre-activations -> activations; tanh_c[t], out[t] = h_t,              */ \
  /* h_prev[t+1] = keep[t+1] h_t, c_prev[t+1] = keep[t+1] c_t.                                     */ \
  void lstm_step_(at::Tensor& gates, at::Tensor& h_prev, at::Tensor& c_prev, at::Tensor& tanh_c,    \
                  at::Tensor& out, const at::Tensor& keep, int64_t t);                               \
  /* GRU forward from the projections x_proj[t], h_proj[t] (3H wide): gates[t] = r, z, n,          */ \
  /* out[t] = h_t, h_prev[t+1] = keep[t+1] h_t.                                                     */ \
  void gru_step_(const at::Tensor& x_proj, const at::Tensor& h_proj, at::Tensor& gates,            \
                 at::Tensor& h_prev, at::Tensor& out, const at::Tensor& keep, int64_t t);            \
  /* LSTM tangent from a[t] (the gates' pre-activation tangents, recurrent term included):       */ \
  /* c_state: the tangent of c_prev[t] in, keep[t+1] c_dot_t out; h_state = keep[t+1] h_dot_t;   */ \
  /* h_dot[t] = h_dot_t.                                                                           */ \
  void lstm_jvp_step_(const at::Tensor& a, const at::Tensor& gates, const at::Tensor& c_prev,       \
                      const at::Tensor& tanh_c, at::Tensor& h_state, at::Tensor& c_state,           \
                      at::Tensor& h_dot, const at::Tensor& keep, int64_t t);                        \
  /* GRU tangent from ax[t], ah[t] (the projections' tangents, ah's recurrent term included):     */ \
  /* h_state: the tangent of h_prev[t] in, keep[t+1] h_dot_t out; h_dot[t] = h_dot_t.              */ \
  void gru_jvp_step_(const at::Tensor& ax, const at::Tensor& ah, const at::Tensor& gates,          \
                     const at::Tensor& h_proj, const at::Tensor& h_prev, at::Tensor& h_state,       \
                     at::Tensor& h_dot, const at::Tensor& keep, int64_t t);                         \
  /* LSTM cotangent: h_bar = g_out[t] + keep[t+1] h_state (h_state: h_prev[t+1]'s cotangent);    */ \
  /* c_state: c_t's cotangent from step t+1 in, keep[t] (c_prev[t]'s cotangent) out; a_bar[t]    */ \
  /* receives the gates' pre-activation cotangents.                                                */ \
  void lstm_vjp_step_(const at::Tensor& g_out, const at::Tensor& h_state, at::Tensor& c_state,     \
                      const at::Tensor& gates, const at::Tensor& c_prev, const at::Tensor& tanh_c,  \
                      at::Tensor& a_bar, const at::Tensor& keep, int64_t t);                        \
  /* GRU cotangent: h_bar = g_out[t] + keep[t+1] h_state; ax_bar[t], ah_bar[t] receive the        */ \
  /* projections' cotangents and h_state = z h_bar (recurrent.cpp adds ah_bar[t] W_hh).           */ \
  void gru_vjp_step_(const at::Tensor& g_out, at::Tensor& h_state, const at::Tensor& gates,        \
                     const at::Tensor& h_proj, const at::Tensor& h_prev, at::Tensor& ax_bar,       \
                     at::Tensor& ah_bar, const at::Tensor& keep, int64_t t);

namespace cpu {
TRPO_EXT_DECLARE_KERNELS

/* CPU only: the MLP's forward pass for a few rows as plain loops, out (N, out width) <- the last
   layer of x (N, obs_dim, contiguous); params contiguous, of x's dtype. mlp_act takes it up to
   kSmallBatchRows rows, a rollout step's: between env steps the caches are cold and each ATen call
   of the GEMM path costs several times what it does in a warm loop (8 Hopper envs: a rollout 5 ms,
   2%, shorter; 16 envs 2 ms; 1 env 3 ms, 6%). At 32 rows the GEMMs were faster again. */
constexpr int64_t kSmallBatchRows = 16;
void mlp_forward_rows(const at::Tensor& x, at::TensorList params, int64_t n_layers, Activation act, at::Tensor& out);
}  // namespace cpu

#ifdef WITH_CUDA
namespace cuda {
TRPO_EXT_DECLARE_KERNELS
}  // namespace cuda
#define TRPO_EXT_DISPATCH(tensor, fn, ...) \
  ((tensor).is_cuda() ? cuda::fn(__VA_ARGS__) : cpu::fn(__VA_ARGS__))
#else
#define TRPO_EXT_DISPATCH(tensor, fn, ...) cpu::fn(__VA_ARGS__)
#endif

}  // namespace trpo_ext
