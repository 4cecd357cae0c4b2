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

// Dropless first projection with the permutation fused in: rows[row_index[t, j]] = x[t] are gathered one expert
// segment at a time into a reused buffer, so neither pass builds nor keeps the k-times larger permuted rows.
// -> [T * k, M].
at::Tensor gather_grouped_mm(const at::Tensor& x, const at::Tensor& b, const at::Tensor& offsets,
                             const at::Tensor& row_index);
// -> (grad_x [T, K], grad_b [E, K, M]).
std::tuple<at::Tensor, at::Tensor> gather_grouped_mm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                              const at::Tensor& b, const at::Tensor& offsets,
                                                              const at::Tensor& row_index);
// Dropless last projection with the weighted combine fused in: y[t] = sum_j weights[t, j] * (h @ b[e])[row_index[t, j]].
// The expert output rows live one segment at a time in a reused buffer; backward needs only h. -> [T, M].
at::Tensor grouped_mm_unpermute(const at::Tensor& h, const at::Tensor& b, const at::Tensor& offsets,
                                const at::Tensor& weights, const at::Tensor& row_index);
// -> (grad_h [N, K], grad_b [E, K, M], grad_weights [T, k]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_mm_unpermute_backward(
    const at::Tensor& grad_y, const at::Tensor& h, const at::Tensor& b, const at::Tensor& offsets,
    const at::Tensor& weights, const at::Tensor& row_index);

}  // namespace torch_moe::cpu
