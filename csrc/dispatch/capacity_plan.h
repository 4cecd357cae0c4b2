// Capacity plan (slot of each assignment in its expert's buffer) and the dropless permutation plan.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>
#include <vector>

namespace torch_moe {

// Checks shared by the planning ops: expert_ids [T, k] int64 in [0, E) (valid rows), valid_mask [T] bool.
void check_expert_ids(const char* op, const at::Tensor& expert_ids, int64_t num_experts,
                      const std::optional<at::Tensor>& valid_mask);

namespace cpu {
// valid_mask [T] as one flag per token (all valid when absent).
std::vector<uint8_t> valid_token_flags(const std::optional<at::Tensor>& valid_mask, int64_t T);

std::tuple<at::Tensor, at::Tensor, at::Tensor> capacity_plan(const at::Tensor& expert_ids, int64_t num_experts,
                                                             int64_t capacity, c10::string_view drop_policy,
                                                             const std::optional<at::Tensor>& priority,
                                                             const std::optional<at::Tensor>& valid_mask);
// Dropless plan: (row_index [T, k], offsets [E + 1]); rows grouped by expert, token order inside.
std::tuple<at::Tensor, at::Tensor> permute_plan(const at::Tensor& expert_ids, int64_t num_experts,
                                                const std::optional<at::Tensor>& valid_mask);
}  // namespace cpu
}  // namespace torch_moe
