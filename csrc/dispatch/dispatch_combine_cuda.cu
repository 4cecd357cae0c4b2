// CUDA kernels of dispatch, combine and their backwards: the device plan check (flat_slot_index) under the
// device-generic op bodies of dispatch_combine.h, on the row movement of row_ops_cuda (16-byte copies, fp32
// accumulation in a fixed order, no float atomics).
#include "dispatch/dispatch_combine.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/row_backend_cuda.h"
#include "dispatch/dispatch_checks.h"

namespace torch_moe::cuda {
namespace {

struct CudaDispatch : CudaRows {
  static at::Tensor flat_slot_index(const char* op, const at::Tensor& expert_ids, const at::Tensor& slots,
                                    int64_t num_experts, int64_t capacity) {
    // Only kept assignments must name a real expert.
    const auto kept = slots.ge(0);
    cuda::check_index_range(op, "expert_ids", expert_ids.masked_fill(kept.logical_not(), 0), 0, num_experts);
    // Ids outside [0, E) (possible only with value checks off) are treated as not kept rather than read.
    const auto usable = kept.logical_and(expert_ids.ge(0)).logical_and_(expert_ids.lt(num_experts))
                            .logical_and_(slots.lt(capacity));
    auto index = at::where(usable, expert_ids * capacity + slots, at::scalar_tensor(-1, slots.options()));
    check_unique_destinations(op, "slots", index, num_experts * capacity);
    return index;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(torch_moe, CUDA, m) { register_dispatch_combine<CudaDispatch>(m); }

}  // namespace torch_moe::cuda
