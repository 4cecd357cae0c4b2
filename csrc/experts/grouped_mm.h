// Grouped GEMM over contiguous per-expert row segments (the dropless expert compute): CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <array>
#include <tuple>

namespace torch_moe::cpu {

// out [N, M]: out[offsets[e]:offsets[e+1]] = a[offsets[e]:offsets[e+1]] @ b[e]; rows past offsets[E] are zero.
at::Tensor grouped_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets);
// -> (grad_a [N, K], grad_b [E, K, M]); experts without rows get zero gradient. In every backward here, an output
// whose output_mask entry is false is neither computed nor allocated and comes back undefined.
std::tuple<at::Tensor, at::Tensor> grouped_mm_backward(const at::Tensor& grad_out, const at::Tensor& a,
                                                       const at::Tensor& b, const at::Tensor& offsets,
                                                       std::array<bool, 2> output_mask);

// Dropless first projection with the permutation fused in: rows[row_index[t, j]] = x[t] are gathered one expert
// segment at a time into a reused buffer, so neither pass builds nor keeps the k-times larger permuted rows.
// -> [T * k, M].
at::Tensor gather_grouped_mm(const at::Tensor& x, const at::Tensor& b, const at::Tensor& offsets,
                             const at::Tensor& row_index);
// -> (grad_x [T, K], grad_b [E, K, M]).
std::tuple<at::Tensor, at::Tensor> gather_grouped_mm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                              const at::Tensor& b, const at::Tensor& offsets,
                                                              const at::Tensor& row_index,
                                                              std::array<bool, 2> output_mask);
// The gated first half of a SwiGLU / GeGLU expert with the permutation fused in: gate = rows @ w_gate[e],
// up = rows @ w_up[e], act = f(gate) * up for rows gathered as in gather_grouped_mm, one segment at a time, so the
// rows are gathered once and the activation is formed while its segment is in cache. -> (act, gate, up), each
// [T * k, M]; gate and up are what backward needs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_grouped_glu(const at::Tensor& x, const at::Tensor& w_gate,
                                                                  const at::Tensor& w_up, const at::Tensor& offsets,
                                                                  const at::Tensor& row_index,
                                                                  c10::string_view activation);
// -> (grad_x [T, K], grad_w_gate [E, K, M], grad_w_up [E, K, M]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_grouped_glu_backward(
    const at::Tensor& grad_act, const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
    const at::Tensor& gate, const at::Tensor& up, const at::Tensor& offsets, const at::Tensor& row_index,
    c10::string_view activation, std::array<bool, 3> output_mask);
// Dropless last projection with the weighted combine fused in: y[t] = sum_j weights[t, j] * (h @ b[e])[row_index[t, j]].
// The expert output rows live one segment at a time in a reused buffer; backward needs only h. -> [T, M].
at::Tensor grouped_mm_unpermute(const at::Tensor& h, const at::Tensor& b, const at::Tensor& offsets,
                                const at::Tensor& weights, const at::Tensor& row_index);
// -> (grad_h [N, K], grad_b [E, K, M], grad_weights [T, k]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_mm_unpermute_backward(
    const at::Tensor& grad_y, const at::Tensor& h, const at::Tensor& b, const at::Tensor& offsets,
    const at::Tensor& weights, const at::Tensor& row_index, std::array<bool, 3> output_mask);

}  // namespace torch_moe::cpu
