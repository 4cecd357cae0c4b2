// Capacity-mode dispatch/combine and dropless permute/unpermute: CPU kernels of the ops and their backwards.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace torch_moe::cpu {

at::Tensor dispatch(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& slots, int64_t num_experts,
                    int64_t capacity);
at::Tensor dispatch_backward(const at::Tensor& grad_buffer, const at::Tensor& expert_ids, const at::Tensor& slots);
at::Tensor combine(const at::Tensor& buffer, const at::Tensor& weights, const at::Tensor& expert_ids,
                   const at::Tensor& slots);
std::tuple<at::Tensor, at::Tensor> combine_backward(const at::Tensor& grad_y, const at::Tensor& buffer,
                                                    const at::Tensor& weights, const at::Tensor& expert_ids,
                                                    const at::Tensor& slots);

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute(const at::Tensor& x, const at::Tensor& expert_ids,
                                                       int64_t num_experts,
                                                       const std::optional<at::Tensor>& valid_mask);
at::Tensor permute_backward(const at::Tensor& grad_rows, const at::Tensor& row_index);
at::Tensor unpermute(const at::Tensor& rows, const at::Tensor& weights, const at::Tensor& row_index);
std::tuple<at::Tensor, at::Tensor> unpermute_backward(const at::Tensor& grad_y, const at::Tensor& rows,
                                                      const at::Tensor& weights, const at::Tensor& row_index);

}  // namespace torch_moe::cpu
