// CPU grouped GEMM: one GEMM per non-empty expert segment, exactly its rows (no padding), looped in C++. The fused
// dropless ops move token rows through one reused segment-sized buffer, so no [T * k, d_model] tensor is built.
#include "experts/grouped_mm.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <optional>
#include <vector>

#include "common/checks.h"
#include "common/cpu_cache.h"
#include "common/row_math.h"
#include "common/row_ops.h"
#include "experts/glu.h"

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

int64_t longest_segment(const std::vector<int64_t>& bounds) {
  int64_t longest = 0;
  for (size_t e = 0; e + 1 < bounds.size(); ++e) longest = std::max(longest, bounds[e + 1] - bounds[e]);
  return longest;
}

// How the experts' segments are spread over threads: slot s runs experts [first_expert[s], first_expert[s + 1]) one
// after the other. Small GEMMs lose most of their time to each GEMM's own fork/join across threads, so when the
// segments are many and small, each thread takes a contiguous range of experts holding about an equal share of the
// rows and runs their GEMMs single-threaded (MKL and nested at::parallel_for run sequentially inside a parallel
// region). Large GEMMs run one expert after the other, each threaded. The split depends only on the offsets and
// the thread count, so results are deterministic for a given thread count.
struct Schedule {
  std::vector<int64_t> first_expert;
  int64_t slots() const { return static_cast<int64_t>(first_expert.size()) - 1; }
};

// Below this many multiply-adds per GEMM on average, experts run side by side (one GEMM of 256 x 512 x 256 is
// ~34M; a Mixtral-sized 512 x 1024 x 3584 one is ~1.9G and runs threaded).
constexpr int64_t kSideBySideMacs = int64_t{1} << 26;

Schedule schedule_segments(const std::vector<int64_t>& bounds, int64_t macs_per_row) {
  const int64_t E = static_cast<int64_t>(bounds.size()) - 1;
  const int64_t rows = bounds[E];
  int64_t busy = 0;
  for (int64_t e = 0; e < E; ++e) busy += bounds[e + 1] > bounds[e] ? 1 : 0;
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  Schedule schedule;
  if (threads < 2 || busy < 2 * threads || rows * macs_per_row >= kSideBySideMacs * busy) {
    schedule.first_expert = {0, E};
    return schedule;
  }
  schedule.first_expert.assign(static_cast<size_t>(threads) + 1, E);
  schedule.first_expert[0] = 0;
  for (int64_t s = 1; s < threads; ++s) {
    const int64_t target = rows * s / threads;
    const int64_t e = std::lower_bound(bounds.begin(), bounds.begin() + E, target) - bounds.begin();
    schedule.first_expert[s] = std::max(e, schedule.first_expert[s - 1]);
  }
  return schedule;
}

// body(e, slot) for every expert e with rows, on the schedule.
template <typename Body>
void run_segments(const Schedule& schedule, const std::vector<int64_t>& bounds, const Body& body) {
  auto run_slot = [&](int64_t slot) {
    for (int64_t e = schedule.first_expert[slot]; e < schedule.first_expert[slot + 1]; ++e) {
      if (bounds[e + 1] > bounds[e]) body(e, slot);
    }
  };
  if (schedule.slots() == 1) {
    run_slot(0);
    return;
  }
  // The GEMMs are ATen calls on OpenMP worker threads: they must see the caller's dispatch state (below autograd
  // when called from backward or an autograd Function's forward, profiler, grad mode).
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, schedule.slots(), 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t slot = begin; slot < end; ++slot) run_slot(slot);
  });
}

// Zero the gradient of experts without rows (run_segments skips them).
void zero_empty_experts(at::Tensor& grad_b, const std::vector<int64_t>& bounds) {
  for (size_t e = 0; e + 1 < bounds.size(); ++e) {
    if (bounds[e + 1] == bounds[e]) grad_b.select(0, static_cast<int64_t>(e)).zero_();
  }
}

// Zero the rows of t [N, ...] past the last segment (padding rows no expert computes).
void zero_rows_past_segments(at::Tensor& t, const std::vector<int64_t>& bounds) {
  const int64_t end = bounds.back();
  if (end < t.size(0)) t.narrow(0, end, t.size(0) - end).zero_();
}

// Per-slot accumulators [rows, cols] (opmath): slot 0 is the result itself and the other slots are added into it in
// slot order, so side-by-side runs cost one extra [rows, cols] per extra thread and no separate sum.
class SlotSums {
 public:
  SlotSums(int64_t slots, int64_t rows, int64_t cols, const at::TensorOptions& options)
      : result_(zeros_cached({rows, cols}, options)),
        extra_(slots > 1 ? zeros_cached({slots - 1, rows, cols}, options) : at::Tensor()) {}
  template <typename T>
  T* slot(int64_t s) const {
    return s == 0 ? result_.data_ptr<T>() : extra_.select(0, s - 1).data_ptr<T>();
  }
  at::Tensor sum() {
    if (extra_.defined()) {
      for (int64_t s = 0; s < extra_.size(0); ++s) result_.add_(extra_.select(0, s));
    }
    return result_;
  }

 private:
  at::Tensor result_, extra_;
};

// The inverse of a [T, k] row plan: assignment_of_row[r] = t * k + j where row_index[t, j] == r, else -1.
// The plan is checked to name distinct rows in [-1, num_rows) before this runs.
std::vector<int64_t> assignment_of_rows(const at::Tensor& row_index, int64_t num_rows) {
  const auto index = row_index.contiguous();
  const int64_t* ip = index.data_ptr<int64_t>();
  std::vector<int64_t> assignment(static_cast<size_t>(num_rows), -1);
  for (int64_t a = 0; a < index.numel(); ++a) {
    if (ip[a] >= 0) assignment[ip[a]] = a;
  }
  return assignment;
}

// True when two rows of one segment come from the same token, so that adding a segment's rows into per-token
// outputs in parallel would race (a row plan from permute_plan never does this: a token's experts are distinct).
bool segments_repeat_tokens(const std::vector<int64_t>& assignment, const std::vector<int64_t>& bounds, int64_t k,
                            int64_t tokens) {
  std::vector<int64_t> last_segment(static_cast<size_t>(tokens), -1);
  for (size_t e = 0; e + 1 < bounds.size(); ++e) {
    for (int64_t r = bounds[e]; r < bounds[e + 1]; ++r) {
      const int64_t a = assignment[r];
      if (a < 0) continue;
      int64_t& last = last_segment[a / k];
      if (last == static_cast<int64_t>(e)) return true;
      last = static_cast<int64_t>(e);
    }
  }
  return false;
}

// buf[i] = src[assignment[first + i] / k] for i < n (a zero row where the row is unassigned).
template <typename scalar_t>
void gather_segment(scalar_t* buf, const scalar_t* src, int64_t d, const int64_t* assignment, int64_t first, int64_t n,
                    int64_t k) {
  at::parallel_for(0, n, grain_for(d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t a = assignment[first + i];
      scalar_t* out = buf + i * d;
      if (a < 0) {
        std::fill(out, out + d, scalar_t(0));
      } else {
        std::memcpy(out, src + (a / k) * d, sizeof(scalar_t) * d);
      }
    }
  });
}

// acc[assignment[first + i] / k] += scale_i * buf[i] for assigned rows, scale_i = w[assignment] (1 when w is null).
// Parallel over rows unless the segment may repeat a token.
template <typename scalar_t, typename opmath_t>
void add_segment(opmath_t* acc, const scalar_t* buf, int64_t d, const int64_t* assignment, int64_t first, int64_t n,
                 int64_t k, const opmath_t* w, bool serial) {
  auto body = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t a = assignment[first + i];
      if (a < 0) continue;
      opmath_t* out = acc + (a / k) * d;
      const scalar_t* row = buf + i * d;
      const opmath_t scale = w == nullptr ? opmath_t(1) : w[a];
      add_scaled_row(out, row, scale, d);
    }
  };
  if (serial) {
    body(0, n);
  } else {
    at::parallel_for(0, n, grain_for(d), body);
  }
}

at::ScalarType opmath_of(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// out [N, M]: each segment of a (contiguous) times its expert's b[e] (any strides); other rows zero.
at::Tensor segment_mm(const at::Tensor& a, const at::Tensor& b, const std::vector<int64_t>& bounds) {
  const int64_t E = b.size(0);
  auto out = empty_cached({a.size(0), b.size(2)}, a.options());
  zero_rows_past_segments(out, bounds);
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
  auto grad = empty_cached({E, a.size(1), g.size(1)}, a.options());
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
                                                       const at::Tensor& b, const at::Tensor& offsets,
                                                       std::array<bool, 2> output_mask) {
  constexpr const char* op = "_grouped_mm_backward";
  check_operands(op, a_in, b);
  check_floating(op, "grad_out", grad_out_in);
  check_dim(op, "grad_out", grad_out_in, 2, "[N, M]");
  check_size(op, "grad_out", grad_out_in, 0, a_in.size(0), "rows of a");
  check_size(op, "grad_out", grad_out_in, 1, b.size(2), "columns of b");
  const auto bounds = read_offsets(op, offsets, b.size(0), a_in.size(0));
  const auto grad_out = grad_out_in.to(a_in.scalar_type()).contiguous();
  return {output_mask[0] ? segment_mm(grad_out, b.transpose(1, 2), bounds) : at::Tensor(),
          output_mask[1] ? segment_weight_grad(a_in.contiguous(), grad_out, bounds) : at::Tensor()};
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

// x [T, K] (the tokens) against the weights b [E, K, M], named b_name in messages.
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
  check_row_plan(op, row_index, x.size(0), row_index.numel());
}

// What the fused ops share: the segment bounds, the inverse plan and whether segments repeat a token.
struct SegmentPlan {
  std::vector<int64_t> bounds;
  std::vector<int64_t> assignment;  // [N]: t * k + j of the row, -1 when unassigned
  int64_t k = 1;
  bool repeats_tokens = false;
};

SegmentPlan segment_plan(const char* op, const at::Tensor& offsets, const at::Tensor& row_index, int64_t num_experts,
                         int64_t num_rows) {
  SegmentPlan plan;
  plan.bounds = read_offsets(op, offsets, num_experts, num_rows);
  plan.assignment = assignment_of_rows(row_index, num_rows);
  plan.k = std::max<int64_t>(row_index.size(1), 1);
  plan.repeats_tokens = segments_repeat_tokens(plan.assignment, plan.bounds, plan.k, row_index.size(0));
  return plan;
}

// body(e, first, n, rows) for every expert e with rows, on the schedule: rows [n, K] are the segment's token rows
// of x [T, K] (contiguous), gathered into its slot's buffer right before the body runs.
template <typename Body>
void run_gathered_segments(const at::Tensor& x, const SegmentPlan& plan, const Schedule& schedule, const Body& body) {
  const int64_t K = x.size(1);
  const auto buffers = empty_cached({schedule.slots(), longest_segment(plan.bounds), K}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_moe_gather_segments", [&] {
    run_segments(schedule, plan.bounds, [&](int64_t e, int64_t slot) {
      const int64_t first = plan.bounds[e], n = plan.bounds[e + 1] - first;
      const auto rows = buffers.select(0, slot).narrow(0, 0, n);
      gather_segment(rows.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), K, plan.assignment.data(), first, n, plan.k);
      body(e, first, n, rows);
    });
  });
}

}  // namespace

at::Tensor gather_grouped_mm(const at::Tensor& x_in, const at::Tensor& b, const at::Tensor& offsets,
                             const at::Tensor& row_index) {
  constexpr const char* op = "gather_grouped_mm";
  check_gather_operands(op, x_in, b, row_index);
  const int64_t N = row_index.numel(), K = x_in.size(1), M = b.size(2), E = b.size(0);
  const auto plan = segment_plan(op, offsets, row_index, E, N);
  const auto schedule = schedule_segments(plan.bounds, K * M);
  const auto x = x_in.contiguous();
  auto out = empty_cached({N, M}, x.options());
  zero_rows_past_segments(out, plan.bounds);
  run_gathered_segments(x, plan, schedule, [&](int64_t e, int64_t first, int64_t n, const at::Tensor& rows) {
    auto out_e = out.narrow(0, first, n);
    at::mm_out(out_e, rows, b.select(0, e));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gather_grouped_mm_backward(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                                              const at::Tensor& b, const at::Tensor& offsets,
                                                              const at::Tensor& row_index,
                                                              std::array<bool, 2> output_mask) {
  constexpr const char* op = "_gather_grouped_mm_backward";
  check_gather_operands(op, x_in, b, row_index);
  const int64_t N = row_index.numel(), T = x_in.size(0), K = x_in.size(1), M = b.size(2), E = b.size(0);
  check_floating(op, "grad_out", grad_out_in);
  check_dim(op, "grad_out", grad_out_in, 2, "[N, M]");
  check_size(op, "grad_out", grad_out_in, 0, N, "rows of the plan");
  check_size(op, "grad_out", grad_out_in, 1, M, "columns of b");
  const auto plan = segment_plan(op, offsets, row_index, E, N);
  const auto schedule = schedule_segments(plan.bounds, K * M);
  const auto x = x_in.contiguous();
  const auto grad_out = grad_out_in.to(x.scalar_type()).contiguous();
  const auto [want_x, want_b] = output_mask;
  // grad_x sums a token's k row gradients: each slot adds its segments' rows (in expert order) into its own
  // accumulator, and the slots are summed in order.
  std::optional<SlotSums> grad_x_acc;
  if (want_x) grad_x_acc.emplace(schedule.slots(), T, K, x.options().dtype(opmath_of(x.scalar_type())));
  at::Tensor grad_b;
  if (want_b) {
    grad_b = empty_cached(b.sizes(), x.options());
    zero_empty_experts(grad_b, plan.bounds);
  }
  const int64_t longest = longest_segment(plan.bounds);
  const auto x_buffers = want_b ? empty_cached({schedule.slots(), longest, K}, x.options()) : at::Tensor();
  const auto grad_buffers = want_x ? empty_cached({schedule.slots(), longest, K}, x.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_moe_gather_grouped_mm_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    run_segments(schedule, plan.bounds, [&](int64_t e, int64_t slot) {
      const int64_t first = plan.bounds[e], n = plan.bounds[e + 1] - first;
      const auto grad_out_e = grad_out.narrow(0, first, n);
      if (want_b) {
        auto x_rows = x_buffers.select(0, slot).narrow(0, 0, n);
        gather_segment(x_rows.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), K, plan.assignment.data(), first, n,
                       plan.k);
        auto grad_b_e = grad_b.select(0, e);
        at::mm_out(grad_b_e, x_rows.t(), grad_out_e);
      }
      if (want_x) {
        auto grad_rows = grad_buffers.select(0, slot).narrow(0, 0, n);
        at::mm_out(grad_rows, grad_out_e, b.select(0, e).t());
        add_segment<scalar_t, opmath_t>(grad_x_acc->slot<opmath_t>(slot), grad_rows.data_ptr<scalar_t>(), K,
                                        plan.assignment.data(), first, n, plan.k, nullptr, plan.repeats_tokens);
      }
    });
  });
  return {want_x ? grad_x_acc->sum().to(x.scalar_type()) : at::Tensor(), grad_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_grouped_glu(const at::Tensor& x_in, const at::Tensor& w_gate,
                                                                  const at::Tensor& w_up, const at::Tensor& offsets,
                                                                  const at::Tensor& row_index,
                                                                  c10::string_view activation) {
  constexpr const char* op = "gather_grouped_glu";
  const auto kind = parse_glu_activation(op, activation);
  check_gather_operands(op, x_in, w_gate, row_index, "w_gate");
  check_glu_weights(op, w_gate, w_up);
  const int64_t N = row_index.numel(), K = x_in.size(1), M = w_gate.size(2), E = w_gate.size(0);
  const auto plan = segment_plan(op, offsets, row_index, E, N);
  const auto schedule = schedule_segments(plan.bounds, K * M);
  const auto x = x_in.contiguous();
  auto act = empty_cached({N, M}, x.options());
  auto gate = empty_cached({N, M}, x.options());
  auto up = empty_cached({N, M}, x.options());
  for (auto* t : {&act, &gate, &up}) zero_rows_past_segments(*t, plan.bounds);
  // A segment's rows are gathered once for both projections, and its activation is formed while the two
  // projections are still in cache.
  run_gathered_segments(x, plan, schedule, [&](int64_t e, int64_t first, int64_t n, const at::Tensor& rows) {
    auto gate_e = gate.narrow(0, first, n);
    auto up_e = up.narrow(0, first, n);
    auto act_e = act.narrow(0, first, n);
    at::mm_out(gate_e, rows, w_gate.select(0, e));
    at::mm_out(up_e, rows, w_up.select(0, e));
    glu_forward_out(act_e, gate_e, up_e, kind);
  });
  return {act, gate, up};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_grouped_glu_backward(
    const at::Tensor& grad_act_in, const at::Tensor& x_in, const at::Tensor& w_gate, const at::Tensor& w_up,
    const at::Tensor& gate_in, const at::Tensor& up_in, const at::Tensor& offsets, const at::Tensor& row_index,
    c10::string_view activation, std::array<bool, 3> output_mask) {
  constexpr const char* op = "_gather_grouped_glu_backward";
  const auto kind = parse_glu_activation(op, activation);
  check_gather_operands(op, x_in, w_gate, row_index, "w_gate");
  check_glu_weights(op, w_gate, w_up);
  const int64_t N = row_index.numel(), T = x_in.size(0), K = x_in.size(1), M = w_gate.size(2), E = w_gate.size(0);
  check_glu_projections(op, N, M, grad_act_in, gate_in, up_in);
  const auto plan = segment_plan(op, offsets, row_index, E, N);
  const auto schedule = schedule_segments(plan.bounds, K * M);
  const auto x = x_in.contiguous();
  const auto grad_act = grad_act_in.to(x.scalar_type()).contiguous();
  const auto gate = gate_in.to(x.scalar_type()).contiguous();
  const auto up = up_in.to(x.scalar_type()).contiguous();
  // Per segment: the gate/up gradients live in the slot's buffers, the token rows are gathered once, and one
  // [n, K] row gradient (from both projections) is added into the slot's grad_x accumulator.
  const auto [want_x, want_gate, want_up] = output_mask;
  std::optional<SlotSums> grad_x_acc;
  if (want_x) grad_x_acc.emplace(schedule.slots(), T, K, x.options().dtype(opmath_of(x.scalar_type())));
  at::Tensor grad_w_gate, grad_w_up;
  if (want_gate) {
    grad_w_gate = empty_cached(w_gate.sizes(), x.options());
    zero_empty_experts(grad_w_gate, plan.bounds);
  }
  if (want_up) {
    grad_w_up = empty_cached(w_up.sizes(), x.options());
    zero_empty_experts(grad_w_up, plan.bounds);
  }
  const int64_t longest = longest_segment(plan.bounds);
  const auto x_buffers = want_gate || want_up ? empty_cached({schedule.slots(), longest, K}, x.options()) : at::Tensor();
  const auto grad_row_buffers = want_x ? empty_cached({schedule.slots(), longest, K}, x.options()) : at::Tensor();
  auto grad_gate_buffers = empty_cached({schedule.slots(), longest, M}, x.options());
  auto grad_up_buffers = empty_cached({schedule.slots(), longest, M}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_moe_gather_grouped_glu_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    run_segments(schedule, plan.bounds, [&](int64_t e, int64_t slot) {
      const int64_t first = plan.bounds[e], n = plan.bounds[e + 1] - first;
      auto grad_gate = grad_gate_buffers.select(0, slot).narrow(0, 0, n);
      auto grad_up = grad_up_buffers.select(0, slot).narrow(0, 0, n);
      glu_backward_out(grad_gate, grad_up, grad_act.narrow(0, first, n), gate.narrow(0, first, n),
                       up.narrow(0, first, n), kind);
      if (want_gate || want_up) {
        auto x_rows = x_buffers.select(0, slot).narrow(0, 0, n);
        gather_segment(x_rows.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), K, plan.assignment.data(), first, n,
                       plan.k);
        if (want_gate) {
          auto grad_w_gate_e = grad_w_gate.select(0, e);
          at::mm_out(grad_w_gate_e, x_rows.t(), grad_gate);
        }
        if (want_up) {
          auto grad_w_up_e = grad_w_up.select(0, e);
          at::mm_out(grad_w_up_e, x_rows.t(), grad_up);
        }
      }
      if (want_x) {
        auto grad_rows = grad_row_buffers.select(0, slot).narrow(0, 0, n);
        at::mm_out(grad_rows, grad_gate, w_gate.select(0, e).t());
        at::addmm_out(grad_rows, grad_rows, grad_up, w_up.select(0, e).t());
        add_segment<scalar_t, opmath_t>(grad_x_acc->slot<opmath_t>(slot), grad_rows.data_ptr<scalar_t>(), K,
                                        plan.assignment.data(), first, n, plan.k, nullptr, plan.repeats_tokens);
      }
    });
  });
  return {want_x ? grad_x_acc->sum().to(x.scalar_type()) : at::Tensor(), grad_w_gate, grad_w_up};
}

namespace {

void check_unpermute_operands(const char* op, const at::Tensor& h, const at::Tensor& b, const at::Tensor& weights,
                              const at::Tensor& row_index) {
  check_operands(op, h, b);
  check_floating(op, "weights", weights);
  check_row_plan(op, row_index, weights.size(0), h.size(0));
  check_same_shape(op, "weights", weights, "row_index", row_index);
  check_same_device(op, {{"h", &h}, {"weights", &weights}, {"row_index", &row_index}});
}

}  // namespace

at::Tensor grouped_mm_unpermute(const at::Tensor& h_in, const at::Tensor& b, const at::Tensor& offsets,
                                const at::Tensor& weights_in, const at::Tensor& row_index) {
  constexpr const char* op = "grouped_mm_unpermute";
  check_unpermute_operands(op, h_in, b, weights_in, row_index);
  const int64_t T = row_index.size(0), F = h_in.size(1), M = b.size(2), E = b.size(0);
  const auto plan = segment_plan(op, offsets, row_index, E, h_in.size(0));
  const auto schedule = schedule_segments(plan.bounds, F * M);
  const auto h = h_in.contiguous();
  const auto opmath = opmath_of(h.scalar_type());
  const auto weights = weights_in.to(opmath).contiguous();
  // y[t] = sum of w * (h @ b[e]) over t's rows; a segment's expert output lives only in its slot's buffer.
  SlotSums y_acc(schedule.slots(), T, M, h.options().dtype(opmath));
  auto out_buffers = empty_cached({schedule.slots(), longest_segment(plan.bounds), M}, h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "torch_moe_grouped_mm_unpermute", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    run_segments(schedule, plan.bounds, [&](int64_t e, int64_t slot) {
      const int64_t first = plan.bounds[e], n = plan.bounds[e + 1] - first;
      auto out_e = out_buffers.select(0, slot).narrow(0, 0, n);
      at::mm_out(out_e, h.narrow(0, first, n), b.select(0, e));
      add_segment<scalar_t, opmath_t>(y_acc.slot<opmath_t>(slot), out_e.data_ptr<scalar_t>(), M,
                                      plan.assignment.data(), first, n, plan.k, weights.data_ptr<opmath_t>(),
                                      plan.repeats_tokens);
    });
  });
  return y_acc.sum().to(h.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_mm_unpermute_backward(
    const at::Tensor& grad_y_in, const at::Tensor& h_in, const at::Tensor& b, const at::Tensor& offsets,
    const at::Tensor& weights_in, const at::Tensor& row_index, std::array<bool, 3> output_mask) {
  constexpr const char* op = "_grouped_mm_unpermute_backward";
  check_unpermute_operands(op, h_in, b, weights_in, row_index);
  check_floating(op, "grad_y", grad_y_in);
  check_dim(op, "grad_y", grad_y_in, 2, "[T, M]");
  check_size(op, "grad_y", grad_y_in, 0, row_index.size(0), "tokens");
  check_size(op, "grad_y", grad_y_in, 1, b.size(2), "columns of b");
  const int64_t N = h_in.size(0), F = h_in.size(1), M = b.size(2), E = b.size(0);
  const auto plan = segment_plan(op, offsets, row_index, E, N);
  const auto schedule = schedule_segments(plan.bounds, F * M);
  const auto h = h_in.contiguous();
  const auto grad_y = grad_y_in.to(h.scalar_type()).contiguous();
  const auto opmath = opmath_of(h.scalar_type());
  const auto weights = weights_in.to(opmath).contiguous();
  // Row r of segment e (assignment a = t * k + j, weight w = weights[a]) put w * (h[r] @ b[e]) into y[t]. With
  // G[r] = grad_y[t] and P[r] = G[r] @ b[e]^T: grad_h[r] = w * P[r], grad_b[e] = sum_r h[r]^T (w * G[r]),
  // grad_weights[a] = <P[r], h[r]>. G is formed per segment in its slot's buffer, P directly in grad_h (in a slot
  // buffer when only grad_weights needs it).
  const auto [want_h, want_b, want_weights] = output_mask;
  const int64_t longest = longest_segment(plan.bounds);
  at::Tensor grad_h, grad_b, grad_weights_acc, p_buffers;
  if (want_h) {
    grad_h = empty_cached({N, F}, h.options());
    zero_rows_past_segments(grad_h, plan.bounds);
  } else if (want_weights) {
    p_buffers = empty_cached({schedule.slots(), longest, F}, h.options());
  }
  if (want_b) {
    grad_b = empty_cached(b.sizes(), h.options());
    zero_empty_experts(grad_b, plan.bounds);
  }
  if (want_weights) grad_weights_acc = zeros_cached({row_index.numel()}, h.options().dtype(opmath));
  auto grad_buffers = empty_cached({schedule.slots(), longest, M}, h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "torch_moe_grouped_mm_unpermute_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t* wp = weights.data_ptr<opmath_t>();
    opmath_t* gwp = want_weights ? grad_weights_acc.data_ptr<opmath_t>() : nullptr;
    const int64_t* assignment = plan.assignment.data();
    run_segments(schedule, plan.bounds, [&](int64_t e, int64_t slot) {
      const int64_t first = plan.bounds[e], n = plan.bounds[e + 1] - first;
      auto G = grad_buffers.select(0, slot).narrow(0, 0, n);
      scalar_t* Gp = G.data_ptr<scalar_t>();
      gather_segment(Gp, grad_y.data_ptr<scalar_t>(), M, assignment, first, n, plan.k);
      scalar_t* Pp = nullptr;
      if (want_h || want_weights) {
        auto P = want_h ? grad_h.narrow(0, first, n) : p_buffers.select(0, slot).narrow(0, 0, n);
        at::mm_out(P, G, b.select(0, e).t());
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
        at::mm_out(grad_b_e, h.narrow(0, first, n).t(), G);
      }
    });
  });
  return {grad_h, grad_b,
          want_weights ? grad_weights_acc.reshape(weights_in.sizes()).to(weights_in.scalar_type()) : at::Tensor()};
}

TORCH_LIBRARY_IMPL(torch_moe, CPU, m) {
  m.impl("grouped_mm", &grouped_mm);
  m.impl("_grouped_mm_backward", &grouped_mm_backward);
  m.impl("gather_grouped_mm", &gather_grouped_mm);
  m.impl("_gather_grouped_mm_backward", &gather_grouped_mm_backward);
  m.impl("gather_grouped_glu", &gather_grouped_glu);
  m.impl("_gather_grouped_glu_backward", &gather_grouped_glu_backward);
  m.impl("grouped_mm_unpermute", &grouped_mm_unpermute);
  m.impl("_grouped_mm_unpermute_backward", &grouped_mm_unpermute_backward);
}

}  // namespace torch_moe::cpu
