// Helpers for the Autograd-key kernels: typed dispatcher handles and the refusal of double backward.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

namespace torch_moe {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Typed handle of an op; callers keep it in a function-local static so the lookup happens once.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* qualified_name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(qualified_name, "").template typed<Signature>();
}

// Backward ops are differentiated by nobody: a second-order gradient through them raises
// "derivative for torch_moe::_x_backward is not implemented" instead of silently returning zeros.
inline torch::CppFunction refuse_double_backward() { return torch::autograd::autogradNotImplementedFallback(); }

}  // namespace torch_moe
