// Fused router aux losses (Switch load balancing, z-loss) and router entropy: CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace torch_moe::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_losses(const at::Tensor& logits, const at::Tensor& expert_ids,
                                                             const std::optional<at::Tensor>& valid_mask);
at::Tensor router_losses_backward(const at::Tensor& grad_load_balancing, const at::Tensor& grad_z,
                                  const at::Tensor& logits, const at::Tensor& expert_ids,
                                  const std::optional<at::Tensor>& valid_mask);

}  // namespace torch_moe::cpu
