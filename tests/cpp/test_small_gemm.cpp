// torch_moe's few-row float32 GEMM kernel (common/small_gemm_cpu.h) against a float64 loop, in each of its forms.
#include <torch/torch.h>

#include <catch2/catch.hpp>

#include <tuple>
#include <vector>

#include "common/small_gemm_cpu.h"

namespace {

// A [rows, cols] float32 matrix of random values with the given layout: row-major, column-major (a transposed
// view), or row-major with padded rows (a narrowed view).
at::Tensor matrix(int64_t rows, int64_t cols, char layout) {
  if (layout == 'c') return at::randn({cols, rows}).t();
  if (layout == 'p') return at::randn({rows, cols + 3}).narrow(1, 1, cols);
  return at::randn({rows, cols});
}

at::Tensor reference(const at::Tensor& out_before, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  auto expected = at::mm(a.to(at::kDouble), b.to(at::kDouble));
  return accumulate ? expected + out_before.to(at::kDouble) : expected;
}

}  // namespace

TEST_CASE("small_gemm matches a float64 product for every layout, edge size and accumulate", "[small_gemm]") {
  if (!torch_moe::cpu::small_gemm_available()) {
    SUCCEED("no AVX-512 on this CPU: the kernel is never called");
    return;
  }
  at::manual_seed(0);
  // (m, n, k): 16-row experts, sizes off every tile and vector edge, a weight gradient (k = rows), k = 0 and 1,
  // decode rows (the row sweep: m <= 2, k not a multiple of its 4 steps, rows of b a page apart).
  const std::vector<std::tuple<int64_t, int64_t, int64_t>> shapes = {
      {16, 256, 512}, {13, 37, 45}, {1, 70, 33}, {5, 3, 17}, {512, 256, 16}, {7, 19, 0},
      {9, 64, 1},     {4, 4, 16},   {2, 100, 41}, {1, 1024, 30}, {2, 5, 3}};
  // a, b, out layouts: forward (r r r), weight gradient (c r r), input gradient (r c r: the dot form), and the
  // transposed forms with and without a packed operand, a strided output, padded rows.
  const std::vector<std::string> layouts = {"rrr", "crr", "rcr", "ccr", "rcc", "prp", "pcr", "rrc"};
  for (const auto& [m, n, k] : shapes) {
    for (const auto& layout : layouts) {
      for (const bool accumulate : {false, true}) {
        INFO("m " << m << " n " << n << " k " << k << " layout " << layout << " accumulate " << accumulate);
        const auto a = matrix(m, k, layout[0]);
        const auto b = matrix(k, n, layout[1]);
        auto out = matrix(m, n, layout[2]);
        out.copy_(at::randn({m, n}));
        const auto before = out.clone();
        torch_moe::cpu::small_gemm(out, a, b, accumulate);
        const auto expected = reference(before, a, b, accumulate);
        const double scale = std::max(1.0, expected.abs().max().item<double>());
        CHECK((out.to(at::kDouble) - expected).abs().max().item<double>() <= 1e-5 * scale);
      }
    }
  }
}

TEST_CASE("small_gemm gives the same bits whether a product runs whole or in row and column blocks",
          "[small_gemm]") {
  if (!torch_moe::cpu::small_gemm_available()) {
    SUCCEED("no AVX-512 on this CPU: the kernel is never called");
    return;
  }
  at::manual_seed(1);
  // Blocks that cut tiles and vectors where the whole product's do not (fixed_mm_out's start at multiples of 16).
  for (const auto& layout : std::vector<std::string>{"rrr", "crr", "rcr", "ccr"}) {
    // A product of 37 rows (tiles) and one of 2 (the row sweep when whole, one row at a time when blocked).
    for (const int64_t m : {37, 2}) {
      INFO("layout " << layout << " m " << m);
      const int64_t n = 90, k = 70;
      const auto a = matrix(m, k, layout[0]);
      const auto b = matrix(k, n, layout[1]);
      auto whole = at::empty({m, n});
      torch_moe::cpu::small_gemm(whole, a, b, false);
      auto blocked = at::empty({m, n});
      const std::vector<std::pair<int64_t, int64_t>> row_blocks =
          m == 2 ? std::vector<std::pair<int64_t, int64_t>>{{0, 1}, {1, 2}}
                 : std::vector<std::pair<int64_t, int64_t>>{{0, 13}, {13, 30}, {30, m}};
      for (const auto& [r0, r1] : row_blocks) {
        for (const auto& [c0, c1] : std::vector<std::pair<int64_t, int64_t>>{{0, 45}, {45, n}}) {
          auto out_block = blocked.narrow(0, r0, r1 - r0).narrow(1, c0, c1 - c0);
          torch_moe::cpu::small_gemm(out_block, a.narrow(0, r0, r1 - r0), b.narrow(1, c0, c1 - c0), false);
        }
      }
      CHECK(at::equal(whole, blocked));
      // Two rows alone (the row sweep) give the bits the tiles gave them inside the larger product.
      auto top = at::empty({2, n});
      torch_moe::cpu::small_gemm(top, a.narrow(0, 0, 2), b, false);
      CHECK(at::equal(top, whole.narrow(0, 0, 2)));
    }
  }
}
