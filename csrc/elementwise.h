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

// ---- Recurrent cells (csrc/recurrent.cpp; docs/design.md §12) ---------------------------------------
// torch's nn.LSTM (gates i, f, g, o) and nn.GRU (r, z, n) cells, one unit j of one row: the forward
// step, its tangent (JVP) and its cotangent (VJP). `g` is the row's gates, 4H (LSTM) or 3H (GRU)
// wide: pre-activations going into the forward step, the activations it leaves there (what the
// products read). The GEMMs around a step (x W_ih', h W_hh', the weights' tangents and cotangents)
// are recurrent.cpp's; a state that starts an episode is zeroed there and in the kernels (`keep`).

C10_HOST_DEVICE inline float sigmoid_of(float v) { return 1.0f / (1.0f + expf(-v)); }
C10_HOST_DEVICE inline double sigmoid_of(double v) { return 1.0 / (1.0 + exp(-v)); }

// c = f c_prev + i g, h = o tanh(c); the gates become their activations in place.
template <typename T>
C10_HOST_DEVICE inline void lstm_unit(T* g, int64_t H, int64_t j, T c_prev, T& c, T& tanh_c, T& h) {
  const T i = sigmoid_of(g[j]), f = sigmoid_of(g[H + j]), gg = tanh_of(g[2 * H + j]), o = sigmoid_of(g[3 * H + j]);
  g[j] = i, g[H + j] = f, g[2 * H + j] = gg, g[3 * H + j] = o;
  c = f * c_prev + i * gg;
  tanh_c = tanh_of(c);
  h = o * tanh_c;
}

// The tangent: `a` the gates' pre-activation tangents (x W_ih' + h W_hh' + b, all terms), c_dot_prev
// the tangent of the (reset) c_prev; returns c_dot and h_dot.
template <typename T>
C10_HOST_DEVICE inline void lstm_unit_jvp(const T* a, const T* g, int64_t H, int64_t j, T c_prev, T tanh_c,
                                          T c_dot_prev, T& c_dot, T& h_dot) {
  const T i = g[j], f = g[H + j], gg = g[2 * H + j], o = g[3 * H + j];
  const T di = i * (T(1) - i) * a[j], df = f * (T(1) - f) * a[H + j];
  const T dg = (T(1) - gg * gg) * a[2 * H + j], dout = o * (T(1) - o) * a[3 * H + j];
  c_dot = df * c_prev + f * c_dot_prev + di * gg + i * dg;
  h_dot = dout * tanh_c + o * (T(1) - tanh_c * tanh_c) * c_dot;
}

// The cotangent: h_bar of h, c_bar_next of c from the next step (its reset applied); writes the
// gates' pre-activation cotangents into a_bar and returns c_prev's cotangent (before this step's reset).
template <typename T>
C10_HOST_DEVICE inline T lstm_unit_vjp(T* a_bar, const T* g, int64_t H, int64_t j, T c_prev, T tanh_c, T h_bar,
                                       T c_bar_next) {
  const T i = g[j], f = g[H + j], gg = g[2 * H + j], o = g[3 * H + j];
  const T c_bar = c_bar_next + h_bar * o * (T(1) - tanh_c * tanh_c);
  a_bar[j] = c_bar * gg * i * (T(1) - i);
  a_bar[H + j] = c_bar * c_prev * f * (T(1) - f);
  a_bar[2 * H + j] = c_bar * i * (T(1) - gg * gg);
  a_bar[3 * H + j] = h_bar * tanh_c * o * (T(1) - o);
  return c_bar * f;
}

// r = σ(x_r + h_r), z = σ(x_z + h_z), n = tanh(x_n + r h_n), h = (1 - z) n + z h_prev, with x the
// input projection row (x W_ih' + b_ih) and hp the recurrent one (h_prev W_hh' + b_hh); g receives r, z, n.
template <typename T>
C10_HOST_DEVICE inline T gru_unit(T* g, const T* x, const T* hp, int64_t H, int64_t j, T h_prev) {
  const T r = sigmoid_of(x[j] + hp[j]), z = sigmoid_of(x[H + j] + hp[H + j]);
  const T n = tanh_of(x[2 * H + j] + r * hp[2 * H + j]);
  g[j] = r, g[H + j] = z, g[2 * H + j] = n;
  return (T(1) - z) * n + z * h_prev;
}

// The tangent: ax and ah the tangents of the two projections (ah includes h_dot_prev W_hh'), h_n the
// recurrent projection's n part, h_dot_prev the tangent of the (reset) h_prev; returns h_dot.
template <typename T>
C10_HOST_DEVICE inline T gru_unit_jvp(const T* ax, const T* ah, const T* g, int64_t H, int64_t j, T h_n, T h_prev,
                                      T h_dot_prev) {
  const T r = g[j], z = g[H + j], n = g[2 * H + j];
  const T dr = r * (T(1) - r) * (ax[j] + ah[j]);
  const T dz = z * (T(1) - z) * (ax[H + j] + ah[H + j]);
  const T dn = (T(1) - n * n) * (ax[2 * H + j] + dr * h_n + r * ah[2 * H + j]);
  return dz * (h_prev - n) + (T(1) - z) * dn + z * h_dot_prev;
}

// The cotangent: h_bar of h; writes the cotangents of the input projection (ax_bar) and of the
// recurrent one (ah_bar), and returns h_prev's direct cotangent z h_bar (the rest is ah_bar W_hh).
template <typename T>
C10_HOST_DEVICE inline T gru_unit_vjp(T* ax_bar, T* ah_bar, const T* g, int64_t H, int64_t j, T h_n, T h_prev,
                                      T h_bar) {
  const T r = g[j], z = g[H + j], n = g[2 * H + j];
  const T an = h_bar * (T(1) - z) * (T(1) - n * n);
  const T az = h_bar * (h_prev - n) * z * (T(1) - z);
  const T ar = an * h_n * r * (T(1) - r);
  ax_bar[j] = ar, ax_bar[H + j] = az, ax_bar[2 * H + j] = an;
  ah_bar[j] = ar, ah_bar[H + j] = az, ah_bar[2 * H + j] = an * r;
  return z * h_bar;
}

}  // namespace ew
}  // namespace trpo_ext
