// CPU grouped GEMM: one GEMM per non-empty expert segment, looped in C++ (no per-expert Python overhead).
// Small segments run experts in parallel with single-threaded GEMMs; large ones give each GEMM all threads.
#include "experts/grouped_mm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/checks.h"

namespace torch_moe::cpu {
namespace {

// Rows per expert below which one GEMM cannot keep all threads busy, so experts run side by side instead.
constexpr int64_t kRowsPerThreadedGemm = 128;

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

// Runs body(e) for every expert with rows, in parallel across experts when segments are small.
template <typename Body>
void for_each_expert(const std::vector<int64_t>& bounds, const Body& body) {
  const int64_t E = static_cast<int64_t>(bounds.size()) - 1;
  const int64_t rows = bounds[E];
  if (E > 1 && rows < kRowsPerThreadedGemm * E && at::get_num_threads() > 1) {
    at::parallel_for(0, E, 1, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) body(e);
    });
  } else {
    for (int64_t e = 0; e < E; ++e) body(e);
  }
}

}  // namespace

at::Tensor grouped_mm(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& offsets) {
  constexpr const char* op = "grouped_mm";
  check_operands(op, a_in, b_in);
  const auto bounds = read_offsets(op, offsets, b_in.size(0), a_in.size(0));
  const auto a = a_in.contiguous();
  const auto b = b_in.contiguous();
  auto out = at::empty({a.size(0), b.size(2)}, a.options());
  const int64_t E = b.size(0);
  if (bounds[E] < a.size(0)) out.narrow(0, bounds[E], a.size(0) - bounds[E]).zero_();
  for_each_expert(bounds, [&](int64_t e) {
    const int64_t n = bounds[e + 1] - bounds[e];
    if (n == 0) return;
    auto out_e = out.narrow(0, bounds[e], n);
    at::mm_out(out_e, a.narrow(0, bounds[e], n), b.select(0, e));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward(const at::Tensor& grad_out_in, const at::Tensor& a_in,
                                                       const at::Tensor& b_in, const at::Tensor& offsets) {
  constexpr const char* op = "_grouped_mm_backward";
  check_operands(op, a_in, b_in);
  check_floating(op, "grad_out", grad_out_in);
  check_dim(op, "grad_out", grad_out_in, 2, "[N, M]");
  check_size(op, "grad_out", grad_out_in, 0, a_in.size(0), "rows of a");
  check_size(op, "grad_out", grad_out_in, 1, b_in.size(2), "columns of b");
  const auto bounds = read_offsets(op, offsets, b_in.size(0), a_in.size(0));
  const auto a = a_in.contiguous();
  const auto b = b_in.contiguous();
  const auto grad_out = grad_out_in.to(a.scalar_type()).contiguous();
  const int64_t E = b.size(0);
  auto grad_a = at::empty_like(a);
  auto grad_b = at::empty_like(b);
  if (bounds[E] < a.size(0)) grad_a.narrow(0, bounds[E], a.size(0) - bounds[E]).zero_();
  for (int64_t e = 0; e < E; ++e) {
    if (bounds[e + 1] == bounds[e]) grad_b.select(0, e).zero_();
  }
  for_each_expert(bounds, [&](int64_t e) {
    const int64_t n = bounds[e + 1] - bounds[e];
    if (n == 0) return;
    const auto g = grad_out.narrow(0, bounds[e], n);
    auto grad_a_e = grad_a.narrow(0, bounds[e], n);
    auto grad_b_e = grad_b.select(0, e);
    at::mm_out(grad_a_e, g, b.select(0, e).t());
    at::mm_out(grad_b_e, a.narrow(0, bounds[e], n).t(), g);
  });
  return {grad_a, grad_b};
}

TORCH_LIBRARY_IMPL(torch_moe, CPU, m) {
  m.impl("grouped_mm", &grouped_mm);
  m.impl("_grouped_mm_backward", &grouped_mm_backward);
}

}  // namespace torch_moe::cpu
