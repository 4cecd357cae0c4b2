// Router math shared by the routing and loss kernels: the score function and router dtype (both backends), and
// on the CPU scoring one row and the ranking order of top-k.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace torch_moe {

enum class ScoreFunc { kSoftmax, kSigmoid };

// Parses "softmax" | "sigmoid", raising an error that names the argument otherwise.
ScoreFunc parse_score_func(const char* op, c10::string_view name);

// Router math dtype: float64 for float64 logits, float32 for every other float dtype.
at::ScalarType router_dtype(const at::Tensor& logits);

}  // namespace torch_moe

namespace torch_moe::cpu {

// Scores of every row of logits [T, E] (contiguous, router dtype): ATen's vectorised softmax or sigmoid over the
// whole tensor, then the scalar score_row below for the rows it leaves with a NaN, which gives those rows its
// meaning. Both kernels of router_topk use it, so forward and backward see the same scores.
at::Tensor score_rows(const at::Tensor& logits, ScoreFunc func);

// Scores of one row in acc precision: softmax over the row or elementwise sigmoid.
template <typename acc_t>
void score_row(const acc_t* logits, int64_t E, ScoreFunc func, acc_t* scores) {
  if (func == ScoreFunc::kSigmoid) {
    for (int64_t e = 0; e < E; ++e) scores[e] = acc_t(1) / (acc_t(1) + std::exp(-logits[e]));
    return;
  }
  acc_t max_logit = -std::numeric_limits<acc_t>::infinity();
  bool has_nan = false;
  for (int64_t e = 0; e < E; ++e) {
    if (std::isnan(logits[e])) has_nan = true;
    max_logit = std::max(max_logit, logits[e]);
  }
  if (has_nan) {
    // NaN poisons the softmax; keep it visible rather than guess (top-k still picks valid ids).
    for (int64_t e = 0; e < E; ++e) scores[e] = std::numeric_limits<acc_t>::quiet_NaN();
    return;
  }
  if (std::isinf(max_logit)) {
    // All -inf: uniform. Some +inf: those share the mass, as the limit of the softmax does.
    const bool pos = max_logit > 0;
    int64_t n = 0;
    for (int64_t e = 0; e < E; ++e) n += !pos || logits[e] == max_logit;
    for (int64_t e = 0; e < E; ++e) scores[e] = (!pos || logits[e] == max_logit) ? acc_t(1) / acc_t(n) : acc_t(0);
    return;
  }
  acc_t sum = 0;
  for (int64_t e = 0; e < E; ++e) {
    scores[e] = std::exp(logits[e] - max_logit);
    sum += scores[e];
  }
  for (int64_t e = 0; e < E; ++e) scores[e] /= sum;
}

// Descending by key with NaN below every number; equal keys go to the lower id. A strict total order.
template <typename acc_t>
struct RankBefore {
  const acc_t* key;
  bool operator()(int64_t a, int64_t b) const {
    const acc_t ka = key[a], kb = key[b];
    const bool na = std::isnan(ka), nb = std::isnan(kb);
    if (na != nb) return nb;
    if (!na && ka != kb) return ka > kb;
    return a < b;
  }
};

// The `keep` best of candidates[0, n) under `rank` (a strict total order), best first, into best[0, keep): what
// std::partial_sort leaves at the front, found by insertion. For the few best of a router row most candidates lose
// to the current last with one comparison, where partial_sort's heap costs several per candidate.
template <typename Rank>
void best_by_rank(const int64_t* candidates, int64_t n, int64_t keep, const Rank& rank, int64_t* best) {
  int64_t size = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = candidates[i];
    if (size == keep && !rank(c, best[keep - 1])) continue;
    int64_t pos = size < keep ? size++ : keep - 1;
    for (; pos > 0 && rank(c, best[pos - 1]); --pos) best[pos] = best[pos - 1];
    best[pos] = c;
  }
}

// best_by_rank under RankBefore{key}, for keys with no NaN and candidates in increasing id order: an equal key then
// ranks after every key already kept, so plain value compares decide, against the kept keys held in best_key[0, keep).
// Most candidates of a router row cost one compare with the last kept key, and no load through an index.
template <typename acc_t>
void best_by_value(const acc_t* key, const int64_t* candidates, int64_t n, int64_t keep, int64_t* best,
                   acc_t* best_key) {
  int64_t size = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = candidates[i];
    const acc_t value = key[c];
    if (size == keep && !(value > best_key[keep - 1])) continue;
    int64_t pos = size < keep ? size++ : keep - 1;
    for (; pos > 0 && value > best_key[pos - 1]; --pos) {
      best[pos] = best[pos - 1];
      best_key[pos] = best_key[pos - 1];
    }
    best[pos] = c;
    best_key[pos] = value;
  }
}

}  // namespace torch_moe::cpu
