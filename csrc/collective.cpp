#include "collective.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

namespace trpo_ext {
namespace {

// Handles stay valid for the life of the process once the op is registered; a static initialised by
// this function is retried on the next call if the op was not there yet (the initialiser threw).
c10::OperatorHandle functional_op(const char* name) {
  const auto handle = c10::Dispatcher::singleton().findOp({name, ""});
  TORCH_CHECK(handle.has_value(), "trpo_ext: the op ", name, " is not registered: this torch has no ",
              "torch.distributed (import torch.distributed and initialise a process group first)");
  return *handle;
}

}  // namespace

GroupSum::GroupSum(std::optional<c10::string_view> group_name) {
  if (group_name.has_value()) {
    TORCH_CHECK_VALUE(!group_name->empty(), "trpo_ext: group must name a process group, got an empty string");
    name_ = std::string(*group_name);
  }
}

void GroupSum::operator()(at::Tensor& t) const {
  if (!name_) return;
  static const c10::OperatorHandle all_reduce = functional_op("_c10d_functional::all_reduce_");
  static const c10::OperatorHandle wait = functional_op("_c10d_functional::wait_tensor");
  TORCH_INTERNAL_ASSERT(t.is_contiguous());
  torch::jit::Stack stack{t, std::string("sum"), *name_};
  all_reduce.callBoxed(stack);
  stack = {t};
  wait.callBoxed(stack);
}

}  // namespace trpo_ext
