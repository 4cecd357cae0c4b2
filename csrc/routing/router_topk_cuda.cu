// CUDA kernels of router_topk and its backward: one fused pass per token row (scores, selection bias, optional
// group limit, top-k, renormalisation); one warp per row for E <= 256, one block per row above. Router math in
// fp32 (fp64 for fp64 logits), ranking as on the CPU: descending key, NaN last, ties to the lower id.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "common/row_ops_cuda.h"
#include "routing/router_topk.h"

namespace torch_moe::cuda {
namespace {

constexpr int64_t kWarpPathMaxExperts = 256;
constexpr int kRowsPerWarpBlock = 4;

// What the softmax of one row needs to score any of its logits: the CPU's score_row, special cases included.
template <typename acc_t>
struct RowStats {
  acc_t max_logit;
  acc_t sum;
  int has_nan;
  int64_t n_top;  // only when max_logit is infinite: how many logits share the mass
};

template <int kThreads, typename scalar_t, typename acc_t>
__device__ RowStats<acc_t> row_stats(const scalar_t* logits, int64_t E, bool softmax, GroupScratch<kThreads>* scratch) {
  RowStats<acc_t> st{dev_inf<acc_t>(), acc_t(0), 0, 0};
  if (!softmax) return st;
  acc_t mx = -dev_inf<acc_t>();
  int nan = 0;
  for (int64_t e = threadIdx.x; e < E; e += kThreads) {
    const acc_t v = static_cast<acc_t>(logits[e]);
    if (isnan(v)) {
      nan = 1;
    } else if (mx < v) {
      mx = v;
    }
  }
  st.max_logit = group_max<kThreads>(mx, scratch);
  st.has_nan = group_max<kThreads>(nan, scratch);
  if (st.has_nan) return st;
  if (isinf(st.max_logit)) {
    const bool pos = st.max_logit > 0;
    int64_t n = 0;
    for (int64_t e = threadIdx.x; e < E; e += kThreads) {
      const acc_t v = static_cast<acc_t>(logits[e]);
      n += (!pos || v == st.max_logit) ? 1 : 0;
    }
    st.n_top = group_sum<kThreads>(n, scratch);
    return st;
  }
  acc_t sum = 0;
  for (int64_t e = threadIdx.x; e < E; e += kThreads) sum += dev_exp(static_cast<acc_t>(logits[e]) - st.max_logit);
  st.sum = group_sum<kThreads>(sum, scratch);
  return st;
}

template <typename acc_t>
__device__ __forceinline__ acc_t score_of(acc_t v, const RowStats<acc_t>& st, bool softmax) {
  if (!softmax) return acc_t(1) / (acc_t(1) + dev_exp(-v));
  if (st.has_nan) return dev_nan<acc_t>();
  if (isinf(st.max_logit)) {
    const bool pos = st.max_logit > 0;
    return (!pos || v == st.max_logit) ? acc_t(1) / static_cast<acc_t>(st.n_top) : acc_t(0);
  }
  return dev_exp(v - st.max_logit) / st.sum;
}

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
  __shared__ GroupScratch<kThreads> scratch_rows[kThreads == 32 ? kRowsPerWarpBlock : 1];
  GroupScratch<kThreads>* scratch = &scratch_rows[kThreads == 32 ? threadIdx.y : 0];
  const int lane = threadIdx.x;
  const bool grouped = topk_groups < n_groups;
  const int64_t group_size = E / n_groups;
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; row < T;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
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
  __shared__ GroupScratch<kThreads> scratch_rows[kThreads == 32 ? kRowsPerWarpBlock : 1];
  GroupScratch<kThreads>* scratch = &scratch_rows[kThreads == 32 ? threadIdx.y : 0];
  const int lane = threadIdx.x;
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; row < T;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
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

template <typename Launch>
void launch_rows(int64_t T, int64_t E, Launch launch) {
  if (E <= kWarpPathMaxExperts) {
    const dim3 block(32, kRowsPerWarpBlock);
    launch(std::integral_constant<int, 32>{}, block, blocks_for((T + kRowsPerWarpBlock - 1) / kRowsPerWarpBlock, 1));
  } else {
    const dim3 block(kBlockThreads, 1);
    launch(std::integral_constant<int, kBlockThreads>{}, block, blocks_for(T, 1));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_topk(const at::Tensor& logits_in, int64_t k,
                                                           c10::string_view score_func,
                                                           const std::optional<at::Tensor>& selection_bias,
                                                           bool normalize, int64_t n_groups, int64_t topk_groups) {
  constexpr const char* op = "router_topk";
  check_floating(op, "logits", logits_in);
  check_dim(op, "logits", logits_in, 2, "[T, E]");
  const ScoreFunc func = parse_score_func(op, score_func);
  const int64_t T = logits_in.size(0), E = logits_in.size(1);
  TORCH_MOE_CHECK(E > 0, "torch_moe.{}: argument 'logits' must have at least one expert (E > 0), got shape {}", op,
                  shape_str(logits_in));
  TORCH_MOE_CHECK(k >= 1 && k <= E, "torch_moe.{}: argument 'k' must be in [1, E] = [1, {}], got {}", op, E, k);
  check_expert_groups(op, E, k, n_groups, topk_groups);
  const auto acc_type = router_dtype(logits_in);
  at::Tensor bias;
  if (selection_bias.has_value() && selection_bias->defined()) {
    check_floating(op, "selection_bias", *selection_bias);
    check_dim(op, "selection_bias", *selection_bias, 1, "[E]");
    check_size(op, "selection_bias", *selection_bias, 0, E, "number of experts");
    check_same_device(op, {{"logits", &logits_in}, {"selection_bias", &*selection_bias}});
    bias = selection_bias->to(acc_type).contiguous();
  }
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

at::Tensor router_topk_backward(const at::Tensor& grad_weights_in, const at::Tensor& logits_in,
                                const at::Tensor& expert_ids_in, c10::string_view score_func, bool normalize) {
  constexpr const char* op = "_router_topk_backward";
  check_floating(op, "grad_weights", grad_weights_in);
  check_dim(op, "logits", logits_in, 2, "[T, E]");
  check_dtype(op, "expert_ids", expert_ids_in, at::kLong);
  check_dim(op, "expert_ids", expert_ids_in, 2, "[T, k]");
  check_same_shape(op, "grad_weights", grad_weights_in, "expert_ids", expert_ids_in);
  const ScoreFunc func = parse_score_func(op, score_func);
  const int64_t T = logits_in.size(0), E = logits_in.size(1), k = expert_ids_in.size(1);
  check_size(op, "expert_ids", expert_ids_in, 0, T, "tokens of logits");
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

TORCH_LIBRARY_IMPL(torch_moe, CUDA, m) {
  m.impl("router_topk", &router_topk);
  m.impl("_router_topk_backward", &router_topk_backward);
}

}  // namespace torch_moe::cuda
