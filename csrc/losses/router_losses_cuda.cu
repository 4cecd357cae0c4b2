// CUDA kernels of router_losses and its backward: one row pass per token (softmax, logsumexp, entropy), then
// fixed-shape device reductions, so results are deterministic; the backward reads its scalar gradients on the
// device (no .item()), so a capacity-mode step stays free of host syncs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "common/expert_ids.h"
#include "common/expert_ids_cuda.h"
#include "common/kernel_registration.h"
#include "common/router_math.h"
#include "losses/router_losses.h"

namespace torch_moe::cuda {
namespace {

// Softmax statistics of one row as the CPU's softmax_row forms them (NaN ignored by the max, then propagated).
template <int kThreads, typename scalar_t, typename acc_t>
__device__ void softmax_stats(const scalar_t* l, int64_t E, GroupScratch<kThreads>* scratch, acc_t* max_out,
                              acc_t* sum_out) {
  acc_t mx = -dev_inf<acc_t>();
  for (int64_t e = threadIdx.x; e < E; e += kThreads) {
    const acc_t v = static_cast<acc_t>(l[e]);
    if (mx < v) mx = v;
  }
  mx = group_max<kThreads>(mx, scratch);
  acc_t sum = 0;
  for (int64_t e = threadIdx.x; e < E; e += kThreads) sum += dev_exp(static_cast<acc_t>(l[e]) - mx);
  *sum_out = group_sum<kThreads>(sum, scratch);
  *max_out = mx;
}

// Per token: probs [T, E], lse^2 [T] and entropy [T]; zero for padding tokens.
template <typename scalar_t, typename acc_t, int kThreads>
__global__ void router_losses_rows_kernel(const scalar_t* __restrict__ logits, const bool* __restrict__ valid,
                                          int64_t T, int64_t E, acc_t* __restrict__ probs, acc_t* __restrict__ lse_sq,
                                          acc_t* __restrict__ entropy) {
  GroupScratch<kThreads>* scratch = row_group_scratch<kThreads>();
  const int lane = threadIdx.x;
  for (int64_t row = first_row(); row < T; row += row_stride()) {
    acc_t* p = probs + row * E;
    if (valid != nullptr && !valid[row]) {
      for (int64_t e = lane; e < E; e += kThreads) p[e] = acc_t(0);
      if (lane == 0) {
        lse_sq[row] = acc_t(0);
        entropy[row] = acc_t(0);
      }
      continue;
    }
    const scalar_t* l = logits + row * E;
    acc_t mx, sum;
    softmax_stats<kThreads, scalar_t, acc_t>(l, E, scratch, &mx, &sum);
    acc_t h = 0;
    for (int64_t e = lane; e < E; e += kThreads) {
      const acc_t pe = dev_exp(static_cast<acc_t>(l[e]) - mx) / sum;
      p[e] = pe;
      if (pe > 0) h -= pe * dev_log(pe);
    }
    h = group_sum<kThreads>(h, scratch);
    if (lane == 0) {
      const acc_t lse = mx + dev_log(sum);
      lse_sq[row] = lse * lse;
      entropy[row] = h;
    }
  }
}

// grad_logits[t] = p * (g_probs - <g_probs, p>) + (2 g_z lse_t / Tv) p for valid tokens, 0 otherwise.
template <typename scalar_t, typename acc_t, int kThreads>
__global__ void router_losses_backward_kernel(const scalar_t* __restrict__ logits, const bool* __restrict__ valid,
                                              int64_t T, int64_t E, const acc_t* __restrict__ g_probs,
                                              const acc_t* __restrict__ g_z, const acc_t* __restrict__ valid_tokens,
                                              acc_t* __restrict__ grad_logits) {
  GroupScratch<kThreads>* scratch = row_group_scratch<kThreads>();
  const int lane = threadIdx.x;
  const acc_t Tv = *valid_tokens;
  for (int64_t row = first_row(); row < T; row += row_stride()) {
    acc_t* out = grad_logits + row * E;
    if (Tv == acc_t(0) || (valid != nullptr && !valid[row])) {
      for (int64_t e = lane; e < E; e += kThreads) out[e] = acc_t(0);
      continue;
    }
    const scalar_t* l = logits + row * E;
    acc_t mx, sum;
    softmax_stats<kThreads, scalar_t, acc_t>(l, E, scratch, &mx, &sum);
    acc_t inner = 0;
    for (int64_t e = lane; e < E; e += kThreads) inner += g_probs[e] * (dev_exp(static_cast<acc_t>(l[e]) - mx) / sum);
    inner = group_sum<kThreads>(inner, scratch);
    const acc_t lse = mx + dev_log(sum);
    const acc_t z_scale = *g_z * acc_t(2) * lse / Tv;
    for (int64_t e = lane; e < E; e += kThreads) {
      const acc_t pe = dev_exp(static_cast<acc_t>(l[e]) - mx) / sum;
      out[e] = pe * (g_probs[e] - inner) + z_scale * pe;
    }
  }
}

const bool* mask_ptr(const at::Tensor& mask) { return mask.defined() ? mask.data_ptr<bool>() : nullptr; }

at::Tensor contiguous_mask(const std::optional<at::Tensor>& valid_mask) {
  return valid_mask.has_value() && valid_mask->defined() ? valid_mask->contiguous() : at::Tensor();
}

// Valid tokens as a 0-dim tensor of the router dtype, on the device.
at::Tensor valid_token_count(const at::Tensor& mask, int64_t T, const at::TensorOptions& options) {
  return mask.defined() ? mask.sum().to(options.dtype()) : at::scalar_tensor(static_cast<double>(T), options);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_losses(const at::Tensor& logits_in, const at::Tensor& expert_ids,
                                                             const std::optional<at::Tensor>& valid_mask) {
  constexpr const char* op = "router_losses";
  check_router_losses_args(op, logits_in, expert_ids, valid_mask, &cuda::check_expert_ids);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto acc_type = router_dtype(logits_in);
  const auto options = logits_in.options().dtype(acc_type);
  const auto logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), k = expert_ids.size(1);
  if (T == 0 || k == 0) {
    return {at::zeros({}, options), at::zeros({}, options), at::zeros({}, options)};
  }
  const auto mask = contiguous_mask(valid_mask);
  auto probs = at::empty({T, E}, options);
  auto lse_sq = at::empty({T}, options);
  auto entropy = at::empty({T}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "torch_moe_router_losses_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    launch_rows(T, E, [&](auto threads, dim3 block, unsigned int grid) {
      router_losses_rows_kernel<scalar_t, acc_t, decltype(threads)::value><<<grid, block, 0, current_stream()>>>(
          logits.data_ptr<scalar_t>(), mask_ptr(mask), T, E, probs.data_ptr<acc_t>(), lse_sq.data_ptr<acc_t>(),
          entropy.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  const auto Tv = valid_token_count(mask, T, options);
  const auto counts = count_per_expert(expert_ids, E, valid_mask).to(acc_type);
  const auto has_tokens = Tv.gt(0);
  const auto safe_Tv = at::where(has_tokens, Tv, at::ones_like(Tv));
  const auto zero = at::zeros({}, options);
  // E * sum_i f_i P_i with f_i = counts_i / (Tv k) and P_i = mean prob of expert i.
  const auto f = counts / (safe_Tv * static_cast<double>(k));
  const auto P = probs.sum(0) / safe_Tv;
  const auto lb = at::where(has_tokens, (f * P).sum() * static_cast<double>(E), zero);
  const auto z = at::where(has_tokens, lse_sq.sum() / safe_Tv, zero);
  const auto h = at::where(has_tokens, entropy.sum() / safe_Tv, zero);
  return {lb, z, h};
}

at::Tensor router_losses_backward(const at::Tensor& grad_load_balancing, const at::Tensor& grad_z,
                                  const at::Tensor& logits_in, const at::Tensor& expert_ids,
                                  const std::optional<at::Tensor>& valid_mask) {
  constexpr const char* op = "_router_losses_backward";
  check_router_losses_args(op, logits_in, expert_ids, valid_mask, &cuda::check_expert_ids);
  check_floating(op, "grad_load_balancing", grad_load_balancing);
  check_floating(op, "grad_z", grad_z);
  TORCH_MOE_CHECK(grad_load_balancing.numel() == 1 && grad_z.numel() == 1,
                  "torch_moe.{}: arguments 'grad_load_balancing' and 'grad_z' must be scalars, got shapes {} and {}",
                  op, shape_str(grad_load_balancing), shape_str(grad_z));
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto acc_type = router_dtype(logits_in);
  const auto options = logits_in.options().dtype(acc_type);
  const auto logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), k = expert_ids.size(1);
  auto grad_logits = at::zeros({T, E}, options);
  if (T == 0 || k == 0) return grad_logits.to(logits_in.scalar_type());
  const auto mask = contiguous_mask(valid_mask);
  const auto Tv = valid_token_count(mask, T, options).reshape({1}).contiguous();
  const auto safe_Tv = at::where(Tv.gt(0), Tv, at::ones_like(Tv));
  const auto counts = count_per_expert(expert_ids, E, valid_mask).to(acc_type);
  // d lb / d p[t, i] = E * f_i / Tv, scaled by the incoming gradient (read on the device).
  const auto g_lb = grad_load_balancing.reshape({1}).to(options);
  const auto g_probs = (g_lb * static_cast<double>(E) * counts / (safe_Tv * static_cast<double>(k) * safe_Tv)).contiguous();
  const auto g_z = grad_z.reshape({1}).to(options).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "torch_moe_router_losses_backward_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    launch_rows(T, E, [&](auto threads, dim3 block, unsigned int grid) {
      router_losses_backward_kernel<scalar_t, acc_t, decltype(threads)::value><<<grid, block, 0, current_stream()>>>(
          logits.data_ptr<scalar_t>(), mask_ptr(mask), T, E, g_probs.data_ptr<acc_t>(), g_z.data_ptr<acc_t>(),
          Tv.data_ptr<acc_t>(), grad_logits.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_logits.to(logits_in.scalar_type());
}

TORCH_LIBRARY_IMPL(torch_moe, CUDA, m) {
  impl_with_backward(m, "router_losses", &router_losses, &router_losses_backward);
}

}  // namespace torch_moe::cuda
