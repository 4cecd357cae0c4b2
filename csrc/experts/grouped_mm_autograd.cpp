// Autograd of the grouped_mm family: gradients to the float operands; offsets and row plans are integers.
#include <torch/library.h>

#include "common/autograd_utils.h"

#include <array>
#include <string>
#include <tuple>

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
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, std::array<bool, 2>)>(
        "torch_moe::_grouped_mm_backward");
    const auto s = ctx->get_saved_variables();
    auto [grad_a, grad_b] =
        op.call(grads[0], s[0], s[1], s[2], {ctx->needs_input_grad(0), ctx->needs_input_grad(1)});
    return {grad_a, grad_b, at::Tensor()};
  }
};

class GatherGroupedMmFunction : public torch::autograd::Function<GatherGroupedMmFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& b,
                               const at::Tensor& offsets, const at::Tensor& row_index) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&)>("torch_moe::gather_grouped_mm");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, b, offsets, row_index});
    return {op.call(x, b, offsets, row_index)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        std::array<bool, 2>)>("torch_moe::_gather_grouped_mm_backward");
    const auto s = ctx->get_saved_variables();
    auto [grad_x, grad_b] =
        op.call(grads[0], s[0], s[1], s[2], s[3], {ctx->needs_input_grad(0), ctx->needs_input_grad(1)});
    return {grad_x, grad_b, at::Tensor(), at::Tensor()};
  }
};

class GatherGroupedGluFunction : public torch::autograd::Function<GatherGroupedGluFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w_gate,
                               const at::Tensor& w_up, const at::Tensor& offsets, const at::Tensor& row_index,
                               c10::string_view activation) {
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        c10::string_view)>("torch_moe::gather_grouped_glu");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [act, gate, up] = op.call(x, w_gate, w_up, offsets, row_index, activation);
    ctx->save_for_backward({x, w_gate, w_up, gate, up, offsets, row_index});
    ctx->saved_data["activation"] = std::string(activation);
    ctx->mark_non_differentiable({gate, up});
    // No [N, M] zero gradients for the non-differentiable gate and up.
    ctx->set_materialize_grads(false);
    return {act, gate, up};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view, std::array<bool, 3>)>(
        "torch_moe::_gather_grouped_glu_backward");
    const auto s = ctx->get_saved_variables();
    const auto activation = ctx->saved_data["activation"].toStringRef();
    auto [grad_x, grad_w_gate, grad_w_up] =
        op.call(grads[0], s[0], s[1], s[2], s[3], s[4], s[5], s[6], activation,
                {ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2)});
    return {grad_x, grad_w_gate, grad_w_up, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class GroupedMmUnpermuteFunction : public torch::autograd::Function<GroupedMmUnpermuteFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& b,
                               const at::Tensor& offsets, const at::Tensor& weights, const at::Tensor& row_index) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&)>(
        "torch_moe::grouped_mm_unpermute");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({h, b, offsets, weights, row_index});
    return {op.call(h, b, offsets, weights, row_index)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, std::array<bool, 3>)>("torch_moe::_grouped_mm_unpermute_backward");
    const auto s = ctx->get_saved_variables();
    auto [grad_h, grad_b, grad_weights] =
        op.call(grads[0], s[0], s[1], s[2], s[3], s[4],
                {ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(3)});
    return {grad_h, grad_b, at::Tensor(), grad_weights, at::Tensor()};
  }
};

at::Tensor grouped_mm_autograd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets) {
  return GroupedMmFunction::apply(a, b, offsets)[0];
}

at::Tensor gather_grouped_mm_autograd(const at::Tensor& x, const at::Tensor& b, const at::Tensor& offsets,
                                      const at::Tensor& row_index) {
  return GatherGroupedMmFunction::apply(x, b, offsets, row_index)[0];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_grouped_glu_autograd(const at::Tensor& x,
                                                                           const at::Tensor& w_gate,
                                                                           const at::Tensor& w_up,
                                                                           const at::Tensor& offsets,
                                                                           const at::Tensor& row_index,
                                                                           c10::string_view activation) {
  auto out = GatherGroupedGluFunction::apply(x, w_gate, w_up, offsets, row_index, activation);
  return {out[0], out[1], out[2]};
}

at::Tensor grouped_mm_unpermute_autograd(const at::Tensor& h, const at::Tensor& b, const at::Tensor& offsets,
                                         const at::Tensor& weights, const at::Tensor& row_index) {
  return GroupedMmUnpermuteFunction::apply(h, b, offsets, weights, row_index)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_moe, Autograd, m) {
  impl_autograd(m, "grouped_mm", &grouped_mm_autograd);
  impl_autograd(m, "gather_grouped_mm", &gather_grouped_mm_autograd);
  impl_autograd(m, "gather_grouped_glu", &gather_grouped_glu_autograd);
  impl_autograd(m, "grouped_mm_unpermute", &grouped_mm_unpermute_autograd);
}

}  // namespace torch_moe
