// CPU grouped GEMM: one GEMM per non-empty expert segment, exactly its rows (no padding), looped in C++. The fused
// dropless ops move token rows through one reused segment-sized buffer, so no [T * k, d_model] tensor is built; the
// segment runtime they run on (plan, schedule, gathers) is segment_runtime_cpu.h.
#include "experts/grouped_mm.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <vector>

#include "common/checks.h"
#include "common/cpu_cache.h"
#include "common/kernel_registration.h"
#include "common/row_backend.h"
#include "common/row_math.h"
#include "common/row_ops.h"
#include "experts/glu.h"
#include "experts/segment_runtime_cpu.h"

namespace torch_moe::cpu {
namespace {

// out [N, M]: each segment of a (contiguous) times its expert's b[e] (any strides); other rows zero. Small segments
// run side by side on the schedule, large ones one after the other with their blocks threaded (as the fused ops).
at::Tensor segment_mm(const at::Tensor& a, const at::Tensor& b, const std::vector<int64_t>& bounds, GemmSite site) {
  record_gemm_path(site, kPathCpuLoop);
  auto out = empty_cached({a.size(0), b.size(2)}, a.options());
  zero_rows_past_segments(out, bounds);
  run_segments(schedule_segments(bounds, a.size(1) * b.size(2)), bounds, [&](int64_t e, int64_t) {
    const int64_t n = bounds[e + 1] - bounds[e];
    auto out_e = out.narrow(0, bounds[e], n);
    fixed_mm_out(out_e, a.narrow(0, bounds[e], n), b.select(0, e));
  });
  return out;
}

// [E, K, M]: sum over each segment of a[r]^T g[r] (zero for experts without rows).
at::Tensor segment_weight_grad(const at::Tensor& a, const at::Tensor& g, const std::vector<int64_t>& bounds,
                               GemmSite site) {
  record_gemm_path(site, kPathCpuLoop);
  const int64_t E = static_cast<int64_t>(bounds.size()) - 1;
  auto grad = empty_cached({E, a.size(1), g.size(1)}, a.options());
  zero_empty_experts(grad, bounds);
  run_segments(schedule_segments(bounds, a.size(1) * g.size(1)), bounds, [&](int64_t e, int64_t) {
    const int64_t n = bounds[e + 1] - bounds[e];
    auto grad_e = grad.select(0, e);
    fixed_mm_out(grad_e, a.narrow(0, bounds[e], n).t(), g.narrow(0, bounds[e], n));
  });
  return grad;
}

// grouped_mm_backward_op's segments: the offsets read (and checked) on the host.
struct CpuSegments {
  using Guard = NoDeviceGuard;
  static std::vector<int64_t> read_segments(const char* op, const at::Tensor& offsets, int64_t num_experts,
                                            const at::Tensor& a) {
    return read_offsets(op, offsets, num_experts, a.size(0));
  }
  static constexpr auto segment_mm = &cpu::segment_mm;
  static constexpr auto segment_weight_grad = &cpu::segment_weight_grad;
};

}  // namespace

at::Tensor grouped_mm(const at::Tensor& a_in, const at::Tensor& b, const at::Tensor& offsets) {
  constexpr const char* op = "grouped_mm";
  check_grouped_mm_operands(op, a_in, b);
  const auto bounds = read_offsets(op, offsets, b.size(0), a_in.size(0));
  return segment_mm(a_in.contiguous(), b, bounds, GemmSite{op, "forward"});
}



at::Tensor gather_grouped_mm(const at::Tensor& x_in, const at::Tensor& b, const at::Tensor& offsets,
                             const at::Tensor& row_index) {
  constexpr const char* op = "gather_grouped_mm";
  check_gather_operands<CpuRows>(op, x_in, b, row_index);
  const int64_t N = row_index.numel(), K = x_in.size(1), M = b.size(2), E = b.size(0);
  const auto [bytes, what] = check_gathered_outputs(op, row_index, "b", b, 1);
  return rethrow_alloc_failure(op, "b", what, bytes, [&] {
    const SegmentRun run(op, offsets, row_index, E, N, K * M, x_in);
    record_gemm_path({op, "forward"}, kPathCpuLoop);
    auto out = empty_cached({N, M}, run.x.options());
    zero_rows_past_segments(out, run.plan.bounds);
    run_gathered_segments(run, [&](int64_t e, int64_t first, int64_t n, const at::Tensor& rows) {
      auto out_e = out.narrow(0, first, n);
      fixed_mm_out(out_e, rows, b.select(0, e));
    });
    return out;
  });
}

std::tuple<at::Tensor, at::Tensor> gather_grouped_mm_backward(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                                              const at::Tensor& b, const at::Tensor& offsets,
                                                              const at::Tensor& row_index,
                                                              std::array<bool, 2> output_mask) {
  constexpr const char* op = "_gather_grouped_mm_backward";
  check_gather_operands<CpuRows>(op, x_in, b, row_index);
  const int64_t N = row_index.numel(), T = x_in.size(0), K = x_in.size(1), M = b.size(2), E = b.size(0);
  check_gather_grad_out(op, grad_out_in, N, M);
  const SegmentRun run(op, offsets, row_index, E, N, K * M, x_in, grad_out_in);
  const auto& plan = run.plan;
  const auto& x = run.x;
  const auto& grad_out = run.grad;
  const auto [want_x, want_b] = output_mask;
  if (want_x) record_gemm_path({"gather_grouped_mm", "backward_input"}, kPathCpuLoop);
  if (want_b) record_gemm_path({"gather_grouped_mm", "backward_weight"}, kPathCpuLoop);
  // grad_x sums a token's k row gradients, in expert order at any thread count (TokenSums).
  std::optional<TokenSums> grad_x_acc;
  if (want_x) grad_x_acc.emplace(run, T, K);
  auto grad_b = run.weight_grad(b, want_b);
  const auto x_buffers = run.slot_buffers(K, want_b);
  at::Tensor grad_x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_moe_gather_grouped_mm_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    run.for_each_segment([&](int64_t e, int64_t slot, int64_t first, int64_t n) {
      const auto grad_out_e = grad_out.narrow(0, first, n);
      if (want_b) {
        auto x_rows = x_buffers.select(0, slot).narrow(0, 0, n);
        gather_segment(x_rows.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), K, plan.assignment.data(), first, n,
                       plan.k);
        auto grad_b_e = grad_b.select(0, e);
        fixed_mm_out(grad_b_e, x_rows.t(), grad_out_e);
      }
      if (want_x) {
        auto grad_rows = grad_x_acc->rows(first, n);
        fixed_mm_out(grad_rows, grad_out_e, b.select(0, e).t());
        grad_x_acc->add<scalar_t, opmath_t>(first, n, nullptr);
      }
    });
    if (want_x) grad_x = grad_x_acc->sum<scalar_t, opmath_t>(nullptr).to(x.scalar_type());
  });
  return {grad_x, grad_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_grouped_glu(const at::Tensor& x_in, const at::Tensor& w_gate,
                                                                  const at::Tensor& w_up, const at::Tensor& offsets,
                                                                  const at::Tensor& row_index,
                                                                  c10::string_view activation) {
  constexpr const char* op = "gather_grouped_glu";
  const auto kind = parse_glu_activation(op, activation);
  check_gather_operands<CpuRows>(op, x_in, w_gate, row_index, "w_gate");
  check_glu_weights(op, w_gate, w_up);
  const int64_t N = row_index.numel(), K = x_in.size(1), M = w_gate.size(2), E = w_gate.size(0);
  const auto [bytes, what] = check_gathered_outputs(op, row_index, "w_gate", w_gate, 3);
  return rethrow_alloc_failure(op, "w_gate", what, bytes, [&] {
    const SegmentRun run(op, offsets, row_index, E, N, K * M, x_in);
    for (int projection = 0; projection < 2; ++projection) record_gemm_path({op, "forward"}, kPathCpuLoop);
    auto act = empty_cached({N, M}, run.x.options());
    auto gate = empty_cached({N, M}, run.x.options());
    auto up = empty_cached({N, M}, run.x.options());
    for (auto* t : {&act, &gate, &up}) zero_rows_past_segments(*t, run.plan.bounds);
    // A segment's rows are gathered once for both projections, and its activation is formed while the two
    // projections are still in cache.
    run_gathered_segments(run, [&](int64_t e, int64_t first, int64_t n, const at::Tensor& rows) {
      auto gate_e = gate.narrow(0, first, n);
      auto up_e = up.narrow(0, first, n);
      auto act_e = act.narrow(0, first, n);
      fixed_mm_out(gate_e, rows, w_gate.select(0, e));
      fixed_mm_out(up_e, rows, w_up.select(0, e));
      glu_forward_chunked(act_e, gate_e, up_e, kind);
    });
    return std::make_tuple(act, gate, up);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_grouped_glu_backward(
    const at::Tensor& grad_act_in, const at::Tensor& x_in, const at::Tensor& w_gate, const at::Tensor& w_up,
    const at::Tensor& gate_in, const at::Tensor& up_in, const at::Tensor& offsets, const at::Tensor& row_index,
    c10::string_view activation, std::array<bool, 3> output_mask) {
  constexpr const char* op = "_gather_grouped_glu_backward";
  const auto kind = parse_glu_activation(op, activation);
  check_gather_operands<CpuRows>(op, x_in, w_gate, row_index, "w_gate");
  check_glu_weights(op, w_gate, w_up);
  const int64_t N = row_index.numel(), T = x_in.size(0), K = x_in.size(1), M = w_gate.size(2), E = w_gate.size(0);
  check_glu_projections(op, N, M, grad_act_in, gate_in, up_in);
  const SegmentRun run(op, offsets, row_index, E, N, K * M, x_in, grad_act_in);
  const auto& plan = run.plan;
  const auto& x = run.x;
  const auto& grad_act = run.grad;
  const auto gate = gate_in.to(x.scalar_type()).contiguous();
  const auto up = up_in.to(x.scalar_type()).contiguous();
  // Per segment: the gate/up gradients live in the slot's buffers, the token rows are gathered once, and one
  // [n, K] row gradient (from both projections) goes to grad_x's TokenSums.
  const auto [want_x, want_gate, want_up] = output_mask;
  for (int projection = 0; projection < (want_x ? 2 : 0); ++projection) {
    record_gemm_path({"gather_grouped_glu", "backward_input"}, kPathCpuLoop);
  }
  if (want_gate) record_gemm_path({"gather_grouped_glu", "backward_weight"}, kPathCpuLoop);
  if (want_up) record_gemm_path({"gather_grouped_glu", "backward_weight"}, kPathCpuLoop);
  std::optional<TokenSums> grad_x_acc;
  if (want_x) grad_x_acc.emplace(run, T, K);
  auto grad_w_gate = run.weight_grad(w_gate, want_gate);
  auto grad_w_up = run.weight_grad(w_up, want_up);
  const auto x_buffers = run.slot_buffers(K, want_gate || want_up);
  auto grad_gate_buffers = run.slot_buffers(M);
  auto grad_up_buffers = run.slot_buffers(M);
  at::Tensor grad_x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_moe_gather_grouped_glu_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    run.for_each_segment([&](int64_t e, int64_t slot, int64_t first, int64_t n) {
      auto grad_gate = grad_gate_buffers.select(0, slot).narrow(0, 0, n);
      auto grad_up = grad_up_buffers.select(0, slot).narrow(0, 0, n);
      glu_backward_chunked(grad_gate, grad_up, grad_act.narrow(0, first, n), gate.narrow(0, first, n),
                           up.narrow(0, first, n), kind);
      if (want_gate || want_up) {
        auto x_rows = x_buffers.select(0, slot).narrow(0, 0, n);
        gather_segment(x_rows.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), K, plan.assignment.data(), first, n,
                       plan.k);
        if (want_gate) {
          auto grad_w_gate_e = grad_w_gate.select(0, e);
          fixed_mm_out(grad_w_gate_e, x_rows.t(), grad_gate);
        }
        if (want_up) {
          auto grad_w_up_e = grad_w_up.select(0, e);
          fixed_mm_out(grad_w_up_e, x_rows.t(), grad_up);
        }
      }
      if (want_x) {
        auto grad_rows = grad_x_acc->rows(first, n);
        fixed_mm_out(grad_rows, grad_gate, w_gate.select(0, e).t());
        fixed_mm_out(grad_rows, grad_up, w_up.select(0, e).t(), /*accumulate=*/true);
        grad_x_acc->add<scalar_t, opmath_t>(first, n, nullptr);
      }
    });
    if (want_x) grad_x = grad_x_acc->sum<scalar_t, opmath_t>(nullptr).to(x.scalar_type());
  });
  return {grad_x, grad_w_gate, grad_w_up};
}


at::Tensor grouped_mm_unpermute(const at::Tensor& h_in, const at::Tensor& b, const at::Tensor& offsets,
                                const at::Tensor& weights_in, const at::Tensor& row_index) {
  constexpr const char* op = "grouped_mm_unpermute";
  check_unpermute_operands<CpuRows>(op, h_in, b, weights_in, row_index);
  const int64_t T = row_index.size(0), N = h_in.size(0), F = h_in.size(1), M = b.size(2), E = b.size(0);
  // The output [T, M] (its opmath accumulator) and the [N, M] rows of the expert outputs: each fits, and what does
  // not come is refused naming b, whose columns these are.
  const int64_t accumulator_bytes = check_alloc_bytes(op, "b", "the output [T, M]", checked_mul(op, "b", "T * M", T, M),
                                                      h_in.scalar_type() == at::kDouble ? 8 : 4);
  const int64_t bytes = checked_add(op, "b", "the bytes of the output and its scratch", accumulator_bytes,
                                    checked_mul(op, "b", "the bytes of the scratch", N * M, h_in.element_size()));
  return rethrow_alloc_failure(op, "b", fmt::format("the output [T, M] = [{}, {}] with its scratch", T, M), bytes, [&] {
    const SegmentRun run(op, offsets, row_index, E, N, F * M, h_in);
    record_gemm_path({op, "forward"}, kPathCpuLoop);
    const auto& h = run.x;
    const auto weights = weights_in.to(opmath_of(h.scalar_type())).contiguous();
    // y[t] = sum of w * (h @ b[e]) over t's rows, in expert order at any thread count (TokenSums).
    TokenSums y_acc(run, T, M);
    at::Tensor y;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "torch_moe_grouped_mm_unpermute", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const opmath_t* wp = weights.data_ptr<opmath_t>();
      run.for_each_segment([&](int64_t e, int64_t slot, int64_t first, int64_t n) {
        auto out_e = y_acc.rows(first, n);
        fixed_mm_out(out_e, h.narrow(0, first, n), b.select(0, e));
        y_acc.add<scalar_t, opmath_t>(first, n, wp);
      });
      y = y_acc.sum<scalar_t, opmath_t>(wp).to(h.scalar_type());
    });
    return y;
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_mm_unpermute_backward(
    const at::Tensor& grad_y_in, const at::Tensor& h_in, const at::Tensor& b, const at::Tensor& offsets,
    const at::Tensor& weights_in, const at::Tensor& row_index, std::array<bool, 3> output_mask) {
  constexpr const char* op = "_grouped_mm_unpermute_backward";
  check_unpermute_operands<CpuRows>(op, h_in, b, weights_in, row_index);
  check_unpermute_grad_y(op, grad_y_in, row_index, b);
  const int64_t N = h_in.size(0), F = h_in.size(1), M = b.size(2), E = b.size(0);
  const SegmentRun run(op, offsets, row_index, E, N, F * M, h_in, grad_y_in);
  const auto& plan = run.plan;
  const auto& h = run.x;
  const auto& grad_y = run.grad;
  const auto opmath = opmath_of(h.scalar_type());
  const auto weights = weights_in.to(opmath).contiguous();
  // Row r of segment e (assignment a = t * k + j, weight w = weights[a]) put w * (h[r] @ b[e]) into y[t]. With
  // G[r] = grad_y[t] and P[r] = G[r] @ b[e]^T: grad_h[r] = w * P[r], grad_b[e] = sum_r h[r]^T (w * G[r]),
  // grad_weights[a] = <P[r], h[r]>. G is formed per segment in its slot's buffer, P directly in grad_h (in a slot
  // buffer when only grad_weights needs it).
  const auto [want_h, want_b, want_weights] = output_mask;
  if (want_h || want_weights) record_gemm_path({"grouped_mm_unpermute", "backward_input"}, kPathCpuLoop);
  if (want_b) record_gemm_path({"grouped_mm_unpermute", "backward_weight"}, kPathCpuLoop);
  at::Tensor grad_h, grad_weights_acc, p_buffers;
  if (want_h) {
    grad_h = empty_cached({N, F}, h.options());
    zero_rows_past_segments(grad_h, plan.bounds);
  } else if (want_weights) {
    p_buffers = run.slot_buffers(F);
  }
  auto grad_b = run.weight_grad(b, want_b);
  if (want_weights) grad_weights_acc = zeros_cached({row_index.numel()}, h.options().dtype(opmath));
  auto grad_buffers = run.slot_buffers(M);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "torch_moe_grouped_mm_unpermute_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t* wp = weights.data_ptr<opmath_t>();
    opmath_t* gwp = want_weights ? grad_weights_acc.data_ptr<opmath_t>() : nullptr;
    const int64_t* assignment = plan.assignment.data();
    run.for_each_segment([&](int64_t e, int64_t slot, int64_t first, int64_t n) {
      auto G = grad_buffers.select(0, slot).narrow(0, 0, n);
      scalar_t* Gp = G.data_ptr<scalar_t>();
      gather_segment(Gp, grad_y.data_ptr<scalar_t>(), M, assignment, first, n, plan.k);
      scalar_t* Pp = nullptr;
      if (want_h || want_weights) {
        auto P = want_h ? grad_h.narrow(0, first, n) : p_buffers.select(0, slot).narrow(0, 0, n);
        fixed_mm_out(P, G, b.select(0, e).t());
        Pp = P.data_ptr<scalar_t>();
      }
      const scalar_t* hp = h.data_ptr<scalar_t>() + first * F;
      at::parallel_for(0, n, grain_for(F + M), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t a = assignment[first + i];
          if (a < 0) continue;  // its G row is zero, so P's is too
          const opmath_t w = wp[a];
          if (Pp != nullptr) {
            scalar_t* p = Pp + i * F;
            if (want_weights) gwp[a] = dot_row<scalar_t, opmath_t>(p, hp + i * F, F);
            if (want_h) scale_row_in_place(p, w, F);
          }
          if (want_b) scale_row_in_place(Gp + i * M, w, M);
        }
      });
      if (want_b) {
        auto grad_b_e = grad_b.select(0, e);
        fixed_mm_out(grad_b_e, h.narrow(0, first, n).t(), G);
      }
    });
  });
  return {grad_h, grad_b,
          want_weights ? grad_weights_acc.reshape(weights_in.sizes()).to(weights_in.scalar_type()) : at::Tensor()};
}

TORCH_LIBRARY_IMPL(torch_moe, CPU, m) { TORCH_MOE_IMPL_GROUPED_MM_FAMILY(m, CpuSegments); }

}  // namespace torch_moe::cpu
