// torch_moe's own float32 GEMM for few-row expert products (see the header for why).
#include "common/small_gemm_cpu.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

#include "common/checks.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TORCH_MOE_SMALL_GEMM_X86 1
#include <immintrin.h>
#endif

namespace torch_moe::cpu {

#ifdef TORCH_MOE_SMALL_GEMM_X86
namespace {

#define TORCH_MOE_AVX512 __attribute__((target("avx512f,avx512vl")))

// Accumulators per tile: NV vectors of 16 columns by MR rows, at most 24 of AVX-512's 32 registers (the rest hold
// b's vectors and the broadcast of a). kMaxRows[NV - 1] rows per tile.
constexpr int kMaxVectors = 4;
constexpr std::array<int, kMaxVectors> kMaxRows = {12, 12, 8, 6};
// b's row this many k steps ahead is prefetched: its first pass comes from memory (an expert's weights are read
// once per GEMM), later passes of the same column panel from L2.
constexpr int64_t kPrefetchRows = 8;

// Products of at most kSweepRows rows with a contiguous C run as row sweeps (sweep_gemm).
constexpr int64_t kSweepRows = 2;
// Outputs of at least this many elements (256 KiB) that are written, not accumulated, skip the cache.
constexpr int64_t kStreamElements = int64_t{1} << 16;

struct TileArgs {
  int64_t k;
  const float* a;
  int64_t a_row, a_col;
  const float* b;
  int64_t b_row;
  float* c;
  int64_t c_row, c_col;
  // Contiguous C: the sums start from C's values; strided C: the tile's sums are added to C.
  bool accumulate;
  bool stream;          // C written with non-temporal stores (a large output nobody reads soon: a weight gradient)
  __mmask16 last_mask;  // the columns of the tile's last vector that exist
};

// Every loop over MR or NV is unrolled before GCC decides where acc lives: otherwise it keeps the array in memory
// and stores all 24 accumulators on every k step (measured: 57 against 29 us per 16 x 512 x 256 product).
#define TORCH_MOE_UNROLL _Pragma("GCC unroll 16")

template <int MR, int NV>
TORCH_MOE_AVX512 void tile(const TileArgs& t) {
  const int64_t k = t.k, a_row = t.a_row, a_col = t.a_col, b_row = t.b_row;
  const __mmask16 last_mask = t.last_mask;
  const bool seed = t.accumulate && t.c_col == 1;
  // A's rows are long contiguous streams from memory (the weights, in the transposed form): asked for ahead.
  const bool prefetch_a = a_col == 1 && k >= 64;
  __m512 acc[MR][NV];
  TORCH_MOE_UNROLL for (int i = 0; i < MR; ++i) {
    TORCH_MOE_UNROLL for (int v = 0; v < NV; ++v) {
      const __mmask16 mask = v == NV - 1 ? last_mask : __mmask16(0xFFFF);
      acc[i][v] = seed ? _mm512_maskz_loadu_ps(mask, t.c + i * t.c_row + 16 * v) : _mm512_setzero_ps();
    }
  }
  const float* a = t.a;
  const float* b = t.b;
  for (int64_t p = 0; p < k; ++p, a += a_col, b += b_row) {
    if (p + kPrefetchRows < k) {
      TORCH_MOE_UNROLL for (int v = 0; v < NV; ++v) {
        _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchRows * b_row + 16 * v), _MM_HINT_T0);
      }
    }
    if (prefetch_a && (p & 15) == 0) {
      TORCH_MOE_UNROLL for (int i = 0; i < MR; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(a + i * a_row + 64), _MM_HINT_T0);
      }
    }
    __m512 bv[NV];
    TORCH_MOE_UNROLL for (int v = 0; v < NV - 1; ++v) bv[v] = _mm512_loadu_ps(b + 16 * v);
    bv[NV - 1] = _mm512_maskz_loadu_ps(last_mask, b + 16 * (NV - 1));
    TORCH_MOE_UNROLL for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * a_row]);
      TORCH_MOE_UNROLL for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
    }
  }
  if (t.c_col == 1) {
    TORCH_MOE_UNROLL for (int i = 0; i < MR; ++i) {
      float* c = t.c + i * t.c_row;
      TORCH_MOE_UNROLL for (int v = 0; v < NV; ++v) {
        const __mmask16 mask = v == NV - 1 ? last_mask : __mmask16(0xFFFF);
        const __m512 value = acc[i][v];
        if (t.stream && mask == 0xFFFF && (reinterpret_cast<uintptr_t>(c + 16 * v) & 63) == 0) {
          _mm512_stream_ps(c + 16 * v, value);
        } else {
          _mm512_mask_storeu_ps(c + 16 * v, mask, value);
        }
      }
    }
    return;
  }
  // C's columns are strided (the transposed form of a product whose b has strided rows): the tile goes through a
  // small buffer, column by column of C, so that each column's MR rows are written together.
  alignas(64) float buffer[MR][NV * 16];
  TORCH_MOE_UNROLL for (int i = 0; i < MR; ++i) {
    TORCH_MOE_UNROLL for (int v = 0; v < NV; ++v) _mm512_store_ps(&buffer[i][16 * v], acc[i][v]);
  }
  const int columns = 16 * (NV - 1) + __builtin_popcount(last_mask);
  for (int j = 0; j < columns; ++j) {
    float* c = t.c + j * t.c_col;
    for (int i = 0; i < MR; ++i) c[i * t.c_row] = t.accumulate ? c[i * t.c_row] + buffer[i][j] : buffer[i][j];
  }
}

using TileFn = void (*)(const TileArgs&);

constexpr int kMostTileRows = 12;  // the largest of kMaxRows

// tile<1..kMaxRows[NV - 1], NV>, the rest of the row empty.
template <int NV, int... R>
constexpr std::array<TileFn, kMostTileRows> tiles_of(std::integer_sequence<int, R...>) {
  return {&tile<R + 1, NV>...};
}

// kTiles[NV - 1][MR - 1]
const std::array<std::array<TileFn, kMostTileRows>, kMaxVectors> kTiles = {
    tiles_of<1>(std::make_integer_sequence<int, kMaxRows[0]>{}),
    tiles_of<2>(std::make_integer_sequence<int, kMaxRows[1]>{}),
    tiles_of<3>(std::make_integer_sequence<int, kMaxRows[2]>{}),
    tiles_of<4>(std::make_integer_sequence<int, kMaxRows[3]>{})};

// The dot form, for C = A @ W^T with A's and W's rows contiguous along k (a product's input gradient, W an
// expert's weight): both operands load as vectors along k, with no broadcasts (a tile of one broadcast per FMA
// runs at half speed: 46 against 26-35 us for a 16 x 512 x 256 input gradient here). A tile is MR rows of A by
// NR rows of W; each of its MR * NR sums is reduced across its 16 lanes once, after the k loop.
struct DotArgs {
  int64_t k;
  const float* a;
  int64_t a_row;
  const float* w;
  int64_t w_row;
  float* c;
  int64_t c_row;
  bool accumulate;
  const float* w_next;  // the next tile's W rows, prefetched while this tile runs (nullptr: none)
};

// The 16 lane sums of v[0..15] as one vector: its 128-bit lane q holds the sums of v[4q .. 4q + 3].
TORCH_MOE_AVX512 inline __m512 lane_sums16(const __m512 (&v)[16]) {
  __m512 pairs[8], quads[4];
  TORCH_MOE_UNROLL for (int i = 0; i < 8; ++i) {
    // Per 128-bit lane: [x0 + x2, y0 + y2, x1 + x3, y1 + y3] of x = v[2i], y = v[2i + 1].
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  TORCH_MOE_UNROLL for (int i = 0; i < 4; ++i) {
    // Per 128-bit lane: the lane's sums of v[4i], v[4i + 1], v[4i + 2], v[4i + 3].
    quads[i] = _mm512_add_ps(_mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0xEE));
  }
  // Add the four 128-bit lanes of each quad: a transpose of 128-bit blocks, then two adds.
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x44),
                                   _mm512_shuffle_f32x4(quads[0], quads[1], 0xEE));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x44),
                                   _mm512_shuffle_f32x4(quads[2], quads[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}

template <int MR, int NR>
TORCH_MOE_AVX512 void dot_tile(const DotArgs& t) {
  const int64_t k = t.k, a_row = t.a_row, w_row = t.w_row;
  __m512 acc[MR][NR];
  TORCH_MOE_UNROLL for (int i = 0; i < MR; ++i) {
    TORCH_MOE_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  }
  int64_t p = 0;
  for (; p + 16 <= k; p += 16) {
    __m512 av[MR], wv[NR];
    TORCH_MOE_UNROLL for (int i = 0; i < MR; ++i) av[i] = _mm512_loadu_ps(t.a + i * a_row + p);
    TORCH_MOE_UNROLL for (int j = 0; j < NR; ++j) wv[j] = _mm512_loadu_ps(t.w + j * w_row + p);
    if (t.w_next != nullptr) {
      TORCH_MOE_UNROLL for (int j = 0; j < NR; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(t.w_next + j * w_row + p), _MM_HINT_T0);
      }
    }
    TORCH_MOE_UNROLL for (int i = 0; i < MR; ++i) {
      TORCH_MOE_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(av[i], wv[j], acc[i][j]);
    }
  }
  if (p < k) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (k - p)) - 1u);
    __m512 av[MR], wv[NR];
    TORCH_MOE_UNROLL for (int i = 0; i < MR; ++i) av[i] = _mm512_maskz_loadu_ps(mask, t.a + i * a_row + p);
    TORCH_MOE_UNROLL for (int j = 0; j < NR; ++j) wv[j] = _mm512_maskz_loadu_ps(mask, t.w + j * w_row + p);
    TORCH_MOE_UNROLL for (int i = 0; i < MR; ++i) {
      TORCH_MOE_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(av[i], wv[j], acc[i][j]);
    }
  }
  // Every tile, full or not, reduces through the same tree, so an element's bits do not depend on its tile's shape
  // (which depends on where the caller's blocks end).
  __m512 all[16];
  TORCH_MOE_UNROLL for (int x = 0; x < 16; ++x) all[x] = _mm512_setzero_ps();
  TORCH_MOE_UNROLL for (int i = 0; i < MR; ++i) {
    TORCH_MOE_UNROLL for (int j = 0; j < NR; ++j) all[4 * i + j] = acc[i][j];
  }
  const __m512 sums = lane_sums16(all);
  const __mmask8 columns = static_cast<__mmask8>((1u << NR) - 1u);
  TORCH_MOE_UNROLL for (int i = 0; i < MR; ++i) {
    float* c = t.c + i * t.c_row;
    __m128 row = _mm512_extractf32x4_ps(sums, i);
    if (t.accumulate) row = _mm_add_ps(row, _mm_maskz_loadu_ps(columns, c));
    _mm_mask_storeu_ps(c, columns, row);
  }
}

using DotTileFn = void (*)(const DotArgs&);
constexpr int kDotRows = 4;

template <int MR, int... J>
constexpr std::array<DotTileFn, kDotRows> dot_row_of(std::integer_sequence<int, J...>) {
  return {&dot_tile<MR, J + 1>...};
}

// kDotTiles[MR - 1][NR - 1]
using DotColumns = std::make_integer_sequence<int, kDotRows>;
const std::array<std::array<DotTileFn, kDotRows>, kDotRows> kDotTiles = {
    dot_row_of<1>(DotColumns{}), dot_row_of<2>(DotColumns{}), dot_row_of<3>(DotColumns{}), dot_row_of<4>(DotColumns{})};

// C [m, n] = A [m, k] @ W^T (W [n, k]), rows of A and W contiguous, C's rows contiguous. W's tile of rows is the
// outer loop: read from memory once, then from L1 for every tile of A's rows.
void dot_gemm_f32(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_row, const float* w, int64_t w_row,
                  float* c, int64_t c_row, bool accumulate) {
  DotArgs t{k, nullptr, a_row, nullptr, w_row, nullptr, c_row, accumulate, nullptr};
  for (int64_t j0 = 0; j0 < n; j0 += kDotRows) {
    const int cols = static_cast<int>(std::min<int64_t>(kDotRows, n - j0));
    t.w = w + j0 * w_row;
    for (int64_t i0 = 0; i0 < m; i0 += kDotRows) {
      // The first tile of A's rows brings W's tile from memory; it also asks for the next one when that is a full
      // tile (a prefetch of all its kDotRows rows stays inside W).
      t.w_next = i0 == 0 && j0 + 2 * kDotRows <= n ? w + (j0 + kDotRows) * w_row : nullptr;
      const int rows = static_cast<int>(std::min<int64_t>(kDotRows, m - i0));
      t.a = a + i0 * a_row;
      t.c = c + i0 * c_row + j0;
      kDotTiles[rows - 1][cols - 1](t);
    }
  }
}

// The row sweep, for products of a few rows (decode): C's rows are the accumulators, in L1, and b is read row
// after row, four rows at a time, as contiguous streams. A panel walk instead touches a new page on every row of b
// when b's rows are a page or more apart (1 x 3584 x 1024), which neither the TLB nor the hardware prefetcher
// follows (8 such experts, one thread: 6.3 ms against MKL's 4.8). The chain of FMAs per element is the tiles' one.
template <int MR>
TORCH_MOE_AVX512 void sweep_gemm(int64_t, int64_t n, int64_t k, const float* a, int64_t a_row, int64_t a_col,
                                 const float* b, int64_t b_row, float* c, int64_t c_row, bool accumulate) {
  const int64_t full = n / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (n - full)) - 1u);
  if (!accumulate) {
    for (int i = 0; i < MR; ++i) std::fill(c + i * c_row, c + i * c_row + n, 0.f);
  }
  constexpr int kSteps = 4;
  constexpr int64_t kSweepAhead = 2 * kSteps;
  for (int64_t p0 = 0; p0 < k; p0 += kSteps) {
    const int steps = static_cast<int>(std::min<int64_t>(kSteps, k - p0));
    __m512 av[MR][kSteps];
    TORCH_MOE_UNROLL for (int i = 0; i < MR; ++i) {
      TORCH_MOE_UNROLL for (int q = 0; q < kSteps; ++q) {
        av[i][q] = _mm512_set1_ps(q < steps ? a[i * a_row + (p0 + q) * a_col] : 0.f);
      }
    }
    const float* rows[kSteps];
    TORCH_MOE_UNROLL for (int q = 0; q < kSteps; ++q) rows[q] = b + (p0 + std::min(q, steps - 1)) * b_row;
    // b's rows two steps ahead, asked for line by line as this step passes the same columns: each row starts a new
    // stream (often a new page), which the hardware prefetcher would only pick up after a few misses.
    const bool ahead = p0 + kSweepAhead + kSteps <= k;
    const float* next = b + (p0 + kSweepAhead) * b_row;
    for (int64_t j = 0; j < n; j += 16) {
      if (ahead) {
        TORCH_MOE_UNROLL for (int q = 0; q < kSteps; ++q) {
          _mm_prefetch(reinterpret_cast<const char*>(next + q * b_row + j), _MM_HINT_T0);
        }
      }
      const __mmask16 mask = j < full ? __mmask16(0xFFFF) : tail;
      __m512 acc[MR];
      TORCH_MOE_UNROLL for (int i = 0; i < MR; ++i) acc[i] = _mm512_maskz_loadu_ps(mask, c + i * c_row + j);
      TORCH_MOE_UNROLL for (int q = 0; q < kSteps; ++q) {
        if (q >= steps) break;
        const __m512 bv = _mm512_maskz_loadu_ps(mask, rows[q] + j);
        TORCH_MOE_UNROLL for (int i = 0; i < MR; ++i) acc[i] = _mm512_fmadd_ps(av[i][q], bv, acc[i]);
      }
      TORCH_MOE_UNROLL for (int i = 0; i < MR; ++i) _mm512_mask_storeu_ps(c + i * c_row + j, mask, acc[i]);
    }
  }
}

using SweepFn = void (*)(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*,
                         int64_t, bool);
const std::array<SweepFn, kSweepRows> kSweeps = {&sweep_gemm<1>, &sweep_gemm<2>};

}  // namespace

bool small_gemm_available() {
  static const bool available = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  return available;
}

void small_gemm_f32(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_row, int64_t a_col, const float* b,
                    int64_t b_row, float* c, int64_t c_row, int64_t c_col, bool accumulate) {
  if (m <= 0 || n <= 0) return;
  if (k == 0) {
    // An empty sum: C = 0 (or unchanged), as at::mm gives.
    for (int64_t i = 0; i < m && !accumulate; ++i) {
      for (int64_t j = 0; j < n; ++j) c[i * c_row + j * c_col] = 0.f;
    }
    return;
  }
  // Column panels of up to 64 (a panel of b, k x 64, stays in L2 while every row tile passes over it); rows in
  // tiles of kMaxRows, the last tile smaller. Each C element is one chain of FMAs over p = 0..k-1 in order, from 0
  // (from C's value when accumulating into a C of contiguous rows; a strided C gets the chain's sum added).
  if (c_col == 1 && m <= kSweepRows) {
    kSweeps[m - 1](m, n, k, a, a_row, a_col, b, b_row, c, c_row, accumulate);
    return;
  }
  for (int64_t j0 = 0; j0 < n; j0 += 16 * kMaxVectors) {
    const int64_t width = std::min<int64_t>(16 * kMaxVectors, n - j0);
    const int vectors = static_cast<int>((width + 15) / 16);
    const int last = static_cast<int>(width - 16 * (vectors - 1));
    TileArgs t{k,
               nullptr,
               a_row,
               a_col,
               b + j0,
               b_row,
               nullptr,
               c_row,
               c_col,
               accumulate,
               /*stream=*/!accumulate && c_col == 1 && m * n >= kStreamElements,
               static_cast<__mmask16>((1u << last) - 1u)};
    const int max_rows = kMaxRows[vectors - 1];
    for (int64_t i0 = 0; i0 < m; i0 += max_rows) {
      const int rows = static_cast<int>(std::min<int64_t>(max_rows, m - i0));
      t.a = a + i0 * a_row;
      t.c = c + i0 * c_row + j0 * c_col;
      kTiles[vectors - 1][rows - 1](t);
    }
  }
  _mm_sfence();
}

void small_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  TORCH_INTERNAL_ASSERT(out.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat &&
                        b.scalar_type() == at::kFloat && out.dim() == 2 && a.dim() == 2 && b.dim() == 2);
  const int64_t m = out.size(0), n = out.size(1), k = a.size(1);
  float* c = out.data_ptr<float>();
  const float* ap = a.const_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();
  if (b.stride(1) == 1 || n <= 1) {
    small_gemm_f32(m, n, k, ap, a.stride(0), a.stride(1), bp, b.stride(0), c, out.stride(0), out.stride(1),
                   accumulate);
    return;
  }
  // b = W^T with W's rows contiguous, a's rows contiguous, out's rows contiguous: the dot form.
  if (b.stride(0) == 1 && a.stride(1) == 1 && out.stride(1) == 1 && k > 0) {
    dot_gemm_f32(m, n, k, ap, a.stride(0), bp, b.stride(1), c, out.stride(0), accumulate);
    return;
  }
  // out^T [n, m] = b^T [n, k] @ a^T [k, m]: b^T is read by element (any strides), a^T must have contiguous rows,
  // else it is packed: [k, m], m being the few rows of an expert's segment here.
  const float* a_t = ap;
  int64_t a_t_row = a.stride(1);
  if (a.stride(0) != 1 && m > 1) {
    thread_local std::vector<float> packed;
    packed.resize(static_cast<size_t>(k * m));
    for (int64_t i = 0; i < m; ++i) {
      const float* row = ap + i * a.stride(0);
      for (int64_t p = 0; p < k; ++p) packed[p * m + i] = row[p * a.stride(1)];
    }
    a_t = packed.data();
    a_t_row = m;
  }
  small_gemm_f32(n, m, k, bp, b.stride(1), b.stride(0), a_t, a_t_row, c, out.stride(1), out.stride(0), accumulate);
}

#else  // not x86-64: the kernel does not exist, and small_gemm_available() keeps every caller away from it.

bool small_gemm_available() { return false; }

void small_gemm_f32(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t,
                    int64_t, bool) {
  TORCH_INTERNAL_ASSERT(false, "torch_moe: small_gemm_f32 needs an x86-64 CPU with AVX-512F");
}

void small_gemm(at::Tensor&, const at::Tensor&, const at::Tensor&, bool) {
  TORCH_INTERNAL_ASSERT(false, "torch_moe: small_gemm needs an x86-64 CPU with AVX-512F");
}

#endif

}  // namespace torch_moe::cpu
