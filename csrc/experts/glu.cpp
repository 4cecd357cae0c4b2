// The gated-activation math of gather_grouped_glu (device-generic ATen calls) and its composite form.
#include "experts/glu.h"

#include <ATen/ATen.h>

#include <string>
#include <utility>

#include "common/checks.h"

namespace torch_moe {

GluActivation parse_glu_activation(const char* op, c10::string_view activation) {
  if (activation == "silu") return GluActivation::kSilu;
  if (activation == "gelu") return GluActivation::kGelu;
  if (activation == "gelu_tanh") return GluActivation::kGeluTanh;
  TORCH_MOE_CHECK(false, "torch_moe.{}: argument 'activation' must be \"silu\", \"gelu\" or \"gelu_tanh\", got \"{}\"",
                  op, std::string(activation));
  return GluActivation::kSilu;
}

void check_glu_weights(const char* op, const at::Tensor& w_gate, const at::Tensor& w_up) {
  check_floating(op, "w_gate", w_gate);
  check_dim(op, "w_gate", w_gate, 3, "[E, K, M]");
  check_floating(op, "w_up", w_up);
  check_same_shape(op, "w_up", w_up, "w_gate", w_gate);
  TORCH_MOE_CHECK(w_up.scalar_type() == w_gate.scalar_type(),
                  "torch_moe.{}: arguments 'w_gate' and 'w_up' must share a dtype, got {} and {}", op,
                  dtype_name(w_gate.scalar_type()), dtype_name(w_up.scalar_type()));
  check_same_device(op, {{"w_gate", &w_gate}, {"w_up", &w_up}});
}

void check_glu_projections(const char* op, int64_t N, int64_t M, const at::Tensor& grad_act, const at::Tensor& gate,
                           const at::Tensor& up) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_act", &grad_act}, {"gate", &gate},
                                {"up", &up}}) {
    check_floating(op, name, *t);
    check_dim(op, name, *t, 2, "[N, M]");
    check_size(op, name, *t, 0, N, "rows of the plan");
    check_size(op, name, *t, 1, M, "columns of w_gate");
  }
}

namespace {

c10::string_view gelu_approximation(GluActivation activation) {
  return activation == GluActivation::kGeluTanh ? "tanh" : "none";
}

// out = f(gate)
void activation_out(at::Tensor& out, const at::Tensor& gate, GluActivation activation) {
  if (activation == GluActivation::kSilu) {
    at::silu_out(out, gate);
  } else {
    at::gelu_out(out, gate, gelu_approximation(activation));
  }
}

}  // namespace

void glu_forward_out(at::Tensor& act, const at::Tensor& gate, const at::Tensor& up, GluActivation activation) {
  activation_out(act, gate, activation);
  act.mul_(up);
}

void glu_backward_out(at::Tensor& grad_gate, at::Tensor& grad_up, const at::Tensor& grad_act, const at::Tensor& gate,
                      const at::Tensor& up, GluActivation activation) {
  // grad_gate first holds grad_act * up, then goes through f' in place (an elementwise op may fully alias).
  at::mul_out(grad_gate, grad_act, up);
  if (activation == GluActivation::kSilu) {
    at::silu_backward_out(grad_gate, grad_gate, gate);
  } else {
    at::gelu_backward_out(grad_gate, grad_gate, gate, gelu_approximation(activation));
  }
  activation_out(grad_up, gate, activation);
  grad_up.mul_(grad_act);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_grouped_glu_composite(
    GatherGroupedMmFn gather_grouped_mm, const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
    const at::Tensor& offsets, const at::Tensor& row_index, c10::string_view activation) {
  constexpr const char* op = "gather_grouped_glu";
  const auto kind = parse_glu_activation(op, activation);
  check_glu_weights(op, w_gate, w_up);
  auto gate = gather_grouped_mm(x, w_gate, offsets, row_index);
  auto up = gather_grouped_mm(x, w_up, offsets, row_index);
  auto act = at::empty_like(gate);
  glu_forward_out(act, gate, up, kind);
  return {act, gate, up};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_grouped_glu_backward_composite(
    GatherGroupedMmBackwardFn gather_grouped_mm_backward, const at::Tensor& grad_act_in, const at::Tensor& x,
    const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& gate, const at::Tensor& up,
    const at::Tensor& offsets, const at::Tensor& row_index, c10::string_view activation,
    std::array<bool, 3> output_mask) {
  constexpr const char* op = "_gather_grouped_glu_backward";
  const auto kind = parse_glu_activation(op, activation);
  check_glu_weights(op, w_gate, w_up);
  check_glu_projections(op, row_index.numel(), w_gate.size(2), grad_act_in, gate, up);
  const auto grad_act = grad_act_in.to(gate.scalar_type());
  auto grad_gate = at::empty_like(gate);
  auto grad_up = at::empty_like(up);
  glu_backward_out(grad_gate, grad_up, grad_act, gate, up, kind);
  auto [grad_x, grad_w_gate] =
      gather_grouped_mm_backward(grad_gate, x, w_gate, offsets, row_index, {output_mask[0], output_mask[1]});
  auto [grad_x_up, grad_w_up] =
      gather_grouped_mm_backward(grad_up, x, w_up, offsets, row_index, {output_mask[0], output_mask[2]});
  if (grad_x.defined()) grad_x.add_(grad_x_up);
  return {grad_x, grad_w_gate, grad_w_up};
}

}  // namespace torch_moe
