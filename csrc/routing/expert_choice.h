// Expert-choice routing (Zhou et al. 2022): each expert picks its C highest-probability tokens. CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace torch_moe {

// Argument checks shared by the CPU and CUDA kernels (same order, same messages).
void check_expert_choice_args(const char* op, const at::Tensor& logits, int64_t capacity,
                              const std::optional<at::Tensor>& valid_mask);
void check_expert_choice_backward_args(const char* op, const at::Tensor& grad_weights, const at::Tensor& logits,
                                       const at::Tensor& slots);

}  // namespace torch_moe

namespace torch_moe::cpu {

// -> (weights [T, E], slots [T, E], token_ids [E, C], scores [T, E]); see registration.cpp.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_choice(const at::Tensor& logits, int64_t capacity,
                                                                         const std::optional<at::Tensor>& valid_mask);
at::Tensor expert_choice_backward(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& slots);

}  // namespace torch_moe::cpu
