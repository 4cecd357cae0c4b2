// Shazeer et al. (2017)'s smooth load estimate of noisy top-k gating: CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace torch_moe {

// Argument checks shared by the CPU and CUDA kernels (same order, same messages).
void check_noisy_topk_load_args(const char* op, const at::Tensor& clean_logits, const at::Tensor& noisy_logits,
                                const at::Tensor& noise_std, int64_t k, const std::optional<at::Tensor>& valid_mask);
// The backward's incoming gradient: grad_load [E] floating.
void check_noisy_topk_load_grad(const char* op, const at::Tensor& grad_load, int64_t E);

}  // namespace torch_moe

namespace torch_moe::cpu {

// load [E] = sum over valid tokens of Phi((clean - threshold) / noise_std); see registration.cpp.
at::Tensor noisy_topk_load(const at::Tensor& clean_logits, const at::Tensor& noisy_logits, const at::Tensor& noise_std,
                           int64_t k, const std::optional<at::Tensor>& valid_mask);
std::tuple<at::Tensor, at::Tensor, at::Tensor> noisy_topk_load_backward(const at::Tensor& grad_load,
                                                                        const at::Tensor& clean_logits,
                                                                        const at::Tensor& noisy_logits,
                                                                        const at::Tensor& noise_std, int64_t k,
                                                                        const std::optional<at::Tensor>& valid_mask);

}  // namespace torch_moe::cpu
