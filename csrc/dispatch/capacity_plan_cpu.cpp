// CPU capacity plan (position and probability policies).
#include "dispatch/capacity_plan.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/checks.h"
#include "common/expert_ids.h"

namespace torch_moe {

namespace cpu {
namespace {

// Sorts one expert's assignments (flat t*k+j) by priority, highest first; NaN last; ties to the lower
// token index (then the lower choice rank, i.e. the lower flat index).
template <typename acc_t>
void sort_by_priority(std::vector<int64_t>& assignments, const acc_t* priority) {
  std::sort(assignments.begin(), assignments.end(), [priority](int64_t a, int64_t b) {
    const acc_t pa = priority[a], pb = priority[b];
    const bool na = std::isnan(pa), nb = std::isnan(pb);
    if (na != nb) return nb;
    if (!na && pa != pb) return pa > pb;
    return a < b;
  });
}

// The plan after capacity_plan_op's checks.
std::tuple<at::Tensor, at::Tensor, at::Tensor> plan_slots(const char* op, const at::Tensor& expert_ids_in,
                                                          int64_t num_experts, int64_t capacity, DropPolicy policy,
                                                          const std::optional<at::Tensor>& priority_in,
                                                          const std::optional<at::Tensor>& valid_mask) {
  const auto ids = expert_ids_in.contiguous();
  const int64_t T = ids.size(0), k = ids.size(1), E = num_experts;
  auto slots = at::full({T, k}, -1, ids.options());
  auto tokens_per_expert = at::zeros({E}, ids.options());
  auto kept_per_expert = at::zeros({E}, ids.options());
  const auto valid = valid_token_flags(valid_mask, T);
  const int64_t* ip = ids.data_ptr<int64_t>();
  int64_t* sp = slots.data_ptr<int64_t>();
  int64_t* count = tokens_per_expert.data_ptr<int64_t>();
  int64_t* kept = kept_per_expert.data_ptr<int64_t>();

  if (policy == DropPolicy::kPosition) {
    // GShard order: every token's 1st choice, then every 2nd choice, ... A linear pass, O(T k).
    for (int64_t j = 0; j < k; ++j) {
      for (int64_t t = 0; t < T; ++t) {
        if (!valid[t]) continue;
        const int64_t e = ip[t * k + j];
        const int64_t position = count[e]++;
        if (position < capacity) sp[t * k + j] = position;
      }
    }
  } else {
    std::vector<std::vector<int64_t>> per_expert(E);
    for (int64_t a = 0; a < T * k; ++a) {
      if (valid[a / k]) per_expert[ip[a]].push_back(a);
    }
    for (int64_t e = 0; e < E; ++e) count[e] = static_cast<int64_t>(per_expert[e].size());
    const auto priority = priority_in->to(priority_in->scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
    AT_DISPATCH_FLOATING_TYPES(priority.scalar_type(), "torch_moe_capacity_plan", [&] {
      const scalar_t* pp = priority.data_ptr<scalar_t>();
      at::parallel_for(0, E, 1, [&](int64_t begin, int64_t end) {
        for (int64_t e = begin; e < end; ++e) {
          auto& list = per_expert[e];
          sort_by_priority(list, pp);
          const int64_t n = std::min<int64_t>(capacity, static_cast<int64_t>(list.size()));
          for (int64_t s = 0; s < n; ++s) sp[list[s]] = s;
        }
      });
    });
  }
  for (int64_t e = 0; e < E; ++e) kept[e] = std::min(count[e], capacity);
  return {slots, tokens_per_expert, kept_per_expert};
}

struct CpuCapacityPlan {
  static constexpr auto plan_slots = &cpu::plan_slots;
};

}  // namespace

TORCH_LIBRARY_IMPL(torch_moe, CPU, m) { m.impl("capacity_plan", &capacity_plan_op<CpuCapacityPlan>); }

}  // namespace cpu

}  // namespace torch_moe
