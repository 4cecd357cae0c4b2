// CUDA kernels of router_topk and its backward: one fused pass per token row (scores, selection bias, optional
// group limit, top-k, renormalisation); one warp per row for E <= 256, one block per row above. Router math in
// fp32 (fp64 for fp64 logits), ranking as on the CPU: descending key, NaN last, ties to the lower id.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "common/kernel_registration.h"
#include "common/row_ops_cuda.h"
#include "routing/router_topk.h"

namespace torch_moe::cuda {
namespace {

template <typename acc_t>
__device__ __forceinline__ acc_t key_of(const acc_t* scores, const acc_t* bias, int64_t e) {
  return bias == nullptr ? scores[e] : scores[e] + bias[e];
}

// A group's key: the sum of its two best keys (its only key for one-expert groups), best by the ranking order.
template <typename acc_t>
__device__ acc_t group_key(const acc_t* scores, const acc_t* bias, int64_t first, int64_t size) {
  int64_t best = 0;
  for (int64_t i = 1; i < size; ++i) {
    if (rank_before(key_of(scores, bias, first + i), i, key_of(scores, bias, first + best), best)) best = i;
  }
  int64_t second = -1;
  for (int64_t i = 0; i < size; ++i) {
    if (i == best) continue;
    if (second < 0 || rank_before(key_of(scores, bias, first + i), i, key_of(scores, bias, first + second), second)) {
      second = i;
    }
  }
  const acc_t best_key = key_of(scores, bias, first + best);
  return second < 0 ? best_key : best_key + key_of(scores, bias, first + second);
}

template <typename scalar_t, typename acc_t, int kThreads>
__global__ void router_topk_kernel(const scalar_t* __restrict__ logits, const acc_t* __restrict__ bias, int64_t T,
                                   int64_t E, int64_t k, bool softmax, bool normalize, int64_t n_groups,
                                   int64_t topk_groups, uint8_t* __restrict__ group_allowed, acc_t* __restrict__ weights,
                                   int64_t* __restrict__ ids, acc_t* __restrict__ scores) {
  GroupScratch<kThreads>* scratch = row_group_scratch<kThreads>();
  const int lane = threadIdx.x;
  const bool grouped = topk_groups < n_groups;
  const int64_t group_size = E / n_groups;
  for (int64_t row = first_row(); row < T; row += row_stride()) {
    const scalar_t* l = logits + row * E;
    acc_t* s = scores + row * E;
    const RowStats<acc_t> st = row_stats<kThreads, scalar_t, acc_t>(l, E, softmax, scratch);
    for (int64_t e = lane; e < E; e += kThreads) s[e] = score_of(static_cast<acc_t>(l[e]), st, softmax);

    uint8_t* allowed = nullptr;
    if (grouped) {
      allowed = group_allowed + row * n_groups;
      group_sync<kThreads>();  // every lane's scores are read below
      // The topk_groups best groups, one round each; the last one chosen bounds the allowed set.
      Candidate<acc_t> last{acc_t(0), acc_t(0), -1};
      for (int64_t r = 0; r < topk_groups; ++r) {
        Candidate<acc_t> best{acc_t(0), acc_t(0), -1};
        for (int64_t g = lane; g < n_groups; g += kThreads) {
          const acc_t gk = group_key(s, bias, g * group_size, group_size);
          if (r > 0 && !rank_before(last.key, last.id, gk, g)) continue;
          best = better(best, Candidate<acc_t>{gk, acc_t(0), static_cast<int32_t>(g)});
        }
        last = group_best<kThreads>(best, scratch);
      }
      for (int64_t g = lane; g < n_groups; g += kThreads) {
        const acc_t gk = group_key(s, bias, g * group_size, group_size);
        allowed[g] = (g == last.id || rank_before(gk, g, last.key, last.id)) ? 1 : 0;
      }
      group_sync<kThreads>();
    }

    // Round j picks the best expert ranking after round j-1's pick: no chosen-set bookkeeping needed.
    Candidate<acc_t> prev{acc_t(0), acc_t(0), -1};
    acc_t sum = 0;
    for (int64_t j = 0; j < k; ++j) {
      Candidate<acc_t> best{acc_t(0), acc_t(0), -1};
      for (int64_t e = lane; e < E; e += kThreads) {
        if (grouped && !allowed[e / group_size]) continue;
        const acc_t score = s[e];
        const acc_t key = bias == nullptr ? score : score + bias[e];
        if (j > 0 && !rank_before(prev.key, prev.id, key, e)) continue;
        best = better(best, Candidate<acc_t>{key, score, static_cast<int32_t>(e)});
      }
      prev = group_best<kThreads>(best, scratch);
      if (lane == 0) {
        ids[row * k + j] = prev.id;
        weights[row * k + j] = prev.score;
      }
      sum += prev.score;
    }
    if (lane == 0 && normalize && sum > 0) {
      for (int64_t j = 0; j < k; ++j) weights[row * k + j] /= sum;
    }
  }
}

template <typename scalar_t, typename acc_t, int kThreads>
__global__ void router_topk_backward_kernel(const acc_t* __restrict__ grad_weights, const scalar_t* __restrict__ logits,
                                            const int64_t* __restrict__ ids, int64_t T, int64_t E, int64_t k,
                                            bool softmax, bool normalize, acc_t* __restrict__ grad_logits) {
  GroupScratch<kThreads>* scratch = row_group_scratch<kThreads>();
  const int lane = threadIdx.x;
  for (int64_t row = first_row(); row < T; row += row_stride()) {
    const scalar_t* l = logits + row * E;
    const acc_t* g = grad_weights + row * k;
    const int64_t* id = ids + row * k;
    acc_t* out = grad_logits + row * E;
    const RowStats<acc_t> st = row_stats<kThreads, scalar_t, acc_t>(l, E, softmax, scratch);
    auto chosen = [&](int64_t j) -> acc_t {
      const int64_t e = id[j];
      return (e >= 0 && e < E) ? score_of(static_cast<acc_t>(l[e]), st, softmax) : acc_t(0);
    };
    // Every lane forms the same k-length sums (k is small) in the CPU's order.
    acc_t sum = 0;
    for (int64_t j = 0; j < k; ++j) sum += chosen(j);
    const bool renorm = normalize && sum > 0;
    acc_t gw = 0;
    if (renorm) {
      for (int64_t j = 0; j < k; ++j) gw += g[j] * chosen(j);
      gw /= sum;
    }
    auto grad_chosen = [&](int64_t j) -> acc_t { return renorm ? (g[j] - gw) / sum : g[j]; };
    if (softmax) {
      acc_t inner = 0;
      for (int64_t j = 0; j < k; ++j) inner += grad_chosen(j) * chosen(j);
      for (int64_t e = lane; e < E; e += kThreads) out[e] = -score_of(static_cast<acc_t>(l[e]), st, softmax) * inner;
    } else {
      for (int64_t e = lane; e < E; e += kThreads) out[e] = acc_t(0);
    }
    group_sync<kThreads>();
    if (lane == 0) {
      // One thread adds the chosen terms in order j = 0, 1, ... (repeated ids add up, as on the CPU).
      for (int64_t j = 0; j < k; ++j) {
        const int64_t e = id[j];
        if (e < 0 || e >= E) continue;
        const acc_t c = chosen(j);
        out[e] += softmax ? grad_chosen(j) * c : grad_chosen(j) * c * (acc_t(1) - c);
      }
    }
    group_sync<kThreads>();
  }
}

}  // namespace

// router_topk after router_topk_op's checks; bias is selection_bias in the router dtype (undefined when absent).
std::tuple<at::Tensor, at::Tensor, at::Tensor> select_topk(const char* op, const at::Tensor& logits_in, int64_t k,
                                                           ScoreFunc func, const at::Tensor& bias, bool normalize,
                                                           int64_t n_groups, int64_t topk_groups) {
  const int64_t T = logits_in.size(0), E = logits_in.size(1);
  const auto acc_type = router_dtype(logits_in);
  TORCH_MOE_CHECK(E < (int64_t{1} << 31), "torch_moe.{}: at most 2^31 - 1 experts on CUDA, got {}", op, E);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto logits = logits_in.contiguous();
  const auto options = logits.options().dtype(acc_type);
  auto weights = at::empty({T, k}, options);
  auto ids = at::empty({T, k}, options.dtype(at::kLong));
  auto scores = at::empty({T, E}, options);
  if (T == 0) return {weights, ids, scores};
  at::Tensor group_allowed;
  if (topk_groups < n_groups) group_allowed = at::empty({T, n_groups}, options.dtype(at::kByte));
  const bool softmax = func == ScoreFunc::kSoftmax;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "torch_moe_router_topk_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    launch_rows(T, E, [&](auto threads, dim3 block, unsigned int grid) {
      router_topk_kernel<scalar_t, acc_t, decltype(threads)::value><<<grid, block, 0, current_stream()>>>(
          logits.data_ptr<scalar_t>(), bias.defined() ? bias.data_ptr<acc_t>() : nullptr, T, E, k, softmax, normalize,
          n_groups, topk_groups, group_allowed.defined() ? group_allowed.data_ptr<uint8_t>() : nullptr,
          weights.data_ptr<acc_t>(), ids.data_ptr<int64_t>(), scores.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {weights, ids, scores};
}

// _router_topk_backward after router_topk_backward_op's checks.
at::Tensor topk_grad(const char* op, const at::Tensor& grad_weights_in, const at::Tensor& logits_in,
                     const at::Tensor& expert_ids_in, ScoreFunc func, bool normalize) {
  const int64_t T = logits_in.size(0), E = logits_in.size(1), k = expert_ids_in.size(1);
  check_same_device(op, {{"logits", &logits_in}, {"expert_ids", &expert_ids_in}, {"grad_weights", &grad_weights_in}});
  check_index_range(op, "expert_ids", expert_ids_in, 0, E);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto acc_type = router_dtype(logits_in);
  const auto logits = logits_in.contiguous();
  const auto grad_w = grad_weights_in.to(acc_type).contiguous();
  const auto ids = expert_ids_in.contiguous();
  auto grad_logits = at::empty({T, E}, logits.options().dtype(acc_type));
  if (T > 0 && E > 0) {
    const bool softmax = func == ScoreFunc::kSoftmax;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "torch_moe_router_topk_backward_cuda",
                                    [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      launch_rows(T, E, [&](auto threads, dim3 block, unsigned int grid) {
        router_topk_backward_kernel<scalar_t, acc_t, decltype(threads)::value><<<grid, block, 0, current_stream()>>>(
            grad_w.data_ptr<acc_t>(), logits.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), T, E, k, softmax,
            normalize, grad_logits.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return grad_logits.to(logits_in.scalar_type());
}

struct CudaRouterTopk {
  static constexpr auto select_topk = &cuda::select_topk;
  static constexpr auto topk_grad = &cuda::topk_grad;
};

TORCH_LIBRARY_IMPL(torch_moe, CUDA, m) {
  impl_with_backward(m, "router_topk", &router_topk_op<CudaRouterTopk>,
                     &router_topk_backward_op<CudaRouterTopk>);
}

}  // namespace torch_moe::cuda
