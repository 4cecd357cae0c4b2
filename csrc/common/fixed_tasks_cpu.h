// Work cut into a fixed number of CPU tasks, run so that no result depends on the number of threads.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cstdint>

namespace torch_moe::cpu {

// body(i) for every task i < tasks, spread over the threads, with the ATen ops and MKL calls inside a task running
// sequentially, so that a task computes the same bits whatever the thread count. That takes a region that is really
// parallel: ATen's inline path (one task, or a call already inside an inline region) lets an elementwise op inside
// split its range by the thread count (where its vector loop stops and scalar remainder starts moves with it), and
// MKL goes sequential only inside an OpenMP region of more than one thread. A single task gets an idle companion.
template <typename Body>
void run_fixed_tasks(int64_t tasks, const Body& body) {
  if (tasks <= 0) return;
  if (at::in_parallel_region() || at::get_num_threads() < 2) {
    for (int64_t i = 0; i < tasks; ++i) body(i);
    return;
  }
  // The tasks are ATen calls on OpenMP worker threads: they must see the caller's dispatch state.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, std::max<int64_t>(tasks, 2), 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t i = begin; i < std::min(end, tasks); ++i) body(i);
  });
}

}  // namespace torch_moe::cpu
