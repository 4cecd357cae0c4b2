// Autograd of noisy_topk_load: differentiable w.r.t. clean logits, noisy logits (through the threshold) and noise_std.
#include <torch/library.h>

#include "common/autograd_utils.h"

namespace torch_moe {
namespace {

using LoadSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, const OptTensor&);
using LoadBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const at::Tensor&, const at::Tensor&, int64_t,
                                                                       const OptTensor&);

class NoisyTopkLoadFunction : public torch::autograd::Function<NoisyTopkLoadFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& clean, const at::Tensor& noisy,
                               const at::Tensor& noise_std, int64_t k, const OptTensor& valid_mask) {
    static const auto op = op_handle<LoadSig>("torch_moe::noisy_topk_load");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({clean, noisy, noise_std, valid_mask.value_or(at::Tensor())});
    ctx->saved_data["k"] = k;
    return {op.call(clean, noisy, noise_std, k, valid_mask)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<LoadBackwardSig>("torch_moe::_noisy_topk_load_backward");
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const auto s = ctx->get_saved_variables();
    OptTensor valid_mask;
    if (s[3].defined()) valid_mask = s[3];
    auto [grad_clean, grad_noisy, grad_std] = op.call(grads[0], s[0], s[1], s[2], ctx->saved_data["k"].toInt(),
                                                      valid_mask);
    return {grad_clean, grad_noisy, grad_std, at::Tensor(), at::Tensor()};
  }
};

at::Tensor noisy_topk_load_autograd(const at::Tensor& clean, const at::Tensor& noisy, const at::Tensor& noise_std,
                                    int64_t k, const OptTensor& valid_mask) {
  return NoisyTopkLoadFunction::apply(clean, noisy, noise_std, k, valid_mask)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_moe, Autograd, m) { impl_autograd(m, "noisy_topk_load", &noisy_topk_load_autograd); }

}  // namespace torch_moe
