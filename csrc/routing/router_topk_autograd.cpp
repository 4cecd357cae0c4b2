// Autograd of router_topk: weights are differentiable w.r.t. logits; ids and scores are not.
#include <torch/library.h>

#include <string>

#include "common/autograd_utils.h"

namespace torch_moe {
namespace {

using RouterTopkSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t, c10::string_view,
                                                                     const std::optional<at::Tensor>&, bool, int64_t, int64_t);
using RouterTopkBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view,
                                         bool);

class RouterTopkFunction : public torch::autograd::Function<RouterTopkFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, int64_t k, c10::string_view score_func,
                               const std::optional<at::Tensor>& selection_bias, bool normalize, int64_t n_groups,
                               int64_t topk_groups) {
    static const auto op = op_handle<RouterTopkSig>("torch_moe::router_topk");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [weights, expert_ids, scores] = op.call(logits, k, score_func, selection_bias, normalize, n_groups, topk_groups);
    ctx->save_for_backward({logits, expert_ids});
    ctx->saved_data["score_func"] = std::string(score_func);
    ctx->saved_data["normalize"] = normalize;
    ctx->mark_non_differentiable({expert_ids, scores});
    return {weights, expert_ids, scores};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<RouterTopkBackwardSig>("torch_moe::_router_topk_backward");
    const auto saved = ctx->get_saved_variables();
    const auto& logits = saved[0];
    const auto& expert_ids = saved[1];
    at::Tensor grad_logits;
    if (grads[0].defined()) {
      grad_logits = op.call(grads[0], logits, expert_ids, ctx->saved_data["score_func"].toStringRef(),
                            ctx->saved_data["normalize"].toBool());
    }
    return {grad_logits, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_topk_autograd(const at::Tensor& logits, int64_t k,
                                                                    c10::string_view score_func,
                                                                    const std::optional<at::Tensor>& selection_bias,
                                                                    bool normalize, int64_t n_groups,
                                                                    int64_t topk_groups) {
  auto out = RouterTopkFunction::apply(logits, k, score_func, selection_bias, normalize, n_groups, topk_groups);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_moe, Autograd, m) { impl_autograd(m, "router_topk", &router_topk_autograd); }

}  // namespace torch_moe
