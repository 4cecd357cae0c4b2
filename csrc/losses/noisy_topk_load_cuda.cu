// CUDA kernels of noisy_topk_load and its backward: one warp per token row (one block for E > 256) finds the k-th
// and (k+1)-th noisy logits in the CPU's ranking order and forms every expert's term; the load sums each expert's
// column in a fixed order (no atomics). Math in fp32 (fp64 for fp64 logits); no host sync.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "common/kernel_registration.h"
#include "common/router_math.h"
#include "losses/noisy_topk_load.h"

namespace torch_moe::cuda {
namespace {

struct LoadInputs {
  at::Tensor clean, noisy, noise_std, mask;  // [T, E] contiguous in the router dtype; mask [T] bool or undefined
  int64_t T, E, k;
};

// The shared argument checks (as on CPU), then the limit of the int32 ids of the ranking step.
LoadInputs prepare(const char* op, const at::Tensor& clean, const at::Tensor& noisy, const at::Tensor& noise_std,
                   int64_t k, const std::optional<at::Tensor>& valid_mask) {
  check_noisy_topk_load_args(op, clean, noisy, noise_std, k, valid_mask);
  LoadInputs in;
  in.T = clean.size(0);
  in.E = clean.size(1);
  in.k = k;
  if (valid_mask.has_value() && valid_mask->defined()) in.mask = valid_mask->contiguous();
  // Candidate ids are int32 in the ranking reduction.
  TORCH_MOE_CHECK(in.E < (int64_t{1} << 31), "torch_moe.{}: at most 2^31 - 1 experts on CUDA, got {}", op, in.E);
  const auto acc_type = router_dtype(clean);
  in.clean = clean.to(acc_type).contiguous();
  in.noisy = noisy.to(acc_type).contiguous();
  in.noise_std = noise_std.to(acc_type).contiguous();
  return in;
}

template <typename acc_t>
__device__ __forceinline__ acc_t normal_cdf(acc_t z) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return 0.5 * ::erfc(-z / 1.4142135623730951);
  } else {
    return 0.5f * ::erfcf(-z / 1.4142135623730951f);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t normal_pdf(acc_t z) {
  return dev_exp(acc_t(-0.5) * z * z) / acc_t(2.5066282746310002);  // sqrt(2 pi)
}

// Expert ids of the k-th and (k+1)-th highest noisy logits of one row (next = -1 when k == E), by the CPU's
// RankBefore: round j picks the best expert ranking after round j-1's pick. Every thread of the group gets both.
template <int kThreads, typename acc_t>
__device__ void kth_and_next(const acc_t* h, int64_t E, int64_t k, GroupScratch<kThreads>* scratch, int64_t* kth,
                             int64_t* next) {
  *kth = -1;
  *next = -1;
  const int64_t rounds = k < E ? k + 1 : E;
  Candidate<acc_t> prev{acc_t(0), acc_t(0), -1};
  for (int64_t j = 0; j < rounds; ++j) {
    Candidate<acc_t> best{acc_t(0), acc_t(0), -1};
    for (int64_t e = threadIdx.x; e < E; e += kThreads) {
      const acc_t key = h[e];
      if (j > 0 && !rank_before(prev.key, static_cast<int64_t>(prev.id), key, e)) continue;
      best = better(best, Candidate<acc_t>{key, acc_t(0), static_cast<int32_t>(e)});
    }
    prev = group_best<kThreads>(best, scratch);
    if (j == k - 1) *kth = prev.id;
    if (j == k) *next = prev.id;
  }
}

// The noisy logit expert e must beat: the (k+1)-th if e is in the top k, else the k-th; -1: always stays (k == E).
template <typename acc_t>
__device__ __forceinline__ int64_t threshold_id(const acc_t* h, int64_t e, int64_t kth, int64_t next) {
  const bool in_topk = e == kth || rank_before(h[e], e, h[kth], kth);
  return in_topk ? next : kth;
}

// terms [E, T] (expert-major, so the load's column sums read contiguous memory): P[t, e], 0 for padding tokens.
template <typename acc_t, int kThreads>
__global__ void noisy_topk_load_terms_kernel(const acc_t* __restrict__ clean, const acc_t* __restrict__ noisy,
                                             const acc_t* __restrict__ noise_std, const bool* __restrict__ valid,
                                             int64_t T, int64_t E, int64_t k, acc_t* __restrict__ terms) {
  GroupScratch<kThreads>* scratch = row_group_scratch<kThreads>();
  for (int64_t row = first_row(); row < T; row += row_stride()) {
    if (valid != nullptr && !valid[row]) {  // the whole group takes this branch
      for (int64_t e = threadIdx.x; e < E; e += kThreads) terms[e * T + row] = acc_t(0);
      continue;
    }
    const acc_t* h = noisy + row * E;
    int64_t kth, next;
    kth_and_next<kThreads>(h, E, k, scratch, &kth, &next);
    for (int64_t e = threadIdx.x; e < E; e += kThreads) {
      const int64_t thr = threshold_id(h, e, kth, next);
      const int64_t i = row * E + e;
      terms[e * T + row] = thr < 0 ? acc_t(1) : normal_cdf((clean[i] - h[thr]) / noise_std[i]);
    }
  }
}

// load[e] = sum of terms[e, :], one block per expert, a fixed reduction tree.
template <typename acc_t>
__global__ void column_sum_kernel(const acc_t* __restrict__ terms, int64_t T, int64_t E, acc_t* __restrict__ load) {
  __shared__ GroupScratch<kBlockThreads> scratch;
  for (int64_t e = blockIdx.x; e < E; e += gridDim.x) {
    acc_t sum = 0;
    for (int64_t t = threadIdx.x; t < T; t += kBlockThreads) sum += terms[e * T + t];
    sum = group_sum<kBlockThreads>(sum, &scratch);
    if (threadIdx.x == 0) load[e] = sum;
  }
}

// Per valid token row: grad_clean = dz, grad_std = -dz z for every expert with a threshold, and the noisy logit
// that served as threshold receives -dz; only two columns can (the k-th and (k+1)-th), each a group sum.
template <typename acc_t, int kThreads>
__global__ void noisy_topk_load_backward_kernel(const acc_t* __restrict__ grad_load, const acc_t* __restrict__ clean,
                                                const acc_t* __restrict__ noisy, const acc_t* __restrict__ noise_std,
                                                const bool* __restrict__ valid, int64_t T, int64_t E, int64_t k,
                                                acc_t* __restrict__ grad_clean, acc_t* __restrict__ grad_noisy,
                                                acc_t* __restrict__ grad_std) {
  GroupScratch<kThreads>* scratch = row_group_scratch<kThreads>();
  for (int64_t row = first_row(); row < T; row += row_stride()) {
    if (valid != nullptr && !valid[row]) {  // the whole group takes this branch
      for (int64_t e = threadIdx.x; e < E; e += kThreads) {
        grad_clean[row * E + e] = acc_t(0);
        grad_noisy[row * E + e] = acc_t(0);
        grad_std[row * E + e] = acc_t(0);
      }
      continue;
    }
    const acc_t* h = noisy + row * E;
    int64_t kth, next;
    kth_and_next<kThreads>(h, E, k, scratch, &kth, &next);
    acc_t to_kth = 0, to_next = 0;  // what the k-th and the (k+1)-th noisy logits lose
    for (int64_t e = threadIdx.x; e < E; e += kThreads) {
      const int64_t thr = threshold_id(h, e, kth, next);
      const int64_t i = row * E + e;
      if (thr < 0) {
        grad_clean[i] = acc_t(0);
        grad_std[i] = acc_t(0);
        continue;
      }
      const acc_t z = (clean[i] - h[thr]) / noise_std[i];
      const acc_t dz = grad_load[e] * normal_pdf(z) / noise_std[i];
      grad_clean[i] = dz;
      grad_std[i] = acc_t(0) - dz * z;
      if (thr == kth) {
        to_kth += dz;
      } else {
        to_next += dz;
      }
    }
    to_kth = group_sum<kThreads>(to_kth, scratch);
    to_next = group_sum<kThreads>(to_next, scratch);
    for (int64_t e = threadIdx.x; e < E; e += kThreads) {
      grad_noisy[row * E + e] = e == kth ? acc_t(0) - to_kth : (e == next ? acc_t(0) - to_next : acc_t(0));
    }
  }
}

}  // namespace

at::Tensor noisy_topk_load(const at::Tensor& clean_logits, const at::Tensor& noisy_logits, const at::Tensor& noise_std,
                           int64_t k, const std::optional<at::Tensor>& valid_mask) {
  const auto in = prepare("noisy_topk_load", clean_logits, noisy_logits, noise_std, k, valid_mask);
  const c10::cuda::CUDAGuard guard(clean_logits.device());
  auto load = at::zeros({in.E}, in.clean.options());
  if (in.T == 0) return load;
  auto terms = at::empty({in.E, in.T}, in.clean.options());
  AT_DISPATCH_FLOATING_TYPES(in.clean.scalar_type(), "torch_moe_noisy_topk_load_cuda", [&] {
    using acc_t = scalar_t;
    launch_rows(in.T, in.E, [&](auto threads, dim3 block, unsigned int grid) {
      noisy_topk_load_terms_kernel<acc_t, decltype(threads)::value><<<grid, block, 0, current_stream()>>>(
          in.clean.data_ptr<acc_t>(), in.noisy.data_ptr<acc_t>(), in.noise_std.data_ptr<acc_t>(),
          in.mask.defined() ? in.mask.data_ptr<bool>() : nullptr, in.T, in.E, in.k, terms.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    column_sum_kernel<acc_t><<<blocks_for(in.E, 1), kBlockThreads, 0, current_stream()>>>(
        terms.data_ptr<acc_t>(), in.T, in.E, load.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return load;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> noisy_topk_load_backward(const at::Tensor& grad_load_in,
                                                                        const at::Tensor& clean_logits,
                                                                        const at::Tensor& noisy_logits,
                                                                        const at::Tensor& noise_std, int64_t k,
                                                                        const std::optional<at::Tensor>& valid_mask) {
  constexpr const char* op = "_noisy_topk_load_backward";
  const auto in = prepare(op, clean_logits, noisy_logits, noise_std, k, valid_mask);
  check_noisy_topk_load_grad(op, grad_load_in, in.E);
  check_same_device(op, {{"clean_logits", &clean_logits}, {"grad_load", &grad_load_in}});
  const c10::cuda::CUDAGuard guard(clean_logits.device());
  const auto grad_load = grad_load_in.to(in.clean.scalar_type()).contiguous();
  auto grad_clean = at::empty_like(in.clean);
  auto grad_noisy = at::empty_like(in.clean);
  auto grad_std = at::empty_like(in.clean);
  if (in.T > 0) {
    AT_DISPATCH_FLOATING_TYPES(in.clean.scalar_type(), "torch_moe_noisy_topk_load_backward_cuda", [&] {
      using acc_t = scalar_t;
      launch_rows(in.T, in.E, [&](auto threads, dim3 block, unsigned int grid) {
        noisy_topk_load_backward_kernel<acc_t, decltype(threads)::value><<<grid, block, 0, current_stream()>>>(
            grad_load.data_ptr<acc_t>(), in.clean.data_ptr<acc_t>(), in.noisy.data_ptr<acc_t>(),
            in.noise_std.data_ptr<acc_t>(), in.mask.defined() ? in.mask.data_ptr<bool>() : nullptr, in.T, in.E, in.k,
            grad_clean.data_ptr<acc_t>(), grad_noisy.data_ptr<acc_t>(), grad_std.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return {grad_clean.to(clean_logits.scalar_type()), grad_noisy.to(noisy_logits.scalar_type()),
          grad_std.to(noise_std.scalar_type())};
}

TORCH_LIBRARY_IMPL(torch_moe, CUDA, m) {
  impl_with_backward(m, "noisy_topk_load", &noisy_topk_load, &noisy_topk_load_backward);
}

}  // namespace torch_moe::cuda
