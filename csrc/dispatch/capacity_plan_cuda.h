// Device planning helpers shared by the CUDA kernels of capacity_plan, permute and the fused dropless ops.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace torch_moe::cuda {

// check_expert_ids (shapes, dtypes, devices) plus the device range check of the ids of valid tokens.
void check_expert_ids(const char* op, const at::Tensor& expert_ids, int64_t num_experts,
                      const std::optional<at::Tensor>& valid_mask);

// Dropless plan on the device, no host sync: (row_index [T, k], offsets [E + 1]); rows grouped by expert, token
// order inside, as cpu::permute_plan.
std::tuple<at::Tensor, at::Tensor> permute_plan(const at::Tensor& expert_ids, int64_t num_experts,
                                                const std::optional<at::Tensor>& valid_mask);

// tokens_per_expert [E]: assignments of valid tokens per expert (ids outside [0, E) are not counted), on the device.
at::Tensor count_per_expert(const at::Tensor& expert_ids, int64_t num_experts,
                            const std::optional<at::Tensor>& valid_mask);

}  // namespace torch_moe::cuda
