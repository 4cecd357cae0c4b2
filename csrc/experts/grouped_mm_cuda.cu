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
#include "common/gemm_paths.h"
#include "common/kernel_registration.h"
#include "common/row_backend_cuda.h"
#include "common/row_ops_cuda.h"
#include "experts/grouped_mm.h"
#include "experts/glu.h"

namespace torch_moe::cuda {
namespace {

thread_local const char* g_last_path = "";

void note_path(GemmSite site, const char* path) {
  g_last_path = path;
  record_gemm_path(site, path);
}

// offsets [E + 1] int64 on the device of the rows it splits (`rows_name`), so no host tensor reaches a kernel; its
// values (the CPU's read_offsets checks, one small device-to-host copy) only when value checks are on.
void check_offsets(const char* op, const at::Tensor& offsets, int64_t num_experts, const char* rows_name,
                   const at::Tensor& rows_like, int64_t num_rows) {
  check_offsets_shape(op, offsets, num_experts);
  check_same_device(op, {{rows_name, &rows_like}, {"offsets", &offsets}});
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
at::Tensor segment_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets, GemmSite site) {
  const int64_t E = b.size(0), N = a.size(0), M = b.size(2);
  if (use_grouped_gemm(a, b)) {
    try {
      auto out = at::_grouped_mm(a, b, group_ends(offsets));
      zero_rows_past_end(out, offsets);
      note_path(site, kPathGroupedMm);
      return out;
    } catch (const c10::Error&) {
      // A layout or size this torch's grouped GEMM refuses: fall through to the loop.
    }
  }
  note_path(site, kPathPerExpertLoop);
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
at::Tensor segment_weight_grad(const at::Tensor& a, const at::Tensor& g, const at::Tensor& offsets, GemmSite site) {
  const int64_t E = offsets.size(0) - 1, K = a.size(1), M = g.size(1);
  if (use_grouped_gemm(a, g.unsqueeze(0))) {
    try {
      auto grad = at::_grouped_mm(a.t(), g, group_ends(offsets));
      // Experts without rows: make their gradient zero whatever the kernel left there.
      const auto has_rows = (offsets.narrow(0, 1, E) - offsets.narrow(0, 0, E)).gt(0).view({E, 1, 1});
      note_path(site, kPathGroupedMm);
      return at::where(has_rows, grad, at::zeros({}, grad.options()));
    } catch (const c10::Error&) {
    }
  }
  note_path(site, kPathPerExpertLoop);
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

// grouped_mm_backward_impl's segments: the offsets tensor itself, checked as check_offsets does.
struct CudaSegments {
  using Guard = c10::cuda::CUDAGuard;
  static at::Tensor read_segments(const char* op, const at::Tensor& offsets, int64_t num_experts, const at::Tensor& a) {
    check_offsets(op, offsets, num_experts, "a", a, a.size(0));
    return offsets;
  }
  static constexpr auto segment_mm = &cuda::segment_mm;
  static constexpr auto segment_weight_grad = &cuda::segment_weight_grad;
};

at::ScalarType opmath_of(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

const char* last_grouped_mm_path() { return g_last_path; }

at::Tensor grouped_mm(const at::Tensor& a_in, const at::Tensor& b, const at::Tensor& offsets) {
  constexpr const char* op = "grouped_mm";
  check_grouped_mm_operands(op, a_in, b);
  check_offsets(op, offsets, b.size(0), "a", a_in, a_in.size(0));
  const c10::cuda::CUDAGuard guard(a_in.device());
  return segment_mm(a_in.contiguous(), b, offsets, GemmSite{op, "forward"});
}

// The fused dropless ops below gather the token rows into [T * k, K] (scatter_rows) and run the grouped GEMMs on
// them: the same checks, in the same order, as the CPU kernels (grouped_mm.h), then device kernels.

// The token rows [N, K] a gathered op builds on this path (the CPU kernels gather a segment at a time): an
// allocation that can be had, else a user error naming x.
static void check_gathered_rows(const char* op, const at::Tensor& x, int64_t N) {
  check_alloc_bytes(op, "x", "the gathered rows [N, K]", checked_mul(op, "x", "N * K", N, x.size(1)),
                    x.element_size());
}

at::Tensor gather_grouped_mm(const at::Tensor& x, const at::Tensor& b, const at::Tensor& offsets,
                             const at::Tensor& row_index) {
  constexpr const char* op = "gather_grouped_mm";
  check_gather_operands<CudaRows>(op, x, b, row_index);
  const int64_t N = row_index.numel();
  check_offsets(op, offsets, b.size(0), "x", x, N);
  // The sizes the CPU kernel checks, plus the gathered rows.
  check_gathered_outputs(op, row_index, "b", b, 1);
  check_gathered_rows(op, x, N);
  const c10::cuda::CUDAGuard guard(x.device());
  return segment_mm(scatter_rows(x, row_index, std::nullopt, N), b, offsets, GemmSite{op, "forward"});
}

std::tuple<at::Tensor, at::Tensor> gather_grouped_mm_backward(const at::Tensor& grad_out_in, const at::Tensor& x,
                                                              const at::Tensor& b, const at::Tensor& offsets,
                                                              const at::Tensor& row_index,
                                                              std::array<bool, 2> output_mask) {
  constexpr const char* op = "_gather_grouped_mm_backward";
  check_gather_operands<CudaRows>(op, x, b, row_index);
  const int64_t N = row_index.numel();
  check_gather_grad_out(op, grad_out_in, N, b.size(2));
  check_same_device(op, {{"x", &x}, {"grad_out", &grad_out_in}});
  check_offsets(op, offsets, b.size(0), "x", x, N);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto grad_out = grad_out_in.to(x.scalar_type()).contiguous();
  const auto [want_x, want_b] = output_mask;
  at::Tensor grad_x, grad_b;
  if (want_b) {
    grad_b = segment_weight_grad(scatter_rows(x, row_index, std::nullopt, N), grad_out, offsets,
                                 GemmSite{"gather_grouped_mm", "backward_weight"});
  }
  if (want_x) {
    const auto grad_rows = segment_mm(grad_out, b.transpose(1, 2), offsets, GemmSite{"gather_grouped_mm", "backward_input"});
    grad_x = gather_rows(grad_rows, row_index, std::nullopt);  // a token's k rows summed in float32, rounded once
  }
  return {grad_x, grad_b};
}

at::Tensor grouped_mm_unpermute(const at::Tensor& h, const at::Tensor& b, const at::Tensor& offsets,
                                const at::Tensor& weights, const at::Tensor& row_index) {
  constexpr const char* op = "grouped_mm_unpermute";
  check_unpermute_operands<CudaRows>(op, h, b, weights, row_index);
  check_offsets(op, offsets, b.size(0), "h", h, h.size(0));
  const c10::cuda::CUDAGuard guard(h.device());
  // gather_rows scales by the weights in float32 and rounds each token's sum once, as the CPU does.
  return gather_rows(segment_mm(h.contiguous(), b, offsets, GemmSite{op, "forward"}), row_index, weights);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_mm_unpermute_backward(
    const at::Tensor& grad_y, const at::Tensor& h, const at::Tensor& b, const at::Tensor& offsets,
    const at::Tensor& weights, const at::Tensor& row_index, std::array<bool, 3> output_mask) {
  constexpr const char* op = "_grouped_mm_unpermute_backward";
  check_unpermute_operands<CudaRows>(op, h, b, weights, row_index);
  check_unpermute_grad_y(op, grad_y, row_index, b);
  check_same_device(op, {{"h", &h}, {"grad_y", &grad_y}});
  check_offsets(op, offsets, b.size(0), "h", h, h.size(0));
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t N = h.size(0);
  const auto opmath = opmath_of(h.scalar_type());
  // As on the CPU: per row r = row_index[t, j], G[r] = grad_y[t] and w[r] = weights[t, j] (0 for unused rows);
  // with P = G b^T: grad_h = w * P, grad_b[e] = h_e^T (w * G)_e, grad_weights[t, j] = <P[r], h[r]>. Every scaling
  // by w is done in float32 (the op-math type of bf16/fp16) and rounded once, as the CPU's scale_row_in_place does:
  // w is never rounded to the activation dtype.
  const auto grad_y_as_h = grad_y.to(h.scalar_type());
  const auto h_c = h.contiguous();
  const auto [want_h, want_b, want_weights] = output_mask;
  at::Tensor grad_h, grad_b, grad_weights;
  if (want_b) {
    // scatter_rows scales in opmath: (w * G)[r] = round(w[t, j] * G[r]).
    const auto wG = scatter_rows(grad_y_as_h, row_index, weights, N);
    grad_b = segment_weight_grad(h_c, wG, offsets, GemmSite{"grouped_mm_unpermute", "backward_weight"});
  }
  if (want_h || want_weights) {
    const auto G = scatter_rows(grad_y_as_h, row_index, std::nullopt, N);
    auto P = segment_mm(G, b.transpose(1, 2), offsets, GemmSite{"grouped_mm_unpermute", "backward_input"});
    if (want_weights) {
      const auto per_row_dot = (P.to(opmath) * h_c.to(opmath)).sum(1, /*keepdim=*/true);
      grad_weights = gather_rows(per_row_dot, row_index.reshape({-1, 1}), std::nullopt)
                         .reshape(weights.sizes())
                         .to(weights.scalar_type());
    }
    if (want_h) {
      const auto w_row = scatter_rows(weights.reshape({-1, 1}).to(opmath), row_index.reshape({-1, 1}), std::nullopt,
                                      N);  // [N, 1] in opmath
      // An in-place product with an opmath operand computes in opmath and rounds once into P's dtype.
      grad_h = P.mul_(w_row);
    }
  }
  return {grad_h, grad_b, grad_weights};
}

// The gated first half: the token rows are gathered once for both projections, then ATen's activation kernels.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_grouped_glu(const at::Tensor& x, const at::Tensor& w_gate,
                                                                  const at::Tensor& w_up, const at::Tensor& offsets,
                                                                  const at::Tensor& row_index,
                                                                  c10::string_view activation) {
  constexpr const char* op = "gather_grouped_glu";
  const auto kind = parse_glu_activation(op, activation);
  check_gather_operands<CudaRows>(op, x, w_gate, row_index, "w_gate");
  check_glu_weights(op, w_gate, w_up);
  const int64_t N = row_index.numel();
  check_offsets(op, offsets, w_gate.size(0), "x", x, N);
  check_gathered_outputs(op, row_index, "w_gate", w_gate, 3);
  check_gathered_rows(op, x, N);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto rows = scatter_rows(x, row_index, std::nullopt, N);
  auto gate = segment_mm(rows, w_gate, offsets, GemmSite{op, "forward"});
  auto up = segment_mm(rows, w_up, offsets, GemmSite{op, "forward"});
  auto act = at::empty_like(gate);
  glu_forward_out(act, gate, up, kind);
  return {act, gate, up};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_grouped_glu_backward(
    const at::Tensor& grad_act_in, const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
    const at::Tensor& gate_in, const at::Tensor& up_in, const at::Tensor& offsets, const at::Tensor& row_index,
    c10::string_view activation, std::array<bool, 3> output_mask) {
  constexpr const char* op = "_gather_grouped_glu_backward";
  const auto kind = parse_glu_activation(op, activation);
  check_gather_operands<CudaRows>(op, x, w_gate, row_index, "w_gate");
  check_glu_weights(op, w_gate, w_up);
  const int64_t N = row_index.numel();
  check_glu_projections(op, N, w_gate.size(2), grad_act_in, gate_in, up_in);
  check_same_device(op, {{"x", &x}, {"grad_act", &grad_act_in}, {"gate", &gate_in}, {"up", &up_in}});
  check_offsets(op, offsets, w_gate.size(0), "x", x, N);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dtype = x.scalar_type();
  const auto grad_act = grad_act_in.to(dtype);
  const auto gate = gate_in.to(dtype);
  const auto up = up_in.to(dtype);
  auto grad_gate = at::empty_like(gate, at::MemoryFormat::Contiguous);
  auto grad_up = at::empty_like(up, at::MemoryFormat::Contiguous);
  glu_backward_out(grad_gate, grad_up, grad_act, gate, up, kind);
  const auto [want_x, want_gate, want_up] = output_mask;
  at::Tensor grad_x, grad_w_gate, grad_w_up;
  if (want_gate || want_up) {
    const auto rows = scatter_rows(x, row_index, std::nullopt, N);
    const GemmSite site{"gather_grouped_glu", "backward_weight"};
    if (want_gate) grad_w_gate = segment_weight_grad(rows, grad_gate, offsets, site);
    if (want_up) grad_w_up = segment_weight_grad(rows, grad_up, offsets, site);
  }
  if (want_x) {
    // A row's gradient from both projections and a token's k rows are summed in opmath and rounded once, as the
    // CPU does (it adds the two projections per row before the per-token sum), not rounded per projection.
    const GemmSite site{"gather_grouped_glu", "backward_input"};
    auto grad_rows = segment_mm(grad_gate, w_gate.transpose(1, 2), offsets, site).to(opmath_of(dtype));
    grad_rows.add_(segment_mm(grad_up, w_up.transpose(1, 2), offsets, site));
    grad_x = gather_rows(grad_rows, row_index, std::nullopt).to(dtype);
  }
  return {grad_x, grad_w_gate, grad_w_up};
}

// glu on CUDA: the device-generic ATen math of glu.cpp under a device guard, registered from this CUDA-compiled
// file so that a CPU-only build has no CUDA kernel for it.
at::Tensor glu_cuda(const at::Tensor& gate, const at::Tensor& up, c10::string_view activation) {
  const c10::cuda::CUDAGuard guard(gate.device());
  return glu_op(gate, up, activation);
}

std::tuple<at::Tensor, at::Tensor> glu_backward_cuda(const at::Tensor& grad_act, const at::Tensor& gate,
                                                     const at::Tensor& up, c10::string_view activation,
                                                     std::array<bool, 2> output_mask) {
  const c10::cuda::CUDAGuard guard(gate.device());
  return glu_backward_op(grad_act, gate, up, activation, output_mask);
}

TORCH_LIBRARY_IMPL(torch_moe, CUDA, m) {
  TORCH_MOE_IMPL_GROUPED_MM_FAMILY(m, CudaSegments);
  impl_with_backward(m, "glu", &glu_cuda, &glu_backward_cuda);
}

}  // namespace torch_moe::cuda
