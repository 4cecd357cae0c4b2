// Checks of expert_ids and the CPU's valid-token flags.
#include "common/expert_ids.h"

#include <ATen/ATen.h>

#include "common/checks.h"

namespace torch_moe {

void check_expert_ids(const char* op, const at::Tensor& expert_ids, int64_t num_experts,
                      const std::optional<at::Tensor>& valid_mask) {
  check_dtype(op, "expert_ids", expert_ids, at::kLong);
  check_dim(op, "expert_ids", expert_ids, 2, "[T, k]");
  TORCH_MOE_CHECK(num_experts > 0, "torch_moe.{}: argument 'num_experts' must be positive, got {}", op, num_experts);
  // Every op that takes num_experts allocates per-expert int64 tensors, up to offsets [E + 1].
  check_alloc_bytes(op, "num_experts", "offsets [num_experts + 1]",
                    checked_add(op, "num_experts", "num_experts + 1", num_experts, 1), sizeof(int64_t));
  check_valid_mask(op, valid_mask, expert_ids, "expert_ids");
  const at::Tensor* mask = valid_mask.has_value() && valid_mask->defined() ? &*valid_mask : nullptr;
  check_index_range(op, "expert_ids", expert_ids, 0, num_experts, mask);
}

namespace cpu {

std::vector<uint8_t> valid_token_flags(const std::optional<at::Tensor>& valid_mask, int64_t T) {
  std::vector<uint8_t> valid(T, 1);
  if (valid_mask.has_value() && valid_mask->defined()) {
    const auto m = valid_mask->contiguous();
    const bool* mp = m.data_ptr<bool>();
    for (int64_t t = 0; t < T; ++t) valid[t] = mp[t];
  }
  return valid;
}

}  // namespace cpu
}  // namespace torch_moe
