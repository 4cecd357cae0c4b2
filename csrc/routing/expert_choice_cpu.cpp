// CPU kernels of expert_choice and its backward: softmax per token, then a top-C selection per expert column.
#include "routing/expert_choice.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/expert_ids.h"
#include "common/kernel_registration.h"
#include "common/router_math.h"

namespace torch_moe {

void check_expert_choice_args(const char* op, const at::Tensor& logits, int64_t capacity,
                              const std::optional<at::Tensor>& valid_mask) {
  check_floating(op, "logits", logits);
  check_dim(op, "logits", logits, 2, "[T, E]");
  TORCH_MOE_CHECK(logits.size(1) > 0,
                  "torch_moe.{}: argument 'logits' must have at least one expert (E > 0), got shape {}", op,
                  shape_str(logits));
  TORCH_MOE_CHECK(capacity >= 0, "torch_moe.{}: argument 'capacity' must be >= 0, got {}", op, capacity);
  // token_ids [E, C] int64; E * C also bounds the device kernel's flat index.
  check_alloc_bytes(op, "capacity", "token_ids [E, C]",
                    checked_mul(op, "capacity", "E * capacity", logits.size(1), capacity), sizeof(int64_t));
  check_valid_mask(op, valid_mask, logits, "logits");
}

void check_expert_choice_backward_args(const char* op, const at::Tensor& grad_weights, const at::Tensor& logits,
                                       const at::Tensor& slots) {
  check_floating(op, "grad_weights", grad_weights);
  check_dim(op, "logits", logits, 2, "[T, E]");
  check_dtype(op, "slots", slots, at::kLong);
  check_same_shape(op, "grad_weights", grad_weights, "logits", logits);
  check_same_shape(op, "slots", slots, "logits", logits);
  check_same_device(op, {{"logits", &logits}, {"grad_weights", &grad_weights}, {"slots", &slots}});
}

namespace cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_choice(const at::Tensor& logits_in, int64_t capacity,
                                                                         const std::optional<at::Tensor>& valid_mask) {
  check_expert_choice_args("expert_choice", logits_in, capacity, valid_mask);
  const int64_t T = logits_in.size(0), E = logits_in.size(1);
  const auto acc_type = router_dtype(logits_in);
  const auto logits = logits_in.to(acc_type).contiguous();
  auto scores = at::empty({T, E}, logits.options());
  auto weights = at::zeros({T, E}, logits.options());
  auto slots = at::full({T, E}, -1, logits.options().dtype(at::kLong));
  auto token_ids = at::full({E, capacity}, -1, logits.options().dtype(at::kLong));
  if (T == 0) return {weights, slots, token_ids, scores};
  const auto valid = valid_token_flags(valid_mask, T);

  AT_DISPATCH_FLOATING_TYPES(acc_type, "torch_moe_expert_choice", [&] {
    using acc_t = scalar_t;
    const acc_t* lp = logits.data_ptr<acc_t>();
    acc_t* sp = scores.data_ptr<acc_t>();
    at::parallel_for(0, T, std::max<int64_t>(1, 4096 / E), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) score_row(lp + t * E, E, ScoreFunc::kSoftmax, sp + t * E);
    });
    acc_t* wp = weights.data_ptr<acc_t>();
    int64_t* slot_p = slots.data_ptr<int64_t>();
    int64_t* tok_p = token_ids.data_ptr<int64_t>();
    // Experts write disjoint columns of slots / weights and disjoint rows of token_ids.
    at::parallel_for(0, E, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> column(T);
      std::vector<int64_t> candidates;
      candidates.reserve(T);
      for (int64_t e = begin; e < end; ++e) {
        candidates.clear();
        for (int64_t t = 0; t < T; ++t) {
          column[t] = sp[t * E + e];
          if (valid[t]) candidates.push_back(t);
        }
        const int64_t taken = std::min<int64_t>(capacity, static_cast<int64_t>(candidates.size()));
        std::partial_sort(candidates.begin(), candidates.begin() + taken, candidates.end(),
                          RankBefore<acc_t>{column.data()});
        for (int64_t c = 0; c < taken; ++c) {
          const int64_t t = candidates[c];
          tok_p[e * capacity + c] = t;
          slot_p[t * E + e] = c;
          wp[t * E + e] = column[t];
        }
      }
    });
  });
  return {weights, slots, token_ids, scores};
}

at::Tensor expert_choice_backward(const at::Tensor& grad_weights_in, const at::Tensor& logits_in,
                                  const at::Tensor& slots_in) {
  check_expert_choice_backward_args("_expert_choice_backward", grad_weights_in, logits_in, slots_in);
  const int64_t T = logits_in.size(0), E = logits_in.size(1);
  const auto acc_type = router_dtype(logits_in);
  const auto logits = logits_in.to(acc_type).contiguous();
  const auto grad_w = grad_weights_in.to(acc_type).contiguous();
  const auto slots = slots_in.contiguous();
  auto grad_logits = at::empty({T, E}, logits.options());
  if (T > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc_type, "torch_moe_expert_choice_backward", [&] {
      using acc_t = scalar_t;
      const acc_t* lp = logits.data_ptr<acc_t>();
      const acc_t* gp = grad_w.data_ptr<acc_t>();
      const int64_t* slot_p = slots.data_ptr<int64_t>();
      acc_t* out_p = grad_logits.data_ptr<acc_t>();
      at::parallel_for(0, T, std::max<int64_t>(1, 4096 / E), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> s(E), g(E);
        for (int64_t t = begin; t < end; ++t) {
          score_row(lp + t * E, E, ScoreFunc::kSoftmax, s.data());
          // Only chosen entries carry weight; the softmax Jacobian spreads their gradient over the row.
          acc_t inner = 0;
          for (int64_t e = 0; e < E; ++e) {
            g[e] = slot_p[t * E + e] >= 0 ? gp[t * E + e] : acc_t(0);
            inner += g[e] * s[e];
          }
          for (int64_t e = 0; e < E; ++e) out_p[t * E + e] = s[e] * (g[e] - inner);
        }
      });
    });
  }
  return grad_logits.to(logits_in.scalar_type());
}

}  // namespace cpu

TORCH_LIBRARY_IMPL(torch_moe, CPU, m) {
  impl_with_backward(m, "expert_choice", &cpu::expert_choice, &cpu::expert_choice_backward);
}

}  // namespace torch_moe
