// Autograd of glu: gradients to gate and up; backward keeps the two inputs, not f(gate).
#include <torch/library.h>

#include "common/autograd_utils.h"

#include <array>
#include <string>
#include <tuple>

namespace torch_moe {
namespace {

class GluFunction : public torch::autograd::Function<GluFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up,
                               c10::string_view activation) {
    static const auto op =
        op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view)>("torch_moe::glu");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({gate, up});
    ctx->saved_data["activation"] = std::string(activation);
    return {op.call(gate, up, activation)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view, std::array<bool, 2>)>(
        "torch_moe::_glu_backward");
    const auto s = ctx->get_saved_variables();
    const auto activation = ctx->saved_data["activation"].toStringRef();
    auto [grad_gate, grad_up] =
        op.call(grads[0], s[0], s[1], activation, {ctx->needs_input_grad(0), ctx->needs_input_grad(1)});
    return {grad_gate, grad_up, at::Tensor()};
  }
};

at::Tensor glu_autograd(const at::Tensor& gate, const at::Tensor& up, c10::string_view activation) {
  return GluFunction::apply(gate, up, activation)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_moe, Autograd, m) { impl_autograd(m, "glu", &glu_autograd); }

}  // namespace torch_moe
