// CPU capacity plan (position and probability policies) and dropless permutation plan.
#include "dispatch/capacity_plan.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/checks.h"

namespace torch_moe {

void check_expert_ids(const char* op, const at::Tensor& expert_ids, int64_t num_experts,
                      const std::optional<at::Tensor>& valid_mask) {
  check_dtype(op, "expert_ids", expert_ids, at::kLong);
  check_dim(op, "expert_ids", expert_ids, 2, "[T, k]");
  TORCH_MOE_CHECK(num_experts > 0, "torch_moe.{}: argument 'num_experts' must be positive, got {}", op, num_experts);
  check_valid_mask(op, valid_mask, expert_ids, "expert_ids");
  const at::Tensor* mask = valid_mask.has_value() && valid_mask->defined() ? &*valid_mask : nullptr;
  check_index_range(op, "expert_ids", expert_ids, 0, num_experts, mask);
}

namespace cpu {
namespace {

enum class DropPolicy { kPosition, kProbability };

DropPolicy parse_drop_policy(const char* op, c10::string_view name) {
  if (name == "position") return DropPolicy::kPosition;
  if (name == "probability") return DropPolicy::kProbability;
  TORCH_MOE_CHECK(false, "torch_moe.{}: argument 'drop_policy' must be \"position\" or \"probability\", got \"{}\"",
                  op, std::string(name));
  return DropPolicy::kPosition;
}


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

}  // namespace

std::vector<uint8_t> valid_token_flags(const std::optional<at::Tensor>& valid_mask, int64_t T) {
  std::vector<uint8_t> valid(T, 1);
  if (valid_mask.has_value() && valid_mask->defined()) {
    const auto m = valid_mask->contiguous();
    const bool* mp = m.data_ptr<bool>();
    for (int64_t t = 0; t < T; ++t) valid[t] = mp[t];
  }
  return valid;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> capacity_plan(const at::Tensor& expert_ids_in, int64_t num_experts,
                                                             int64_t capacity, c10::string_view drop_policy,
                                                             const std::optional<at::Tensor>& priority_in,
                                                             const std::optional<at::Tensor>& valid_mask) {
  constexpr const char* op = "capacity_plan";
  check_expert_ids(op, expert_ids_in, num_experts, valid_mask);
  TORCH_MOE_CHECK(capacity >= 0, "torch_moe.{}: argument 'capacity' must be >= 0, got {}", op, capacity);
  const DropPolicy policy = parse_drop_policy(op, drop_policy);
  const bool has_priority = priority_in.has_value() && priority_in->defined();
  TORCH_MOE_CHECK(policy != DropPolicy::kProbability || has_priority,
                  "torch_moe.{}: argument 'priority' [T, k] is required by drop_policy=\"probability\", got None", op);
  if (has_priority) {
    check_floating(op, "priority", *priority_in);
    check_same_shape(op, "priority", *priority_in, "expert_ids", expert_ids_in);
    check_same_device(op, {{"expert_ids", &expert_ids_in}, {"priority", &*priority_in}});
  }
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

}  // namespace cpu

TORCH_LIBRARY_IMPL(torch_moe, CPU, m) { m.impl("capacity_plan", &cpu::capacity_plan); }

}  // namespace torch_moe
