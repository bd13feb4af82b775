// The action distribution on a policy MLP's output (docs/design.md, "Action spaces"): the kind, a
// categorical's segments (MultiDiscrete: one softmax per segment) and its invalid-action masks; the
// checks of the actions and masks an op is given; and the log-probability table that the
// line-search trial's KL and probability ratio are read from, one formula for every discrete kind.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "mlp.h"

namespace trpo_ext {

// What a masked logit is replaced by (sb3-contrib's MaskableCategorical uses the same): its exp
// underflows to exactly 0, so a masked action has probability exactly 0 and adds exactly 0 to the
// Fisher and the gradient, while log_softmax stays finite, so the KL's p·(log-ratio) terms are
// 0·finite = 0 rather than 0·(-inf + inf) = NaN.
inline constexpr double kMaskedLogit = -1e8;

struct ActionDist {
  MlpKind kind;
  int64_t width = 0;  // K, the output layer's units
  // Categorical: the class counts of the consecutive softmaxes an output row is split into, and the
  // first unit of each ({K} and {0} without `segments`). Empty for the other kinds.
  std::vector<int64_t> segments, offsets;
  bool segmented = false;  // `segments` was given: actions are (N, S) rather than (N)

  int64_t count() const { return static_cast<int64_t>(segments.size()); }
  // Segment s of (N, K) rows: a (N, K_s) view.
  at::Tensor segment(const at::Tensor& rows, int64_t s) const { return rows.narrow(1, offsets[s], segments[s]); }
};

// "categorical", "gaussian" or "bernoulli", for messages.
const char* kind_name(MlpKind kind);

// The distribution of a `kind` policy with `width` outputs: ValueError unless `segments` is absent,
// or given for a categorical with every count >= 1 and the counts summing to width.
ActionDist parse_action_dist(MlpKind kind, at::OptionalIntArrayRef segments, int64_t width);

// When given, `mask` (named `name`) must be a bool (N, K) tensor on the device of `rows` (named
// `rows_name`, N its rows; TypeError for dtype or device, ValueError for the shape), for a categorical
// only, and every segment of every row must allow at least one action (ValueError naming the row;
// one host read).
void check_action_mask(const std::optional<at::Tensor>& mask, const char* name, const ActionDist& dist,
                       const at::Tensor& rows, const char* rows_name);

// Actions for the states obs: categorical int64 class indices, (N) or with segments (N, S) with
// column s in [0, segments[s]); bernoulli (N, K) of obs's dtype holding 0 or 1; gaussian (N, K) of
// obs's dtype. With a mask (already checked), no action may be masked. One or two host reads.
void check_actions(const at::Tensor& actions, const ActionDist& dist, const at::Tensor& obs,
                   const std::optional<at::Tensor>& mask);

// logits with the masked entries replaced by kMaskedLogit; logits itself without a mask.
at::Tensor apply_action_mask(const at::Tensor& logits, const std::optional<at::Tensor>& mask);

// Categorical or bernoulli: the log-probability of every outcome, (N, C), rows summing (in exp) to
// 1 per segment or unit, so that KL(old ‖ new) = Σ exp(old) (old - new) for either kind.
// Categorical: each segment's log_softmax (C = K). Bernoulli: [log σ(-x) | log σ(x)] (C = 2K),
// outcome a ∈ {0, 1} of unit k at column a·K + k; log_sigmoid stays accurate when σ saturates.
at::Tensor log_prob_table(const ActionDist& dist, const at::Tensor& logits);

// The columns of log_prob_table that the (checked) actions took, (N, S) int64 (S = K for bernoulli):
// log π(a|s) is the sum of the row's entries there. For a categorical they are also the output units.
at::Tensor taken_columns(const ActionDist& dist, const at::Tensor& actions);

}  // namespace trpo_ext
