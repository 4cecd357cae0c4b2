// CUDA capacity plan (position and probability policies) and the device sort/assign steps it shares with the
// dropless plan (dispatch/permute_cuda.cu): stable device sorts of per-assignment keys, a histogram and a prefix
// sum; nothing is read back to the host, so capacity mode can be graph-captured.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "common/expert_ids_cuda.h"
#include "common/row_ops_cuda.h"
#include "dispatch/capacity_plan.h"
#include "dispatch/capacity_plan_cuda.h"

namespace torch_moe::cuda {
namespace {

// For sorted position p of expert e = sorted_keys[p]: its rank inside the expert is p - segment_start[e].
// Capacity plan: out[flat] = rank < capacity ? rank : -1. Dropless plan (capacity < 0): out[flat] = p.
__global__ void assign_kernel(const int64_t* sorted_keys, const int64_t* flat_of_sorted, const int64_t* segment_start,
                              int64_t n, int64_t E, int64_t capacity, int64_t* out) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < n;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = sorted_keys[p];
    if (e < 0 || e >= E) continue;
    const int64_t flat = flat_of_sorted[p];
    if (capacity < 0) {
      out[flat] = p;
    } else {
      const int64_t rank = p - segment_start[e];
      if (rank < capacity) out[flat] = rank;
    }
  }
}

// An int64 whose ascending order is the CPU's priority order: highest first, NaN last (-0 equals +0).
__global__ void priority_key_kernel(const double* priority, int64_t n, int64_t* key) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double x = priority[i];
    if (isnan(x)) {
      key[i] = INT64_MAX;
      continue;
    }
    if (x == 0.0) x = 0.0;
    const auto bits = static_cast<unsigned long long>(__double_as_longlong(x));
    const unsigned long long ascending = (bits >> 63) ? ~bits : (bits | 0x8000000000000000ULL);
    const unsigned long long descending = ~ascending;
    key[i] = static_cast<int64_t>(descending ^ 0x8000000000000000ULL);
  }
}

}  // namespace

void assign(const at::Tensor& sorted_keys, const at::Tensor& flat_of_sorted, const at::Tensor& counts, int64_t E,
            int64_t capacity, at::Tensor& out) {
  const int64_t n = sorted_keys.numel();
  if (n == 0) return;
  const auto segment_start = (at::cumsum(counts, 0) - counts).contiguous();
  assign_kernel<<<blocks_for(n), kBlockThreads, 0, current_stream()>>>(
      sorted_keys.data_ptr<int64_t>(), flat_of_sorted.data_ptr<int64_t>(), segment_start.data_ptr<int64_t>(), n, E,
      capacity, out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> stable_sort(const at::Tensor& keys) {
  auto [sorted, perm] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  return {sorted.contiguous(), perm.contiguous()};
}

namespace {

// The plan after capacity_plan_op's checks: the device range check of the ids first (on the CPU it sits inside
// check_expert_ids, after the cheap checks).
std::tuple<at::Tensor, at::Tensor, at::Tensor> plan_slots(const char* op, const at::Tensor& expert_ids_in,
                                                          int64_t num_experts, int64_t capacity, DropPolicy policy,
                                                          const std::optional<at::Tensor>& priority_in,
                                                          const std::optional<at::Tensor>& valid_mask) {
  check_index_range(op, "expert_ids", expert_ids_in, 0, num_experts,
                    valid_mask.has_value() && valid_mask->defined() ? &*valid_mask : nullptr);

  const c10::cuda::CUDAGuard guard(expert_ids_in.device());
  const auto ids = expert_ids_in.contiguous();
  const int64_t T = ids.size(0), k = ids.size(1), E = num_experts, n = T * k;
  auto slots = at::full({T, k}, -1, ids.options());
  const auto keys_tk = expert_keys(ids, E, valid_mask);  // [T, k]
  const auto counts = expert_histogram(keys_tk, E);
  if (n > 0) {
    if (policy == DropPolicy::kPosition) {
      // GShard order: every token's 1st choice, then every 2nd choice, ...: sort in choice-major order.
      const auto keys = keys_tk.t().reshape({-1});
      const auto flat_of_order = at::arange(n, ids.options()).view({T, k}).t().reshape({-1});
      auto [sorted, perm] = stable_sort(keys);
      assign(sorted, flat_of_order.index_select(0, perm).contiguous(), counts, E, capacity, slots);
    } else {
      // Highest priority first, ties to the lower flat position (token, then choice): a stable sort by priority,
      // then a stable sort by expert.
      const auto priority = priority_in->to(at::kDouble).contiguous().reshape({-1});
      auto priority_key = at::empty({n}, ids.options());
      priority_key_kernel<<<blocks_for(n), kBlockThreads, 0, current_stream()>>>(
          priority.data_ptr<double>(), n, priority_key.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      auto [by_priority, perm1] = stable_sort(priority_key);
      (void)by_priority;
      auto [sorted, perm2] = stable_sort(keys_tk.reshape({-1}).index_select(0, perm1).contiguous());
      assign(sorted, perm1.index_select(0, perm2).contiguous(), counts, E, capacity, slots);
    }
  }
  auto kept_per_expert = counts.clamp_max(capacity);
  return {slots, counts, kept_per_expert};
}

struct CudaCapacityPlan {
  static constexpr auto plan_slots = &cuda::plan_slots;
};

}  // namespace

TORCH_LIBRARY_IMPL(torch_moe, CUDA, m) { m.impl("capacity_plan", &capacity_plan_op<CudaCapacityPlan>); }

}  // namespace torch_moe::cuda
