// Grouped GEMM over contiguous per-expert row segments (the dropless expert compute): CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace torch_moe::cpu {

// out [N, M]: out[offsets[e]:offsets[e+1]] = a[offsets[e]:offsets[e+1]] @ b[e]; rows past offsets[E] are zero.
at::Tensor grouped_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets);
// -> (grad_a [N, K], grad_b [E, K, M]); experts without rows get zero gradient.
std::tuple<at::Tensor, at::Tensor> grouped_mm_backward(const at::Tensor& grad_out, const at::Tensor& a,
                                                       const at::Tensor& b, const at::Tensor& offsets);

}  // namespace torch_moe::cpu
