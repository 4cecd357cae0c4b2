// The CPU segment runtime of the grouped GEMM family: the parts that are not templates (see the header).
#include "experts/segment_runtime_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/checks.h"
#include "common/cpu_cache.h"
#include "common/cpu_gemm.h"
#include "common/fixed_tasks_cpu.h"
#include "common/small_gemm_cpu.h"
#include "experts/grouped_mm.h"

namespace torch_moe::cpu {

std::vector<int64_t> read_offsets(const char* op, const at::Tensor& offsets, int64_t num_experts, int64_t num_rows) {
  check_offsets_shape(op, offsets, num_experts);
  const auto c = offsets.contiguous();
  std::vector<int64_t> bounds(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + num_experts + 1);
  check_offset_values(op, bounds.data(), num_experts, num_rows);
  return bounds;
}

int64_t longest_segment(const std::vector<int64_t>& bounds) {
  int64_t longest = 0;
  for (size_t e = 0; e + 1 < bounds.size(); ++e) longest = std::max(longest, bounds[e + 1] - bounds[e]);
  return longest;
}

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

namespace {

// Blocks of about this many multiply-adds, at least 128 a side: large enough that a sequential MKL call runs near
// its peak (2^24 and 64 a side cost Mixtral-mini fwd+bwd ~14% at 2 threads; these ~3-5%), while a Mixtral-sized
// expert GEMM (512 x 1024 x 3584) still gives 16 blocks to spread over the threads. One expert's GEMM therefore
// uses at most 16 threads.
constexpr int64_t kBlockMacs = int64_t{1} << 26;
constexpr int64_t kMaxBlocks = 16;
constexpr int64_t kMinBlockSide = 128;
// Below 4 rows MKL's matrix-vector kernels beat oneDNN's per-call cost (1 x 512 x 256: 5 us against 15; 1 x 1024 x
// 3584: 143 us against 185, single-threaded), from 4 rows on oneDNN is faster (benchmarks/NOTES.md section 19).
constexpr int64_t kMinOneDnnRows = 4;
// torch_moe's kernel: a block per this many floats of b (or of a weight gradient's output), 1 MiB.
constexpr double kStreamBlockFloats = double(int64_t{1} << 18);

// [0, size) cut into `parts` ranges of whole multiples of 16 (so that vector loops see the same alignment).
int64_t block_bound(int64_t size, int64_t parts, int64_t i) {
  if (i >= parts) return size;
  return std::min(size, (size * i / parts) / 16 * 16);
}

}  // namespace

void fixed_mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const int64_t m = out.size(0), n = out.size(1), k = a.size(1);
  // In double: the product of three sizes can pass int64 even when each operand fits in memory.
  const double macs = static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(std::max<int64_t>(k, 1));
  // A few-row GEMM goes to torch_moe's kernel (common/cpu_gemm.h) when chosen. It reads any strides, so it takes
  // row and column blocks alike, and sums every element over k in one order whatever the blocks; so its GEMMs are
  // also cut by the floats they stream (b, or a weight gradient's output): a decode-sized GEMM (1 x 1024 x 3584) is
  // bound by memory bandwidth, half of which one core leaves unused.
  const bool by_small = small_gemm_wanted(out, a, b);
  double work = macs / kBlockMacs;
  if (by_small) {
    work = std::max(work, static_cast<double>(std::max(m, k)) * static_cast<double>(n) / kStreamBlockFloats);
  }
  const int64_t blocks =
      std::clamp<int64_t>(static_cast<int64_t>(std::min(std::ceil(work), double(kMaxBlocks))), 1, kMaxBlocks);
  // Rows first (a block of rows re-reads all of b, a block of columns all of a), at least kMinBlockSide a side.
  const int64_t row_parts = std::clamp<int64_t>(std::min(blocks, m / kMinBlockSide), 1, blocks);
  // oneDNN (float32, at least kMinOneDnnRows rows; common/cpu_gemm.h) takes blocks of whole rows only: a block of
  // b's columns is a strided operand it would copy first. So it takes a GEMM that is one block, or that splits
  // into at least two row blocks; a large GEMM of few rows (decode-sized) keeps at::mm's column blocks, so that
  // both threads work on it. Which library a block uses depends on the shapes and the library switch only, never
  // on the thread count.
  const bool by_onednn =
      !by_small && m >= kMinOneDnnRows && onednn_gemm_wanted(out, a, b) && (blocks == 1 || row_parts >= 2);
  const int64_t col_parts =
      by_onednn ? 1
                : std::clamp<int64_t>(std::min((blocks + row_parts - 1) / row_parts, n / kMinBlockSide), 1, kMaxBlocks);
  auto block = [&](int64_t i) {
    const int64_t r = i / col_parts, c = i % col_parts;
    const int64_t r0 = block_bound(m, row_parts, r), r1 = block_bound(m, row_parts, r + 1);
    const int64_t c0 = block_bound(n, col_parts, c), c1 = block_bound(n, col_parts, c + 1);
    if (r1 <= r0 || c1 <= c0) return;
    // One block is the whole GEMM: no views. The three narrows are per-call overhead, which is most of the cost
    // of the many 16-row expert GEMMs of OLMoE-mini at T=128 (benchmarks/NOTES.md section 19).
    const bool whole = row_parts == 1 && col_parts == 1;
    auto out_block = whole ? out : out.narrow(0, r0, r1 - r0).narrow(1, c0, c1 - c0);
    const auto a_block = whole ? a : a.narrow(0, r0, r1 - r0);
    const auto b_block = whole ? b : b.narrow(1, c0, c1 - c0);
    if (by_small) {
      small_gemm(out_block, a_block, b_block, accumulate);
    } else if (by_onednn) {
      onednn_gemm(out_block, a_block, b_block, accumulate);
    } else if (accumulate) {
      at::addmm_out(out_block, out_block, a_block, b_block);
    } else {
      at::mm_out(out_block, a_block, b_block);
    }
  };
  run_fixed_tasks(row_parts * col_parts, block);
}

void zero_empty_experts(at::Tensor& grad_b, const std::vector<int64_t>& bounds) {
  for (size_t e = 0; e + 1 < bounds.size(); ++e) {
    if (bounds[e + 1] == bounds[e]) grad_b.select(0, static_cast<int64_t>(e)).zero_();
  }
}

void zero_rows_past_segments(at::Tensor& t, const std::vector<int64_t>& bounds) {
  const int64_t end = bounds.back();
  if (end < t.size(0)) t.narrow(0, end, t.size(0) - end).zero_();
}

std::vector<int64_t> assignment_of_rows(const at::Tensor& row_index, int64_t num_rows) {
  const auto index = row_index.contiguous();
  const int64_t* ip = index.data_ptr<int64_t>();
  std::vector<int64_t> assignment(static_cast<size_t>(num_rows), -1);
  for (int64_t a = 0; a < index.numel(); ++a) {
    if (ip[a] >= 0) assignment[ip[a]] = a;
  }
  return assignment;
}

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

at::ScalarType opmath_of(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }


SegmentPlan segment_plan(const char* op, const at::Tensor& offsets, const at::Tensor& row_index, int64_t num_experts,
                         int64_t num_rows) {
  SegmentPlan plan;
  plan.bounds = read_offsets(op, offsets, num_experts, num_rows);
  plan.assignment = assignment_of_rows(row_index, num_rows);
  plan.row_index = row_index.contiguous();
  plan.k = std::max<int64_t>(row_index.size(1), 1);
  plan.repeats_tokens = segments_repeat_tokens(plan.assignment, plan.bounds, plan.k, row_index.size(0));
  return plan;
}

SegmentRun::SegmentRun(const char* op, const at::Tensor& offsets, const at::Tensor& row_index, int64_t num_experts,
                       int64_t num_rows, int64_t macs_per_row, const at::Tensor& x_in, const at::Tensor& grad_in)
    : plan(segment_plan(op, offsets, row_index, num_experts, num_rows)),
      schedule(schedule_segments(plan.bounds, macs_per_row)),
      x(x_in.contiguous()),
      grad(grad_in.defined() ? grad_in.to(x.scalar_type()).contiguous() : at::Tensor()) {}

at::Tensor SegmentRun::slot_buffers(int64_t cols, bool wanted) const {
  return wanted ? empty_cached({schedule.slots(), longest_segment(plan.bounds), cols}, x.options()) : at::Tensor();
}

at::Tensor SegmentRun::weight_grad(const at::Tensor& w, bool wanted) const {
  if (!wanted) return at::Tensor();
  auto grad_w = empty_cached(w.sizes(), x.options());
  zero_empty_experts(grad_w, plan.bounds);
  return grad_w;
}


}  // namespace torch_moe::cpu
