// CUDA kernels of dselect_k_gate and its backward. Forward: one thread per (token, expert), which forms r_i[j] for
// every selector and q[j]; backward: one thread per (token, selector, bit) for the code gradients and one per token
// for the selector-logit gradients (k, m and E of a router are small: recomputing steps beats a second pass).
// Same math and summation order as the CPU kernels, in fp32 (fp64 for fp64 logits).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_utils.cuh"
#include "common/kernel_registration.h"
#include "routing/dselect_k_gate.h"

namespace torch_moe::cuda {
namespace {

template <typename acc_t>
__device__ __forceinline__ acc_t smooth_step(acc_t t, acc_t gamma) {
  if (t <= -gamma / 2) return acc_t(0);
  if (t >= gamma / 2) return acc_t(1);
  return (acc_t(-2) / (gamma * gamma * gamma)) * t * t * t + (acc_t(1.5) / gamma) * t + acc_t(0.5);
}

template <typename acc_t>
__device__ __forceinline__ acc_t smooth_step_slope(acc_t t, acc_t gamma) {
  if (t <= -gamma / 2 || t >= gamma / 2) return acc_t(0);
  return (acc_t(-6) / (gamma * gamma * gamma)) * t * t + acc_t(1.5) / gamma;
}

__device__ __forceinline__ bool code_bit(int64_t j, int64_t l, int64_t m) { return (j >> (m - 1 - l)) & 1; }

// The max and the sum of exp(a - max) of a token's k selector logits; alpha_i = exp(a_i - max) / sum.
template <typename acc_t>
struct SoftmaxStats {
  acc_t max, sum;
};

template <typename acc_t>
__device__ SoftmaxStats<acc_t> softmax_stats(const acc_t* a, int64_t k) {
  acc_t max = a[0];
  for (int64_t i = 1; i < k; ++i) max = a[i] > max ? a[i] : max;
  acc_t sum = 0;
  for (int64_t i = 0; i < k; ++i) sum += dev_exp(a[i] - max);
  return {max, sum};
}

// r_i[j] of one token's selector i: the product over its m code bits, most significant first.
template <typename acc_t>
__device__ acc_t selector_output(const acc_t* z, int64_t m, int64_t j, acc_t gamma) {
  acc_t value = 1;
  for (int64_t l = 0; l < m; ++l) {
    const acc_t s = smooth_step(z[l], gamma);
    value *= code_bit(j, l, m) ? s : acc_t(1) - s;
  }
  return value;
}

template <typename acc_t>
__global__ void dselect_k_gate_kernel(const acc_t* __restrict__ code, const acc_t* __restrict__ selector, int64_t T,
                                      int64_t k, int64_t m, int64_t E, acc_t gamma, acc_t* __restrict__ q,
                                      acc_t* __restrict__ r) {
  const int64_t n = T * E;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = idx / E, j = idx % E;
    const acc_t* a = selector + t * k;
    const SoftmaxStats<acc_t> st = softmax_stats(a, k);
    acc_t q_tj = 0;
    for (int64_t i = 0; i < k; ++i) {
      const acc_t value = selector_output(code + (t * k + i) * m, m, j, gamma);
      r[(t * k + i) * E + j] = value;
      q_tj += dev_exp(a[i] - st.max) / st.sum * value;
    }
    q[idx] = q_tj;
  }
}

// grad of code logit (t, i, l): sum_j (grad_r[t,i,j] + alpha_i grad_q[t,j]) * d r_i[j] / d S_l * S'(z_l).
template <typename acc_t>
__global__ void dselect_k_code_grad_kernel(const acc_t* __restrict__ grad_q, const acc_t* __restrict__ grad_r,
                                           const acc_t* __restrict__ code, const acc_t* __restrict__ selector,
                                           int64_t T, int64_t k, int64_t m, int64_t E, acc_t gamma,
                                           acc_t* __restrict__ grad_code) {
  const int64_t n = T * k * m;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t l = idx % m, ti = idx / m, t = ti / k, i = ti % k;
    const acc_t* z = code + ti * m;
    const acc_t slope = smooth_step_slope(z[l], gamma);
    if (slope == acc_t(0)) {  // a flat step gets exactly no gradient, whatever comes from upstream
      grad_code[idx] = acc_t(0);
      continue;
    }
    const acc_t* a = selector + t * k;
    const SoftmaxStats<acc_t> st = softmax_stats(a, k);
    const acc_t alpha = dev_exp(a[i] - st.max) / st.sum;
    acc_t d_step = 0;
    for (int64_t j = 0; j < E; ++j) {
      acc_t others = 1;
      for (int64_t o = 0; o < m; ++o) {
        if (o == l) continue;
        const acc_t s = smooth_step(z[o], gamma);
        others *= code_bit(j, o, m) ? s : acc_t(1) - s;
      }
      const acc_t g_r = grad_r[ti * E + j] + alpha * grad_q[t * E + j];
      d_step += code_bit(j, l, m) ? g_r * others : -g_r * others;
    }
    grad_code[idx] = d_step * slope;
  }
}

// grad of selector logits of token t: alpha_i (d_alpha_i - sum_n alpha_n d_alpha_n), d_alpha_i = sum_j grad_q r_i[j];
// d_alpha is kept in grad_selector's row until the inner product is known.
template <typename acc_t>
__global__ void dselect_k_selector_grad_kernel(const acc_t* __restrict__ grad_q, const acc_t* __restrict__ code,
                                               const acc_t* __restrict__ selector, int64_t T, int64_t k, int64_t m,
                                               int64_t E, acc_t gamma, acc_t* __restrict__ grad_selector) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < T;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t* a = selector + t * k;
    const SoftmaxStats<acc_t> st = softmax_stats(a, k);
    acc_t* out = grad_selector + t * k;
    acc_t inner = 0;
    for (int64_t i = 0; i < k; ++i) {
      acc_t d_alpha = 0;
      for (int64_t j = 0; j < E; ++j) {
        d_alpha += grad_q[t * E + j] * selector_output(code + (t * k + i) * m, m, j, gamma);
      }
      out[i] = d_alpha;
      inner += dev_exp(a[i] - st.max) / st.sum * d_alpha;
    }
    for (int64_t i = 0; i < k; ++i) out[i] = dev_exp(a[i] - st.max) / st.sum * (out[i] - inner);
  }
}

}  // namespace

// dselect_k_gate after dselect_k_gate_op's checks; code [T, k, m] and selector [T, k] contiguous, router dtype.
std::tuple<at::Tensor, at::Tensor> dselect_gate(const at::Tensor& code, const at::Tensor& selector, int64_t E,
                                                double gamma) {
  const int64_t T = code.size(0), k = code.size(1), m = code.size(2);
  const c10::cuda::CUDAGuard guard(code.device());
  auto q = at::empty({T, E}, code.options());
  auto r = at::empty({T, k, E}, code.options());
  if (T == 0) return {q, r};
  AT_DISPATCH_FLOATING_TYPES(code.scalar_type(), "torch_moe_dselect_k_gate_cuda", [&] {
    dselect_k_gate_kernel<scalar_t><<<blocks_for(T * E), kBlockThreads, 0, current_stream()>>>(
        code.data_ptr<scalar_t>(), selector.data_ptr<scalar_t>(), T, k, m, E, static_cast<scalar_t>(gamma),
        q.data_ptr<scalar_t>(), r.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {q, r};
}

// _dselect_k_gate_backward after dselect_k_gate_backward_op's checks; every input contiguous in the router dtype.
std::tuple<at::Tensor, at::Tensor> dselect_gate_grad(const at::Tensor& grad_q, const at::Tensor& grad_r,
                                                     const at::Tensor& code, const at::Tensor& selector, int64_t E,
                                                     double gamma) {
  const int64_t T = code.size(0), k = code.size(1), m = code.size(2);
  const c10::cuda::CUDAGuard guard(code.device());
  auto grad_code = at::empty({T, k, m}, code.options());
  auto grad_selector = at::empty({T, k}, code.options());
  if (T == 0) return {grad_code, grad_selector};
  AT_DISPATCH_FLOATING_TYPES(code.scalar_type(), "torch_moe_dselect_k_gate_backward_cuda", [&] {
    const auto g = static_cast<scalar_t>(gamma);
    if (m > 0) {
      dselect_k_code_grad_kernel<scalar_t><<<blocks_for(T * k * m), kBlockThreads, 0, current_stream()>>>(
          grad_q.data_ptr<scalar_t>(), grad_r.data_ptr<scalar_t>(), code.data_ptr<scalar_t>(),
          selector.data_ptr<scalar_t>(), T, k, m, E, g, grad_code.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    dselect_k_selector_grad_kernel<scalar_t><<<blocks_for(T), kBlockThreads, 0, current_stream()>>>(
        grad_q.data_ptr<scalar_t>(), code.data_ptr<scalar_t>(), selector.data_ptr<scalar_t>(), T, k, m, E, g,
        grad_selector.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_code, grad_selector};
}

struct CudaDSelectKGate {
  static constexpr auto gate = &cuda::dselect_gate;
  static constexpr auto gate_grad = &cuda::dselect_gate_grad;
};

TORCH_LIBRARY_IMPL(torch_moe, CUDA, m) {
  impl_with_backward(m, "dselect_k_gate", &dselect_k_gate_op<CudaDSelectKGate>,
                     &dselect_k_gate_backward_op<CudaDSelectKGate>);
}

}  // namespace torch_moe::cuda
