// Fused element-wise kernels that sit between the GEMMs of the FVP and the CG loop.
// Each has a CPU and a CUDA implementation with the same contract; `TRPO_EXT_DISPATCH` picks by
// the device of the first tensor, so the orchestration in fisher.cpp never branches on the device.
#pragma once

#include <ATen/ATen.h>

namespace trpo_ext {

enum class Activation { Tanh, Relu };

// Slots of the CG state: a float64 tensor of kStateSize values on the solve's device. Keeping the
// scalars on the device lets the CUDA loop run without host reads (and be captured in a graph).
enum StateSlot : int64_t {
  kRs = 0,      // r'r
  kPAp = 1,     // p'Ap of this iteration
  kPP = 2,      // p'p of this iteration
  kRsNew = 3,   // r'r after this iteration's update
  kTol2 = 4,    // rtol^2 b'b
  kActive = 5,  // 1 while iterating, 0 once converged or broken down
  kIters = 6,   // iterations taken
  kBeta = 7,    // r'r_new / r'r, for the next direction
  kStateSize = 8
};

#define TRPO_EXT_DECLARE_KERNELS                                                                  \
  /* h = act(z) in place of z, d = act'(z). */                                                     \
  void activation_forward_(at::Tensor& z, at::Tensor& d, Activation act);                        \
  /* Categorical output Fisher, row by row, in place: u <- scale * (p*u - p (p'u)). p is a       */ \
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
  at::Tensor dot64(const at::Tensor& a, const at::Tensor& b);

namespace cpu {
TRPO_EXT_DECLARE_KERNELS
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
