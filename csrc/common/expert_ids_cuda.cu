// Expert-id checks on the device and the per-expert histogram of the CUDA planning and loss kernels.
#include "common/expert_ids_cuda.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/expert_ids.h"
#include "common/row_ops_cuda.h"

namespace torch_moe::cuda {
namespace {

// counts[e] += 1 for every key e < E (integer atomics: the result does not depend on their order).
__global__ void histogram_kernel(const int64_t* keys, int64_t n, int64_t E, unsigned long long* counts) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = keys[i];
    if (e >= 0 && e < E) atomicAdd(counts + e, 1ULL);
  }
}

}  // namespace

at::Tensor expert_keys(const at::Tensor& ids, int64_t E, const std::optional<at::Tensor>& valid_mask) {
  auto usable = ids.ge(0).logical_and_(ids.lt(E));
  if (valid_mask.has_value() && valid_mask->defined()) usable.logical_and_(valid_mask->unsqueeze(1));
  return at::where(usable, ids, at::scalar_tensor(E, ids.options()));
}

at::Tensor expert_histogram(const at::Tensor& keys, int64_t E) {
  auto counts = at::zeros({E}, keys.options());
  const int64_t n = keys.numel();
  if (n > 0) {
    histogram_kernel<<<blocks_for(n), kBlockThreads, 0, current_stream()>>>(
        keys.data_ptr<int64_t>(), n, E, reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return counts;
}

at::Tensor count_per_expert(const at::Tensor& expert_ids, int64_t num_experts,
                            const std::optional<at::Tensor>& valid_mask) {
  const c10::cuda::CUDAGuard guard(expert_ids.device());
  return expert_histogram(expert_keys(expert_ids.contiguous(), num_experts, valid_mask), num_experts);
}

void check_expert_ids(const char* op, const at::Tensor& expert_ids, int64_t num_experts,
                      const std::optional<at::Tensor>& valid_mask) {
  ::torch_moe::check_expert_ids(op, expert_ids, num_experts, valid_mask);  // the range check there is CPU-only
  const at::Tensor* mask = valid_mask.has_value() && valid_mask->defined() ? &*valid_mask : nullptr;
  check_index_range(op, "expert_ids", expert_ids, 0, num_experts, mask);
}

}  // namespace torch_moe::cuda
