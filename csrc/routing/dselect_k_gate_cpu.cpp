// CPU kernels of dselect_k_gate and its backward: one pass per token, parallel over tokens (each token's sums run in
// a fixed order, so results do not depend on the thread count).
#include "routing/dselect_k_gate.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/kernel_registration.h"

namespace torch_moe::cpu {
namespace {

// The smooth-step: exactly 0 for t <= -gamma/2 and 1 for t >= gamma/2 (so a selector can become exactly one-hot),
// the C1 cubic between.
template <typename acc_t>
acc_t smooth_step(acc_t t, acc_t gamma) {
  if (t <= -gamma / 2) return acc_t(0);
  if (t >= gamma / 2) return acc_t(1);
  return (acc_t(-2) / (gamma * gamma * gamma)) * t * t * t + (acc_t(1.5) / gamma) * t + acc_t(0.5);
}

// Its slope: exactly 0 on the flat parts (where the step is exactly 0 or 1), whatever comes from upstream.
template <typename acc_t>
acc_t smooth_step_slope(acc_t t, acc_t gamma) {
  if (t <= -gamma / 2 || t >= gamma / 2) return acc_t(0);
  return (acc_t(-6) / (gamma * gamma * gamma)) * t * t + acc_t(1.5) / gamma;
}

// alpha = softmax(a[0..k)).
template <typename acc_t>
void softmax_row(const acc_t* a, int64_t k, acc_t* alpha) {
  acc_t max = a[0];
  for (int64_t i = 1; i < k; ++i) max = std::max(max, a[i]);
  acc_t sum = 0;
  for (int64_t i = 0; i < k; ++i) sum += (alpha[i] = std::exp(a[i] - max));
  for (int64_t i = 0; i < k; ++i) alpha[i] /= sum;
}

// Bit l (most significant first) of expert j's m-bit code.
inline bool code_bit(int64_t j, int64_t l, int64_t m) { return (j >> (m - 1 - l)) & 1; }

}  // namespace

// dselect_k_gate after dselect_k_gate_op's checks; code [T, k, m] and selector [T, k] contiguous, router dtype.
std::tuple<at::Tensor, at::Tensor> dselect_gate(const at::Tensor& code, const at::Tensor& selector, int64_t E,
                                                double gamma) {
  const int64_t T = code.size(0), k = code.size(1), m = code.size(2);
  auto q = at::empty({T, E}, code.options());
  auto r = at::empty({T, k, E}, code.options());
  if (T == 0) return {q, r};
  AT_DISPATCH_FLOATING_TYPES(code.scalar_type(), "torch_moe_dselect_k_gate", [&] {
    using acc_t = scalar_t;
    const acc_t g = static_cast<acc_t>(gamma);
    const acc_t* zp = code.data_ptr<acc_t>();
    const acc_t* ap = selector.data_ptr<acc_t>();
    acc_t* qp = q.data_ptr<acc_t>();
    acc_t* rp = r.data_ptr<acc_t>();
    at::parallel_for(0, T, std::max<int64_t>(1, 4096 / (k * E)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> alpha(k), steps(m);
      for (int64_t t = begin; t < end; ++t) {
        softmax_row(ap + t * k, k, alpha.data());
        acc_t* q_t = qp + t * E;
        std::fill(q_t, q_t + E, acc_t(0));
        for (int64_t i = 0; i < k; ++i) {
          const acc_t* z = zp + (t * k + i) * m;
          for (int64_t l = 0; l < m; ++l) steps[l] = smooth_step(z[l], g);
          acc_t* r_ti = rp + (t * k + i) * E;
          // Codes >= E are never formed: their mass is what the reachability loss sees missing from sum_j r_i[j].
          for (int64_t j = 0; j < E; ++j) {
            acc_t value = 1;
            for (int64_t l = 0; l < m; ++l) value *= code_bit(j, l, m) ? steps[l] : acc_t(1) - steps[l];
            r_ti[j] = value;
            q_t[j] += alpha[i] * value;
          }
        }
      }
    });
  });
  return {q, r};
}

// _dselect_k_gate_backward after dselect_k_gate_backward_op's checks; every input contiguous in the router dtype.
std::tuple<at::Tensor, at::Tensor> dselect_gate_grad(const at::Tensor& grad_q, const at::Tensor& grad_r,
                                                     const at::Tensor& code, const at::Tensor& selector, int64_t E,
                                                     double gamma) {
  const int64_t T = code.size(0), k = code.size(1), m = code.size(2);
  auto grad_code = at::empty({T, k, m}, code.options());
  auto grad_selector = at::empty({T, k}, code.options());
  if (T == 0) return {grad_code, grad_selector};
  AT_DISPATCH_FLOATING_TYPES(code.scalar_type(), "torch_moe_dselect_k_gate_backward", [&] {
    using acc_t = scalar_t;
    const acc_t g = static_cast<acc_t>(gamma);
    const acc_t* zp = code.data_ptr<acc_t>();
    const acc_t* ap = selector.data_ptr<acc_t>();
    const acc_t* gqp = grad_q.data_ptr<acc_t>();
    const acc_t* grp = grad_r.data_ptr<acc_t>();
    acc_t* gzp = grad_code.data_ptr<acc_t>();
    acc_t* gap = grad_selector.data_ptr<acc_t>();
    at::parallel_for(0, T, std::max<int64_t>(1, 4096 / (k * E)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> alpha(k), d_alpha(k), steps(m), factor(m), prefix(m + 1), suffix(m + 1), d_steps(m);
      for (int64_t t = begin; t < end; ++t) {
        softmax_row(ap + t * k, k, alpha.data());
        const acc_t* gq_t = gqp + t * E;
        for (int64_t i = 0; i < k; ++i) {
          const acc_t* z = zp + (t * k + i) * m;
          const acc_t* gr_ti = grp + (t * k + i) * E;
          for (int64_t l = 0; l < m; ++l) steps[l] = smooth_step(z[l], g);
          std::fill(d_steps.begin(), d_steps.end(), acc_t(0));
          acc_t da = 0;
          for (int64_t j = 0; j < E; ++j) {
            for (int64_t l = 0; l < m; ++l) factor[l] = code_bit(j, l, m) ? steps[l] : acc_t(1) - steps[l];
            // Products of the other factors from prefix and suffix products: no division, so a factor of exactly
            // 0 still passes the gradient of its own bit.
            prefix[0] = 1;
            for (int64_t l = 0; l < m; ++l) prefix[l + 1] = prefix[l] * factor[l];
            suffix[m] = 1;
            for (int64_t l = m; l-- > 0;) suffix[l] = suffix[l + 1] * factor[l];
            const acc_t r_ij = prefix[m];
            da += gq_t[j] * r_ij;
            // d loss / d r_i[j]: directly, and through q[j] = sum_i alpha_i r_i[j].
            const acc_t g_r = gr_ti[j] + alpha[i] * gq_t[j];
            for (int64_t l = 0; l < m; ++l) {
              const acc_t others = prefix[l] * suffix[l + 1];
              d_steps[l] += code_bit(j, l, m) ? g_r * others : -g_r * others;
            }
          }
          d_alpha[i] = da;
          acc_t* gz = gzp + (t * k + i) * m;
          for (int64_t l = 0; l < m; ++l) {
            const acc_t slope = smooth_step_slope(z[l], g);
            gz[l] = slope == acc_t(0) ? acc_t(0) : d_steps[l] * slope;
          }
        }
        // Softmax Jacobian: d alpha_i / d a_n = alpha_i (delta_in - alpha_n).
        acc_t inner = 0;
        for (int64_t i = 0; i < k; ++i) inner += alpha[i] * d_alpha[i];
        for (int64_t i = 0; i < k; ++i) gap[t * k + i] = alpha[i] * (d_alpha[i] - inner);
      }
    });
  });
  return {grad_code, grad_selector};
}

struct CpuDSelectKGate {
  static constexpr auto gate = &cpu::dselect_gate;
  static constexpr auto gate_grad = &cpu::dselect_gate_grad;
};

}  // namespace torch_moe::cpu

namespace torch_moe {

TORCH_LIBRARY_IMPL(torch_moe, CPU, m) {
  impl_with_backward(m, "dselect_k_gate", &dselect_k_gate_op<cpu::CpuDSelectKGate>,
                     &dselect_k_gate_backward_op<cpu::CpuDSelectKGate>);
}

}  // namespace torch_moe
