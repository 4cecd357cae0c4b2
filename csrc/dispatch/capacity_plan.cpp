// The argument checks of capacity_plan, shared by its CPU and CUDA kernels.
#include "dispatch/capacity_plan.h"

#include <ATen/ATen.h>

#include <string>

#include "common/checks.h"
#include "common/expert_ids.h"

namespace torch_moe {
namespace {

DropPolicy parse_drop_policy(const char* op, c10::string_view name) {
  if (name == "position") return DropPolicy::kPosition;
  if (name == "probability") return DropPolicy::kProbability;
  TORCH_MOE_CHECK(false, "torch_moe.{}: argument 'drop_policy' must be \"position\" or \"probability\", got \"{}\"",
                  op, std::string(name));
  return DropPolicy::kPosition;
}

}  // namespace

DropPolicy check_capacity_plan_args(const char* op, const at::Tensor& expert_ids, int64_t num_experts,
                                    int64_t capacity, c10::string_view drop_policy,
                                    const std::optional<at::Tensor>& priority,
                                    const std::optional<at::Tensor>& valid_mask) {
  check_expert_ids(op, expert_ids, num_experts, valid_mask);
  TORCH_MOE_CHECK(capacity >= 0, "torch_moe.{}: argument 'capacity' must be >= 0, got {}", op, capacity);
  const DropPolicy policy = parse_drop_policy(op, drop_policy);
  const bool has_priority = priority.has_value() && priority->defined();
  TORCH_MOE_CHECK(policy != DropPolicy::kProbability || has_priority,
                  "torch_moe.{}: argument 'priority' [T, k] is required by drop_policy=\"probability\", got None", op);
  if (has_priority) {
    check_floating(op, "priority", *priority);
    check_same_shape(op, "priority", *priority, "expert_ids", expert_ids);
    check_same_device(op, {{"expert_ids", &expert_ids}, {"priority", &*priority}});
  }
  return policy;
}

}  // namespace torch_moe
