// CUDA grouped GEMM over per-expert row segments: torch's grouped GEMM (at::_grouped_mm, CUTLASS) where it
// supports the inputs (bfloat16 on sm90/sm100 with 16-byte aligned rows), else one GEMM per non-empty expert
// segment with the offsets read on the host (a sync; dropless mode only). Zero-token experts give zero rows and
// zero weight gradients on both paths.
#include "experts/grouped_mm_cuda.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <array>
#include <limits>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "common/kernel_registration.h"
#include "common/row_backend_cuda.h"
#include "common/row_ops_cuda.h"
#include "experts/grouped_mm.h"
#include "experts/glu.h"

namespace torch_moe::cuda {
namespace {

thread_local const char* g_last_path = "";

// The CPU's read_offsets checks: shape on the host always, values (one small device-to-host copy) when value
// checks are on.
void check_offsets(const char* op, const at::Tensor& offsets, int64_t num_experts, int64_t num_rows) {
  check_offsets_shape(op, offsets, num_experts);
  if (!value_checks_enabled()) return;
  const auto host = offsets.to(at::kCPU).contiguous();
  const int64_t* bounds = host.data_ptr<int64_t>();
  check_offset_values(op, bounds, num_experts, num_rows);
}

int capability_major(int device) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major;
}

bool forced_loop() {
  static const bool forced = [] {
    const char* v = std::getenv("TORCH_MOE_GROUPED_MM");
    return v != nullptr && std::strcmp(v, "loop") == 0;
  }();
  return forced;
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Whether at::_grouped_mm takes a [N, K] x [E, K, M] problem: bf16 CUTLASS kernels on sm90/sm100, every row
// stride a multiple of 16 bytes, row counts that fit its int32 offsets.
bool use_grouped_gemm(const at::Tensor& a, const at::Tensor& b) {
  if (forced_loop() || a.scalar_type() != at::kBFloat16 || b.scalar_type() != at::kBFloat16) return false;
  const int major = capability_major(a.get_device());
  if (major != 9 && major != 10) return false;
  const int64_t N = a.size(0), K = a.size(1), M = b.size(2);
  if (N == 0 || K == 0 || M == 0 || N >= std::numeric_limits<int32_t>::max()) return false;
  return K % 8 == 0 && M % 8 == 0 && aligned16(a) && aligned16(b);
}

at::Tensor group_ends(const at::Tensor& offsets) { return offsets.narrow(0, 1, offsets.size(0) - 1).to(at::kInt); }

std::vector<int64_t> host_bounds(const at::Tensor& offsets) {
  const auto host = offsets.to(at::kCPU).contiguous();
  return std::vector<int64_t>(host.data_ptr<int64_t>(), host.data_ptr<int64_t>() + host.numel());
}

// out [N, M] = segments of a (contiguous) times b[e] (any strides); rows past offsets[E] zero.
at::Tensor segment_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets) {
  const int64_t E = b.size(0), N = a.size(0), M = b.size(2);
  if (use_grouped_gemm(a, b)) {
    try {
      auto out = at::_grouped_mm(a, b, group_ends(offsets));
      zero_rows_past_end(out, offsets);
      g_last_path = "grouped_mm";
      return out;
    } catch (const c10::Error&) {
      // A layout or size this torch's grouped GEMM refuses: fall through to the loop.
    }
  }
  g_last_path = "per_expert_loop";
  auto out = at::zeros({N, M}, a.options());
  const auto bounds = host_bounds(offsets);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = bounds[e + 1] - bounds[e];
    if (n <= 0) continue;
    auto out_e = out.narrow(0, bounds[e], n);
    at::mm_out(out_e, a.narrow(0, bounds[e], n), b.select(0, e));
  }
  return out;
}

// [E, K, M]: per expert the sum over its rows of a[r]^T g[r]; zero for experts without rows.
at::Tensor segment_weight_grad(const at::Tensor& a, const at::Tensor& g, const at::Tensor& offsets) {
  const int64_t E = offsets.size(0) - 1, K = a.size(1), M = g.size(1);
  if (use_grouped_gemm(a, g.unsqueeze(0))) {
    try {
      auto grad = at::_grouped_mm(a.t(), g, group_ends(offsets));
      // Experts without rows: make their gradient zero whatever the kernel left there.
      const auto has_rows = (offsets.narrow(0, 1, E) - offsets.narrow(0, 0, E)).gt(0).view({E, 1, 1});
      g_last_path = "grouped_mm";
      return at::where(has_rows, grad, at::zeros({}, grad.options()));
    } catch (const c10::Error&) {
    }
  }
  g_last_path = "per_expert_loop";
  auto grad = at::zeros({E, K, M}, a.options());
  const auto bounds = host_bounds(offsets);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = bounds[e + 1] - bounds[e];
    if (n <= 0) continue;
    auto grad_e = grad.select(0, e);
    at::mm_out(grad_e, a.narrow(0, bounds[e], n).t(), g.narrow(0, bounds[e], n));
  }
  return grad;
}

// grouped_mm_backward_op's segments: the offsets tensor itself, checked as check_offsets does.
struct CudaSegments {
  using Guard = c10::cuda::CUDAGuard;
  static at::Tensor read_segments(const char* op, const at::Tensor& offsets, int64_t num_experts, int64_t num_rows) {
    check_offsets(op, offsets, num_experts, num_rows);
    return offsets;
  }
  static constexpr auto segment_mm = &cuda::segment_mm;
  static constexpr auto segment_weight_grad = &cuda::segment_weight_grad;
};

}  // namespace

const char* last_grouped_mm_path() { return g_last_path; }

at::Tensor grouped_mm(const at::Tensor& a_in, const at::Tensor& b, const at::Tensor& offsets) {
  constexpr const char* op = "grouped_mm";
  check_grouped_mm_operands(op, a_in, b);
  check_same_device(op, {{"a", &a_in}, {"offsets", &offsets}});
  check_offsets(op, offsets, b.size(0), a_in.size(0));
  const c10::cuda::CUDAGuard guard(a_in.device());
  return segment_mm(a_in.contiguous(), b, offsets);
}


at::Tensor gather_grouped_mm(const at::Tensor& x, const at::Tensor& b, const at::Tensor& offsets,
                             const at::Tensor& row_index) {
  constexpr const char* op = "gather_grouped_mm";
  check_floating(op, "x", x);
  check_dim(op, "x", x, 2, "[T, K]");
  check_row_plan<CudaRows>(op, row_index, x.size(0), row_index.numel());
  const c10::cuda::CUDAGuard guard(x.device());
  return grouped_mm(scatter_rows(x, row_index, std::nullopt, row_index.numel()), b, offsets);
}

std::tuple<at::Tensor, at::Tensor> gather_grouped_mm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                              const at::Tensor& b, const at::Tensor& offsets,
                                                              const at::Tensor& row_index,
                                                              std::array<bool, 2> output_mask) {
  constexpr const char* op = "_gather_grouped_mm_backward";
  check_floating(op, "x", x);
  check_dim(op, "x", x, 2, "[T, K]");
  check_row_plan<CudaRows>(op, row_index, x.size(0), row_index.numel());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto rows = scatter_rows(x, row_index, std::nullopt, row_index.numel());
  auto [grad_rows, grad_b] = grouped_mm_backward_op<CudaSegments>(grad_out, rows, b, offsets, output_mask);
  return {output_mask[0] ? gather_rows(grad_rows, row_index, std::nullopt) : at::Tensor(), grad_b};
}

at::Tensor grouped_mm_unpermute(const at::Tensor& h, const at::Tensor& b, const at::Tensor& offsets,
                                const at::Tensor& weights, const at::Tensor& row_index) {
  constexpr const char* op = "grouped_mm_unpermute";
  check_floating(op, "weights", weights);
  check_row_plan<CudaRows>(op, row_index, weights.size(0), h.size(0));
  check_same_shape(op, "weights", weights, "row_index", row_index);
  const c10::cuda::CUDAGuard guard(h.device());
  return gather_rows(grouped_mm(h, b, offsets), row_index, weights);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_mm_unpermute_backward(
    const at::Tensor& grad_y, const at::Tensor& h, const at::Tensor& b, const at::Tensor& offsets,
    const at::Tensor& weights, const at::Tensor& row_index, std::array<bool, 3> output_mask) {
  constexpr const char* op = "_grouped_mm_unpermute_backward";
  check_grouped_mm_operands(op, h, b);
  check_floating(op, "weights", weights);
  check_row_plan<CudaRows>(op, row_index, weights.size(0), h.size(0));
  check_same_shape(op, "weights", weights, "row_index", row_index);
  check_floating(op, "grad_y", grad_y);
  check_dim(op, "grad_y", grad_y, 2, "[T, M]");
  check_offsets(op, offsets, b.size(0), h.size(0));
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t N = h.size(0);
  // As on the CPU: per row r = row_index[t, j], G[r] = grad_y[t] and w[r] = weights[t, j] (0 for unused rows);
  // with P = G b^T: grad_h = w * P, grad_b[e] = h_e^T (w * G)_e, grad_weights[t, j] = <P[r], h[r]>.
  const auto G = scatter_rows(grad_y.to(h.scalar_type()), row_index, std::nullopt, N);
  const auto w_row = scatter_rows(weights.reshape({-1, 1}).to(h.scalar_type()), row_index.reshape({-1, 1}),
                                  std::nullopt, N);  // [N, 1]
  const auto h_c = h.contiguous();
  const auto [want_h, want_b, want_weights] = output_mask;
  at::Tensor grad_h, grad_b, grad_weights;
  if (want_b) grad_b = segment_weight_grad(h_c, (G * w_row).contiguous(), offsets);
  if (want_h || want_weights) {
    auto P = segment_mm(G, b.transpose(1, 2), offsets);
    if (want_weights) {
      const auto opmath = h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      const auto per_row_dot = (P.to(opmath) * h_c.to(opmath)).sum(1, /*keepdim=*/true);
      grad_weights = gather_rows(per_row_dot, row_index.reshape({-1, 1}), std::nullopt)
                         .reshape(weights.sizes())
                         .to(weights.scalar_type());
    }
    if (want_h) grad_h = P.mul_(w_row);
  }
  return {grad_h, grad_b, grad_weights};
}

// The gated first half as the composite of the gathers above and ATen's activation kernels: correct, but it
// gathers the token rows once per projection and writes the activation in separate passes.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_grouped_glu(const at::Tensor& x, const at::Tensor& w_gate,
                                                                  const at::Tensor& w_up, const at::Tensor& offsets,
                                                                  const at::Tensor& row_index,
                                                                  c10::string_view activation) {
  const c10::cuda::CUDAGuard guard(x.device());
  return gather_grouped_glu_composite(&gather_grouped_mm, x, w_gate, w_up, offsets, row_index, activation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_grouped_glu_backward(
    const at::Tensor& grad_act, const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
    const at::Tensor& gate, const at::Tensor& up, const at::Tensor& offsets, const at::Tensor& row_index,
    c10::string_view activation, std::array<bool, 3> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return gather_grouped_glu_backward_composite(&gather_grouped_mm_backward, grad_act, x, w_gate, w_up, gate, up,
                                               offsets, row_index, activation, output_mask);
}

TORCH_LIBRARY_IMPL(torch_moe, CUDA, m) { TORCH_MOE_IMPL_GROUPED_MM_FAMILY(m, CudaSegments); }

}  // namespace torch_moe::cuda
