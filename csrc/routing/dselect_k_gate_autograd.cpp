// Autograd of dselect_k_gate: the mixture q and the selector outputs r are both differentiable w.r.t. both logits
// (r feeds the router's entropy and reachability losses).
#include <torch/library.h>

#include "common/autograd_utils.h"

namespace torch_moe {
namespace {

using DSelectKGateSig = TensorPair(const at::Tensor&, const at::Tensor&, int64_t, double);
using DSelectKGateBackwardSig = TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           int64_t, double);

class DSelectKGateFunction : public torch::autograd::Function<DSelectKGateFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& code_logits, const at::Tensor& selector_logits,
                               int64_t num_experts, double gamma) {
    static const auto op = op_handle<DSelectKGateSig>("torch_moe::dselect_k_gate");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [weights, selector_outputs] = op.call(code_logits, selector_logits, num_experts, gamma);
    // The backward recomputes the steps and the softmax from the logits: [T, k, m] + [T, k] instead of [T, k, E].
    ctx->save_for_backward({code_logits, selector_logits});
    ctx->saved_data["num_experts"] = num_experts;
    ctx->saved_data["gamma"] = gamma;
    return {weights, selector_outputs};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<DSelectKGateBackwardSig>("torch_moe::_dselect_k_gate_backward");
    if (!grads[0].defined() && !grads[1].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    const auto& code_logits = saved[0];
    const auto& selector_logits = saved[1];
    const int64_t num_experts = ctx->saved_data["num_experts"].toInt();
    const int64_t T = code_logits.size(0), k = code_logits.size(1);
    const auto options = grads[grads[0].defined() ? 0 : 1].options();
    const auto grad_weights = grads[0].defined() ? grads[0] : at::zeros({T, num_experts}, options);
    const auto grad_selector_outputs = grads[1].defined() ? grads[1] : at::zeros({T, k, num_experts}, options);
    auto [grad_code, grad_selector] = op.call(grad_weights, grad_selector_outputs, code_logits, selector_logits,
                                              num_experts, ctx->saved_data["gamma"].toDouble());
    return {grad_code, grad_selector, at::Tensor(), at::Tensor()};
  }
};

TensorPair dselect_k_gate_autograd(const at::Tensor& code_logits, const at::Tensor& selector_logits,
                                   int64_t num_experts, double gamma) {
  auto out = DSelectKGateFunction::apply(code_logits, selector_logits, num_experts, gamma);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_moe, Autograd, m) { impl_autograd(m, "dselect_k_gate", &dselect_k_gate_autograd); }

}  // namespace torch_moe
