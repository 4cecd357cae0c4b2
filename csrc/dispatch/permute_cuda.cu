// CUDA kernels of permute, permute_plan, unpermute and their backwards: the dropless plan on the device (a stable
// sort by expert, a histogram and a prefix sum; no host sync) under the device-generic op bodies of permute.h, on
// the row movement of row_ops_cuda.
#include "dispatch/permute.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/expert_ids_cuda.h"
#include "common/row_backend_cuda.h"
#include "dispatch/capacity_plan_cuda.h"

namespace torch_moe::cuda {

std::tuple<at::Tensor, at::Tensor> permute_plan(const at::Tensor& expert_ids, int64_t num_experts,
                                                const std::optional<at::Tensor>& valid_mask) {
  const c10::cuda::CUDAGuard guard(expert_ids.device());
  const auto ids = expert_ids.contiguous();
  const int64_t T = ids.size(0), k = ids.size(1), E = num_experts;
  auto row_index = at::full({T, k}, -1, ids.options());
  // Token-major flat order is the order inside each expert; the stable sort keeps it.
  const auto keys = expert_keys(ids, E, valid_mask).reshape({-1});
  const auto counts = expert_histogram(keys, E);
  auto offsets = at::zeros({E + 1}, ids.options());
  offsets.narrow(0, 1, E).copy_(at::cumsum(counts, 0));
  if (T * k > 0) {
    auto [sorted, perm] = stable_sort(keys);
    assign(sorted, perm, counts, E, /*capacity=*/-1, row_index);
  }
  return {row_index, offsets};
}

namespace {

struct CudaPermute : CudaRows {
  static constexpr auto check_expert_ids = &cuda::check_expert_ids;
  static constexpr auto permute_plan = &cuda::permute_plan;
};

}  // namespace

TORCH_LIBRARY_IMPL(torch_moe, CUDA, m) { register_permute<CudaPermute>(m); }

}  // namespace torch_moe::cuda
