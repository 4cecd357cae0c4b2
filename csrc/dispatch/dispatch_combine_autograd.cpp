// Autograd of dispatch and combine; capacity_plan has integer outputs and only redispatches.
#include <torch/library.h>

#include "common/autograd_utils.h"

namespace torch_moe {
namespace {

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

at::Tensor dispatch_autograd(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& slots,
                             int64_t num_experts, c10::SymInt capacity) {
  return DispatchFunction::apply(x, expert_ids, slots, num_experts, std::move(capacity))[0];
}

at::Tensor combine_autograd(const at::Tensor& buffer, const at::Tensor& weights, const at::Tensor& expert_ids,
                            const at::Tensor& slots) {
  return CombineFunction::apply(buffer, weights, expert_ids, slots)[0];
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
  impl_autograd(m, "dispatch", &dispatch_autograd);
  impl_autograd(m, "combine", &combine_autograd);
}

}  // namespace torch_moe
