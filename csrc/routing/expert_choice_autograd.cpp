// Autograd of expert_choice: weights are differentiable w.r.t. logits; slots, token_ids and scores are not.
#include <torch/library.h>

#include "common/autograd_utils.h"

namespace torch_moe {
namespace {

using ExpertChoiceSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, c10::SymInt,
                                                                                   const OptTensor&);
using ExpertChoiceBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&);

class ExpertChoiceFunction : public torch::autograd::Function<ExpertChoiceFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, c10::SymInt capacity,
                               const OptTensor& valid_mask) {
    static const auto op = op_handle<ExpertChoiceSig>("torch_moe::expert_choice");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [weights, slots, token_ids, scores] = op.call(logits, std::move(capacity), valid_mask);
    ctx->save_for_backward({logits, slots});
    ctx->mark_non_differentiable({slots, token_ids, scores});
    return {weights, slots, token_ids, scores};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<ExpertChoiceBackwardSig>("torch_moe::_expert_choice_backward");
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_logits;
    if (grads[0].defined()) grad_logits = op.call(grads[0], saved[0], saved[1]);
    return {grad_logits, at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_choice_autograd(const at::Tensor& logits,
                                                                                  c10::SymInt capacity,
                                                                                  const OptTensor& valid_mask) {
  auto out = ExpertChoiceFunction::apply(logits, std::move(capacity), valid_mask);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_moe, Autograd, m) { impl_autograd(m, "expert_choice", &expert_choice_autograd); }

}  // namespace torch_moe
