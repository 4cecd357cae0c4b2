// Per-row loops of the CPU row kernels (scale, scaled add), with float/double rows on loops built for several x86
// vector widths.
#pragma once

#include <cstdint>
#include <type_traits>

namespace torch_moe::cpu {

namespace simd {
// out[c] = scale * in[c]; out[c] += scale * in[c]; x[c] *= scale, for c < n. out and in do not overlap.
void scale_row(float* out, const float* in, float scale, int64_t n);
void scale_row(double* out, const double* in, double scale, int64_t n);
void add_scaled_row(float* out, const float* in, float scale, int64_t n);
void add_scaled_row(double* out, const double* in, double scale, int64_t n);
void scale_row_in_place(float* x, float scale, int64_t n);
void scale_row_in_place(double* x, double scale, int64_t n);
// sum of a[c] * b[c] for c < n, in 16 interleaved partial sums added in a fixed order.
float dot_row(const float* a, const float* b, int64_t n);
double dot_row(const double* a, const double* b, int64_t n);
}  // namespace simd

// Rows whose element and accumulation type are one, float or double, take the simd loops.
template <typename T, typename opmath_t>
inline constexpr bool kSimdRow = std::is_same_v<T, opmath_t> && (std::is_same_v<T, float> || std::is_same_v<T, double>);

// out[c] = scale * in[c] for c < n, computed in opmath_t.
template <typename out_t, typename in_t, typename opmath_t>
inline void scale_row(out_t* out, const in_t* in, opmath_t scale, int64_t n) {
  if constexpr (kSimdRow<out_t, opmath_t> && std::is_same_v<in_t, opmath_t>) {
    simd::scale_row(out, in, scale, n);
  } else {
    for (int64_t c = 0; c < n; ++c) out[c] = static_cast<out_t>(scale * static_cast<opmath_t>(in[c]));
  }
}

// acc[c] += scale * in[c] for c < n, acc in opmath_t.
template <typename in_t, typename opmath_t>
inline void add_scaled_row(opmath_t* acc, const in_t* in, opmath_t scale, int64_t n) {
  if constexpr (kSimdRow<in_t, opmath_t>) {
    simd::add_scaled_row(acc, in, scale, n);
  } else {
    for (int64_t c = 0; c < n; ++c) acc[c] += scale * static_cast<opmath_t>(in[c]);
  }
}

// x[c] = scale * x[c] for c < n, computed in opmath_t.
template <typename T, typename opmath_t>
inline void scale_row_in_place(T* x, opmath_t scale, int64_t n) {
  if constexpr (kSimdRow<T, opmath_t>) {
    simd::scale_row_in_place(x, scale, n);
  } else {
    for (int64_t c = 0; c < n; ++c) x[c] = static_cast<T>(scale * static_cast<opmath_t>(x[c]));
  }
}

// sum of a[c] * b[c] for c < n, in opmath_t.
template <typename T, typename opmath_t>
inline opmath_t dot_row(const T* a, const T* b, int64_t n) {
  if constexpr (kSimdRow<T, opmath_t>) {
    return simd::dot_row(a, b, n);
  } else {
    opmath_t sum = 0;
    for (int64_t c = 0; c < n; ++c) sum += static_cast<opmath_t>(a[c]) * static_cast<opmath_t>(b[c]);
    return sum;
  }
}

}  // namespace torch_moe::cpu
