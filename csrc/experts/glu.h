// Gated expert FFN input half (SwiGLU / GeGLU): the activation math shared by the CPU and CUDA kernels, on whole
// tensors or on one expert segment at a time.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <array>
#include <tuple>

namespace torch_moe {

enum class GluActivation { kSilu, kGelu, kGeluTanh };

// "silu" (SwiGLU), "gelu" (exact erf gelu, GeGLU) or "gelu_tanh"; anything else is a user error naming `op`.
GluActivation parse_glu_activation(const char* op, c10::string_view activation);

// w_gate [E, K, M] floating, and w_up matching it in shape, dtype and device.
void check_glu_weights(const char* op, const at::Tensor& w_gate, const at::Tensor& w_up);

// The backward's [N, M] operands: grad_act, gate and up, floating, N rows of the plan and M columns of w_gate.
void check_glu_projections(const char* op, int64_t N, int64_t M, const at::Tensor& grad_act, const at::Tensor& gate,
                           const at::Tensor& up);

// act = f(gate) * up, written into act (same shape as gate and up; may not alias them).
void glu_forward_out(at::Tensor& act, const at::Tensor& gate, const at::Tensor& up, GluActivation activation);

// grad_gate = grad_act * up * f'(gate), grad_up = grad_act * f(gate), written into the first two arguments.
void glu_backward_out(at::Tensor& grad_gate, at::Tensor& grad_up, const at::Tensor& grad_act, const at::Tensor& gate,
                      const at::Tensor& up, GluActivation activation);

// The CPU kernels' forms of the two above, on contiguous operands: the math runs in fixed chunks of elements, each
// without nested threads, so that where ATen's vectorised loops stop and their scalar remainders start depends on
// the operands' size only. Run whole, an elementwise op splits at a point set by the thread count, and f(gate)'s
// vector and scalar forms can differ in the last bit.
void glu_forward_chunked(at::Tensor& act, const at::Tensor& gate, const at::Tensor& up, GluActivation activation);
void glu_backward_chunked(at::Tensor& grad_gate, at::Tensor& grad_up, const at::Tensor& grad_act,
                          const at::Tensor& gate, const at::Tensor& up, GluActivation activation);

// The glu op and its backward on whole tensors (device-generic ATen math; on the CPU in cache-sized chunks).
at::Tensor glu_op(const at::Tensor& gate, const at::Tensor& up, c10::string_view activation);
std::tuple<at::Tensor, at::Tensor> glu_backward_op(const at::Tensor& grad_act, const at::Tensor& gate,
                                                   const at::Tensor& up, c10::string_view activation,
                                                   std::array<bool, 2> output_mask);

}  // namespace torch_moe
