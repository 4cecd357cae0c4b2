// Fused router scoring + top-k selection: CPU kernels and the shared argument checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace torch_moe {

enum class ScoreFunc { kSoftmax, kSigmoid };

// Parses "softmax" | "sigmoid", raising an error that names the argument otherwise.
ScoreFunc parse_score_func(const char* op, c10::string_view name);

// n_groups must divide E, topk_groups lie in [1, n_groups] and k fit in the experts of topk_groups groups.
void check_expert_groups(const char* op, int64_t E, int64_t k, int64_t n_groups, int64_t topk_groups);

// Router math dtype: float64 for float64 logits, float32 for every other float dtype.
at::ScalarType router_dtype(const at::Tensor& logits);

namespace cpu {
// Scores of every row of logits [T, E] (contiguous, router dtype): ATen's vectorised softmax or sigmoid over the
// whole tensor, then the scalar score_row (router_math.h) for the rows it leaves with a NaN, which gives those rows
// its meaning. Both kernels of router_topk use it, so forward and backward see the same scores.
at::Tensor score_rows(const at::Tensor& logits, ScoreFunc func);

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_topk(const at::Tensor& logits, int64_t k,
                                                           c10::string_view score_func,
                                                           const std::optional<at::Tensor>& selection_bias,
                                                           bool normalize, int64_t n_groups, int64_t topk_groups);
at::Tensor router_topk_backward(const at::Tensor& grad_weights, const at::Tensor& logits,
                                const at::Tensor& expert_ids, c10::string_view score_func, bool normalize);
}  // namespace cpu
}  // namespace torch_moe
