// Autograd of grouped_mm: gradients to both operands; offsets are an integer plan.
#include <torch/library.h>

#include "common/autograd_utils.h"

namespace torch_moe {
namespace {

class GroupedMmFunction : public torch::autograd::Function<GroupedMmFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b,
                               const at::Tensor& offsets) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
        "torch_moe::grouped_mm");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({a, b, offsets});
    return {op.call(a, b, offsets)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                        const at::Tensor&, const at::Tensor&)>(
        "torch_moe::_grouped_mm_backward");
    const auto s = ctx->get_saved_variables();
    auto [grad_a, grad_b] = op.call(grads[0], s[0], s[1], s[2]);
    return {grad_a, grad_b, at::Tensor()};
  }
};

at::Tensor grouped_mm_autograd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets) {
  return GroupedMmFunction::apply(a, b, offsets)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_moe, Autograd, m) {
  m.impl("grouped_mm", &grouped_mm_autograd);
  m.impl("_grouped_mm_backward", refuse_double_backward());
}

}  // namespace torch_moe
