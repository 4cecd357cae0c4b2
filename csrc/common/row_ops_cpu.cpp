// CPU row movement kernels (see row_ops.h), parallel over tokens with at::parallel_for.
#include "common/row_ops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_cache.h"
#include "common/row_math.h"

namespace torch_moe::cpu {
namespace {

at::Tensor weights_as(const std::optional<at::Tensor>& weights, at::ScalarType dtype) {
  if (!weights.has_value() || !weights->defined()) return at::Tensor();
  return weights->to(dtype).contiguous();
}

}  // namespace

int64_t grain_for(int64_t row_elems) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_elems, 1)); }

at::Tensor scatter_rows(const at::Tensor& src_in, const at::Tensor& index_in, const std::optional<at::Tensor>& weights,
                        int64_t num_rows) {
  const auto src = src_in.contiguous();
  const auto index = index_in.contiguous();
  const int64_t d = src.size(1), k = index.size(1);
  auto out = empty_cached({num_rows, d}, src.options());
  if (num_rows == 0 || d == 0) return out;
  // Destination-major: every output row is written exactly once (copied or zeroed), instead of zero-filling the
  // whole output and then copying over it.
  std::vector<int64_t> owner(static_cast<size_t>(num_rows), -1);
  const int64_t* ip = index.data_ptr<int64_t>();
  for (int64_t a = 0; a < index.numel(); ++a) {
    const int64_t dest = ip[a];
    if (dest < 0) continue;
    TORCH_INTERNAL_ASSERT(owner[dest] < 0, "scatter_rows: two assignments target row ", dest);
    owner[dest] = a;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "torch_moe_scatter_rows", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto w = weights_as(weights, c10::CppTypeToScalarType<opmath_t>::value);
    const opmath_t* wp = w.defined() ? w.data_ptr<opmath_t>() : nullptr;
    const scalar_t* sp = src.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, num_rows, grain_for(d), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* o = op + r * d;
        const int64_t a = owner[r];
        if (a < 0) {
          std::fill(o, o + d, scalar_t(0));
          continue;
        }
        const scalar_t* row = sp + (a / k) * d;
        if (wp == nullptr) {
          std::copy(row, row + d, o);
        } else {
          scale_row(o, row, wp[a], d);
        }
      }
    });
  });
  return out;
}

at::Tensor gather_rows(const at::Tensor& src_in, const at::Tensor& index_in, const std::optional<at::Tensor>& weights) {
  const auto src = src_in.contiguous();
  const auto index = index_in.contiguous();
  const int64_t T = index.size(0), k = index.size(1), d = src.size(1);
  auto out = empty_cached({T, d}, src.options());
  if (T == 0 || d == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "torch_moe_gather_rows", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto w = weights_as(weights, c10::CppTypeToScalarType<opmath_t>::value);
    const opmath_t* wp = w.defined() ? w.data_ptr<opmath_t>() : nullptr;
    const scalar_t* sp = src.data_ptr<scalar_t>();
    const int64_t* ip = index.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, grain_for(d * k), [&](int64_t begin, int64_t end) {
      // float and double accumulate in the output row itself; half types in an opmath row, converted once.
      constexpr bool in_place = std::is_same_v<opmath_t, scalar_t>;
      std::vector<opmath_t> scratch(in_place ? 0 : d);
      for (int64_t t = begin; t < end; ++t) {
        scalar_t* o = op + t * d;
        opmath_t* acc = in_place ? reinterpret_cast<opmath_t*>(o) : scratch.data();
        bool first = true;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t from = ip[t * k + j];
          if (from < 0) continue;
          const scalar_t* row = sp + from * d;
          const opmath_t scale = wp == nullptr ? opmath_t(1) : wp[t * k + j];
          if (first) {
            scale_row(acc, row, scale, d);
            first = false;
          } else {
            add_scaled_row(acc, row, scale, d);
          }
        }
        if (first) std::fill(acc, acc + d, opmath_t(0));
        if constexpr (!in_place) {
          for (int64_t c = 0; c < d; ++c) o[c] = static_cast<scalar_t>(acc[c]);
        }
      }
    });
  });
  return out;
}

at::Tensor row_dots(const at::Tensor& a_in, const at::Tensor& src_in, const at::Tensor& index_in,
                    at::ScalarType out_dtype) {
  const auto a = a_in.contiguous();
  const auto src = src_in.contiguous().to(a.scalar_type());
  const auto index = index_in.contiguous();
  const int64_t T = index.size(0), k = index.size(1), d = a.size(1);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "torch_moe_row_dots", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    auto acc = at::zeros({T, k}, a.options().dtype(c10::CppTypeToScalarType<opmath_t>::value));
    if (T > 0 && k > 0 && d > 0) {
      const scalar_t* ap = a.data_ptr<scalar_t>();
      const scalar_t* sp = src.data_ptr<scalar_t>();
      const int64_t* ip = index.data_ptr<int64_t>();
      opmath_t* op = acc.data_ptr<opmath_t>();
      at::parallel_for(0, T, grain_for(d * k), [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const scalar_t* arow = ap + t * d;
          for (int64_t j = 0; j < k; ++j) {
            const int64_t from = ip[t * k + j];
            if (from < 0) continue;
            const scalar_t* row = sp + from * d;
            op[t * k + j] = dot_row<scalar_t, opmath_t>(arow, row, d);
          }
        }
      });
    }
    out = acc.to(out_dtype);
  });
  return out;
}

void check_unique_destinations(const char* op, const char* name, const at::Tensor& index_in, int64_t num_rows) {
  if (!index_in.device().is_cpu()) return;
  const auto index = index_in.contiguous();
  const int64_t* ip = index.data_ptr<int64_t>();
  std::vector<int64_t> owner(static_cast<size_t>(num_rows), -1);
  for (int64_t a = 0; a < index.numel(); ++a) {
    const int64_t dest = ip[a];
    if (dest < 0) continue;
    TORCH_MOE_CHECK(owner[dest] < 0,
                    "torch_moe.{}: argument '{}' gives assignments {} and {} (flat [T, k] positions) the same "
                    "row {}; every row belongs to one assignment",
                    op, name, owner[dest], a, dest);
    owner[dest] = a;
  }
}

}  // namespace torch_moe::cpu
