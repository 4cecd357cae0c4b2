// CPU kernels of dispatch, combine, permute, unpermute and their backwards, on top of the shared row kernels.
#include "dispatch/dispatch_combine.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/row_ops.h"
#include "dispatch/capacity_plan.h"
#include "dispatch/dispatch_checks.h"

namespace torch_moe::cpu {
namespace {

// expert_ids/slots [T, k] -> flat row e * C + s of the [E * C, d] buffer, or -1 when not kept. Raw loops rather than
// ATen ops: on small moves the ten or so elementwise ops this took cost more than moving the rows.
at::Tensor flat_slot_index(const char* op, const at::Tensor& expert_ids_in, const at::Tensor& slots_in,
                           int64_t num_experts, int64_t capacity) {
  check_slot_plan(op, expert_ids_in, slots_in, capacity);
  const auto expert_ids = expert_ids_in.contiguous();
  const auto slots = slots_in.contiguous();
  const int64_t n = slots.numel();
  const int64_t* ep = expert_ids.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  // Only kept assignments must name a real expert.
  for (int64_t a = 0; a < n; ++a) {
    TORCH_MOE_CHECK(sp[a] < 0 || (ep[a] >= 0 && ep[a] < num_experts),
                    "torch_moe.{}: argument '{}' must hold values in [{}, {}), got {} at flat index {}", op,
                    "expert_ids", 0, num_experts, ep[a], a);
  }
  auto index = at::empty(slots.sizes(), slots.options());
  int64_t* ip = index.data_ptr<int64_t>();
  for (int64_t a = 0; a < n; ++a) ip[a] = sp[a] >= 0 ? ep[a] * capacity + sp[a] : -1;
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
  const auto index = flat_slot_index(op, expert_ids, slots, num_experts, capacity);
  check_size(op, "expert_ids", expert_ids, 0, x.size(0), "tokens of x");
  return scatter_rows(x, index, std::nullopt, num_experts * capacity).view({num_experts, capacity, x.size(1)});
}

at::Tensor dispatch_backward(const at::Tensor& grad_buffer, const at::Tensor& expert_ids, const at::Tensor& slots) {
  constexpr const char* op = "_dispatch_backward";
  check_buffer(op, "grad_buffer", grad_buffer);
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
  const auto grad_y_as_rows = grad_y.to(rows.scalar_type());
  auto grad_rows = scatter_rows(grad_y_as_rows, row_index, weights, rows.size(0));
  auto grad_weights = row_dots(grad_y_as_rows, rows, row_index, weights.scalar_type());
  return {grad_rows, grad_weights};
}

TORCH_LIBRARY_IMPL(torch_moe, CPU, m) {
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

}  // namespace torch_moe::cpu
