// The CPU segment runtime of the grouped GEMM family: checked expert segments (offsets), the inverse row plan, the
// schedule that spreads segments over threads, per-slot scratch and accumulators, and the row gathers and scaled
// adds between token rows and segment rows. The op kernels (grouped_mm_cpu.cpp) are written on top of it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "common/cpu_cache.h"
#include "common/row_math.h"
#include "common/row_ops.h"

namespace torch_moe::cpu {

// Reads and checks offsets [E + 1] (int64, from 0, non-decreasing, ending at most at num_rows) -> the segment bounds.
std::vector<int64_t> read_offsets(const char* op, const at::Tensor& offsets, int64_t num_experts, int64_t num_rows);

int64_t longest_segment(const std::vector<int64_t>& bounds);

// How the experts' segments are spread over threads: slot s runs experts [first_expert[s], first_expert[s + 1]) one
// after the other. Small GEMMs lose most of their time to each GEMM's own fork/join across threads, so when the
// segments are many and small, each thread takes a contiguous range of experts holding about an equal share of the
// rows and runs their GEMMs single-threaded (MKL and nested at::parallel_for run sequentially inside a parallel
// region). Large GEMMs run one expert after the other, each threaded (fixed_mm_out). The split depends on the
// thread count, but no result does: a GEMM's blocks are the same either way and per-token sums are formed in one
// order (TokenSums).
struct Schedule {
  std::vector<int64_t> first_expert;
  int64_t slots() const { return static_cast<int64_t>(first_expert.size()) - 1; }
};

// Below this many multiply-adds per GEMM on average, experts run side by side (one GEMM of 256 x 512 x 256 is
// ~34M; a Mixtral-sized 512 x 1024 x 3584 one is ~1.9G and runs threaded).
constexpr int64_t kSideBySideMacs = int64_t{1} << 26;

// Slots for the segments of `bounds` when a row costs macs_per_row multiply-adds.
Schedule schedule_segments(const std::vector<int64_t>& bounds, int64_t macs_per_row);

// out = a @ b (out += a @ b when accumulate), out [m, n] contiguous rows, a [m, k] and b [k, n] any strides: one
// expert's GEMM. MKL's threaded GEMMs round differently at different thread counts (the split of the work, and
// with it which kernel computes which part, follows the thread count), so MKL never runs threaded here: the output
// is cut into blocks whose bounds depend on m, n and k only, each block is one sequential MKL call, and the blocks
// run on the threads (or one after the other inside a parallel region). The result then depends on the shapes only.
void fixed_mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate = false);

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
void zero_empty_experts(at::Tensor& grad_b, const std::vector<int64_t>& bounds);

// Zero the rows of t [N, ...] past the last segment (padding rows no expert computes).
void zero_rows_past_segments(at::Tensor& t, const std::vector<int64_t>& bounds);

// The inverse of a [T, k] row plan: assignment_of_row[r] = t * k + j where row_index[t, j] == r, else -1.
// The plan is checked to name distinct rows in [-1, num_rows) before this runs.
std::vector<int64_t> assignment_of_rows(const at::Tensor& row_index, int64_t num_rows);

// True when two rows of one segment come from the same token, so that adding a segment's rows into per-token
// outputs in parallel would race (a row plan from permute_plan never does this: a token's experts are distinct).
bool segments_repeat_tokens(const std::vector<int64_t>& assignment, const std::vector<int64_t>& bounds, int64_t k,
                            int64_t tokens);

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

// The accumulation dtype of a row dtype: float64 for float64, float32 otherwise.
at::ScalarType opmath_of(at::ScalarType dtype);

// What the fused ops share: the segment bounds, the inverse plan and whether segments repeat a token.
struct SegmentPlan {
  std::vector<int64_t> bounds;
  std::vector<int64_t> assignment;  // [N]: t * k + j of the row, -1 when unassigned
  at::Tensor row_index;             // [T, k] int64, contiguous
  int64_t k = 1;
  bool repeats_tokens = false;
};

// The plan of offsets and row_index, for num_rows rows (offsets checked as read_offsets does).
SegmentPlan segment_plan(const char* op, const at::Tensor& offsets, const at::Tensor& row_index, int64_t num_experts,
                         int64_t num_rows);

// The start the fused segment ops share, their backwards above all: the plan of offsets and row_index, its schedule
// for macs_per_row multiply-adds a row, the token (or row) operand x contiguous and, in a backward, the incoming
// gradient in x's dtype, contiguous; and the outputs and scratch those backwards allocate.
struct SegmentRun {
  SegmentRun(const char* op, const at::Tensor& offsets, const at::Tensor& row_index, int64_t num_experts,
             int64_t num_rows, int64_t macs_per_row, const at::Tensor& x_in, const at::Tensor& grad_in = at::Tensor());
  // Scratch rows [slots, longest segment, cols] in x's dtype, one block per slot; undefined when not wanted.
  at::Tensor slot_buffers(int64_t cols, bool wanted = true) const;
  // A weight gradient shaped like w, in x's dtype: zero for experts without rows, the others for run_segments to
  // write; undefined when not wanted.
  at::Tensor weight_grad(const at::Tensor& w, bool wanted) const;
  // body(e, slot, first, n) for every expert e with rows [first, first + n), on the schedule.
  template <typename Body>
  void for_each_segment(const Body& body) const {
    run_segments(schedule, plan.bounds, [&](int64_t e, int64_t slot) {
      const int64_t first = plan.bounds[e], n = plan.bounds[e + 1] - first;
      body(e, slot, first, n);
    });
  }

  SegmentPlan plan;
  Schedule schedule;
  at::Tensor x;
  at::Tensor grad;
};

// Per-token sums of segment rows, acc[t] = sum over t's rows r of scale_r * rows[r] (opmath), added in one order
// whatever the thread count: ascending row, which is expert order, as one thread adding segment after segment into
// one accumulator does. With one slot that is what runs (each segment's rows go through a scratch block and are
// added at once). With slots side by side, adding into one accumulator would race and per-slot accumulators summed
// at the end would change the order with the number of slots; there each segment's rows are kept in an [N, cols]
// buffer and the sums are formed per token at the end, in the one-slot order. So the results are bit-identical at
// any thread count.
class TokenSums {
 public:
  TokenSums(const SegmentRun& run, int64_t tokens, int64_t cols)
      : plan_(run.plan),
        cols_(cols),
        buffered_(run.schedule.slots() > 1),
        rows_(buffered_ ? empty_cached({static_cast<int64_t>(run.plan.assignment.size()), cols}, run.x.options())
                        : empty_cached({longest_segment(run.plan.bounds), cols}, run.x.options())),
        acc_(zeros_cached({tokens, cols}, run.x.options().dtype(opmath_of(run.x.scalar_type())))) {}

  // Where the rows [first, first + n) of a segment are to be written: [n, cols], contiguous.
  at::Tensor rows(int64_t first, int64_t n) const { return rows_.narrow(0, buffered_ ? first : 0, n); }

  // Once those rows are written: with one slot they are added now (scale_r = w[assignment of r], 1 when w is null).
  template <typename scalar_t, typename opmath_t>
  void add(int64_t first, int64_t n, const opmath_t* w) {
    if (buffered_) return;
    add_segment<scalar_t, opmath_t>(acc_.data_ptr<opmath_t>(), rows_.data_ptr<scalar_t>(), cols_,
                                    plan_.assignment.data(), first, n, plan_.k, w, plan_.repeats_tokens);
  }

  // The sums [tokens, cols] (opmath), once every segment was added.
  template <typename scalar_t, typename opmath_t>
  at::Tensor sum(const opmath_t* w) {
    if (!buffered_) return acc_;
    const int64_t tokens = acc_.size(0), k = plan_.row_index.size(1), end = plan_.bounds.back();
    const int64_t* ri = plan_.row_index.data_ptr<int64_t>();
    const scalar_t* rows = rows_.data_ptr<scalar_t>();
    opmath_t* acc = acc_.data_ptr<opmath_t>();
    at::parallel_for(0, tokens, grain_for(cols_ * std::max<int64_t>(k, 1)), [&](int64_t begin, int64_t stop) {
      std::vector<std::pair<int64_t, int64_t>> order;  // (row, assignment) of a token, by row
      for (int64_t t = begin; t < stop; ++t) {
        order.clear();
        for (int64_t a = t * k; a < (t + 1) * k; ++a) {
          // Rows past the last segment belong to no expert: one slot never adds them either.
          if (ri[a] >= 0 && ri[a] < end) order.emplace_back(ri[a], a);
        }
        std::sort(order.begin(), order.end());
        for (const auto& [r, a] : order) {
          add_scaled_row(acc + t * cols_, rows + r * cols_, w == nullptr ? opmath_t(1) : w[a], cols_);
        }
      }
    });
    return acc_;
  }

 private:
  const SegmentPlan& plan_;
  int64_t cols_;
  bool buffered_;
  at::Tensor rows_, acc_;
};

// body(e, first, n, rows) for every expert e with rows, on the schedule: rows [n, K] are the segment's token rows
// of x [T, K] (contiguous), gathered into its slot's buffer right before the body runs.
template <typename Body>
void run_gathered_segments(const SegmentRun& run, const Body& body) {
  const at::Tensor& x = run.x;
  const SegmentPlan& plan = run.plan;
  const int64_t K = x.size(1);
  const auto buffers = run.slot_buffers(K);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_moe_gather_segments", [&] {
    run.for_each_segment([&](int64_t e, int64_t slot, int64_t first, int64_t n) {
      const auto rows = buffers.select(0, slot).narrow(0, 0, n);
      gather_segment(rows.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), K, plan.assignment.data(), first, n, plan.k);
      body(e, first, n, rows);
    });
  });
}

}  // namespace torch_moe::cpu
