// Autograd of router_losses: both losses are differentiable w.r.t. logits; the entropy is a statistic.
#include <torch/library.h>

#include "common/autograd_utils.h"

namespace torch_moe {
namespace {

using RouterLossesSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const std::optional<at::Tensor>&);
using RouterLossesBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const std::optional<at::Tensor>&);

class RouterLossesFunction : public torch::autograd::Function<RouterLossesFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& expert_ids,
                               const std::optional<at::Tensor>& valid_mask) {
    static const auto op = op_handle<RouterLossesSig>("torch_moe::router_losses");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [lb, z, entropy] = op.call(logits, expert_ids, valid_mask);
    ctx->save_for_backward({logits, expert_ids, valid_mask.value_or(at::Tensor())});
    ctx->mark_non_differentiable({entropy});
    return {lb, z, entropy};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<RouterLossesBackwardSig>("torch_moe::_router_losses_backward");
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined() && !grads[1].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const auto zero = at::zeros({}, saved[0].options().dtype(grads[grads[0].defined() ? 0 : 1].scalar_type()));
    const auto& g_lb = grads[0].defined() ? grads[0] : zero;
    const auto& g_z = grads[1].defined() ? grads[1] : zero;
    std::optional<at::Tensor> valid_mask;
    if (saved[2].defined()) valid_mask = saved[2];
    return {op.call(g_lb, g_z, saved[0], saved[1], valid_mask), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_losses_autograd(const at::Tensor& logits,
                                                                      const at::Tensor& expert_ids,
                                                                      const std::optional<at::Tensor>& valid_mask) {
  auto out = RouterLossesFunction::apply(logits, expert_ids, valid_mask);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_moe, Autograd, m) { impl_autograd(m, "router_losses", &router_losses_autograd); }

}  // namespace torch_moe
