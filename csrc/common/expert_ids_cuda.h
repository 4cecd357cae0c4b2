// The device side of common/expert_ids.h: the range check of expert ids on the device, and per-expert counts and
// sort keys for the CUDA planning and loss kernels (no host sync).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace torch_moe::cuda {

// check_expert_ids (shapes, dtypes, devices) plus the device range check of the ids of valid tokens.
void check_expert_ids(const char* op, const at::Tensor& expert_ids, int64_t num_experts,
                      const std::optional<at::Tensor>& valid_mask);

// tokens_per_expert [E]: assignments of valid tokens per expert (ids outside [0, E) are not counted), on the device.
at::Tensor count_per_expert(const at::Tensor& expert_ids, int64_t num_experts,
                            const std::optional<at::Tensor>& valid_mask);

// [T, k] expert key per assignment: its expert, or E for padding tokens and out-of-range ids (sorted last).
at::Tensor expert_keys(const at::Tensor& ids, int64_t E, const std::optional<at::Tensor>& valid_mask);

// counts [E] (int64) of the keys in [0, E).
at::Tensor expert_histogram(const at::Tensor& keys, int64_t E);

}  // namespace torch_moe::cuda
