// Capacity plan (slot of each assignment in its expert's buffer): the argument checks and the op body of both
// backends; capacity_plan_cpu.cpp and capacity_plan_cuda.cu hold the plans themselves.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

#include "common/checks.h"
#include <tuple>

namespace torch_moe {

enum class DropPolicy { kPosition, kProbability };

// The argument checks of capacity_plan, shared by the CPU and CUDA kernels (same order, same messages); returns the
// parsed drop policy. The range of the ids is checked on the CPU only (check_expert_ids).
DropPolicy check_capacity_plan_args(const char* op, const at::Tensor& expert_ids, int64_t num_experts,
                                    int64_t capacity, c10::string_view drop_policy,
                                    const std::optional<at::Tensor>& priority,
                                    const std::optional<at::Tensor>& valid_mask);

// capacity_plan, written once over a backend B: the checks, then B::plan_slots(op, expert_ids, num_experts, capacity,
// policy, priority, valid_mask) -> (slots [T, k], tokens_per_expert [E], kept_per_expert [E]).
template <typename B>
std::tuple<at::Tensor, at::Tensor, at::Tensor> capacity_plan_op(const at::Tensor& expert_ids, int64_t num_experts,
                                                                int64_t capacity, c10::string_view drop_policy,
                                                                const std::optional<at::Tensor>& priority,
                                                                const std::optional<at::Tensor>& valid_mask) {
  constexpr const char* op = "capacity_plan";
  const DropPolicy policy =
      check_capacity_plan_args(op, expert_ids, num_experts, capacity, drop_policy, priority, valid_mask);
  // tokens_per_expert and kept_per_expert [E] int64 (check_expert_ids has bounded E).
  return rethrow_alloc_failure(op, "num_experts", num_experts, 2 * num_experts * int64_t{sizeof(int64_t)}, [&] {
    return B::plan_slots(op, expert_ids, num_experts, capacity, policy, priority, valid_mask);
  });
}
}  // namespace torch_moe
