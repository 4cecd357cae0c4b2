// DSelect-k's per-token gate (smooth-steps, per-selector products over the code bits, mixture): the argument checks
// and the op bodies of both backends; the kernels are in dselect_k_gate_cpu.cpp and dselect_k_gate_cuda.cu.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <tuple>

#include "common/checks.h"
#include "common/router_math.h"

namespace torch_moe {

// ceil(log2(num_experts)): the code bits of one selector (0 for a single expert).
inline int64_t dselect_k_bits(int64_t num_experts) {
  int64_t bits = 0;
  while (bits < 62 && (int64_t{1} << bits) < num_experts) ++bits;
  return bits;
}

// The argument checks of dselect_k_gate, shared by both backends and by the backward (same order, same messages).
inline void check_dselect_k_gate_args(const char* op, const at::Tensor& code_logits, const at::Tensor& selector_logits,
                                      int64_t num_experts, double gamma) {
  check_floating(op, "code_logits", code_logits);
  check_dim(op, "code_logits", code_logits, 3, "[T, k, m]");
  check_floating(op, "selector_logits", selector_logits);
  check_dim(op, "selector_logits", selector_logits, 2, "[T, k]");
  TORCH_MOE_CHECK(num_experts >= 1 && num_experts <= (int64_t{1} << 62),
                  "torch_moe.{}: argument 'num_experts' must be in [1, 2^62], got {}", op, num_experts);
  TORCH_MOE_CHECK(std::isfinite(gamma) && gamma > 0, "torch_moe.{}: argument 'gamma' must be > 0 and finite, got {}",
                  op, gamma);
  const int64_t T = code_logits.size(0), k = code_logits.size(1);
  TORCH_MOE_CHECK(k >= 1, "torch_moe.{}: argument 'code_logits' must have at least one selector (k >= 1), got shape {}",
                  op, shape_str(code_logits));
  check_size(op, "code_logits", code_logits, 2, dselect_k_bits(num_experts), "code bits ceil(log2(num_experts))");
  check_size(op, "selector_logits", selector_logits, 0, T, "tokens of code_logits");
  check_size(op, "selector_logits", selector_logits, 1, k, "selectors of code_logits");
  TORCH_MOE_CHECK(selector_logits.scalar_type() == code_logits.scalar_type(),
                  "torch_moe.{}: argument 'selector_logits' must have the dtype of code_logits ({}), got {}", op,
                  dtype_name(code_logits.scalar_type()), dtype_name(selector_logits.scalar_type()));
  check_same_device(op, {{"code_logits", &code_logits}, {"selector_logits", &selector_logits}});
  const int64_t itemsize = static_cast<int64_t>(c10::elementSize(router_dtype(code_logits)));
  check_alloc_bytes(op, "num_experts", "selector_outputs [T, k, E]",
                    checked_mul(op, "num_experts", "T * k * num_experts", T * k, num_experts), itemsize);
}

inline void check_dselect_k_gate_backward_args(const char* op, const at::Tensor& grad_weights,
                                               const at::Tensor& grad_selector_outputs, const at::Tensor& code_logits,
                                               const at::Tensor& selector_logits, int64_t num_experts, double gamma) {
  check_dselect_k_gate_args(op, code_logits, selector_logits, num_experts, gamma);
  const int64_t T = code_logits.size(0), k = code_logits.size(1);
  check_floating(op, "grad_weights", grad_weights);
  check_dim(op, "grad_weights", grad_weights, 2, "[T, E]");
  check_size(op, "grad_weights", grad_weights, 0, T, "tokens of code_logits");
  check_size(op, "grad_weights", grad_weights, 1, num_experts, "num_experts");
  check_floating(op, "grad_selector_outputs", grad_selector_outputs);
  check_dim(op, "grad_selector_outputs", grad_selector_outputs, 3, "[T, k, E]");
  check_size(op, "grad_selector_outputs", grad_selector_outputs, 0, T, "tokens of code_logits");
  check_size(op, "grad_selector_outputs", grad_selector_outputs, 1, k, "selectors of code_logits");
  check_size(op, "grad_selector_outputs", grad_selector_outputs, 2, num_experts, "num_experts");
  check_same_device(op, {{"code_logits", &code_logits},
                         {"grad_weights", &grad_weights},
                         {"grad_selector_outputs", &grad_selector_outputs}});
}

// dselect_k_gate written once over a backend B: the checks, the inputs in the router dtype (float32; float64 for
// float64 logits), contiguous, then B::gate(code [T, k, m], selector [T, k], E, gamma) -> (q [T, E], r [T, k, E]).
template <typename B>
std::tuple<at::Tensor, at::Tensor> dselect_k_gate_op(const at::Tensor& code_logits, const at::Tensor& selector_logits,
                                                     int64_t num_experts, double gamma) {
  constexpr const char* op = "dselect_k_gate";
  check_dselect_k_gate_args(op, code_logits, selector_logits, num_experts, gamma);
  const auto acc = router_dtype(code_logits);
  return B::gate(code_logits.to(acc).contiguous(), selector_logits.to(acc).contiguous(), num_experts, gamma);
}

// _dselect_k_gate_backward written once over a backend B: the checks, then
// B::gate_grad(grad_q, grad_r, code, selector, E, gamma) -> (grad_code [T, k, m], grad_selector [T, k]) in the
// router dtype, returned in the dtypes of the logits.
template <typename B>
std::tuple<at::Tensor, at::Tensor> dselect_k_gate_backward_op(const at::Tensor& grad_weights,
                                                              const at::Tensor& grad_selector_outputs,
                                                              const at::Tensor& code_logits,
                                                              const at::Tensor& selector_logits, int64_t num_experts,
                                                              double gamma) {
  constexpr const char* op = "_dselect_k_gate_backward";
  check_dselect_k_gate_backward_args(op, grad_weights, grad_selector_outputs, code_logits, selector_logits,
                                     num_experts, gamma);
  const auto acc = router_dtype(code_logits);
  auto [grad_code, grad_selector] =
      B::gate_grad(grad_weights.to(acc).contiguous(), grad_selector_outputs.to(acc).contiguous(),
                   code_logits.to(acc).contiguous(), selector_logits.to(acc).contiguous(), num_experts, gamma);
  return {grad_code.to(code_logits.scalar_type()), grad_selector.to(selector_logits.scalar_type())};
}

}  // namespace torch_moe
