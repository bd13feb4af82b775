// Sums over the ranks of a torch.distributed process group, from inside an op: through the functional
// collectives that torch.distributed registers as ops (_c10d_functional::all_reduce_ and wait_tensor),
// looked up by name in the dispatcher. So a loop that reduces, such as the CG solve's products, stays
// in one extension call, and the extension needs no link to torch's distributed library: the group is
// torch.distributed's own (gloo, NCCL, ...), named as `ProcessGroup.group_name` names it.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace trpo_ext {

class GroupSum {
 public:
  GroupSum() = default;  // no group: every call is a no-op (one process)
  explicit GroupSum(std::optional<c10::string_view> group_name);

  bool active() const { return name_.has_value(); }

  // t = the sum of t over the group's ranks, in place; returns when the sum has arrived. Every rank
  // must call it in the same order with tensors of one shape and dtype. A rank that is gone or
  // stuck makes the others raise once the group's timeout has passed.
  void operator()(at::Tensor& t) const;

 private:
  std::optional<std::string> name_;
};

}  // namespace trpo_ext
