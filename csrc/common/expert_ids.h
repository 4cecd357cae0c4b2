// The expert ids of a routing decision, expert_ids [T, k] with an optional valid_mask [T]: their checks (both
// backends) and, on the CPU, the valid-token flags the planning and loss kernels read.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace torch_moe {

// expert_ids [T, k] int64, num_experts > 0 and small enough that [num_experts + 1] int64 can be allocated, valid_mask [T] bool; the ids of valid tokens in [0, E) (checked on the
// CPU only: a device tensor's range is its backend's to check, see cuda::check_expert_ids).
void check_expert_ids(const char* op, const at::Tensor& expert_ids, int64_t num_experts,
                      const std::optional<at::Tensor>& valid_mask);

namespace cpu {
// valid_mask [T] as one flag per token (all valid when absent).
std::vector<uint8_t> valid_token_flags(const std::optional<at::Tensor>& valid_mask, int64_t T);
}  // namespace cpu

}  // namespace torch_moe
