// Registration helpers for the TORCH_LIBRARY_IMPL blocks of the backend and Autograd kernels: a differentiable op
// and its backward op `_<name>_backward` (house style 2) are registered together.
#pragma once

#include <torch/library.h>

#include <string>

namespace torch_moe {

// "_<name>_backward": the backward op of op `name`.
inline std::string backward_op_name(const char* name) { return "_" + std::string(name) + "_backward"; }

// One backend's kernels of op `name` and of its backward op.
template <typename Forward, typename Backward>
void impl_with_backward(torch::Library& m, const char* name, Forward forward, Backward backward) {
  m.impl(name, forward);
  m.impl(backward_op_name(name).c_str(), backward);
}

}  // namespace torch_moe
