// Helpers for the Autograd-key kernels: tuple aliases, typed dispatcher handles and the refusal of double backward.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/kernel_registration.h"

namespace torch_moe {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;
using TensorPair = std::tuple<at::Tensor, at::Tensor>;
using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Typed handle of an op; callers keep it in a function-local static so the lookup happens once.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* qualified_name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(qualified_name, "").template typed<Signature>();
}

// Backward ops are differentiated by nobody: a second-order gradient through them raises
// "derivative for torch_moe::_x_backward is not implemented" instead of silently returning zeros.
inline torch::CppFunction refuse_double_backward() { return torch::autograd::autogradNotImplementedFallback(); }

// The Autograd kernel of a differentiable op `name`, and the refusal of double backward on its backward op.
template <typename Func>
void impl_autograd(torch::Library& m, const char* name, Func autograd_kernel) {
  m.impl(name, autograd_kernel);
  m.impl(backward_op_name(name).c_str(), refuse_double_backward());
}

}  // namespace torch_moe
