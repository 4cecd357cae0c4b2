// Autograd of dispatch, combine, permute and unpermute; capacity_plan has integer outputs and only redispatches.
#include <torch/library.h>

#include "common/autograd_utils.h"

namespace torch_moe {
namespace {

using OptTensor = std::optional<at::Tensor>;
using TensorPair = std::tuple<at::Tensor, at::Tensor>;
using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

class DispatchFunction : public torch::autograd::Function<DispatchFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& expert_ids,
                               const at::Tensor& slots, int64_t num_experts, c10::SymInt capacity) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                                c10::SymInt)>("torch_moe::dispatch");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({expert_ids, slots});
    return {op.call(x, expert_ids, slots, num_experts, std::move(capacity))};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
        "torch_moe::_dispatch_backward");
    const auto saved = ctx->get_saved_variables();
    return {op.call(grads[0], saved[0], saved[1]), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class CombineFunction : public torch::autograd::Function<CombineFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& buffer, const at::Tensor& weights,
                               const at::Tensor& expert_ids, const at::Tensor& slots) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&)>("torch_moe::combine");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({buffer, weights, expert_ids, slots});
    return {op.call(buffer, weights, expert_ids, slots)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&)>("torch_moe::_combine_backward");
    const auto s = ctx->get_saved_variables();
    auto [grad_buffer, grad_weights] = op.call(grads[0], s[0], s[1], s[2], s[3]);
    return {grad_buffer, grad_weights, at::Tensor(), at::Tensor()};
  }
};

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

at::Tensor dispatch_autograd(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& slots,
                             int64_t num_experts, c10::SymInt capacity) {
  return DispatchFunction::apply(x, expert_ids, slots, num_experts, std::move(capacity))[0];
}

at::Tensor combine_autograd(const at::Tensor& buffer, const at::Tensor& weights, const at::Tensor& expert_ids,
                            const at::Tensor& slots) {
  return CombineFunction::apply(buffer, weights, expert_ids, slots)[0];
}

TensorTriple permute_autograd(const at::Tensor& x, const at::Tensor& expert_ids, int64_t num_experts,
                              const OptTensor& valid_mask) {
  auto out = PermuteFunction::apply(x, expert_ids, num_experts, valid_mask);
  return {out[0], out[1], out[2]};
}

at::Tensor unpermute_autograd(const at::Tensor& rows, const at::Tensor& weights, const at::Tensor& row_index) {
  return UnpermuteFunction::apply(rows, weights, row_index)[0];
}

// Integer outputs carry no gradient; a priority that requires grad is read, never differentiated.
TensorTriple capacity_plan_autograd(const at::Tensor& expert_ids, int64_t num_experts, c10::SymInt capacity,
                                    c10::string_view drop_policy, const OptTensor& priority,
                                    const OptTensor& valid_mask) {
  static const auto op = op_handle<TensorTriple(const at::Tensor&, int64_t, c10::SymInt, c10::string_view,
                                                const OptTensor&, const OptTensor&)>("torch_moe::capacity_plan");
  at::AutoDispatchBelowADInplaceOrView guard;
  OptTensor detached = priority.has_value() && priority->defined() ? OptTensor(priority->detach()) : priority;
  return op.call(expert_ids, num_experts, std::move(capacity), drop_policy, detached, valid_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_moe, Autograd, m) {
  m.impl("capacity_plan", &capacity_plan_autograd);
  m.impl("dispatch", &dispatch_autograd);
  m.impl("combine", &combine_autograd);
  m.impl("permute", &permute_autograd);
  m.impl("unpermute", &unpermute_autograd);
  m.impl("_dispatch_backward", refuse_double_backward());
  m.impl("_combine_backward", refuse_double_backward());
  m.impl("_permute_backward", refuse_double_backward());
  m.impl("_unpermute_backward", refuse_double_backward());
}

}  // namespace torch_moe
