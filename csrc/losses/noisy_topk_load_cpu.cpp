// CPU kernels of noisy_topk_load: per token, the threshold each expert's noisy logit must beat to stay in the
// top k when only its own noise is redrawn; per expert, the sum over tokens of the probability that it does.
#include "losses/noisy_topk_load.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <numeric>
#include <vector>

#include "common/checks.h"
#include "common/expert_ids.h"
#include "common/kernel_registration.h"
#include "common/router_math.h"

namespace torch_moe {

void check_noisy_topk_load_args(const char* op, const at::Tensor& clean, const at::Tensor& noisy,
                                const at::Tensor& noise_std, int64_t k, const std::optional<at::Tensor>& valid_mask) {
  check_floating(op, "clean_logits", clean);
  check_dim(op, "clean_logits", clean, 2, "[T, E]");
  check_floating(op, "noisy_logits", noisy);
  check_same_shape(op, "noisy_logits", noisy, "clean_logits", clean);
  check_floating(op, "noise_std", noise_std);
  check_same_shape(op, "noise_std", noise_std, "clean_logits", clean);
  check_same_device(op, {{"clean_logits", &clean}, {"noisy_logits", &noisy}, {"noise_std", &noise_std}});
  const int64_t E = clean.size(1);
  TORCH_MOE_CHECK(E > 0, "torch_moe.{}: argument 'clean_logits' must have at least one expert, got shape {}", op,
                  shape_str(clean));
  TORCH_MOE_CHECK(k >= 1 && k <= E, "torch_moe.{}: argument 'k' must be in [1, E] = [1, {}], got {}", op, E, k);
  check_valid_mask(op, valid_mask, clean, "clean_logits");
}

void check_noisy_topk_load_grad(const char* op, const at::Tensor& grad_load, int64_t E) {
  check_floating(op, "grad_load", grad_load);
  check_dim(op, "grad_load", grad_load, 1, "[E]");
  check_size(op, "grad_load", grad_load, 0, E, "number of experts");
}

namespace cpu {
namespace {

struct LoadInputs {
  at::Tensor clean, noisy, noise_std;  // [T, E] contiguous, router dtype
  int64_t T, E, k;
  std::vector<uint8_t> valid;
  // Per token: the k-th and (k+1)-th highest noisy logits' expert ids (-1 when k == E: no (k+1)-th).
  std::vector<int64_t> kth, next;
};

LoadInputs prepare(const char* op, const at::Tensor& clean, const at::Tensor& noisy, const at::Tensor& noise_std,
                   int64_t k, const std::optional<at::Tensor>& valid_mask) {
  check_noisy_topk_load_args(op, clean, noisy, noise_std, k, valid_mask);
  LoadInputs in;
  in.T = clean.size(0);
  in.E = clean.size(1);
  in.k = k;
  const auto acc_type = router_dtype(clean);
  in.clean = clean.to(acc_type).contiguous();
  in.noisy = noisy.to(acc_type).contiguous();
  in.noise_std = noise_std.to(acc_type).contiguous();
  in.valid = valid_token_flags(valid_mask, in.T);
  in.kth.assign(in.T, -1);
  in.next.assign(in.T, -1);
  if (in.T == 0) return in;
  AT_DISPATCH_FLOATING_TYPES(acc_type, "torch_moe_noisy_topk_load_order", [&] {
    const scalar_t* hp = in.noisy.data_ptr<scalar_t>();
    const int64_t E = in.E;
    at::parallel_for(0, in.T, std::max<int64_t>(1, 4096 / E), [&](int64_t begin, int64_t end) {
      std::vector<int64_t> order(E);
      for (int64_t t = begin; t < end; ++t) {
        std::iota(order.begin(), order.end(), 0);
        const int64_t keep = std::min(k + 1, E);
        std::partial_sort(order.begin(), order.begin() + keep, order.end(), RankBefore<scalar_t>{hp + t * E});
        in.kth[t] = order[k - 1];
        in.next[t] = k < E ? order[k] : -1;
      }
    });
  });
  return in;
}

// The noisy logit expert e of token t must beat: the (k+1)-th if e is in the top k (it would take that one's
// place), else the k-th. -1: e stays in the top k whatever its noise (k == E).
inline int64_t threshold_id(const LoadInputs& in, int64_t t, bool in_topk) {
  return in_topk ? in.next[t] : in.kth[t];
}

template <typename acc_t>
acc_t normal_cdf(acc_t z) {
  return acc_t(0.5) * std::erfc(-z / std::sqrt(acc_t(2)));
}

template <typename acc_t>
acc_t normal_pdf(acc_t z) {
  return std::exp(acc_t(-0.5) * z * z) / std::sqrt(acc_t(2) * acc_t(M_PI));
}

// Whether expert e is among the top k of token t's noisy logits (same order as the selection: ties to lower id).
template <typename acc_t>
bool in_topk(const LoadInputs& in, const acc_t* h, int64_t t, int64_t e) {
  const int64_t kth = in.kth[t];
  return e == kth || RankBefore<acc_t>{h + t * in.E}(e, kth);
}

}  // namespace

at::Tensor noisy_topk_load(const at::Tensor& clean_logits, const at::Tensor& noisy_logits, const at::Tensor& noise_std,
                           int64_t k, const std::optional<at::Tensor>& valid_mask) {
  const auto in = prepare("noisy_topk_load", clean_logits, noisy_logits, noise_std, k, valid_mask);
  auto load = at::zeros({in.E}, in.clean.options());
  if (in.T == 0) return load;
  AT_DISPATCH_FLOATING_TYPES(in.clean.scalar_type(), "torch_moe_noisy_topk_load", [&] {
    using acc_t = scalar_t;
    const acc_t* cp = in.clean.data_ptr<acc_t>();
    const acc_t* hp = in.noisy.data_ptr<acc_t>();
    const acc_t* sp = in.noise_std.data_ptr<acc_t>();
    acc_t* lp = load.data_ptr<acc_t>();
    // One expert per task, tokens summed in order: the result does not depend on the thread count.
    at::parallel_for(0, in.E, 1, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        acc_t sum = 0;
        for (int64_t t = 0; t < in.T; ++t) {
          if (!in.valid[t]) continue;
          const int64_t thr = threshold_id(in, t, in_topk(in, hp, t, e));
          if (thr < 0) {
            sum += acc_t(1);
            continue;
          }
          const int64_t i = t * in.E + e;
          sum += normal_cdf((cp[i] - hp[t * in.E + thr]) / sp[i]);
        }
        lp[e] = sum;
      }
    });
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
  const auto grad_load = grad_load_in.to(in.clean.scalar_type()).contiguous();
  auto grad_clean = at::zeros_like(in.clean);
  auto grad_noisy = at::zeros_like(in.clean);
  auto grad_std = at::zeros_like(in.clean);
  if (in.T > 0) {
    AT_DISPATCH_FLOATING_TYPES(in.clean.scalar_type(), "torch_moe_noisy_topk_load_backward", [&] {
      using acc_t = scalar_t;
      const acc_t* cp = in.clean.data_ptr<acc_t>();
      const acc_t* hp = in.noisy.data_ptr<acc_t>();
      const acc_t* sp = in.noise_std.data_ptr<acc_t>();
      const acc_t* gp = grad_load.data_ptr<acc_t>();
      acc_t* gc = grad_clean.data_ptr<acc_t>();
      acc_t* gh = grad_noisy.data_ptr<acc_t>();
      acc_t* gs = grad_std.data_ptr<acc_t>();
      // Each task owns whole token rows of the three gradients.
      at::parallel_for(0, in.T, std::max<int64_t>(1, 4096 / in.E), [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          if (!in.valid[t]) continue;
          for (int64_t e = 0; e < in.E; ++e) {
            const int64_t thr = threshold_id(in, t, in_topk(in, hp, t, e));
            if (thr < 0) continue;
            const int64_t i = t * in.E + e;
            const acc_t z = (cp[i] - hp[t * in.E + thr]) / sp[i];
            const acc_t dz = gp[e] * normal_pdf(z) / sp[i];
            gc[i] += dz;
            gs[i] -= dz * z;
            gh[t * in.E + thr] -= dz;
          }
        }
      });
    });
  }
  return {grad_clean.to(clean_logits.scalar_type()), grad_noisy.to(noisy_logits.scalar_type()),
          grad_std.to(noise_std.scalar_type())};
}

}  // namespace cpu

TORCH_LIBRARY_IMPL(torch_moe, CPU, m) {
  impl_with_backward(m, "noisy_topk_load", &cpu::noisy_topk_load, &cpu::noisy_topk_load_backward);
}

}  // namespace torch_moe
