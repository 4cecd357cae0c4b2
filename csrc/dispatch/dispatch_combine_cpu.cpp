// CPU kernels of dispatch, combine and their backwards: the CPU plan check (flat_slot_index) under the
// device-generic op bodies of dispatch_combine.h, on the shared CPU row kernels.
#include "dispatch/dispatch_combine.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/row_backend.h"
#include "dispatch/dispatch_checks.h"

namespace torch_moe::cpu {
namespace {

struct CpuDispatch : CpuRows {
  // Raw loops rather than ATen ops: on small moves the ten or so elementwise ops this took cost more than moving
  // the rows.
  static at::Tensor flat_slot_index(const char* op, const at::Tensor& expert_ids_in, const at::Tensor& slots_in,
                                    int64_t num_experts, int64_t capacity) {
    const auto expert_ids = expert_ids_in.contiguous();
    const auto slots = slots_in.contiguous();
    const int64_t n = slots.numel();
    const int64_t* ep = expert_ids.data_ptr<int64_t>();
    const int64_t* sp = slots.data_ptr<int64_t>();
    // Only kept assignments must name a real expert.
    for (int64_t a = 0; a < n; ++a) {
      TORCH_MOE_CHECK(sp[a] < 0 || (ep[a] >= 0 && ep[a] < num_experts),
                      "torch_moe.{}: argument '{}' must hold values in [{}, {}), got {} at flat index {}", op,
                      "expert_ids", 0, num_experts, ep[a], a);
    }
    auto index = at::empty(slots.sizes(), slots.options());
    int64_t* ip = index.data_ptr<int64_t>();
    for (int64_t a = 0; a < n; ++a) ip[a] = sp[a] >= 0 ? ep[a] * capacity + sp[a] : -1;
    check_unique_destinations(op, "slots", index, num_experts * capacity);
    return index;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(torch_moe, CPU, m) { register_dispatch_combine<CpuDispatch>(m); }

}  // namespace torch_moe::cpu
