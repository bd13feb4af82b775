// Every element-wise formula that sits between the GEMMs, written once as host+device inline
// functions: csrc/cpu/kernels.cpp calls them from at::parallel_for loops and csrc/cuda/kernels.cu
// from its kernels, so the CPU tests exercise the arithmetic the GPU runs. No ATen here: this
// header only needs c10's macros, and nvcc compiles it for the device.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace trpo_ext {

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

namespace ew {

// The C math functions, by precision, on host and device.
C10_HOST_DEVICE inline float exp_of(float v) { return expf(v); }
C10_HOST_DEVICE inline double exp_of(double v) { return exp(v); }
C10_HOST_DEVICE inline float expm1_of(float v) { return expm1f(v); }
C10_HOST_DEVICE inline double expm1_of(double v) { return expm1(v); }
C10_HOST_DEVICE inline float tanh_of(float v) { return tanhf(v); }
C10_HOST_DEVICE inline double tanh_of(double v) { return tanh(v); }

// ---- Hidden-layer activations ------------------------------------------------------------------
// Each is a struct with value(z) = act(z) and grad(h) = act'(z) written in terms of h = act(z):
// the FVP's forward keeps act'(z) next to h, and the critic's backward (which only keeps h) uses the
// same definition. Adding an activation: one struct here and one line in TRPO_EXT_ACTIVATIONS below
// (mlp.h builds the enum, the name table and the dispatch from that list); in Python, one entry in
// trpo_ext/policies.py's ACTIVATIONS.

struct TanhAct {
  template <typename T>
  C10_HOST_DEVICE static T value(T z) { return tanh_of(z); }
  template <typename T>
  C10_HOST_DEVICE static T grad(T h) { return T(1) - h * h; }
};

struct ReluAct {
  // z < 0 rather than z > 0 so that a NaN passes through, as with torch.relu.
  template <typename T>
  C10_HOST_DEVICE static T value(T z) { return z < T(0) ? T(0) : z; }
  template <typename T>
  C10_HOST_DEVICE static T grad(T h) { return h > T(0) ? T(1) : T(0); }
};

// torch.nn.ELU() (alpha = 1): z for z > 0, else exp(z) - 1; act'(z) = 1 for z > 0, else exp(z) = h + 1
// (h > 0 exactly when z > 0).
struct EluAct {
  template <typename T>
  C10_HOST_DEVICE static T value(T z) { return z > T(0) ? z : expm1_of(z); }
  template <typename T>
  C10_HOST_DEVICE static T grad(T h) { return h > T(0) ? T(1) : h + T(1); }
};

}  // namespace ew

// X(enumerator, name, struct): the one list of activations. mlp.h expands it into
// `enum class Activation`, the names that parse_activation accepts and visit_activation.
#define TRPO_EXT_ACTIVATIONS(X) \
  X(Tanh, "tanh", TanhAct)      \
  X(Relu, "relu", ReluAct)      \
  X(Elu, "elu", EluAct)

namespace ew {

// ---- Categorical output Fisher -------------------------------------------------------------------
// One row, in place: u_j <- scale * p_j (u_j - p'u). p is contiguous, u has stride `su` between
// classes (fisher.cpp passes a transposed view).
//
// Not as p_j (u_j - p'u) with p'u summed directly: when a probability rounds to 1 (saturated
// logits), u_j* - p'u cancels to rounding and the dominant term of the product is lost (70% relative
// error at logits (50, 0, 0), tests/test_numerics.py). Since sum p = 1,
// u_j - p'u = (u_j - u_j*) + d*,  d* = sum_{k != j*} p_k (u_j* - u_k),
// with j* the argmax of p: d* sums only the small probabilities, so it is accurate, and every class
// costs O(1) after it. d* also sums the term j = j*, an exact 0 for finite u, which keeps the loop
// branch-free; with the running maximum in a register, the row costs 1.0-1.5x the direct formula's
// time on the CPU (measured alone, K = 2..18). A NaN in p or u still reaches u.
template <typename T>
C10_HOST_DEVICE inline void categorical_fisher_row(const T* p, T* u, int64_t k, int64_t su, T scale) {
  int64_t top = 0;
  T p_top = p[0];
  for (int64_t j = 1; j < k; ++j) {
    const bool larger = p[j] > p_top;
    top = larger ? j : top;
    p_top = larger ? p[j] : p_top;
  }
  const T u_top = u[top * su];
  T d = 0;
  for (int64_t j = 0; j < k; ++j) d += p[j] * (u_top - u[j * su]);
  for (int64_t j = 0; j < k; ++j) u[j * su] = scale * p[j] * ((u[j * su] - u_top) + d);
}

// ---- Conjugate gradient ---------------------------------------------------------------------------

// After cg_start's r'r = b'b: the tolerance and whether to iterate at all.
C10_HOST_DEVICE inline void cg_start_scalars(double* s, double rtol) {
  s[kTol2] = rtol * rtol * s[kRs];
  s[kActive] = s[kRs] > s[kTol2] ? 1.0 : 0.0;
}

// Whether this iteration takes its step: active and p'Ap > eps p'p. A NaN in p'Ap fails the test
// too, so a poisoned direction never reaches x.
C10_HOST_DEVICE inline bool cg_step_ok(const double* s, double eps) {
  return s[kActive] != 0.0 && s[kPAp] > eps * s[kPP];
}

// One element of the step x += a p, r -= a Ap; returns the new r_i^2 (float64) for r'r.
template <typename T>
C10_HOST_DEVICE inline double cg_step(T& x, T& r, T p, T Ap, T a) {
  x += a * p;
  const T ri = r - a * Ap;
  r = ri;
  return double(ri) * double(ri);
}

// The scalar half of an iteration, once r'r_new is in s[kRsNew]. `step_ok` is cg_step_ok before the
// step; a refused step freezes the solve. Re-zeroes the slots that the next iteration accumulates
// into (the CUDA kernels add into them atomically).
C10_HOST_DEVICE inline void cg_update_scalars(double* s, bool step_ok) {
  if (step_ok) {
    s[kIters] += 1.0;
    s[kBeta] = s[kRsNew] / s[kRs];
    s[kRs] = s[kRsNew];
    s[kActive] = s[kRs] > s[kTol2] ? 1.0 : 0.0;
  } else {
    s[kActive] = 0.0;
    s[kBeta] = 0.0;
  }
  s[kPAp] = 0.0;
  s[kPP] = 0.0;
  s[kRsNew] = 0.0;
}

// Whether the next direction is needed (the solve has neither converged nor broken down).
C10_HOST_DEVICE inline bool cg_active(const double* s) { return s[kActive] != 0.0; }

// The direction update p = r + beta p, one element.
template <typename T>
C10_HOST_DEVICE inline T cg_direction(T r, T p, T beta) {
  return r + beta * p;
}

// ---- Rollout inference ------------------------------------------------------------------------------

// Observation normalization, one element: clamp((x - mean) * inv_std, -clip, clip); NaN passes
// through, as with at::clamp.
template <typename T>
C10_HOST_DEVICE inline T normalize_obs(T x, T mean, T inv_std, T clip) {
  const T v = (x - mean) * inv_std;
  return v < -clip ? -clip : (v > clip ? clip : v);
}

// Inverse-CDF sample of one row of logits (k >= 1): the first class a with
// sum_{j <= a} softmax(row)_j > u, u in [0, 1), compared unnormalized. A class whose probability
// underflows to 0 is never picked; if rounding leaves the total at or below u, the last class with
// nonzero probability.
template <typename T>
C10_HOST_DEVICE inline int64_t categorical_sample_row(const T* row, int64_t k, T u) {
  T max = row[0];
  for (int64_t j = 1; j < k; ++j) max = row[j] > max ? row[j] : max;
  T total = 0;
  for (int64_t j = 0; j < k; ++j) total += exp_of(row[j] - max);
  const T target = u * total;
  T cum = 0;
  int64_t a = -1, last_positive = 0;
  for (int64_t j = 0; j < k; ++j) {
    const T e = exp_of(row[j] - max);
    if (e > T(0)) last_positive = j;
    cum += e;
    if (a < 0 && cum > target && e > T(0)) a = j;
  }
  return a < 0 ? last_positive : a;
}

// A diagonal-Gaussian sample, one element: mean + exp(log_std) * noise.
template <typename T>
C10_HOST_DEVICE inline T gaussian_sample(T mean, T log_std, T noise) {
  return mean + exp_of(log_std) * noise;
}

}  // namespace ew
}  // namespace trpo_ext
