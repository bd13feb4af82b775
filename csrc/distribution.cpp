#include "distribution.h"

#include <string>

namespace trpo_ext {
namespace {

// "actions[3]" for an unsegmented categorical, "actions[3, 1]" otherwise.
std::string action_name(const ActionDist& dist, int64_t row, int64_t column) {
  if (dist.kind == MlpKind::Categorical && !dist.segmented) return c10::str("actions[", row, "]");
  return c10::str("actions[", row, ", ", column, "]");
}

void check_categorical_actions(const at::Tensor& actions, const ActionDist& dist, const at::Tensor& obs) {
  TORCH_CHECK_TYPE(actions.scalar_type() == at::kLong, "trpo_ext: actions must be int64 class indices, got ",
                   actions.scalar_type());
  check_dtype_device(actions, "actions", at::kLong, obs.device(), "obs's");
  const int64_t n = obs.size(0);
  if (!dist.segmented) {
    TORCH_CHECK_VALUE(actions.dim() == 1 && actions.size(0) == n, "trpo_ext: actions must have shape (", n,
                      "), got ", actions.sizes());
    // One host read per call: an index out of range would be undefined behaviour in a scatter or gather.
    const auto [lo, hi] = at::aminmax(actions);
    TORCH_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < dist.width,
                      "trpo_ext: actions must be class indices in [0, ", dist.width, "), got values in [",
                      lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
    return;
  }
  TORCH_CHECK_VALUE(actions.dim() == 2 && actions.size(0) == n && actions.size(1) == dist.count(),
                    "trpo_ext: actions must have shape (", n, ", ", dist.count(),
                    ") (one class index per segment), got ", actions.sizes());
  // Each column's range in one host read.
  const auto [lo, hi] = at::aminmax(actions, 0);
  const at::Tensor range = at::stack({lo, hi}).cpu();
  const auto r = range.accessor<int64_t, 2>();
  for (int64_t s = 0; s < dist.count(); ++s) {
    TORCH_CHECK_VALUE(r[0][s] >= 0 && r[1][s] < dist.segments[s], "trpo_ext: actions[:, ", s,
                      "] must be class indices in [0, ", dist.segments[s], ") (segments[", s, "]), got values in [",
                      r[0][s], ", ", r[1][s], "]");
  }
}

void check_bernoulli_actions(const at::Tensor& actions, const ActionDist& dist, const at::Tensor& obs) {
  check_dtype_device(actions, "actions", obs.scalar_type(), obs.device(), "obs's");
  TORCH_CHECK_VALUE(actions.dim() == 2 && actions.size(0) == obs.size(0) && actions.size(1) == dist.width,
                    "trpo_ext: actions must have shape (", obs.size(0), ", ", dist.width, "), got ", actions.sizes());
  const at::Tensor bad = actions.ne(0).logical_and_(actions.ne(1));  // NaN included
  if (!bad.any().item<bool>()) return;
  const at::Tensor where = bad.nonzero()[0].cpu();
  const int64_t row = where[0].item<int64_t>(), unit = where[1].item<int64_t>();
  TORCH_CHECK_VALUE(false, "trpo_ext: actions of a bernoulli policy must hold 0 or 1, got ",
                    actions[row][unit].item<double>(), " at ", action_name(dist, row, unit));
}

}  // namespace

const char* kind_name(MlpKind kind) {
  switch (kind) {
    case MlpKind::Categorical: return "categorical";
    case MlpKind::Gaussian: return "gaussian";
    case MlpKind::Bernoulli: return "bernoulli";
    case MlpKind::Value: return "value";
  }
  return "?";
}

ActionDist parse_action_dist(MlpKind kind, at::OptionalIntArrayRef segments, int64_t width) {
  ActionDist dist;
  dist.kind = kind;
  dist.width = width;
  if (!segments.has_value()) {
    if (kind == MlpKind::Categorical) dist.segments = {width}, dist.offsets = {0};
    return dist;
  }
  TORCH_CHECK_VALUE(kind == MlpKind::Categorical, "trpo_ext: segments is only for kind 'categorical', got kind '",
                    kind_name(kind), "'");
  TORCH_CHECK_VALUE(!segments->empty(), "trpo_ext: segments must list at least one class count, got []");
  int64_t offset = 0;
  for (const int64_t count : *segments) {
    TORCH_CHECK_VALUE(count >= 1, "trpo_ext: segments must be class counts >= 1, got ", *segments);
    dist.offsets.push_back(offset);
    offset += count;
  }
  TORCH_CHECK_VALUE(offset == width, "trpo_ext: segments must sum to the output width ", width, ", got ", *segments,
                    " (sum ", offset, ")");
  dist.segments.assign(segments->begin(), segments->end());
  dist.segmented = true;
  return dist;
}

void check_action_mask(const std::optional<at::Tensor>& mask, const char* name, const ActionDist& dist,
                       const at::Tensor& rows, const char* rows_name) {
  if (!mask.has_value()) return;
  TORCH_CHECK_VALUE(dist.kind == MlpKind::Categorical, "trpo_ext: ", name,
                    " is only for kind 'categorical', got kind '", kind_name(dist.kind), "'");
  TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "trpo_ext: ", name, " must be bool (True = allowed), got ",
                   mask->scalar_type());
  TORCH_CHECK_TYPE(mask->device() == rows.device(), "trpo_ext: ", name, " must be on ", rows_name, "'s device ",
                   rows.device(), ", got ", mask->device());
  const int64_t n = rows.size(0);
  TORCH_CHECK_VALUE(mask->dim() == 2 && mask->size(0) == n && mask->size(1) == dist.width, "trpo_ext: ", name,
                    " must have shape (", n, ", ", dist.width, "), got ", mask->sizes());
  std::vector<at::Tensor> any_allowed;  // (N) per segment
  for (int64_t s = 0; s < dist.count(); ++s) any_allowed.push_back(dist.segment(*mask, s).any(1));
  const at::Tensor ok = at::stack(any_allowed, 1);  // (N, S)
  if (ok.all().item<bool>()) return;
  const at::Tensor where = ok.logical_not().nonzero()[0].cpu();
  const int64_t row = where[0].item<int64_t>(), s = where[1].item<int64_t>();
  if (dist.segmented) {
    TORCH_CHECK_VALUE(false, "trpo_ext: ", name, "[", row, "] allows no action in segment ", s, " (columns [",
                      dist.offsets[s], ", ", dist.offsets[s] + dist.segments[s], ")): every segment of every row ",
                      "needs at least one allowed action");
  }
  TORCH_CHECK_VALUE(false, "trpo_ext: ", name, "[", row, "] allows no action: every row needs at least one");
}

void check_actions(const at::Tensor& actions, const ActionDist& dist, const at::Tensor& obs,
                   const std::optional<at::Tensor>& mask) {
  if (dist.kind == MlpKind::Gaussian) {
    check_dtype_device(actions, "actions", obs.scalar_type(), obs.device(), "obs's");
    TORCH_CHECK_VALUE(actions.dim() == 2 && actions.size(0) == obs.size(0) && actions.size(1) == dist.width,
                      "trpo_ext: actions must have shape (", obs.size(0), ", ", dist.width, "), got ",
                      actions.sizes());
    return;
  }
  if (dist.kind == MlpKind::Bernoulli) return check_bernoulli_actions(actions, dist, obs);
  check_categorical_actions(actions, dist, obs);
  if (!mask.has_value()) return;
  // A masked action has probability 0: it could never have been sampled, and its log-probability
  // (about -1e8) would swamp the surrogate.
  const at::Tensor allowed = mask->gather(1, taken_columns(dist, actions));  // (N, S)
  if (allowed.all().item<bool>()) return;
  const at::Tensor where = allowed.logical_not().nonzero()[0].cpu();
  const int64_t row = where[0].item<int64_t>(), s = where[1].item<int64_t>();
  TORCH_CHECK_VALUE(false, "trpo_ext: ", action_name(dist, row, s), " = ",
                    (dist.segmented ? actions[row][s] : actions[row]).item<int64_t>(),
                    " is an action that action_mask[", row, "] forbids: it could never have been sampled");
}

at::Tensor apply_action_mask(const at::Tensor& logits, const std::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return logits;
  return logits.masked_fill(mask->logical_not(), kMaskedLogit);
}

at::Tensor log_prob_table(const ActionDist& dist, const at::Tensor& logits) {
  if (dist.kind == MlpKind::Bernoulli) return at::cat({at::log_sigmoid(-logits), at::log_sigmoid(logits)}, 1);
  TORCH_INTERNAL_ASSERT(dist.kind == MlpKind::Categorical);
  if (dist.count() == 1) return at::log_softmax(logits, 1);
  std::vector<at::Tensor> parts;
  for (int64_t s = 0; s < dist.count(); ++s) parts.push_back(at::log_softmax(dist.segment(logits, s), 1));
  return at::cat(parts, 1);
}

at::Tensor taken_columns(const ActionDist& dist, const at::Tensor& actions) {
  const auto index = actions.options().dtype(at::kLong);
  if (dist.kind == MlpKind::Bernoulli) {
    return at::arange(dist.width, index).unsqueeze(0) + actions.to(at::kLong) * dist.width;
  }
  TORCH_INTERNAL_ASSERT(dist.kind == MlpKind::Categorical);
  const at::Tensor class_index = actions.reshape({actions.size(0), dist.count()});
  if (dist.count() == 1) return class_index;
  return class_index + at::tensor(dist.offsets, index.device(at::kCPU)).to(actions.device()).unsqueeze(0);
}

}  // namespace trpo_ext
