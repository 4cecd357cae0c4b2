// CPU grouped GEMM: one batched GEMM over segments padded to the longest when the padding is cheap, else one
// GEMM per non-empty expert segment looped in C++; no per-expert Python overhead either way.
#include "experts/grouped_mm.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "common/checks.h"
#include "common/row_ops.h"

namespace torch_moe::cpu {
namespace {

std::vector<int64_t> read_offsets(const char* op, const at::Tensor& offsets, int64_t num_experts, int64_t num_rows) {
  check_dtype(op, "offsets", offsets, at::kLong);
  check_dim(op, "offsets", offsets, 1, "[E + 1]");
  check_size(op, "offsets", offsets, 0, num_experts + 1, "experts + 1");
  const auto c = offsets.contiguous();
  std::vector<int64_t> bounds(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + num_experts + 1);
  TORCH_MOE_CHECK(bounds[0] == 0, "torch_moe.{}: argument 'offsets' must start at 0, got {}", op, bounds[0]);
  for (int64_t e = 0; e < num_experts; ++e) {
    TORCH_MOE_CHECK(bounds[e] <= bounds[e + 1],
                    "torch_moe.{}: argument 'offsets' must be non-decreasing, got offsets[{}] = {} > offsets[{}] = {}",
                    op, e, bounds[e], e + 1, bounds[e + 1]);
  }
  TORCH_MOE_CHECK(bounds[num_experts] <= num_rows,
                  "torch_moe.{}: argument 'offsets' ends at {} but 'a' has only {} rows", op, bounds[num_experts],
                  num_rows);
  return bounds;
}

void check_operands(const char* op, const at::Tensor& a, const at::Tensor& b) {
  check_floating(op, "a", a);
  check_dim(op, "a", a, 2, "[N, K]");
  check_floating(op, "b", b);
  check_dim(op, "b", b, 3, "[E, K, M]");
  TORCH_MOE_CHECK(a.scalar_type() == b.scalar_type(), "torch_moe.{}: arguments 'a' and 'b' must share a dtype, got {} and {}",
                  op, dtype_name(a.scalar_type()), dtype_name(b.scalar_type()));
  check_size(op, "b", b, 1, a.size(1), "columns of a");
  check_same_device(op, {{"a", &a}, {"b", &b}});
}

// Segments padded to the longest one, as [E, C_max, cols]; used when that costs at most 2x the rows, so that the
// whole group is one batched GEMM (one fork/join) instead of E small threaded GEMMs, each paying a barrier.
bool pad_to_batch(const std::vector<int64_t>& bounds, int64_t* max_rows) {
  const int64_t E = static_cast<int64_t>(bounds.size()) - 1;
  int64_t longest = 0;
  for (int64_t e = 0; e < E; ++e) longest = std::max(longest, bounds[e + 1] - bounds[e]);
  *max_rows = longest;
  return E > 1 && longest > 0 && E * longest <= 2 * bounds[E];
}

at::Tensor pack(const at::Tensor& rows, const std::vector<int64_t>& bounds, int64_t max_rows) {
  const int64_t E = static_cast<int64_t>(bounds.size()) - 1;
  auto packed = at::zeros({E, max_rows, rows.size(1)}, rows.options());
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = bounds[e + 1] - bounds[e];
    if (n > 0) packed.select(0, e).narrow(0, 0, n).copy_(rows.narrow(0, bounds[e], n));
  }
  return packed;
}

void unpack_into(at::Tensor& rows, const at::Tensor& packed, const std::vector<int64_t>& bounds) {
  const int64_t E = static_cast<int64_t>(bounds.size()) - 1;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = bounds[e + 1] - bounds[e];
    if (n > 0) rows.narrow(0, bounds[e], n).copy_(packed.select(0, e).narrow(0, 0, n));
  }
}

// out [N, M]: each segment of a (contiguous) times its expert's b[e] (any strides); rows past the end zero.
at::Tensor segment_mm(const at::Tensor& a, const at::Tensor& b, const std::vector<int64_t>& bounds) {
  const int64_t E = b.size(0);
  auto out = at::empty({a.size(0), b.size(2)}, a.options());
  if (bounds[E] < a.size(0)) out.narrow(0, bounds[E], a.size(0) - bounds[E]).zero_();
  int64_t max_rows = 0;
  if (pad_to_batch(bounds, &max_rows)) {
    unpack_into(out, at::bmm(pack(a, bounds, max_rows), b), bounds);
    return out;
  }
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = bounds[e + 1] - bounds[e];
    if (n == 0) continue;
    auto out_e = out.narrow(0, bounds[e], n);
    at::mm_out(out_e, a.narrow(0, bounds[e], n), b.select(0, e));
  }
  return out;
}

// [E, K, M]: sum over each segment of a[r]^T g[r] (zero for experts without rows).
at::Tensor segment_weight_grad(const at::Tensor& a, const at::Tensor& g, const std::vector<int64_t>& bounds) {
  const int64_t E = static_cast<int64_t>(bounds.size()) - 1;
  int64_t max_rows = 0;
  if (pad_to_batch(bounds, &max_rows)) {
    // Padding rows are zero, so they add nothing.
    return at::bmm(pack(a, bounds, max_rows).transpose(1, 2), pack(g, bounds, max_rows));
  }
  auto grad = at::empty({E, a.size(1), g.size(1)}, a.options());
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = bounds[e + 1] - bounds[e];
    auto grad_e = grad.select(0, e);
    if (n == 0) {
      grad_e.zero_();
    } else {
      at::mm_out(grad_e, a.narrow(0, bounds[e], n).t(), g.narrow(0, bounds[e], n));
    }
  }
  return grad;
}

}  // namespace

at::Tensor grouped_mm(const at::Tensor& a_in, const at::Tensor& b, const at::Tensor& offsets) {
  constexpr const char* op = "grouped_mm";
  check_operands(op, a_in, b);
  const auto bounds = read_offsets(op, offsets, b.size(0), a_in.size(0));
  return segment_mm(a_in.contiguous(), b, bounds);
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward(const at::Tensor& grad_out_in, const at::Tensor& a_in,
                                                       const at::Tensor& b, const at::Tensor& offsets) {
  constexpr const char* op = "_grouped_mm_backward";
  check_operands(op, a_in, b);
  check_floating(op, "grad_out", grad_out_in);
  check_dim(op, "grad_out", grad_out_in, 2, "[N, M]");
  check_size(op, "grad_out", grad_out_in, 0, a_in.size(0), "rows of a");
  check_size(op, "grad_out", grad_out_in, 1, b.size(2), "columns of b");
  const auto bounds = read_offsets(op, offsets, b.size(0), a_in.size(0));
  const auto grad_out = grad_out_in.to(a_in.scalar_type()).contiguous();
  return {segment_mm(grad_out, b.transpose(1, 2), bounds), segment_weight_grad(a_in.contiguous(), grad_out, bounds)};
}

namespace {

// row_index [T, k] int64 naming distinct rows in [-1, num_rows).
void check_row_plan(const char* op, const at::Tensor& row_index, int64_t tokens, int64_t num_rows) {
  check_dtype(op, "row_index", row_index, at::kLong);
  check_dim(op, "row_index", row_index, 2, "[T, k]");
  check_size(op, "row_index", row_index, 0, tokens, "tokens");
  check_index_range(op, "row_index", row_index, -1, num_rows);
  check_unique_destinations(op, "row_index", row_index, num_rows);
}

}  // namespace

at::Tensor gather_grouped_mm(const at::Tensor& x, const at::Tensor& b, const at::Tensor& offsets,
                             const at::Tensor& row_index) {
  constexpr const char* op = "gather_grouped_mm";
  check_floating(op, "x", x);
  check_dim(op, "x", x, 2, "[T, K]");
  check_row_plan(op, row_index, x.size(0), row_index.numel());
  return grouped_mm(scatter_rows(x, row_index, std::nullopt, row_index.numel()), b, offsets);
}

std::tuple<at::Tensor, at::Tensor> gather_grouped_mm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                              const at::Tensor& b, const at::Tensor& offsets,
                                                              const at::Tensor& row_index) {
  constexpr const char* op = "_gather_grouped_mm_backward";
  check_floating(op, "x", x);
  check_dim(op, "x", x, 2, "[T, K]");
  check_row_plan(op, row_index, x.size(0), row_index.numel());
  // The permuted rows are rebuilt (a copy) rather than kept alive between forward and backward.
  const auto rows = scatter_rows(x, row_index, std::nullopt, row_index.numel());
  auto [grad_rows, grad_b] = grouped_mm_backward(grad_out, rows, b, offsets);
  return {gather_rows(grad_rows, row_index, std::nullopt), grad_b};
}

at::Tensor grouped_mm_unpermute(const at::Tensor& h, const at::Tensor& b, const at::Tensor& offsets,
                                const at::Tensor& weights, const at::Tensor& row_index) {
  constexpr const char* op = "grouped_mm_unpermute";
  check_floating(op, "weights", weights);
  check_row_plan(op, row_index, weights.size(0), h.size(0));
  check_same_shape(op, "weights", weights, "row_index", row_index);
  return gather_rows(grouped_mm(h, b, offsets), row_index, weights);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_mm_unpermute_backward(
    const at::Tensor& grad_y, const at::Tensor& h, const at::Tensor& b, const at::Tensor& offsets,
    const at::Tensor& weights, const at::Tensor& row_index) {
  constexpr const char* op = "_grouped_mm_unpermute_backward";
  check_operands(op, h, b);
  check_floating(op, "weights", weights);
  check_row_plan(op, row_index, weights.size(0), h.size(0));
  check_same_shape(op, "weights", weights, "row_index", row_index);
  check_floating(op, "grad_y", grad_y);
  check_dim(op, "grad_y", grad_y, 2, "[T, M]");
  const int64_t N = h.size(0);
  // Per row r = row_index[t, j]: G[r] = grad_y[t] and its weight w[r] = weights[t, j] (0 for unused rows).
  const auto G = scatter_rows(grad_y.to(h.scalar_type()), row_index, std::nullopt, N);
  const auto w_row = scatter_rows(weights.reshape({-1, 1}).to(h.scalar_type()),
                                  row_index.reshape({-1, 1}), std::nullopt, N);  // [N, 1]
  // out[r] = h[r] @ b[e] contributes w[r] * out[r] to y: with P = G b^T,
  // grad_h = w * P, grad_b[e] = h_e^T (w * G)_e, grad_weights[t, j] = <P[r], h[r]>.
  // Scaling G (model width) rather than h (hidden width) and P in place keeps the transients small.
  const auto bounds = read_offsets(op, offsets, b.size(0), h.size(0));
  const auto h_c = h.contiguous();
  auto P = segment_mm(G, b.transpose(1, 2), bounds);
  auto grad_b = segment_weight_grad(h_c, G * w_row, bounds);
  const auto opmath = h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto per_row_dot = (P.to(opmath) * h_c.to(opmath)).sum(1, /*keepdim=*/true);
  auto grad_weights = gather_rows(per_row_dot, row_index.reshape({-1, 1}), std::nullopt)
                          .reshape(weights.sizes())
                          .to(weights.scalar_type());
  return {P.mul_(w_row), grad_b, grad_weights};
}

TORCH_LIBRARY_IMPL(torch_moe, CPU, m) {
  m.impl("grouped_mm", &grouped_mm);
  m.impl("_grouped_mm_backward", &grouped_mm_backward);
  m.impl("gather_grouped_mm", &gather_grouped_mm);
  m.impl("_gather_grouped_mm_backward", &gather_grouped_mm_backward);
  m.impl("grouped_mm_unpermute", &grouped_mm_unpermute);
  m.impl("_grouped_mm_unpermute_backward", &grouped_mm_unpermute_backward);
}

}  // namespace torch_moe::cpu
