// CPU kernels of router_losses and its backward. Reductions run over fixed blocks of tokens, summed in block
// order, so results do not depend on the thread count.
#include "losses/router_losses.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/expert_ids.h"
#include "common/kernel_registration.h"
#include "common/router_math.h"

namespace torch_moe::cpu {
namespace {

constexpr int64_t kBlock = 256;

// Per-token softmax and logsumexp in acc precision.
template <typename acc_t>
acc_t softmax_row(const acc_t* logits, int64_t E, acc_t* probs) {
  acc_t max_logit = -std::numeric_limits<acc_t>::infinity();
  for (int64_t e = 0; e < E; ++e) max_logit = std::max(max_logit, logits[e]);
  acc_t sum = 0;
  for (int64_t e = 0; e < E; ++e) sum += (probs[e] = std::exp(logits[e] - max_logit));
  for (int64_t e = 0; e < E; ++e) probs[e] /= sum;
  return max_logit + std::log(sum);
}

// Softmax of every row by ATen's vectorised kernel, each row's logsumexp taken from its largest prob
// (lse = logit - log p there, and p >= 1/E keeps that log well conditioned). A row the vectorised softmax leaves
// with a NaN (an inf or NaN logit) is redone by softmax_row, as every row was before.
template <typename acc_t>
at::Tensor softmax_rows(const at::Tensor& logits, std::vector<acc_t>& lse) {
  auto probs = at::softmax(logits, 1);
  const int64_t T = logits.size(0), E = logits.size(1);
  lse.resize(T);
  const acc_t* lp = logits.data_ptr<acc_t>();
  acc_t* pp = probs.data_ptr<acc_t>();
  at::parallel_for(0, T, std::max<int64_t>(1, 16384 / E), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const acc_t* row = lp + t * E;
      acc_t* p = pp + t * E;
      bool has_nan = false;
      int64_t best = 0;
      for (int64_t e = 0; e < E; ++e) {
        has_nan |= std::isnan(p[e]);
        best = p[e] > p[best] ? e : best;
      }
      lse[t] = has_nan ? softmax_row(row, E, p) : row[best] - std::log(p[best]);
    }
  });
  return probs;
}

// What both passes need: logits in router precision, which tokens count, and each expert's valid
// assignment count (f_i * Tv * k).
struct LossInputs {
  at::Tensor logits;  // [T, E] contiguous, router dtype
  int64_t T, E, k;
  std::vector<uint8_t> valid;
  int64_t valid_tokens = 0;
  std::vector<int64_t> counts;
};

LossInputs prepare(const char* op, const at::Tensor& logits, const at::Tensor& expert_ids,
                   const std::optional<at::Tensor>& valid_mask) {
  check_router_losses_args(op, logits, expert_ids, valid_mask, &::torch_moe::check_expert_ids);
  LossInputs in;
  in.logits = logits.to(router_dtype(logits)).contiguous();
  in.T = logits.size(0);
  in.E = logits.size(1);
  in.k = expert_ids.size(1);
  in.valid = valid_token_flags(valid_mask, in.T);
  in.counts.assign(in.E, 0);
  const auto ids = expert_ids.contiguous();
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t t = 0; t < in.T; ++t) {
    if (!in.valid[t]) continue;
    ++in.valid_tokens;
    for (int64_t j = 0; j < in.k; ++j) ++in.counts[ip[t * in.k + j]];
  }
  return in;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_losses(const at::Tensor& logits_in, const at::Tensor& expert_ids,
                                                             const std::optional<at::Tensor>& valid_mask) {
  constexpr const char* op = "router_losses";
  const auto in = prepare(op, logits_in, expert_ids, valid_mask);
  const auto& logits = in.logits;
  const auto& valid = in.valid;
  const auto& counts = in.counts;
  const auto acc_type = logits.scalar_type();
  const int64_t T = in.T, E = in.E, k = in.k, Tv = in.valid_tokens;
  auto lb = at::zeros({}, logits.options());
  auto z = at::zeros({}, logits.options());
  auto entropy = at::zeros({}, logits.options());
  if (Tv == 0 || k == 0) return {lb, z, entropy};

  AT_DISPATCH_FLOATING_TYPES(acc_type, "torch_moe_router_losses", [&] {
    using acc_t = scalar_t;
    const acc_t* lp = logits.data_ptr<acc_t>();
    std::vector<acc_t> lse_rows;
    const auto probs_all = softmax_rows<acc_t>(logits, lse_rows);
    const acc_t* pp = probs_all.data_ptr<acc_t>();
    const int64_t n_blocks = (T + kBlock - 1) / kBlock;
    // Per block: E prob sums, then z^2 sum, then entropy sum.
    std::vector<acc_t> partial(n_blocks * (E + 2), acc_t(0));
    at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        acc_t* part = partial.data() + b * (E + 2);
        for (int64_t t = b * kBlock; t < std::min(T, (b + 1) * kBlock); ++t) {
          if (!valid[t]) continue;
          const acc_t* row = lp + t * E;
          const acc_t* probs = pp + t * E;
          const acc_t lse = lse_rows[t];
          // log p = logit - lse: the entropy without a log per expert. A zero prob adds nothing (p log p -> 0)
          // and is skipped, so that a -inf logit does not make 0 * inf.
          acc_t h = 0;
          for (int64_t e = 0; e < E; ++e) {
            part[e] += probs[e];
            if (probs[e] > 0) h -= probs[e] * (row[e] - lse);
          }
          part[E] += lse * lse;
          part[E + 1] += h;
        }
      }
    });
    std::vector<acc_t> total(E + 2, acc_t(0));
    for (int64_t b = 0; b < n_blocks; ++b) {
      for (int64_t i = 0; i < E + 2; ++i) total[i] += partial[b * (E + 2) + i];
    }
    acc_t balance = 0;
    for (int64_t e = 0; e < E; ++e) {
      const acc_t f = static_cast<acc_t>(counts[e]) / static_cast<acc_t>(Tv * k);
      balance += f * (total[e] / static_cast<acc_t>(Tv));
    }
    lb.fill_(static_cast<acc_t>(E) * balance);
    z.fill_(total[E] / static_cast<acc_t>(Tv));
    entropy.fill_(total[E + 1] / static_cast<acc_t>(Tv));
  });
  return {lb, z, entropy};
}

at::Tensor router_losses_backward(const at::Tensor& grad_load_balancing, const at::Tensor& grad_z,
                                  const at::Tensor& logits_in, const at::Tensor& expert_ids,
                                  const std::optional<at::Tensor>& valid_mask) {
  constexpr const char* op = "_router_losses_backward";
  const auto in = prepare(op, logits_in, expert_ids, valid_mask);
  check_floating(op, "grad_load_balancing", grad_load_balancing);
  check_floating(op, "grad_z", grad_z);
  TORCH_MOE_CHECK(grad_load_balancing.numel() == 1 && grad_z.numel() == 1,
                  "torch_moe.{}: arguments 'grad_load_balancing' and 'grad_z' must be scalars, got shapes {} and {}",
                  op, shape_str(grad_load_balancing), shape_str(grad_z));
  const auto& logits = in.logits;
  const auto& valid = in.valid;
  const auto& counts = in.counts;
  const auto acc_type = logits.scalar_type();
  const int64_t T = in.T, E = in.E, k = in.k, Tv = in.valid_tokens;
  auto grad_logits = at::zeros({T, E}, logits.options());
  if (Tv > 0 && k > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc_type, "torch_moe_router_losses_backward", [&] {
      using acc_t = scalar_t;
      const acc_t g_lb = grad_load_balancing.to(at::kDouble).item<double>();
      const acc_t g_z = grad_z.to(at::kDouble).item<double>();
      // d lb / d p[t, i] = E * f_i / Tv; d z / d logits[t] = 2 lse_t / Tv * p[t].
      std::vector<acc_t> g_probs(E);
      for (int64_t e = 0; e < E; ++e) {
        g_probs[e] = g_lb * static_cast<acc_t>(E) * static_cast<acc_t>(counts[e]) /
                     (static_cast<acc_t>(Tv * k) * static_cast<acc_t>(Tv));
      }
      std::vector<acc_t> lse_rows;
      const auto probs_all = softmax_rows<acc_t>(logits, lse_rows);
      const acc_t* pp = probs_all.data_ptr<acc_t>();
      acc_t* gp = grad_logits.data_ptr<acc_t>();
      at::parallel_for(0, T, std::max<int64_t>(1, 4096 / E), [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          if (!valid[t]) continue;
          const acc_t* probs = pp + t * E;
          const acc_t lse = lse_rows[t];
          acc_t inner = 0;
          for (int64_t e = 0; e < E; ++e) inner += g_probs[e] * probs[e];
          const acc_t z_scale = g_z * acc_t(2) * lse / static_cast<acc_t>(Tv);
          acc_t* out = gp + t * E;
          for (int64_t e = 0; e < E; ++e) out[e] = probs[e] * (g_probs[e] - inner) + z_scale * probs[e];
        }
      });
    });
  }
  return grad_logits.to(logits_in.scalar_type());
}

TORCH_LIBRARY_IMPL(torch_moe, CPU, m) {
  impl_with_backward(m, "router_losses", &router_losses, &router_losses_backward);
}

}  // namespace torch_moe::cpu
