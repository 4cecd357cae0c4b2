// Autograd of permute and unpermute; permute_plan has integer outputs only and needs none.
#include <torch/library.h>

#include "common/autograd_utils.h"

namespace torch_moe {
namespace {

class PermuteFunction : public torch::autograd::Function<PermuteFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& expert_ids,
                               int64_t num_experts, const OptTensor& valid_mask) {
    static const auto op = op_handle<TensorTriple(const at::Tensor&, const at::Tensor&, int64_t, const OptTensor&)>(
        "torch_moe::permute");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [rows, row_index, offsets] = op.call(x, expert_ids, num_experts, valid_mask);
    ctx->save_for_backward({row_index});
    ctx->mark_non_differentiable({row_index, offsets});
    return {rows, row_index, offsets};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&)>("torch_moe::_permute_backward");
    const auto saved = ctx->get_saved_variables();
    return {op.call(grads[0], saved[0]), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class UnpermuteFunction : public torch::autograd::Function<UnpermuteFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& rows, const at::Tensor& weights,
                               const at::Tensor& row_index) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
        "torch_moe::unpermute");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({rows, weights, row_index});
    return {op.call(rows, weights, row_index)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&)>("torch_moe::_unpermute_backward");
    const auto s = ctx->get_saved_variables();
    auto [grad_rows, grad_weights] = op.call(grads[0], s[0], s[1], s[2]);
    return {grad_rows, grad_weights, at::Tensor()};
  }
};

TensorTriple permute_autograd(const at::Tensor& x, const at::Tensor& expert_ids, int64_t num_experts,
                              const OptTensor& valid_mask) {
  auto out = PermuteFunction::apply(x, expert_ids, num_experts, valid_mask);
  return {out[0], out[1], out[2]};
}

at::Tensor unpermute_autograd(const at::Tensor& rows, const at::Tensor& weights, const at::Tensor& row_index) {
  return UnpermuteFunction::apply(rows, weights, row_index)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_moe, Autograd, m) {
  impl_autograd(m, "permute", &permute_autograd);
  impl_autograd(m, "unpermute", &unpermute_autograd);
}

}  // namespace torch_moe
