// CUDA kernels of expert_choice and its backward: a fused softmax pass per token row (one warp per row for
// E <= 256, one block above), a stable descending sort of each expert's column, and a scatter of the first C.
// Router math in fp32 (fp64 for fp64 logits); ties to the lower token index as on the CPU; no host sync.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "common/kernel_registration.h"
#include "common/router_math.h"
#include "routing/expert_choice.h"

namespace torch_moe::cuda {
namespace {

// Selection keys: softmax probabilities lie in [0, 1], so a NaN probability maps to -1 (below every number, as in
// the CPU's RankBefore) and a padding token to -2 (below everything; never taken, whatever the capacity).
template <typename acc_t>
__device__ __forceinline__ acc_t nan_key() {
  return acc_t(-1);
}
template <typename acc_t>
__device__ __forceinline__ acc_t padding_key() {
  return acc_t(-2);
}

// scores [T, E] = softmax per row; keys [E, T] = the selection key of every (expert, token).
template <typename scalar_t, typename acc_t, int kThreads>
__global__ void expert_choice_scores_kernel(const scalar_t* __restrict__ logits, const bool* __restrict__ valid,
                                            int64_t T, int64_t E, acc_t* __restrict__ scores,
                                            acc_t* __restrict__ keys) {
  GroupScratch<kThreads>* scratch = row_group_scratch<kThreads>();
  for (int64_t row = first_row(); row < T; row += row_stride()) {
    const scalar_t* l = logits + row * E;
    const RowStats<acc_t> st = row_stats<kThreads, scalar_t, acc_t>(l, E, /*softmax=*/true, scratch);
    const bool is_valid = valid == nullptr || valid[row];
    for (int64_t e = threadIdx.x; e < E; e += kThreads) {
      const acc_t s = score_of(static_cast<acc_t>(l[e]), st, /*softmax=*/true);
      scores[row * E + e] = s;
      keys[e * T + row] = !is_valid ? padding_key<acc_t>() : (isnan(s) ? nan_key<acc_t>() : s);
    }
  }
}

// Entry (e, c) of token_ids [E, C]: the c-th token of expert e's sorted column unless c >= T or that token is
// padding; a taken token gets its slot and weight. Each (token, expert) is written at most once: no races.
template <typename acc_t>
__global__ void expert_choice_select_kernel(const acc_t* __restrict__ sorted_keys,
                                            const int64_t* __restrict__ sorted_tokens,
                                            const acc_t* __restrict__ scores, int64_t T, int64_t E, int64_t C,
                                            int64_t* __restrict__ token_ids, int64_t* __restrict__ slots,
                                            acc_t* __restrict__ weights) {
  const int64_t n = E * C;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i / C, c = i % C;
    int64_t token = -1;
    // Padding keys are -2, every other key >= -1.
    if (c < T && sorted_keys[e * T + c] > acc_t(-1.5)) {
      token = sorted_tokens[e * T + c];
      slots[token * E + e] = c;
      weights[token * E + e] = scores[token * E + e];
    }
    token_ids[i] = token;
  }
}

// grad_logits[t] = s * (g - <g, s>) with g the incoming gradient of the taken entries (0 elsewhere).
template <typename scalar_t, typename acc_t, int kThreads>
__global__ void expert_choice_backward_kernel(const acc_t* __restrict__ grad_weights,
                                              const scalar_t* __restrict__ logits, const int64_t* __restrict__ slots,
                                              int64_t T, int64_t E, acc_t* __restrict__ grad_logits) {
  GroupScratch<kThreads>* scratch = row_group_scratch<kThreads>();
  for (int64_t row = first_row(); row < T; row += row_stride()) {
    const scalar_t* l = logits + row * E;
    const RowStats<acc_t> st = row_stats<kThreads, scalar_t, acc_t>(l, E, /*softmax=*/true, scratch);
    auto grad_of = [&](int64_t e) -> acc_t { return slots[row * E + e] >= 0 ? grad_weights[row * E + e] : acc_t(0); };
    acc_t inner = 0;
    for (int64_t e = threadIdx.x; e < E; e += kThreads) inner += grad_of(e) * score_of(static_cast<acc_t>(l[e]), st, /*softmax=*/true);
    inner = group_sum<kThreads>(inner, scratch);
    for (int64_t e = threadIdx.x; e < E; e += kThreads) {
      const acc_t s = score_of(static_cast<acc_t>(l[e]), st, /*softmax=*/true);
      grad_logits[row * E + e] = s * (grad_of(e) - inner);
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_choice(const at::Tensor& logits_in, int64_t capacity,
                                                                         const std::optional<at::Tensor>& valid_mask) {
  check_expert_choice_args("expert_choice", logits_in, capacity, valid_mask);
  const int64_t T = logits_in.size(0), E = logits_in.size(1);
  at::Tensor mask;
  if (valid_mask.has_value() && valid_mask->defined()) mask = valid_mask->contiguous();
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto acc_type = router_dtype(logits_in);
  const auto logits = logits_in.contiguous();
  const auto options = logits.options().dtype(acc_type);
  auto scores = at::empty({T, E}, options);
  auto weights = at::zeros({T, E}, options);
  auto slots = at::full({T, E}, -1, options.dtype(at::kLong));
  auto token_ids = at::full({E, capacity}, -1, options.dtype(at::kLong));
  if (T == 0) return {weights, slots, token_ids, scores};
  auto keys = at::empty({E, T}, options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "torch_moe_expert_choice_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    launch_rows(T, E, [&](auto threads, dim3 block, unsigned int grid) {
      expert_choice_scores_kernel<scalar_t, acc_t, decltype(threads)::value><<<grid, block, 0, current_stream()>>>(
          logits.data_ptr<scalar_t>(), mask.defined() ? mask.data_ptr<bool>() : nullptr, T, E,
          scores.data_ptr<acc_t>(), keys.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (capacity == 0) return {weights, slots, token_ids, scores};

  // Stable, so equal keys keep increasing token order: ties go to the lower token index. The keys hold no NaN.
  const auto [sorted_keys, sorted_tokens] = at::sort(keys, /*stable=*/true, /*dim=*/1, /*descending=*/true);
  const auto sorted_keys_c = sorted_keys.contiguous();
  const auto sorted_tokens_c = sorted_tokens.contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc_type, "torch_moe_expert_choice_select_cuda", [&] {
    expert_choice_select_kernel<scalar_t><<<blocks_for(E * capacity), kBlockThreads, 0, current_stream()>>>(
        sorted_keys_c.data_ptr<scalar_t>(), sorted_tokens_c.data_ptr<int64_t>(), scores.data_ptr<scalar_t>(), T, E,
        capacity, token_ids.data_ptr<int64_t>(), slots.data_ptr<int64_t>(), weights.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {weights, slots, token_ids, scores};
}

at::Tensor expert_choice_backward(const at::Tensor& grad_weights_in, const at::Tensor& logits_in,
                                  const at::Tensor& slots_in) {
  check_expert_choice_backward_args("_expert_choice_backward", grad_weights_in, logits_in, slots_in);
  const int64_t T = logits_in.size(0), E = logits_in.size(1);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto acc_type = router_dtype(logits_in);
  const auto logits = logits_in.contiguous();
  const auto grad_w = grad_weights_in.to(acc_type).contiguous();
  const auto slots = slots_in.contiguous();
  auto grad_logits = at::empty({T, E}, logits.options().dtype(acc_type));
  if (T > 0 && E > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                    "torch_moe_expert_choice_backward_cuda", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      launch_rows(T, E, [&](auto threads, dim3 block, unsigned int grid) {
        expert_choice_backward_kernel<scalar_t, acc_t, decltype(threads)::value><<<grid, block, 0, current_stream()>>>(
            grad_w.data_ptr<acc_t>(), logits.data_ptr<scalar_t>(), slots.data_ptr<int64_t>(), T, E,
            grad_logits.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return grad_logits.to(logits_in.scalar_type());
}

TORCH_LIBRARY_IMPL(torch_moe, CUDA, m) {
  impl_with_backward(m, "expert_choice", &expert_choice, &expert_choice_backward);
}

}  // namespace torch_moe::cuda
