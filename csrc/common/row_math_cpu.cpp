// The simd row loops of row_math.h. The build targets baseline x86-64 (SSE2, 4 floats a step); on x86-64 with GCC or
// Clang each loop is also compiled for AVX2 and AVX-512 and the widest one the CPU has is picked at load time
// (target_clones: a GNU ifunc). The weighted combine of token rows is bound by these loops, not by memory.
#include "common/row_math.h"

// ifuncs need an ELF target and glibc's loader (<cstdint>, through row_math.h, brings in glibc's features.h).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__) && defined(__ELF__) && defined(__GLIBC__)
#define TORCH_MOE_ROW_LOOP __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TORCH_MOE_ROW_LOOP
#endif

namespace torch_moe::cpu::simd {
namespace {

template <typename T>
inline void scale_row_impl(T* __restrict__ out, const T* __restrict__ in, T scale, int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] = scale * in[c];
}

template <typename T>
inline void add_scaled_row_impl(T* __restrict__ out, const T* __restrict__ in, T scale, int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] += scale * in[c];
}

template <typename T>
inline void scale_row_in_place_impl(T* __restrict__ x, T scale, int64_t n) {
  for (int64_t c = 0; c < n; ++c) x[c] *= scale;
}

// Lane l sums the products at c = l (mod 16): independent partial sums the compiler may keep in vector registers
// without reassociating anything, so every clone adds the same terms in the same order.
template <typename T>
inline T dot_row_impl(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  constexpr int64_t kLanes = 16;
  T lanes[kLanes] = {};
  const int64_t body = n - n % kLanes;
  for (int64_t c = 0; c < body; c += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[c + l] * b[c + l];
  }
  for (int64_t c = body; c < n; ++c) lanes[c - body] += a[c] * b[c];
  T sum = 0;
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

}  // namespace

TORCH_MOE_ROW_LOOP void scale_row(float* out, const float* in, float scale, int64_t n) {
  scale_row_impl(out, in, scale, n);
}
TORCH_MOE_ROW_LOOP void scale_row(double* out, const double* in, double scale, int64_t n) {
  scale_row_impl(out, in, scale, n);
}
TORCH_MOE_ROW_LOOP void add_scaled_row(float* out, const float* in, float scale, int64_t n) {
  add_scaled_row_impl(out, in, scale, n);
}
TORCH_MOE_ROW_LOOP void add_scaled_row(double* out, const double* in, double scale, int64_t n) {
  add_scaled_row_impl(out, in, scale, n);
}
TORCH_MOE_ROW_LOOP void scale_row_in_place(float* x, float scale, int64_t n) { scale_row_in_place_impl(x, scale, n); }
TORCH_MOE_ROW_LOOP void scale_row_in_place(double* x, double scale, int64_t n) { scale_row_in_place_impl(x, scale, n); }

TORCH_MOE_ROW_LOOP float dot_row(const float* a, const float* b, int64_t n) { return dot_row_impl(a, b, n); }
TORCH_MOE_ROW_LOOP double dot_row(const double* a, const double* b, int64_t n) { return dot_row_impl(a, b, n); }

}  // namespace torch_moe::cpu::simd
