// Device helpers shared by the CUDA kernels: launch sizes, row-group reductions, 16-byte vectors, the router's
// ranking order, and the switch that says whether data-dependent argument checks may read the device.
#pragma once

// Only c10/cuda headers (not ATen/cuda/CUDAContext.h): they need nothing beyond the CUDA runtime, so the kernels
// also compile on CI machines whose toolkit has no cuBLAS/cuSPARSE headers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <initializer_list>

#include <cstdint>
#include <type_traits>

namespace torch_moe::cuda {

constexpr int kBlockThreads = 256;

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Streaming multiprocessors of the current device.
int sm_count();

// Blocks for a grid-stride loop over n items; capped so that huge n (> 2^31 elements) still launches.
inline unsigned int blocks_for(int64_t n, int threads = kBlockThreads) {
  const int64_t blocks = (n + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(sm_count()) * 32;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(blocks, cap)));
}

// Host-side data-dependent checks (index ranges with the CPU's messages, duplicate destinations, offsets) read one
// small result back to the host, which is a synchronisation, so they are opt-in: they run when asked for
// (TORCH_MOE_CUDA_CHECKS=1 or torch_moe.ops.set_cuda_value_checks(True); common/checks.h) and the current stream
// is not capturing a CUDA graph. Without them, slots and row indices are still range-checked by a device-side
// assert (row_ops_cuda.h, assert_index_range); other bad entries (expert ids out of range, duplicate rows) are
// ignored, and kernels never touch memory out of bounds.
bool value_checks_enabled();

// ------------------------------------------------------------------------------------------- 16-byte vectors

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Elements per 16-byte access when every row start of both pointers is 16-byte aligned, else 1.
template <typename scalar_t>
int vector_width(int64_t row_elems, std::initializer_list<const void*> ptrs) {
  constexpr int width = 16 / sizeof(scalar_t);
  if (row_elems % width != 0) return 1;
  for (const void* p : ptrs) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  }
  return width;
}

// ------------------------------------------------------------------------------------------- math

template <typename T>
__device__ __forceinline__ T dev_exp(T x) {
  if constexpr (std::is_same_v<T, double>) {
    return ::exp(x);
  } else {
    return ::expf(x);
  }
}

template <typename T>
__device__ __forceinline__ T dev_log(T x) {
  if constexpr (std::is_same_v<T, double>) {
    return ::log(x);
  } else {
    return ::logf(x);
  }
}

template <typename T>
__device__ __forceinline__ T dev_inf() {
  if constexpr (std::is_same_v<T, double>) {
    return __longlong_as_double(0x7ff0000000000000LL);
  } else {
    return __int_as_float(0x7f800000);
  }
}

template <typename T>
__device__ __forceinline__ T dev_nan() {
  if constexpr (std::is_same_v<T, double>) {
    return __longlong_as_double(0x7ff8000000000000LL);
  } else {
    return __int_as_float(0x7fc00000);
  }
}

// ------------------------------------------------------------------------------------------- row groups
// A row of the router/loss kernels is handled by kThreads threads: one warp (kThreads == 32, several rows per
// block along threadIdx.y) or one whole block (kThreads > 32, one row per block). Reductions combine in a fixed
// order, so every thread of the group gets the same, run-to-run identical result.

template <int kThreads>
__device__ __forceinline__ void group_sync() {
  if constexpr (kThreads == 32) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask);
}

// Shared scratch of a block-wide group: one slot per warp, big enough for any reduced type below.
template <int kThreads>
struct GroupScratch {
  static constexpr int kWarps = kThreads / 32 > 0 ? kThreads / 32 : 1;
  alignas(16) unsigned char bytes[kWarps * 32];
};

// Reduces v over the group with op (associative, deterministic order); shfl(v, mask) exchanges a value.
template <int kThreads, typename T, typename Op, typename Shfl>
__device__ __forceinline__ T group_reduce(T v, Op op, Shfl shfl, GroupScratch<kThreads>* scratch) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) v = op(v, shfl(v, mask));
  if constexpr (kThreads > 32) {
    static_assert(sizeof(T) <= 32, "group_reduce: value too large for the scratch");
    T* slots = reinterpret_cast<T*>(scratch->bytes);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // the scratch may still be read by a previous reduction
    if (lane == 0) slots[warp] = v;
    __syncthreads();
    v = slots[0];
    for (int w = 1; w < GroupScratch<kThreads>::kWarps; ++w) v = op(v, slots[w]);
  }
  return v;
}

template <int kThreads, typename T>
__device__ __forceinline__ T group_sum(T v, GroupScratch<kThreads>* scratch) {
  return group_reduce<kThreads>(
      v, [](T a, T b) { return a + b; }, [](T x, int m) { return shfl_xor(x, m); }, scratch);
}

template <int kThreads, typename T>
__device__ __forceinline__ T group_max(T v, GroupScratch<kThreads>* scratch) {
  return group_reduce<kThreads>(
      v, [](T a, T b) { return a < b ? b : a; }, [](T x, int m) { return shfl_xor(x, m); }, scratch);
}

// ------------------------------------------------------------------------------------------- ranking order
// Descending by key with NaN below every number, equal keys to the lower id: the CPU's RankBefore.
template <typename acc_t>
__device__ __forceinline__ bool rank_before(acc_t ka, int64_t a, acc_t kb, int64_t b) {
  const bool na = isnan(ka), nb = isnan(kb);
  if (na != nb) return nb;
  if (!na && ka != kb) return ka > kb;
  return a < b;
}

// A candidate of a top-k round: id < 0 means none.
template <typename acc_t>
struct Candidate {
  acc_t key;
  acc_t score;
  int32_t id;
};

template <typename acc_t>
__device__ __forceinline__ Candidate<acc_t> better(const Candidate<acc_t>& x, const Candidate<acc_t>& y) {
  if (y.id < 0) return x;
  if (x.id < 0) return y;
  return rank_before(x.key, x.id, y.key, y.id) ? x : y;
}

template <int kThreads, typename acc_t>
__device__ __forceinline__ Candidate<acc_t> group_best(Candidate<acc_t> c, GroupScratch<kThreads>* scratch) {
  return group_reduce<kThreads>(
      c, [](const Candidate<acc_t>& a, const Candidate<acc_t>& b) { return better(a, b); },
      [](const Candidate<acc_t>& x, int m) {
        return Candidate<acc_t>{shfl_xor(x.key, m), shfl_xor(x.score, m), shfl_xor(x.id, m)};
      },
      scratch);
}

// ------------------------------------------------------------------------------------------- router rows
// The row kernels of the routing and loss ops give each token row a warp (E <= kWarpPathMaxExperts, with
// kRowsPerWarpBlock rows per block) or a whole block.
constexpr int64_t kWarpPathMaxExperts = 256;
constexpr int kRowsPerWarpBlock = 4;

// Inside a row kernel: the scratch of this thread's row group, one per row of the block (kThreads == 32) or the
// block's one (declared here, so each kernel that calls this once gets its own shared array).
template <int kThreads>
__device__ __forceinline__ GroupScratch<kThreads>* row_group_scratch() {
  __shared__ GroupScratch<kThreads> scratch_rows[kThreads == 32 ? kRowsPerWarpBlock : 1];
  return &scratch_rows[kThreads == 32 ? threadIdx.y : 0];
}

// The grid-stride loop of a row kernel over token rows: for (row = first_row(); row < T; row += row_stride()).
__device__ __forceinline__ int64_t first_row() { return blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; }
__device__ __forceinline__ int64_t row_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.y; }

// launch(threads, block, grid) with threads an integral_constant of the threads per row: 32 or kBlockThreads.
template <typename Launch>
void launch_rows(int64_t T, int64_t E, Launch launch) {
  if (E <= kWarpPathMaxExperts) {
    const dim3 block(32, kRowsPerWarpBlock);
    launch(std::integral_constant<int, 32>{}, block, blocks_for((T + kRowsPerWarpBlock - 1) / kRowsPerWarpBlock, 1));
  } else {
    const dim3 block(kBlockThreads, 1);
    launch(std::integral_constant<int, kBlockThreads>{}, block, blocks_for(T, 1));
  }
}

// What the softmax of one row needs to score any of its logits: the CPU's score_row, special cases included.
template <typename acc_t>
struct RowStats {
  acc_t max_logit;
  acc_t sum;
  int has_nan;
  int64_t n_top;  // only when max_logit is infinite: how many logits share the mass
};

template <int kThreads, typename scalar_t, typename acc_t>
__device__ RowStats<acc_t> row_stats(const scalar_t* logits, int64_t E, bool softmax, GroupScratch<kThreads>* scratch) {
  RowStats<acc_t> st{dev_inf<acc_t>(), acc_t(0), 0, 0};
  if (!softmax) return st;
  acc_t mx = -dev_inf<acc_t>();
  int nan = 0;
  for (int64_t e = threadIdx.x; e < E; e += kThreads) {
    const acc_t v = static_cast<acc_t>(logits[e]);
    if (isnan(v)) {
      nan = 1;
    } else if (mx < v) {
      mx = v;
    }
  }
  st.max_logit = group_max<kThreads>(mx, scratch);
  st.has_nan = group_max<kThreads>(nan, scratch);
  if (st.has_nan) return st;
  if (isinf(st.max_logit)) {
    const bool pos = st.max_logit > 0;
    int64_t n = 0;
    for (int64_t e = threadIdx.x; e < E; e += kThreads) {
      const acc_t v = static_cast<acc_t>(logits[e]);
      n += (!pos || v == st.max_logit) ? 1 : 0;
    }
    st.n_top = group_sum<kThreads>(n, scratch);
    return st;
  }
  acc_t sum = 0;
  for (int64_t e = threadIdx.x; e < E; e += kThreads) sum += dev_exp(static_cast<acc_t>(logits[e]) - st.max_logit);
  st.sum = group_sum<kThreads>(sum, scratch);
  return st;
}

template <typename acc_t>
__device__ __forceinline__ acc_t score_of(acc_t v, const RowStats<acc_t>& st, bool softmax) {
  if (!softmax) return acc_t(1) / (acc_t(1) + dev_exp(-v));
  if (st.has_nan) return dev_nan<acc_t>();
  if (isinf(st.max_logit)) {
    const bool pos = st.max_logit > 0;
    return (!pos || v == st.max_logit) ? acc_t(1) / static_cast<acc_t>(st.n_top) : acc_t(0);
  }
  return dev_exp(v - st.max_logit) / st.sum;
}

}  // namespace torch_moe::cuda
