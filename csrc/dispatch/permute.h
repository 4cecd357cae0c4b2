// Dropless permute, permute_plan and unpermute and their backwards: each backend's plan kernel, and the op bodies
// written once over a backend B (CPU and CUDA differ only in B's expert-id check, plan and row movement kernels and
// a device guard); permute_cpu.cpp and permute_cuda.cu register them for their dispatch key.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/kernel_registration.h"
#include "dispatch/dispatch_checks.h"

namespace torch_moe {

namespace cpu {
// Dropless plan: (row_index [T, k], offsets [E + 1]); rows grouped by expert, token order inside.
std::tuple<at::Tensor, at::Tensor> permute_plan(const at::Tensor& expert_ids, int64_t num_experts,
                                                const std::optional<at::Tensor>& valid_mask);
}  // namespace cpu

namespace cuda {
// The dropless plan on the device, no host sync: the same plan as cpu::permute_plan.
std::tuple<at::Tensor, at::Tensor> permute_plan(const at::Tensor& expert_ids, int64_t num_experts,
                                                const std::optional<at::Tensor>& valid_mask);
}  // namespace cuda

// B provides Guard, scatter_rows, gather_rows, row_dots, check_unique_destinations (common/row_backend.h),
// check_expert_ids (with the signature of common/expert_ids.h) and permute_plan.
template <typename B>
std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_op(const at::Tensor& x, const at::Tensor& expert_ids,
                                                          int64_t num_experts,
                                                          const std::optional<at::Tensor>& valid_mask) {
  constexpr const char* op = "permute";
  check_floating(op, "x", x);
  check_dim(op, "x", x, 2, "[T, d]");
  B::check_expert_ids(op, expert_ids, num_experts, valid_mask);
  check_size(op, "expert_ids", expert_ids, 0, x.size(0), "tokens of x");
  check_same_device(op, {{"x", &x}, {"expert_ids", &expert_ids}});
  // rows [T * k, d]: an expanded expert_ids can make T * k * d overflow although each input fits.
  const int64_t numel = checked_mul(op, "expert_ids", "T * k * d", expert_ids.numel(), x.size(1));
  const int64_t bytes = check_alloc_bytes(op, "expert_ids", "rows [T * k, d]", numel, x.element_size());
  const typename B::Guard guard(x.device());
  return rethrow_alloc_failure(op, "num_experts", num_experts, bytes + (num_experts + 1) * int64_t{sizeof(int64_t)},
                               [&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
    auto [row_index, offsets] = B::permute_plan(expert_ids, num_experts, valid_mask);
    auto rows = B::scatter_rows(x, row_index, std::nullopt, expert_ids.numel());
    return {rows, row_index, offsets};
  });
}

template <typename B>
std::tuple<at::Tensor, at::Tensor> permute_plan_op(const at::Tensor& expert_ids, int64_t num_experts,
                                                   const std::optional<at::Tensor>& valid_mask) {
  B::check_expert_ids("permute_plan", expert_ids, num_experts, valid_mask);
  return rethrow_alloc_failure("permute_plan", "num_experts", num_experts, (num_experts + 1) * int64_t{sizeof(int64_t)},
                               [&] { return B::permute_plan(expert_ids, num_experts, valid_mask); });
}

template <typename B>
at::Tensor permute_backward_op(const at::Tensor& grad_rows, const at::Tensor& row_index) {
  constexpr const char* op = "_permute_backward";
  check_floating(op, "grad_rows", grad_rows);
  check_dim(op, "grad_rows", grad_rows, 2, "[N, d]");
  check_row_index(op, row_index, grad_rows.size(0), B::check_index_range);
  const typename B::Guard guard(grad_rows.device());
  return B::gather_rows(grad_rows, row_index, std::nullopt);
}

template <typename B>
at::Tensor unpermute_op(const at::Tensor& rows, const at::Tensor& weights, const at::Tensor& row_index) {
  constexpr const char* op = "unpermute";
  check_floating(op, "rows", rows);
  check_dim(op, "rows", rows, 2, "[N, d]");
  check_row_index(op, row_index, rows.size(0), B::check_index_range);
  check_weights(op, weights, row_index, "row_index");
  check_same_device(op, {{"rows", &rows}, {"row_index", &row_index}});
  B::check_unique_destinations(op, "row_index", row_index, rows.size(0));
  const typename B::Guard guard(rows.device());
  return B::gather_rows(rows, row_index, weights);
}

template <typename B>
std::tuple<at::Tensor, at::Tensor> unpermute_backward_op(const at::Tensor& grad_y, const at::Tensor& rows,
                                                         const at::Tensor& weights, const at::Tensor& row_index) {
  constexpr const char* op = "_unpermute_backward";
  check_floating(op, "rows", rows);
  check_dim(op, "rows", rows, 2, "[N, d]");
  check_row_index(op, row_index, rows.size(0), B::check_index_range);
  check_weights(op, weights, row_index, "row_index");
  check_tokens(op, "grad_y", grad_y, row_index.size(0), rows.size(1));
  B::check_unique_destinations(op, "row_index", row_index, rows.size(0));
  const typename B::Guard guard(rows.device());
  const auto grad_y_as_rows = grad_y.to(rows.scalar_type());
  auto grad_rows = B::scatter_rows(grad_y_as_rows, row_index, weights, rows.size(0));
  auto grad_weights = B::row_dots(grad_y_as_rows, rows, row_index, weights.scalar_type());
  return {grad_rows, grad_weights};
}

template <typename B>
void register_permute(torch::Library& m) {
  impl_with_backward(m, "permute", &permute_op<B>, &permute_backward_op<B>);
  m.impl("permute_plan", &permute_plan_op<B>);
  impl_with_backward(m, "unpermute", &unpermute_op<B>, &unpermute_backward_op<B>);
}

}  // namespace torch_moe
