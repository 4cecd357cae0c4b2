// CPU kernels of permute, permute_plan, unpermute and their backwards: the dropless plan (a counting sort by
// expert) under the device-generic op bodies of permute.h, on the shared CPU row kernels.
#include "dispatch/permute.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "common/expert_ids.h"
#include "common/row_backend.h"

namespace torch_moe::cpu {

std::tuple<at::Tensor, at::Tensor> permute_plan(const at::Tensor& expert_ids_in, int64_t num_experts,
                                                const std::optional<at::Tensor>& valid_mask) {
  const auto ids = expert_ids_in.contiguous();
  const int64_t T = ids.size(0), k = ids.size(1), E = num_experts;
  auto row_index = at::full({T, k}, -1, ids.options());
  auto offsets = at::zeros({E + 1}, ids.options());
  const auto valid = valid_token_flags(valid_mask, T);
  const int64_t* ip = ids.data_ptr<int64_t>();
  int64_t* rp = row_index.data_ptr<int64_t>();
  int64_t* op = offsets.data_ptr<int64_t>();
  // Counting sort by expert; the token-major scan keeps token order inside each expert.
  for (int64_t a = 0; a < T * k; ++a) {
    if (valid[a / k]) ++op[ip[a] + 1];
  }
  for (int64_t e = 0; e < E; ++e) op[e + 1] += op[e];
  std::vector<int64_t> cursor(op, op + E);
  for (int64_t a = 0; a < T * k; ++a) {
    if (valid[a / k]) rp[a] = cursor[ip[a]]++;
  }
  return {row_index, offsets};
}

namespace {

struct CpuPermute : CpuRows {
  static constexpr auto check_expert_ids = &::torch_moe::check_expert_ids;
  static constexpr auto permute_plan = &cpu::permute_plan;
};

}  // namespace

TORCH_LIBRARY_IMPL(torch_moe, CPU, m) { register_permute<CpuPermute>(m); }

}  // namespace torch_moe::cpu
