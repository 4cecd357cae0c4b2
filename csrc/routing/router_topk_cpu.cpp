// CPU kernels of router_topk and its backward: one pass per token row, parallel over tokens.
#include "routing/router_topk.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "common/checks.h"
#include "common/kernel_registration.h"
#include "common/router_math.h"

namespace torch_moe {

void check_expert_groups(const char* op, int64_t E, int64_t k, int64_t n_groups, int64_t topk_groups) {
  TORCH_MOE_CHECK(n_groups >= 1 && E % n_groups == 0,
                  "torch_moe.{}: argument 'n_groups' must be >= 1 and divide the number of experts E = {}, got {}", op,
                  E, n_groups);
  TORCH_MOE_CHECK(topk_groups >= 1 && topk_groups <= n_groups,
                  "torch_moe.{}: argument 'topk_groups' must be in [1, n_groups] = [1, {}], got {}", op, n_groups,
                  topk_groups);
  TORCH_MOE_CHECK(k <= topk_groups * (E / n_groups),
                  "torch_moe.{}: argument 'k' = {} is larger than the {} experts of the topk_groups = {} chosen groups "
                  "(E / n_groups = {} each)",
                  op, k, topk_groups * (E / n_groups), topk_groups, E / n_groups);
}

ScoreFunc check_router_topk_args(const char* op, const at::Tensor& logits, int64_t k, c10::string_view score_func,
                                 const std::optional<at::Tensor>& selection_bias, int64_t n_groups,
                                 int64_t topk_groups) {
  check_floating(op, "logits", logits);
  check_dim(op, "logits", logits, 2, "[T, E]");
  const ScoreFunc func = parse_score_func(op, score_func);
  const int64_t E = logits.size(1);
  TORCH_MOE_CHECK(E > 0, "torch_moe.{}: argument 'logits' must have at least one expert (E > 0), got shape {}", op,
                  shape_str(logits));
  TORCH_MOE_CHECK(k >= 1 && k <= E, "torch_moe.{}: argument 'k' must be in [1, E] = [1, {}], got {}", op, E, k);
  check_expert_groups(op, E, k, n_groups, topk_groups);
  if (selection_bias.has_value() && selection_bias->defined()) {
    check_floating(op, "selection_bias", *selection_bias);
    check_dim(op, "selection_bias", *selection_bias, 1, "[E]");
    check_size(op, "selection_bias", *selection_bias, 0, E, "number of experts");
    check_same_device(op, {{"logits", &logits}, {"selection_bias", &*selection_bias}});
  }
  return func;
}

ScoreFunc check_router_topk_backward_args(const char* op, const at::Tensor& grad_weights, const at::Tensor& logits,
                                          const at::Tensor& expert_ids, c10::string_view score_func) {
  check_floating(op, "grad_weights", grad_weights);
  check_dim(op, "logits", logits, 2, "[T, E]");
  check_dtype(op, "expert_ids", expert_ids, at::kLong);
  check_dim(op, "expert_ids", expert_ids, 2, "[T, k]");
  check_same_shape(op, "grad_weights", grad_weights, "expert_ids", expert_ids);
  const ScoreFunc func = parse_score_func(op, score_func);
  check_size(op, "expert_ids", expert_ids, 0, logits.size(0), "tokens of logits");
  return func;
}

namespace cpu {

// router_topk after router_topk_op's checks; bias is selection_bias in the router dtype (undefined when absent).
std::tuple<at::Tensor, at::Tensor, at::Tensor> select_topk(const char* op, const at::Tensor& logits_in, int64_t k,
                                                           ScoreFunc func, const at::Tensor& bias, bool normalize,
                                                           int64_t n_groups, int64_t topk_groups) {
  const int64_t T = logits_in.size(0), E = logits_in.size(1);
  const auto acc_type = router_dtype(logits_in);
  const auto logits = logits_in.to(acc_type).contiguous();
  auto weights = at::empty({T, k}, logits.options());
  auto ids = at::empty({T, k}, logits.options().dtype(at::kLong));
  if (T == 0) return {weights, ids, at::empty({T, E}, logits.options())};
  auto scores = score_rows(logits, func);

  AT_DISPATCH_FLOATING_TYPES(acc_type, "torch_moe_router_topk", [&] {
    using acc_t = scalar_t;
    const acc_t* bp = bias.defined() ? bias.data_ptr<acc_t>() : nullptr;
    acc_t* wp = weights.data_ptr<acc_t>();
    int64_t* ip = ids.data_ptr<int64_t>();
    acc_t* sp = scores.data_ptr<acc_t>();
    const int64_t group_size = E / n_groups;
    const bool grouped = topk_groups < n_groups;
    at::parallel_for(0, T, std::max<int64_t>(1, 4096 / E), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> biased(bp == nullptr ? 0 : E), group_key(n_groups), chosen_key(k);
      std::vector<int64_t> order(E), group_order(n_groups), chosen(k);
      std::iota(order.begin(), order.end(), 0);
      for (int64_t t = begin; t < end; ++t) {
        const acc_t* s = sp + t * E;
        const acc_t* key = s;
        if (bp != nullptr) {
          for (int64_t e = 0; e < E; ++e) biased[e] = s[e] + bp[e];
          key = biased.data();
        }
        bool has_nan = false;
        for (int64_t e = 0; e < E; ++e) has_nan |= std::isnan(key[e]);
        int64_t candidates = E;
        if (grouped) {
          // A group ranks by the sum of its two best keys; only the topk_groups best groups stay candidates.
          for (int64_t g = 0; g < n_groups; ++g) {
            const acc_t* gk = key + g * group_size;
            int64_t best = 0;
            for (int64_t i = 1; i < group_size; ++i) best = RankBefore<acc_t>{gk}(i, best) ? i : best;
            int64_t second = -1;
            for (int64_t i = 0; i < group_size; ++i) {
              if (i != best && (second < 0 || RankBefore<acc_t>{gk}(i, second))) second = i;
            }
            group_key[g] = second < 0 ? gk[best] : gk[best] + gk[second];
          }
          std::iota(group_order.begin(), group_order.end(), 0);
          std::partial_sort(group_order.begin(), group_order.begin() + topk_groups, group_order.end(),
                            RankBefore<acc_t>{group_key.data()});
          std::sort(group_order.begin(), group_order.begin() + topk_groups);
          candidates = 0;
          for (int64_t g = 0; g < topk_groups; ++g) {
            for (int64_t i = 0; i < group_size; ++i) order[candidates++] = group_order[g] * group_size + i;
          }
        }
        // Candidates are in increasing id order here (groups sorted, ids within a group ascending).
        if (has_nan) {
          best_by_rank(order.data(), candidates, k, RankBefore<acc_t>{key}, chosen.data());
        } else {
          best_by_value(key, order.data(), candidates, k, chosen.data(), chosen_key.data());
        }
        acc_t sum = 0;
        for (int64_t j = 0; j < k; ++j) {
          ip[t * k + j] = chosen[j];
          wp[t * k + j] = s[chosen[j]];
          sum += s[chosen[j]];
        }
        if (normalize && sum > 0) {
          for (int64_t j = 0; j < k; ++j) wp[t * k + j] /= sum;
        }
      }
    });
  });
  return {weights, ids, scores};
}

// _router_topk_backward after router_topk_backward_op's checks.
at::Tensor topk_grad(const char* op, const at::Tensor& grad_weights_in, const at::Tensor& logits_in,
                     const at::Tensor& expert_ids_in, ScoreFunc func, bool normalize) {
  const int64_t T = logits_in.size(0), E = logits_in.size(1), k = expert_ids_in.size(1);
  check_index_range(op, "expert_ids", expert_ids_in, 0, E);
  const auto acc_type = router_dtype(logits_in);
  const auto logits = logits_in.to(acc_type).contiguous();
  const auto grad_w = grad_weights_in.to(acc_type).contiguous();
  const auto ids = expert_ids_in.contiguous();
  auto grad_logits = at::zeros({T, E}, logits.options());
  if (T > 0) {
    const auto scores = score_rows(logits, func);
    AT_DISPATCH_FLOATING_TYPES(acc_type, "torch_moe_router_topk_backward", [&] {
      using acc_t = scalar_t;
      const acc_t* sp = scores.data_ptr<acc_t>();
      const acc_t* gp = grad_w.data_ptr<acc_t>();
      const int64_t* ip = ids.data_ptr<int64_t>();
      acc_t* op_ = grad_logits.data_ptr<acc_t>();
      at::parallel_for(0, T, std::max<int64_t>(1, 4096 / E), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> chosen(k), grad_chosen(k);
        for (int64_t t = begin; t < end; ++t) {
          const acc_t* s = sp + t * E;
          const acc_t* g = gp + t * k;
          const int64_t* id = ip + t * k;
          acc_t* out = op_ + t * E;
          acc_t sum = 0;
          for (int64_t j = 0; j < k; ++j) sum += (chosen[j] = s[id[j]]);
          // d loss / d chosen score: through the normalisation w_j = s_j / sum when it is applied.
          if (normalize && sum > 0) {
            acc_t gw = 0;
            for (int64_t j = 0; j < k; ++j) gw += g[j] * chosen[j];
            gw /= sum;
            for (int64_t j = 0; j < k; ++j) grad_chosen[j] = (g[j] - gw) / sum;
          } else {
            for (int64_t j = 0; j < k; ++j) grad_chosen[j] = g[j];
          }
          if (func == ScoreFunc::kSigmoid) {
            for (int64_t j = 0; j < k; ++j) out[id[j]] += grad_chosen[j] * chosen[j] * (acc_t(1) - chosen[j]);
          } else {
            // Softmax Jacobian: d s_i / d l_m = s_i (delta_im - s_m).
            acc_t inner = 0;
            for (int64_t j = 0; j < k; ++j) inner += grad_chosen[j] * chosen[j];
            for (int64_t e = 0; e < E; ++e) out[e] = -s[e] * inner;
            for (int64_t j = 0; j < k; ++j) out[id[j]] += grad_chosen[j] * chosen[j];
          }
        }
      });
    });
  }
  return grad_logits.to(logits_in.scalar_type());
}

struct CpuRouterTopk {
  static constexpr auto select_topk = &cpu::select_topk;
  static constexpr auto topk_grad = &cpu::topk_grad;
};

}  // namespace cpu

TORCH_LIBRARY_IMPL(torch_moe, CPU, m) {
  impl_with_backward(m, "router_topk", &router_topk_op<cpu::CpuRouterTopk>,
                     &router_topk_backward_op<cpu::CpuRouterTopk>);
}

}  // namespace torch_moe
