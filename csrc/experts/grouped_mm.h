// Grouped GEMM over contiguous per-expert row segments (the dropless expert compute): the argument checks of both
// backends and the CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <array>
#include <string>
#include <tuple>
#include <utility>

#include "common/checks.h"
#include "common/gemm_paths.h"
#include "common/kernel_registration.h"

// Registers a backend's kernels of the grouped GEMM family (named alike in cpu:: and cuda::; the backward of
// grouped_mm is grouped_mm_backward_op over the backend's Segments) under the dispatch key of the
// TORCH_LIBRARY_IMPL block it is expanded in, from inside that backend's namespace.
#define TORCH_MOE_IMPL_GROUPED_MM_FAMILY(m, Segments)                                             \
  impl_with_backward(m, "grouped_mm", &grouped_mm, &grouped_mm_backward_op<Segments>);            \
  impl_with_backward(m, "gather_grouped_mm", &gather_grouped_mm, &gather_grouped_mm_backward);    \
  impl_with_backward(m, "gather_grouped_glu", &gather_grouped_glu, &gather_grouped_glu_backward); \
  impl_with_backward(m, "grouped_mm_unpermute", &grouped_mm_unpermute, &grouped_mm_unpermute_backward)

namespace torch_moe {

// Argument checks shared by the CPU and CUDA kernels of the grouped GEMM family (same order, same messages).
// a [N, K] and b [E, K, M]: floating, one dtype, one device.
inline void check_grouped_mm_operands(const char* op, const at::Tensor& a, const at::Tensor& b) {
  check_floating(op, "a", a);
  check_dim(op, "a", a, 2, "[N, K]");
  check_floating(op, "b", b);
  check_dim(op, "b", b, 3, "[E, K, M]");
  TORCH_MOE_CHECK(a.scalar_type() == b.scalar_type(), "torch_moe.{}: arguments 'a' and 'b' must share a dtype, got {} and {}",
                  op, dtype_name(a.scalar_type()), dtype_name(b.scalar_type()));
  check_size(op, "b", b, 1, a.size(1), "columns of a");
  check_same_device(op, {{"a", &a}, {"b", &b}});
  // The output [N, M]: each operand fits, but an expanded a or b can make N * M overflow.
  check_alloc_bytes(op, "a", "output [N, M]", checked_mul(op, "a", "N * M", a.size(0), b.size(2)), a.element_size());
}

// The `count` outputs [N, M] of a gathered op, N = row_index.numel() rows and M = w.size(2) columns of the weights w
// (named w_name): each an allocation that can be had, else a user error naming w_name. -> what they need together,
// as (bytes, a description for an allocation failure).
inline std::pair<int64_t, std::string> check_gathered_outputs(const char* op, const at::Tensor& row_index,
                                                              const char* w_name, const at::Tensor& w, int64_t count) {
  const int64_t numel = checked_mul(op, w_name, "N * M (rows of the plan times columns)", row_index.numel(), w.size(2));
  const int64_t bytes = check_alloc_bytes(op, w_name, "an output [N, M]", numel, w.element_size());
  return {checked_mul(op, w_name, "the bytes of the outputs", bytes, count),
          fmt::format("{} output(s) [N, M] = [{}, {}]", count, row_index.numel(), w.size(2))};
}

// offsets [E + 1] int64.
inline void check_offsets_shape(const char* op, const at::Tensor& offsets, int64_t num_experts) {
  check_dtype(op, "offsets", offsets, at::kLong);
  check_dim(op, "offsets", offsets, 1, "[E + 1]");
  check_size(op, "offsets", offsets, 0, num_experts + 1, "experts + 1");
}

// The values of offsets, read into bounds[0, E]: from 0, non-decreasing, ending at most at num_rows.
inline void check_offset_values(const char* op, const int64_t* bounds, int64_t num_experts, int64_t num_rows) {
  TORCH_MOE_CHECK(bounds[0] == 0, "torch_moe.{}: argument 'offsets' must start at 0, got {}", op, bounds[0]);
  for (int64_t e = 0; e < num_experts; ++e) {
    TORCH_MOE_CHECK(bounds[e] <= bounds[e + 1],
                    "torch_moe.{}: argument 'offsets' must be non-decreasing, got offsets[{}] = {} > offsets[{}] = {}",
                    op, e, bounds[e], e + 1, bounds[e + 1]);
  }
  TORCH_MOE_CHECK(bounds[num_experts] <= num_rows,
                  "torch_moe.{}: argument 'offsets' ends at {} but 'a' has only {} rows", op, bounds[num_experts],
                  num_rows);
}

// The operands of _grouped_mm_backward, then grad_out [N, M]: floating, the rows of a and the columns of b.
inline void check_grouped_mm_backward_args(const char* op, const at::Tensor& grad_out, const at::Tensor& a,
                                           const at::Tensor& b) {
  check_grouped_mm_operands(op, a, b);
  check_floating(op, "grad_out", grad_out);
  check_dim(op, "grad_out", grad_out, 2, "[N, M]");
  check_size(op, "grad_out", grad_out, 0, a.size(0), "rows of a");
  check_size(op, "grad_out", grad_out, 1, b.size(2), "columns of b");
}

// row_index [T, k] int64 naming distinct rows in [-1, num_rows), with the range and duplicate checks of the row
// backend B (CpuRows, CudaRows).
template <typename B>
void check_row_plan(const char* op, const at::Tensor& row_index, int64_t tokens, int64_t num_rows) {
  check_dtype(op, "row_index", row_index, at::kLong);
  check_dim(op, "row_index", row_index, 2, "[T, k]");
  check_size(op, "row_index", row_index, 0, tokens, "tokens");
  B::check_index_range(op, "row_index", row_index, -1, num_rows, nullptr);
  B::check_unique_destinations(op, "row_index", row_index, num_rows);
}

// x [T, K] (the tokens) against the weights b [E, K, M], named b_name in messages, and the row plan of backend B.
template <typename B>
void check_gather_operands(const char* op, const at::Tensor& x, const at::Tensor& b, const at::Tensor& row_index,
                           const char* b_name = "b") {
  check_floating(op, "x", x);
  check_dim(op, "x", x, 2, "[T, K]");
  check_floating(op, b_name, b);
  check_dim(op, b_name, b, 3, "[E, K, M]");
  TORCH_MOE_CHECK(x.scalar_type() == b.scalar_type(), "torch_moe.{}: arguments 'x' and '{}' must share a dtype, got {} and {}",
                  op, b_name, dtype_name(x.scalar_type()), dtype_name(b.scalar_type()));
  check_size(op, b_name, b, 1, x.size(1), "columns of x");
  check_same_device(op, {{"x", &x}, {b_name, &b}, {"row_index", &row_index}});
  check_row_plan<B>(op, row_index, x.size(0), row_index.numel());
}

// grad_out [N, M] of gather_grouped_mm's backward: floating, the rows of the plan and the columns of b.
inline void check_gather_grad_out(const char* op, const at::Tensor& grad_out, int64_t N, int64_t M) {
  check_floating(op, "grad_out", grad_out);
  check_dim(op, "grad_out", grad_out, 2, "[N, M]");
  check_size(op, "grad_out", grad_out, 0, N, "rows of the plan");
  check_size(op, "grad_out", grad_out, 1, M, "columns of b");
}

// h [N, K] and b [E, K, M] as grouped_mm's operands, weights [T, k] like row_index, all on h's device, and the row
// plan of backend B.
template <typename B>
void check_unpermute_operands(const char* op, const at::Tensor& h, const at::Tensor& b, const at::Tensor& weights,
                              const at::Tensor& row_index) {
  check_grouped_mm_operands(op, h, b);
  check_floating(op, "weights", weights);
  check_row_plan<B>(op, row_index, weights.size(0), h.size(0));
  check_same_shape(op, "weights", weights, "row_index", row_index);
  check_same_device(op, {{"h", &h}, {"weights", &weights}, {"row_index", &row_index}});
}

// grad_y [T, M] of grouped_mm_unpermute's backward: floating, the tokens of row_index and the columns of b.
inline void check_unpermute_grad_y(const char* op, const at::Tensor& grad_y, const at::Tensor& row_index,
                                   const at::Tensor& b) {
  check_floating(op, "grad_y", grad_y);
  check_dim(op, "grad_y", grad_y, 2, "[T, M]");
  check_size(op, "grad_y", grad_y, 0, row_index.size(0), "tokens");
  check_size(op, "grad_y", grad_y, 1, b.size(2), "columns of b");
}

// _grouped_mm_backward, written once over a backend B -> (grad_a [N, K], grad_b [E, K, M]); experts without rows get
// zero gradient. B::read_segments checks offsets (against a's rows and device) and returns what B::segment_mm and
// B::segment_weight_grad take (the bounds read to the host on the CPU, the offsets tensor on CUDA).
template <typename B>
std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_op(const at::Tensor& grad_out_in, const at::Tensor& a_in,
                                                          const at::Tensor& b, const at::Tensor& offsets,
                                                          std::array<bool, 2> output_mask) {
  constexpr const char* op = "_grouped_mm_backward";
  constexpr const char* site_op = "grouped_mm";
  check_grouped_mm_backward_args(op, grad_out_in, a_in, b);
  const auto segments = B::read_segments(op, offsets, b.size(0), a_in);
  const typename B::Guard guard(a_in.device());
  const auto grad_out = grad_out_in.to(a_in.scalar_type()).contiguous();
  return {output_mask[0] ? B::segment_mm(grad_out, b.transpose(1, 2), segments, GemmSite{site_op, "backward_input"})
                         : at::Tensor(),
          output_mask[1] ? B::segment_weight_grad(a_in.contiguous(), grad_out, segments,
                                                  GemmSite{site_op, "backward_weight"})
                         : at::Tensor()};
}

}  // namespace torch_moe

namespace torch_moe::cpu {

// out [N, M]: out[offsets[e]:offsets[e+1]] = a[offsets[e]:offsets[e+1]] @ b[e]; rows past offsets[E] are zero.
at::Tensor grouped_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets);
// In every backward here (and in grouped_mm_backward_op above), an output whose output_mask entry is false is
// neither computed nor allocated and comes back undefined.

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
