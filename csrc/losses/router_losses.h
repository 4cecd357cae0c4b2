// Fused router aux losses (Switch load balancing, z-loss) and router entropy: the argument checks of both backends
// and the CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "common/checks.h"

namespace torch_moe {

// How a backend checks expert_ids: check_expert_ids (common/expert_ids.h) or its device version.
using ExpertIdsCheck = void (*)(const char* op, const at::Tensor& expert_ids, int64_t num_experts,
                                const std::optional<at::Tensor>& valid_mask);

// The argument checks of router_losses and its backward, shared by the CPU and CUDA kernels (same order, same
// messages); check_ids is the backend's check of expert_ids.
inline void check_router_losses_args(const char* op, const at::Tensor& logits, const at::Tensor& expert_ids,
                                     const std::optional<at::Tensor>& valid_mask, ExpertIdsCheck check_ids) {
  check_floating(op, "logits", logits);
  check_dim(op, "logits", logits, 2, "[T, E]");
  TORCH_MOE_CHECK(logits.size(1) > 0, "torch_moe.{}: argument 'logits' must have at least one expert, got shape {}",
                  op, shape_str(logits));
  check_ids(op, expert_ids, logits.size(1), valid_mask);
  check_size(op, "expert_ids", expert_ids, 0, logits.size(0), "tokens of logits");
  check_same_device(op, {{"logits", &logits}, {"expert_ids", &expert_ids}});
}

}  // namespace torch_moe

namespace torch_moe::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_losses(const at::Tensor& logits, const at::Tensor& expert_ids,
                                                             const std::optional<at::Tensor>& valid_mask);
at::Tensor router_losses_backward(const at::Tensor& grad_load_balancing, const at::Tensor& grad_z,
                                  const at::Tensor& logits, const at::Tensor& expert_ids,
                                  const std::optional<at::Tensor>& valid_mask);

}  // namespace torch_moe::cpu
