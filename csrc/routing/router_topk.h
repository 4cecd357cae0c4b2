// Fused router scoring + top-k selection: the argument checks and the op bodies of both backends; the kernels are in
// router_topk_cpu.cpp and router_topk_cuda.cu.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

#include "common/router_math.h"

namespace torch_moe {

// n_groups must divide E, topk_groups lie in [1, n_groups] and k fit in the experts of topk_groups groups.
void check_expert_groups(const char* op, int64_t E, int64_t k, int64_t n_groups, int64_t topk_groups);

// The argument checks of router_topk, shared by the CPU and CUDA kernels (same order, same messages); returns the
// parsed score function.
ScoreFunc check_router_topk_args(const char* op, const at::Tensor& logits, int64_t k, c10::string_view score_func,
                                 const std::optional<at::Tensor>& selection_bias, int64_t n_groups,
                                 int64_t topk_groups);
// The checks both backends of _router_topk_backward start with (the range of the ids is each backend's to check);
// returns the parsed score function.
ScoreFunc check_router_topk_backward_args(const char* op, const at::Tensor& grad_weights, const at::Tensor& logits,
                                          const at::Tensor& expert_ids, c10::string_view score_func);

// router_topk, written once over a backend B: the checks and the selection bias in the router dtype, then
// B::select_topk(op, logits, k, func, bias, normalize, n_groups, topk_groups) -> (weights, expert_ids, scores).
template <typename B>
std::tuple<at::Tensor, at::Tensor, at::Tensor> router_topk_op(const at::Tensor& logits, int64_t k,
                                                              c10::string_view score_func,
                                                              const std::optional<at::Tensor>& selection_bias,
                                                              bool normalize, int64_t n_groups,
                                                              int64_t topk_groups) {
  constexpr const char* op = "router_topk";
  const ScoreFunc func = check_router_topk_args(op, logits, k, score_func, selection_bias, n_groups, topk_groups);
  at::Tensor bias;
  if (selection_bias.has_value() && selection_bias->defined()) {
    bias = selection_bias->to(router_dtype(logits)).contiguous();
  }
  return B::select_topk(op, logits, k, func, bias, normalize, n_groups, topk_groups);
}

// _router_topk_backward, written once over a backend B: the checks, then
// B::topk_grad(op, grad_weights, logits, expert_ids, func, normalize) -> grad_logits [T, E].
template <typename B>
at::Tensor router_topk_backward_op(const at::Tensor& grad_weights, const at::Tensor& logits,
                                   const at::Tensor& expert_ids, c10::string_view score_func, bool normalize) {
  constexpr const char* op = "_router_topk_backward";
  const ScoreFunc func = check_router_topk_backward_args(op, grad_weights, logits, expert_ids, score_func);
  return B::topk_grad(op, grad_weights, logits, expert_ids, func, normalize);
}

}  // namespace torch_moe
