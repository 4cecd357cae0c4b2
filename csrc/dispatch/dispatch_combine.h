// Capacity-mode dispatch and combine and their backwards, written once over a backend B (CPU and CUDA differ only in
// B::flat_slot_index, the row movement kernels of B and a device guard): dispatch_combine_cpu.cpp and
// dispatch_combine_cuda.cu register these templates for their dispatch key.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/kernel_registration.h"
#include "dispatch/dispatch_checks.h"

namespace torch_moe {

// B provides Guard, scatter_rows, gather_rows, row_dots (common/row_backend.h) and
// flat_slot_index(op, expert_ids, slots, num_experts, capacity): expert_ids/slots [T, k] (passed check_slot_plan) ->
// flat row e * C + s of the [E * C, d] buffer, or -1 when not kept; the backend checks the ids of kept slots.

// The plan's checks, then B::flat_slot_index.
template <typename B>
at::Tensor slot_index(const char* op, const at::Tensor& expert_ids, const at::Tensor& slots, int64_t num_experts,
                      int64_t capacity) {
  check_slot_plan(op, expert_ids, slots, capacity, B::check_index_range);
  return B::flat_slot_index(op, expert_ids, slots, num_experts, capacity);
}

template <typename B>
at::Tensor dispatch_op(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& slots,
                       int64_t num_experts, int64_t capacity) {
  constexpr const char* op = "dispatch";
  check_floating(op, "x", x);
  check_dim(op, "x", x, 2, "[T, d]");
  TORCH_MOE_CHECK(num_experts > 0, "torch_moe.{}: argument 'num_experts' must be positive, got {}", op, num_experts);
  TORCH_MOE_CHECK(capacity >= 0, "torch_moe.{}: argument 'capacity' must be >= 0, got {}", op, capacity);
  check_same_device(op, {{"x", &x}, {"expert_ids", &expert_ids}});
  // The buffer [E, C, d] and the CPU's slot table [E * C]: sized before anything is allocated or indexed, naming the
  // larger of the two size arguments.
  const bool experts_larger = num_experts > capacity;
  const char* name = experts_larger ? "num_experts" : "capacity";
  const int64_t value = experts_larger ? num_experts : capacity;
  const int64_t rows = checked_mul(op, name, "num_experts * capacity", num_experts, capacity);
  const int64_t numel = checked_mul(op, name, "num_experts * capacity * d", rows, x.size(1));
  const int64_t bytes = check_alloc_bytes(op, name, "buffer [E, C, d]", numel, x.element_size()) +
                        check_alloc_bytes(op, name, "slot table [E * C]", rows, sizeof(int64_t));
  const typename B::Guard guard(x.device());
  return rethrow_alloc_failure(op, name, value, bytes, [&] {
    const auto index = slot_index<B>(op, expert_ids, slots, num_experts, capacity);
    check_size(op, "expert_ids", expert_ids, 0, x.size(0), "tokens of x");
    return B::scatter_rows(x, index, std::nullopt, rows).view({num_experts, capacity, x.size(1)});
  });
}

template <typename B>
at::Tensor dispatch_backward_op(const at::Tensor& grad_buffer, const at::Tensor& expert_ids,
                                const at::Tensor& slots) {
  constexpr const char* op = "_dispatch_backward";
  check_buffer(op, "grad_buffer", grad_buffer);
  const typename B::Guard guard(grad_buffer.device());
  const int64_t E = grad_buffer.size(0), C = grad_buffer.size(1), d = grad_buffer.size(2);
  const auto index = slot_index<B>(op, expert_ids, slots, E, C);
  return B::gather_rows(grad_buffer.reshape({E * C, d}), index, std::nullopt);
}

template <typename B>
at::Tensor combine_op(const at::Tensor& buffer, const at::Tensor& weights, const at::Tensor& expert_ids,
                      const at::Tensor& slots) {
  constexpr const char* op = "combine";
  check_buffer(op, "buffer", buffer);
  check_weights(op, weights, expert_ids, "expert_ids");
  check_same_device(op, {{"buffer", &buffer}, {"expert_ids", &expert_ids}});
  const typename B::Guard guard(buffer.device());
  const int64_t E = buffer.size(0), C = buffer.size(1), d = buffer.size(2);
  const auto index = slot_index<B>(op, expert_ids, slots, E, C);
  return B::gather_rows(buffer.reshape({E * C, d}), index, weights);
}

template <typename B>
std::tuple<at::Tensor, at::Tensor> combine_backward_op(const at::Tensor& grad_y, const at::Tensor& buffer,
                                                       const at::Tensor& weights, const at::Tensor& expert_ids,
                                                       const at::Tensor& slots) {
  constexpr const char* op = "_combine_backward";
  check_buffer(op, "buffer", buffer);
  check_weights(op, weights, expert_ids, "expert_ids");
  const typename B::Guard guard(buffer.device());
  const int64_t E = buffer.size(0), C = buffer.size(1), d = buffer.size(2);
  check_tokens(op, "grad_y", grad_y, expert_ids.size(0), d);
  const auto index = slot_index<B>(op, expert_ids, slots, E, C);
  const auto grad_y_as_buffer = grad_y.to(buffer.scalar_type());
  auto grad_buffer = B::scatter_rows(grad_y_as_buffer, index, weights, E * C).view({E, C, d});
  auto grad_weights = B::row_dots(grad_y_as_buffer, buffer.reshape({E * C, d}), index, weights.scalar_type());
  return {grad_buffer, grad_weights};
}

template <typename B>
void register_dispatch_combine(torch::Library& m) {
  impl_with_backward(m, "dispatch", &dispatch_op<B>, &dispatch_backward_op<B>);
  impl_with_backward(m, "combine", &combine_op<B>, &combine_backward_op<B>);
}

}  // namespace torch_moe
