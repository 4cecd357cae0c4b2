// The gated-activation math (device-generic ATen calls): the glu op on whole tensors and the per-segment math of
// gather_grouped_glu.
#include "experts/glu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <utility>

#include "common/checks.h"
#include "common/cpu_cache.h"
#include "common/fixed_tasks_cpu.h"
#include "common/kernel_registration.h"

namespace torch_moe {

GluActivation parse_glu_activation(const char* op, c10::string_view activation) {
  if (activation == "silu") return GluActivation::kSilu;
  if (activation == "gelu") return GluActivation::kGelu;
  if (activation == "gelu_tanh") return GluActivation::kGeluTanh;
  TORCH_MOE_CHECK(false, "torch_moe.{}: argument 'activation' must be \"silu\", \"gelu\" or \"gelu_tanh\", got \"{}\"",
                  op, std::string(activation));
  return GluActivation::kSilu;
}

namespace {

// gate and up (named as in the op's schema): floating, of one shape, dtype and device.
void check_gate_up_pair(const char* op, const char* gate_name, const at::Tensor& gate, const char* up_name,
                        const at::Tensor& up) {
  check_floating(op, gate_name, gate);
  check_floating(op, up_name, up);
  check_same_shape(op, up_name, up, gate_name, gate);
  TORCH_MOE_CHECK(up.scalar_type() == gate.scalar_type(),
                  "torch_moe.{}: arguments '{}' and '{}' must share a dtype, got {} and {}", op, gate_name, up_name,
                  dtype_name(gate.scalar_type()), dtype_name(up.scalar_type()));
  check_same_device(op, {{gate_name, &gate}, {up_name, &up}});
}

}  // namespace

void check_glu_weights(const char* op, const at::Tensor& w_gate, const at::Tensor& w_up) {
  check_dim(op, "w_gate", w_gate, 3, "[E, K, M]");
  check_gate_up_pair(op, "w_gate", w_gate, "w_up", w_up);
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

namespace {

// grad_gate = grad_act * up * f'(gate): grad_gate first holds grad_act * up, then goes through f' in place (an
// elementwise op may fully alias).
void glu_grad_gate_out(at::Tensor& grad_gate, const at::Tensor& grad_act, const at::Tensor& gate, const at::Tensor& up,
                       GluActivation activation) {
  at::mul_out(grad_gate, grad_act, up);
  if (activation == GluActivation::kSilu) {
    at::silu_backward_out(grad_gate, grad_gate, gate);
  } else {
    at::gelu_backward_out(grad_gate, grad_gate, gate, gelu_approximation(activation));
  }
}

// grad_up = grad_act * f(gate)
void glu_grad_up_out(at::Tensor& grad_up, const at::Tensor& grad_act, const at::Tensor& gate, GluActivation activation) {
  activation_out(grad_up, gate, activation);
  grad_up.mul_(grad_act);
}

}  // namespace

void glu_backward_out(at::Tensor& grad_gate, at::Tensor& grad_up, const at::Tensor& grad_act, const at::Tensor& gate,
                      const at::Tensor& up, GluActivation activation) {
  glu_grad_gate_out(grad_gate, grad_act, gate, up, activation);
  glu_grad_up_out(grad_up, grad_act, gate, activation);
}

namespace {

// An output shaped like `like` (contiguous): from the block cache on the CPU, so that a training step's activation
// gradients reuse the last step's pages instead of faulting fresh ones in.
at::Tensor empty_like_output(const at::Tensor& like) {
  return like.is_cpu() ? cpu::empty_cached(like.sizes(), like.options()) : at::empty(like.sizes(), like.options());
}

// body(begin, end) over element ranges of the flattened operands. On the CPU the ranges are chunks small enough for
// a chunk's operands to stay in cache from one pass of the math to the next (the whole-tensor passes each read
// their operands from memory), spread over the threads; elsewhere one range.
template <typename Body>
void for_element_chunks(const at::Tensor& like, const Body& body) {
  const int64_t numel = like.numel();
  if (!like.is_cpu()) {
    body(0, numel);
    return;
  }
  constexpr int64_t kChunk = 65536;
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  // Each chunk runs whole on one thread (run_fixed_tasks), so results do not depend on the thread count.
  cpu::run_fixed_tasks(chunks, [&](int64_t c) { body(c * kChunk, std::min(numel, (c + 1) * kChunk)); });
}

}  // namespace

void glu_forward_chunked(at::Tensor& act, const at::Tensor& gate, const at::Tensor& up, GluActivation activation) {
  auto act_flat = act.view(-1);
  const auto gate_flat = gate.view(-1), up_flat = up.view(-1);
  for_element_chunks(gate_flat, [&](int64_t begin, int64_t end) {
    auto act_chunk = act_flat.slice(0, begin, end);
    glu_forward_out(act_chunk, gate_flat.slice(0, begin, end), up_flat.slice(0, begin, end), activation);
  });
}

void glu_backward_chunked(at::Tensor& grad_gate, at::Tensor& grad_up, const at::Tensor& grad_act,
                          const at::Tensor& gate, const at::Tensor& up, GluActivation activation) {
  auto grad_gate_flat = grad_gate.view(-1), grad_up_flat = grad_up.view(-1);
  const auto grad_act_flat = grad_act.view(-1), gate_flat = gate.view(-1), up_flat = up.view(-1);
  for_element_chunks(gate_flat, [&](int64_t begin, int64_t end) {
    auto grad_gate_chunk = grad_gate_flat.slice(0, begin, end);
    auto grad_up_chunk = grad_up_flat.slice(0, begin, end);
    glu_backward_out(grad_gate_chunk, grad_up_chunk, grad_act_flat.slice(0, begin, end),
                     gate_flat.slice(0, begin, end), up_flat.slice(0, begin, end), activation);
  });
}

namespace {

// `count` outputs shaped like gate: each fits, else a user error naming gate (an expanded gate and up can be far
// larger than their storage). -> (bytes they need together, a description for an allocation failure).
std::pair<int64_t, std::string> check_outputs(const char* op, const at::Tensor& gate, int64_t count) {
  const int64_t bytes = check_alloc_bytes(op, "gate", "an output shaped like gate", gate.numel(), gate.element_size());
  return {checked_mul(op, "gate", "the bytes of the outputs", bytes, count),
          fmt::format("{} output(s) of {} elements", count, gate.numel())};
}

std::tuple<at::Tensor, at::Tensor> glu_backward_body(const at::Tensor& grad_act_in, const at::Tensor& gate_in,
                                                     const at::Tensor& up_in, GluActivation kind,
                                                     std::array<bool, 2> output_mask);

}  // namespace

at::Tensor glu_op(const at::Tensor& gate_in, const at::Tensor& up_in, c10::string_view activation) {
  constexpr const char* op = "glu";
  const auto kind = parse_glu_activation(op, activation);
  check_gate_up_pair(op, "gate", gate_in, "up", up_in);
  const auto [bytes, what] = check_outputs(op, gate_in, 1);
  return rethrow_alloc_failure(op, "gate", what, bytes, [&] {
    const auto gate = gate_in.contiguous();
    const auto up = up_in.contiguous();
    auto act = empty_like_output(gate_in);
    glu_forward_chunked(act, gate, up, kind);
    return act;
  });
}

std::tuple<at::Tensor, at::Tensor> glu_backward_op(const at::Tensor& grad_act_in, const at::Tensor& gate_in,
                                                const at::Tensor& up_in, c10::string_view activation,
                                                std::array<bool, 2> output_mask) {
  constexpr const char* op = "_glu_backward";
  const auto kind = parse_glu_activation(op, activation);
  check_gate_up_pair(op, "gate", gate_in, "up", up_in);
  check_floating(op, "grad_act", grad_act_in);
  check_same_shape(op, "grad_act", grad_act_in, "gate", gate_in);
  check_same_device(op, {{"grad_act", &grad_act_in}, {"gate", &gate_in}});
  const auto [bytes, what] = check_outputs(op, gate_in, 2);
  return rethrow_alloc_failure(op, "gate", what, bytes,
                               [&] { return glu_backward_body(grad_act_in, gate_in, up_in, kind, output_mask); });
}

namespace {

std::tuple<at::Tensor, at::Tensor> glu_backward_body(const at::Tensor& grad_act_in, const at::Tensor& gate_in,
                                                     const at::Tensor& up_in, GluActivation kind,
                                                     std::array<bool, 2> output_mask) {
  const auto gate = gate_in.contiguous().view(-1);
  const auto up = up_in.contiguous().view(-1);
  const auto grad_act = grad_act_in.to(gate_in.scalar_type()).contiguous().view(-1);
  const auto [want_gate, want_up] = output_mask;
  at::Tensor grad_gate, grad_up, grad_gate_flat, grad_up_flat;
  if (want_gate) {
    grad_gate = empty_like_output(gate_in);
    grad_gate_flat = grad_gate.view(-1);
  }
  if (want_up) {
    grad_up = empty_like_output(gate_in);
    grad_up_flat = grad_up.view(-1);
  }
  for_element_chunks(gate, [&](int64_t begin, int64_t end) {
    const auto grad_act_chunk = grad_act.slice(0, begin, end);
    const auto gate_chunk = gate.slice(0, begin, end);
    if (want_gate) {
      auto out = grad_gate_flat.slice(0, begin, end);
      glu_grad_gate_out(out, grad_act_chunk, gate_chunk, up.slice(0, begin, end), kind);
    }
    if (want_up) {
      auto out = grad_up_flat.slice(0, begin, end);
      glu_grad_up_out(out, grad_act_chunk, gate_chunk, kind);
    }
  });
  return {grad_gate, grad_up};
}

}  // namespace

// The same ATen math serves both devices; only the output allocation and the chunking differ.
// The CUDA kernel is registered from experts/grouped_mm_cuda.cu, so that only a CUDA build has one.
TORCH_LIBRARY_IMPL(torch_moe, CPU, m) { impl_with_backward(m, "glu", &glu_op, &glu_backward_op); }

}  // namespace torch_moe
