// The torch_moe ops called through the dispatcher from C++ (as a LibTorch program would), backward included.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <catch2/catch.hpp>

#include "common/checks.h"
#include "common/router_math.h"
#include "common/row_math.h"
#include "experts/glu.h"
#include "experts/grouped_mm.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <new>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using RouterTopk = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, int64_t, c10::string_view, const OptTensor&, bool,
                                                      int64_t, int64_t);
using CapacityPlan = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, int64_t, c10::SymInt, c10::string_view,
                                                        const OptTensor&, const OptTensor&);
using Dispatch = Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, c10::SymInt);
using Combine = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&);
using Permute = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, int64_t, const OptTensor&);
using Unpermute = Tensor(const Tensor&, const Tensor&, const Tensor&);
using RouterLosses = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&);
using ExpertChoice = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, c10::SymInt, const OptTensor&);
using NoisyTopkLoad = Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, const OptTensor&);
using DSelectKGate = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, int64_t, double);

}  // namespace

TEST_CASE("every op is registered in the torch_moe namespace", "[registration]") {
  for (const char* name : {"torch_moe::router_topk", "torch_moe::_router_topk_backward", "torch_moe::capacity_plan",
                           "torch_moe::dispatch", "torch_moe::_dispatch_backward", "torch_moe::combine",
                           "torch_moe::_combine_backward", "torch_moe::permute", "torch_moe::_permute_backward",
                           "torch_moe::unpermute", "torch_moe::_unpermute_backward", "torch_moe::router_losses",
                           "torch_moe::_router_losses_backward", "torch_moe::expert_choice",
                           "torch_moe::_expert_choice_backward", "torch_moe::noisy_topk_load",
                           "torch_moe::_noisy_topk_load_backward", "torch_moe::gather_grouped_glu",
                           "torch_moe::_gather_grouped_glu_backward", "torch_moe::glu", "torch_moe::_glu_backward",
                           "torch_moe::dselect_k_gate", "torch_moe::_dselect_k_gate_backward"}) {
    INFO(name);
    CHECK(c10::Dispatcher::singleton().findSchema({name, ""}).has_value());
  }
}

TEST_CASE("router_topk picks the largest probs, ties to the lower id, and backpropagates", "[router_topk]") {
  const auto router = op<RouterTopk>("torch_moe::router_topk");
  auto logits = torch::tensor({{1.0, 3.0, 3.0, 0.0}, {0.0, 0.0, 0.0, 0.0}}, torch::kDouble).requires_grad_();
  auto [weights, ids, scores] = router.call(logits, 2, "softmax", std::nullopt, true, 1, 1);
  CHECK(torch::equal(ids, torch::tensor({{1, 2}, {0, 1}}, torch::kLong)));
  CHECK(torch::allclose(weights, torch::full({2, 2}, 0.5, torch::kDouble)));
  CHECK(torch::allclose(scores.sum(1), torch::ones({2}, torch::kDouble)));

  // Same gradient as the plain softmax -> gather -> renormalise composition.
  auto g = torch::tensor({{1.0, -2.0}, {0.5, 3.0}}, torch::kDouble);
  (weights * g).sum().backward();
  auto ref_logits = logits.detach().clone().requires_grad_();
  auto probs = torch::softmax(ref_logits, 1).gather(1, ids);
  ((probs / probs.sum(1, true)) * g).sum().backward();
  CHECK(torch::allclose(logits.grad(), ref_logits.grad()));
}

TEST_CASE("router_topk refuses k outside [1, E] with a message naming k", "[router_topk][errors]") {
  const auto router = op<RouterTopk>("torch_moe::router_topk");
  auto logits = torch::randn({3, 4});
  CHECK_THROWS_WITH(router.call(logits, 5, "softmax", std::nullopt, true, 1, 1), Catch::Contains("'k'"));
  CHECK_THROWS_WITH(router.call(logits, 2, "tanh", std::nullopt, true, 1, 1), Catch::Contains("score_func"));
}

TEST_CASE("checked size arithmetic names the argument on overflow and on unallocatable requests", "[sizes][errors]") {
  using torch_moe::check_alloc_bytes;
  using torch_moe::checked_add;
  using torch_moe::checked_mul;
  const int64_t max = std::numeric_limits<int64_t>::max();
  CHECK(checked_mul("op", "capacity", "E * C", 4, int64_t{1} << 40) == int64_t{1} << 42);
  CHECK(checked_mul("op", "capacity", "E * C", -3, 5) == -15);
  CHECK_THROWS_WITH(checked_mul("op", "capacity", "E * C", 4, int64_t{1} << 62),
                    Catch::Contains("'capacity'") && Catch::Contains("overflows int64"));
  CHECK_THROWS_WITH(checked_mul("op", "capacity", "E * C", max, -2), Catch::Contains("overflows int64"));
  CHECK(checked_add("op", "num_experts", "E + 1", max - 1, 1) == max);
  CHECK_THROWS_WITH(checked_add("op", "num_experts", "E + 1", max, 1), Catch::Contains("'num_experts'"));
  CHECK(check_alloc_bytes("op", "capacity", "buffer", 10, 4) == 40);
  CHECK(check_alloc_bytes("op", "capacity", "buffer", torch_moe::kMaxAllocBytes, 1) == torch_moe::kMaxAllocBytes);
  CHECK_THROWS_WITH(check_alloc_bytes("op", "capacity", "buffer", torch_moe::kMaxAllocBytes, 2),
                    Catch::Contains("'capacity'") && Catch::Contains("bytes"));
  CHECK_THROWS_WITH(check_alloc_bytes("op", "capacity", "buffer", max, 8), Catch::Contains("'capacity'"));
  CHECK_THROWS_WITH(torch_moe::rethrow_alloc_failure("op", "capacity", 7, 56, []() -> int { throw std::bad_alloc(); }),
                    Catch::Contains("'capacity' = 7") && Catch::Contains("56 bytes"));
  const auto dispatch = op<Dispatch>("torch_moe::dispatch");
  const auto ids = torch::zeros({2, 1}, torch::kLong);
  const auto slots = torch::full({2, 1}, -1, torch::kLong);
  CHECK_THROWS_WITH(dispatch.call(torch::randn({2, 3}), ids, slots, 4, c10::SymInt(int64_t{1} << 62)),
                    Catch::Contains("'capacity'") && Catch::Contains("overflows int64"));
}

TEST_CASE("capacity mode: plan, dispatch and combine round-trip with gradients from C++", "[dispatch]") {
  const auto plan = op<CapacityPlan>("torch_moe::capacity_plan");
  const auto dispatch = op<Dispatch>("torch_moe::dispatch");
  const auto combine = op<Combine>("torch_moe::combine");
  // 4 tokens, k = 2, E = 3, capacity 2: 1st choices fill first: token 2 finds expert 0 full, then token 3 finds expert 1 full.
  auto ids = torch::tensor({{0, 1}, {0, 2}, {0, 1}, {2, 1}}, torch::kLong);
  auto [slots, tokens_per_expert, kept] = plan.call(ids, 3, 2, "position", std::nullopt, std::nullopt);
  CHECK(torch::equal(slots, torch::tensor({{0, 0}, {1, 1}, {-1, 1}, {0, -1}}, torch::kLong)));
  CHECK(torch::equal(tokens_per_expert, torch::tensor({3, 3, 2}, torch::kLong)));
  CHECK(torch::equal(kept, torch::tensor({2, 2, 2}, torch::kLong)));

  auto x = torch::randn({4, 5}, torch::kDouble).requires_grad_();
  auto weights = torch::rand({4, 2}, torch::kDouble).requires_grad_();
  auto buffer = dispatch.call(x, ids, slots, 3, 2);
  REQUIRE(buffer.sizes() == torch::IntArrayRef({3, 2, 5}));
  CHECK(torch::equal(buffer[1][1], x[2]));
  auto y = combine.call(buffer * 2.0, weights, ids, slots);
  auto kept_weight = (weights * slots.ge(0)).sum(1, true);
  CHECK(torch::allclose(y, 2.0 * kept_weight * x));

  y.sum().backward();
  CHECK(torch::allclose(x.grad(), 2.0 * kept_weight.expand({4, 5})));
  CHECK(torch::allclose(weights.grad(), (2.0 * x.sum(1, true) * slots.ge(0)).detach()));
}

TEST_CASE("dropless permute and unpermute group rows by expert and backpropagate", "[permute]") {
  const auto permute = op<Permute>("torch_moe::permute");
  const auto unpermute = op<Unpermute>("torch_moe::unpermute");
  auto ids = torch::tensor({{2, 0}, {0, 1}, {2, 1}}, torch::kLong);
  auto x = torch::randn({3, 4}, torch::kDouble).requires_grad_();
  auto [rows, row_index, offsets] = permute.call(x, ids, 3, std::nullopt);
  CHECK(torch::equal(offsets, torch::tensor({0, 2, 4, 6}, torch::kLong)));
  CHECK(torch::equal(rows[0], x[0]));  // expert 0 holds tokens 0 and 1, in token order
  CHECK(torch::equal(rows[1], x[1]));
  auto weights = torch::full({3, 2}, 0.5, torch::kDouble);
  auto y = unpermute.call(rows, weights, row_index);
  CHECK(torch::allclose(y, x));
  y.pow(2).sum().backward();
  CHECK(torch::allclose(x.grad(), 2.0 * x.detach()));
}

TEST_CASE("router_losses: uniform probs give a balance loss of exactly 1 and gradients flow", "[losses]") {
  const auto losses = op<RouterLosses>("torch_moe::router_losses");
  auto logits = torch::zeros({8, 4}, torch::kDouble).requires_grad_();
  auto ids = torch::tensor({{0}, {1}, {2}, {3}, {0}, {1}, {2}, {3}}, torch::kLong);
  auto [lb, z, entropy] = losses.call(logits, ids, std::nullopt);
  CHECK(lb.item<double>() == Approx(1.0));
  CHECK(z.item<double>() == Approx(std::log(4.0) * std::log(4.0)));
  CHECK(entropy.item<double>() == Approx(std::log(4.0)));
  (lb + z).backward();
  REQUIRE(logits.grad().defined());
  // z-loss gradient 2 lse / T * p, balance gradient vanishes for uniform p and balanced counts.
  CHECK(torch::allclose(logits.grad(), torch::full({8, 4}, 2.0 * std::log(4.0) / 8.0 * 0.25, torch::kDouble)));
}

TEST_CASE("ops reject expert ids out of range with a message naming expert_ids", "[errors]") {
  const auto plan = op<CapacityPlan>("torch_moe::capacity_plan");
  auto ids = torch::tensor({{0, 7}}, torch::kLong);
  CHECK_THROWS_WITH(plan.call(ids, 3, 2, "position", std::nullopt, std::nullopt),
                    Catch::Contains("expert_ids") && Catch::Contains("[0, 3)"));
  CHECK_THROWS_WITH(plan.call(ids.to(torch::kInt), 3, 2, "position", std::nullopt, std::nullopt),
                    Catch::Contains("int64"));
}

TEST_CASE("router_topk with groups chooses only inside the best group", "[router_topk][groups]") {
  const auto router = op<RouterTopk>("torch_moe::router_topk");
  auto logits = torch::tensor({{3.0, -5.0, 2.0, 2.0}}, torch::kDouble);
  auto [weights, ids, scores] = router.call(logits, 2, "sigmoid", std::nullopt, true, 2, 1);
  CHECK(torch::equal(ids, torch::tensor({{2, 3}}, torch::kLong)));
  CHECK_THROWS_WITH(router.call(logits, 3, "sigmoid", std::nullopt, true, 2, 1), Catch::Contains("'k' = 3"));
}

TEST_CASE("expert_choice: each expert takes its best tokens and the weights backpropagate", "[expert_choice]") {
  const auto choice = op<ExpertChoice>("torch_moe::expert_choice");
  auto logits = torch::tensor({{2.0, 0.0}, {0.0, 2.0}, {1.0, 1.0}}, torch::kDouble).requires_grad_();
  auto [weights, slots, token_ids, scores] = choice.call(logits, 1, std::nullopt);
  CHECK(torch::equal(token_ids, torch::tensor({{0}, {1}}, torch::kLong)));
  CHECK(torch::equal(slots, torch::tensor({{0, -1}, {-1, 0}, {-1, -1}}, torch::kLong)));
  weights.sum().backward();
  REQUIRE(logits.grad().defined());
  CHECK(logits.grad()[2].abs().sum().item<double>() == 0.0);  // nobody took token 2
}

TEST_CASE("noisy_topk_load is the sum of normal CDFs and differentiable", "[noisy_topk_load]") {
  const auto load_op = op<NoisyTopkLoad>("torch_moe::noisy_topk_load");
  auto clean = torch::zeros({1, 2}, torch::kDouble).requires_grad_();
  auto noisy = torch::zeros({1, 2}, torch::kDouble);
  auto std_ = torch::ones({1, 2}, torch::kDouble);
  // k = 1 of 2 equal logits: each expert beats the other with probability 1/2.
  auto load = load_op.call(clean, noisy, std_, 1, std::nullopt);
  CHECK(torch::allclose(load, torch::full({2}, 0.5, torch::kDouble)));
  load.sum().backward();
  CHECK(torch::allclose(clean.grad(), torch::full({1, 2}, 1.0 / std::sqrt(2.0 * M_PI), torch::kDouble)));
}

TEST_CASE("dselect_k_gate: binary steps pick one expert per selector, fractional ones spread and backpropagate",
          "[dselect_k_gate]") {
  const auto gate = op<DSelectKGate>("torch_moe::dselect_k_gate");
  // E = 4, m = 2, k = 2. Selector 0: both steps exactly 1 (code 11 = expert 3). Selector 1: first step exactly 0,
  // second at z = 0, S = 1/2: half on expert 0 (00), half on expert 1 (01).
  auto code = torch::tensor({1.0, 2.0, -1.0, 0.0}, torch::kDouble).reshape({1, 2, 2}).requires_grad_();
  auto selector = torch::zeros({1, 2}, torch::kDouble).requires_grad_();
  auto [q, r] = gate.call(code, selector, 4, 1.0);
  CHECK(torch::equal(r, torch::tensor({0.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.0, 0.0}, torch::kDouble).reshape({1, 2, 4})));
  CHECK(torch::allclose(q, torch::tensor({{0.25, 0.25, 0.0, 0.5}}, torch::kDouble)));
  (q.select(1, 1) - q.select(1, 0)).sum().backward();
  REQUIRE(code.grad().defined());
  // Only the fractional step (z = 0, slope 3/(2 gamma)) gets a gradient: alpha_1 * (d r[1] - d r[0]) = 0.5 * 2 * 1.5.
  CHECK(torch::allclose(code.grad(), torch::tensor({0.0, 0.0, 0.0, 1.5}, torch::kDouble).reshape({1, 2, 2})));
  CHECK(selector.grad().defined());
}

TEST_CASE("glu is silu(gate) * up and backpropagates to both", "[glu]") {
  using Glu = Tensor(const Tensor&, const Tensor&, c10::string_view);
  torch::manual_seed(11);
  // 70000 elements: two chunks of the CPU kernel, the second short.
  const auto gate = torch::randn({350, 200}, torch::kDouble).requires_grad_();
  const auto up = torch::randn({350, 200}, torch::kDouble).requires_grad_();
  const auto act = op<Glu>("torch_moe::glu").call(gate, up, "silu");
  const auto expected = torch::silu(gate) * up;
  CHECK(torch::allclose(act, expected, 1e-12, 1e-14));
  const auto grad = torch::randn({350, 200}, torch::kDouble);
  const auto got = torch::autograd::grad({act}, {gate, up}, {grad});
  const auto want = torch::autograd::grad({expected}, {gate, up}, {grad});
  CHECK(torch::allclose(got[0], want[0], 1e-12, 1e-14));
  CHECK(torch::allclose(got[1], want[1], 1e-12, 1e-14));
}

TEST_CASE("dot_row sums a row product for every length, on the loop the CPU picked", "[row_math]") {
  std::vector<float> a(300), b(300);
  for (size_t i = 0; i < a.size(); ++i) {
    a[i] = static_cast<float>(std::sin(0.37 * i));
    b[i] = static_cast<float>(std::cos(0.11 * i) - 0.25);
  }
  for (int64_t n : {0, 1, 15, 16, 17, 64, 255, 300}) {
    INFO(n);
    double expected = 0;
    for (int64_t c = 0; c < n; ++c) expected += static_cast<double>(a[c]) * static_cast<double>(b[c]);
    CHECK(std::abs(torch_moe::cpu::simd::dot_row(a.data(), b.data(), n) - expected) <= 1e-5 * (1 + std::abs(expected)));
  }
}

TEST_CASE("best_by_value keeps what partial_sort under RankBefore keeps, ties to the lower id", "[router_math]") {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> coarse(-3, 3);  // few values: many exact ties
  for (int64_t n : {1, 5, 64, 67}) {
    for (int64_t keep : {int64_t{1}, int64_t{2}, int64_t{8}, n}) {
      if (keep > n) continue;
      INFO("n = " << n << ", keep = " << keep);
      std::vector<float> key(n);
      for (auto& v : key) v = static_cast<float>(coarse(rng)) * 0.5f;
      key[n - 1] = -std::numeric_limits<float>::infinity();
      std::vector<int64_t> candidates(n), expected(n), got(keep);
      std::iota(candidates.begin(), candidates.end(), 0);
      expected = candidates;
      std::partial_sort(expected.begin(), expected.begin() + keep, expected.end(),
                        torch_moe::cpu::RankBefore<float>{key.data()});
      expected.resize(keep);
      std::vector<float> got_key(keep);
      torch_moe::cpu::best_by_value(key.data(), candidates.data(), n, keep, got.data(), got_key.data());
      CHECK(got == expected);
      for (int64_t j = 0; j < keep; ++j) CHECK(got_key[j] == key[got[j]]);
    }
  }
}
