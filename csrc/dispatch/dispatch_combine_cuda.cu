// CUDA kernels of dispatch, combine, permute, unpermute and their backwards: the CPU kernels' checks and plans, the
// row movement of row_ops_cuda (16-byte copies, fp32 accumulation in a fixed order, no float atomics).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/row_ops_cuda.h"
#include "dispatch/capacity_plan.h"
#include "dispatch/dispatch_checks.h"
#include "dispatch/capacity_plan_cuda.h"

namespace torch_moe::cuda {
namespace {

// expert_ids/slots [T, k] -> flat row e * C + s of the [E * C, d] buffer, or -1 when not kept.
at::Tensor flat_slot_index(const char* op, const at::Tensor& expert_ids, const at::Tensor& slots, int64_t num_experts,
                           int64_t capacity) {
  check_slot_plan(op, expert_ids, slots, capacity);
  // Only kept assignments must name a real expert.
  const auto kept = slots.ge(0);
  check_index_range(op, "expert_ids", expert_ids.masked_fill(kept.logical_not(), 0), 0, num_experts);
  // Ids outside [0, E) (possible only with value checks off) are treated as not kept rather than read.
  const auto usable = kept.logical_and(expert_ids.ge(0)).logical_and_(expert_ids.lt(num_experts))
                          .logical_and_(slots.lt(capacity));
  auto index = at::where(usable, expert_ids * capacity + slots, at::scalar_tensor(-1, slots.options()));
  check_unique_destinations(op, "slots", index, num_experts * capacity);
  return index;
}

}  // namespace

at::Tensor dispatch(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& slots, int64_t num_experts,
                    int64_t capacity) {
  constexpr const char* op = "dispatch";
  check_floating(op, "x", x);
  check_dim(op, "x", x, 2, "[T, d]");
  TORCH_MOE_CHECK(num_experts > 0, "torch_moe.{}: argument 'num_experts' must be positive, got {}", op, num_experts);
  TORCH_MOE_CHECK(capacity >= 0, "torch_moe.{}: argument 'capacity' must be >= 0, got {}", op, capacity);
  check_same_device(op, {{"x", &x}, {"expert_ids", &expert_ids}});
  const c10::cuda::CUDAGuard guard(x.device());
  const auto index = flat_slot_index(op, expert_ids, slots, num_experts, capacity);
  check_size(op, "expert_ids", expert_ids, 0, x.size(0), "tokens of x");
  return scatter_rows(x, index, std::nullopt, num_experts * capacity).view({num_experts, capacity, x.size(1)});
}

at::Tensor dispatch_backward(const at::Tensor& grad_buffer, const at::Tensor& expert_ids, const at::Tensor& slots) {
  constexpr const char* op = "_dispatch_backward";
  check_buffer(op, "grad_buffer", grad_buffer);
  const c10::cuda::CUDAGuard guard(grad_buffer.device());
  const int64_t E = grad_buffer.size(0), C = grad_buffer.size(1), d = grad_buffer.size(2);
  const auto index = flat_slot_index(op, expert_ids, slots, E, C);
  return gather_rows(grad_buffer.reshape({E * C, d}), index, std::nullopt);
}

at::Tensor combine(const at::Tensor& buffer, const at::Tensor& weights, const at::Tensor& expert_ids,
                   const at::Tensor& slots) {
  constexpr const char* op = "combine";
  check_buffer(op, "buffer", buffer);
  check_weights(op, weights, expert_ids, "expert_ids");
  check_same_device(op, {{"buffer", &buffer}, {"expert_ids", &expert_ids}});
  const c10::cuda::CUDAGuard guard(buffer.device());
  const int64_t E = buffer.size(0), C = buffer.size(1), d = buffer.size(2);
  const auto index = flat_slot_index(op, expert_ids, slots, E, C);
  return gather_rows(buffer.reshape({E * C, d}), index, weights);
}

std::tuple<at::Tensor, at::Tensor> combine_backward(const at::Tensor& grad_y, const at::Tensor& buffer,
                                                    const at::Tensor& weights, const at::Tensor& expert_ids,
                                                    const at::Tensor& slots) {
  constexpr const char* op = "_combine_backward";
  check_buffer(op, "buffer", buffer);
  check_weights(op, weights, expert_ids, "expert_ids");
  const c10::cuda::CUDAGuard guard(buffer.device());
  const int64_t E = buffer.size(0), C = buffer.size(1), d = buffer.size(2);
  check_tokens(op, "grad_y", grad_y, expert_ids.size(0), d);
  const auto index = flat_slot_index(op, expert_ids, slots, E, C);
  const auto grad_y_as_buffer = grad_y.to(buffer.scalar_type());
  auto grad_buffer = scatter_rows(grad_y_as_buffer, index, weights, E * C).view({E, C, d});
  auto grad_weights = row_dots(grad_y_as_buffer, buffer.reshape({E * C, d}), index, weights.scalar_type());
  return {grad_buffer, grad_weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute(const at::Tensor& x, const at::Tensor& expert_ids,
                                                       int64_t num_experts,
                                                       const std::optional<at::Tensor>& valid_mask) {
  constexpr const char* op = "permute";
  check_floating(op, "x", x);
  check_dim(op, "x", x, 2, "[T, d]");
  check_expert_ids(op, expert_ids, num_experts, valid_mask);
  check_size(op, "expert_ids", expert_ids, 0, x.size(0), "tokens of x");
  check_same_device(op, {{"x", &x}, {"expert_ids", &expert_ids}});
  const c10::cuda::CUDAGuard guard(x.device());
  auto [row_index, offsets] = permute_plan(expert_ids, num_experts, valid_mask);
  auto rows = scatter_rows(x, row_index, std::nullopt, expert_ids.numel());
  return {rows, row_index, offsets};
}

std::tuple<at::Tensor, at::Tensor> permute_plan_op(const at::Tensor& expert_ids, int64_t num_experts,
                                                   const std::optional<at::Tensor>& valid_mask) {
  check_expert_ids("permute_plan", expert_ids, num_experts, valid_mask);
  return permute_plan(expert_ids, num_experts, valid_mask);
}

at::Tensor permute_backward(const at::Tensor& grad_rows, const at::Tensor& row_index) {
  constexpr const char* op = "_permute_backward";
  check_floating(op, "grad_rows", grad_rows);
  check_dim(op, "grad_rows", grad_rows, 2, "[N, d]");
  check_row_index(op, row_index, grad_rows.size(0));
  const c10::cuda::CUDAGuard guard(grad_rows.device());
  return gather_rows(grad_rows, row_index, std::nullopt);
}

at::Tensor unpermute(const at::Tensor& rows, const at::Tensor& weights, const at::Tensor& row_index) {
  constexpr const char* op = "unpermute";
  check_floating(op, "rows", rows);
  check_dim(op, "rows", rows, 2, "[N, d]");
  check_row_index(op, row_index, rows.size(0));
  check_weights(op, weights, row_index, "row_index");
  check_same_device(op, {{"rows", &rows}, {"row_index", &row_index}});
  check_unique_destinations(op, "row_index", row_index, rows.size(0));
  const c10::cuda::CUDAGuard guard(rows.device());
  return gather_rows(rows, row_index, weights);
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward(const at::Tensor& grad_y, const at::Tensor& rows,
                                                      const at::Tensor& weights, const at::Tensor& row_index) {
  constexpr const char* op = "_unpermute_backward";
  check_floating(op, "rows", rows);
  check_dim(op, "rows", rows, 2, "[N, d]");
  check_row_index(op, row_index, rows.size(0));
  check_weights(op, weights, row_index, "row_index");
  check_tokens(op, "grad_y", grad_y, row_index.size(0), rows.size(1));
  check_unique_destinations(op, "row_index", row_index, rows.size(0));
  const c10::cuda::CUDAGuard guard(rows.device());
  const auto grad_y_as_rows = grad_y.to(rows.scalar_type());
  auto grad_rows = scatter_rows(grad_y_as_rows, row_index, weights, rows.size(0));
  auto grad_weights = row_dots(grad_y_as_rows, rows, row_index, weights.scalar_type());
  return {grad_rows, grad_weights};
}

TORCH_LIBRARY_IMPL(torch_moe, CUDA, m) {
  m.impl("dispatch", &dispatch);
  m.impl("_dispatch_backward", &dispatch_backward);
  m.impl("combine", &combine);
  m.impl("_combine_backward", &combine_backward);
  m.impl("permute", &permute);
  m.impl("permute_plan", &permute_plan_op);
  m.impl("_permute_backward", &permute_backward);
  m.impl("unpermute", &unpermute);
  m.impl("_unpermute_backward", &unpermute_backward);
}

}  // namespace torch_moe::cuda
