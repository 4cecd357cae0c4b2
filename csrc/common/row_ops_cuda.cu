// CUDA row movement kernels (see row_ops_cuda.h): grid-stride loops over (row, 16-byte chunk) with int64 index
// math, and the device side of the index checks.
#include "common/row_ops_cuda.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdio>
#include <cstring>
#include <limits>

#include "common/checks.h"
#include "common/cuda_utils.cuh"

namespace torch_moe::cuda {

bool value_checks_enabled() {
  return cuda_value_checks_requested() &&
         c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
}

int sm_count() {
  constexpr int kMaxDevices = 64;
  static int cached[kMaxDevices] = {};
  const int device = c10::cuda::current_device();
  if (device >= kMaxDevices) return 132;
  if (cached[device] == 0) {
    int count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cached[device] = count;
  }
  return cached[device];
}

namespace {

// first_bad = the lowest flat index whose value is outside [low, high) (rows masked out are skipped).
__global__ void find_out_of_range_kernel(const int64_t* values, int64_t n, int64_t per_row, const bool* keep,
                                         int64_t low, int64_t high, unsigned long long* first_bad) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (keep != nullptr && !keep[i / per_row]) continue;
    const int64_t v = values[i];
    if (v < low || v >= high) atomicMin(first_bad, static_cast<unsigned long long>(i));
  }
}

// The names a device-side assert prints, by value in the kernel's parameters (no host pointer reaches the device).
struct IndexCheckLabel {
  char op[48];
  char name[24];
};

IndexCheckLabel make_label(const char* op, const char* name) {
  IndexCheckLabel label{};
  std::strncpy(label.op, op, sizeof(label.op) - 1);
  std::strncpy(label.name, name, sizeof(label.name) - 1);
  return label;
}

// Every value (of rows not masked out) in [low, high), else a device-side assert with the CPU's message: the kernel
// stops the context as ATen's indexing kernels do, and the error surfaces at the next sync.
__global__ void assert_in_range_kernel(const int64_t* values, int64_t n, int64_t per_row, const bool* keep,
                                       int64_t low, int64_t high, IndexCheckLabel label) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (keep != nullptr && !keep[i / per_row]) continue;
    const int64_t v = values[i];
    const bool in_range = v >= low && v < high;
    if (!in_range) {
      printf("torch_moe.%s: argument '%s' must hold values in [%lld, %lld), got %lld at flat index %lld\n", label.op,
             label.name, static_cast<long long>(low), static_cast<long long>(high), static_cast<long long>(v),
             static_cast<long long>(i));
    }
    CUDA_KERNEL_ASSERT(in_range);
  }
}

// owner[dest] = the lowest flat position a with index[a] == dest (atomicMin: the result is order-independent).
__global__ void owner_kernel(const int64_t* index, int64_t n, int64_t num_rows, unsigned long long* owner) {
  for (int64_t a = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; a < n;
       a += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t dest = index[a];
    if (dest >= 0 && dest < num_rows) atomicMin(owner + dest, static_cast<unsigned long long>(a));
  }
}

// The lowest position that is not its destination's owner: the CPU's first duplicate in scanning order.
__global__ void first_duplicate_kernel(const int64_t* index, int64_t n, int64_t num_rows,
                                       const unsigned long long* owner, unsigned long long* first_dup) {
  for (int64_t a = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; a < n;
       a += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t dest = index[a];
    if (dest >= 0 && dest < num_rows && owner[dest] != static_cast<unsigned long long>(a)) {
      atomicMin(first_dup, static_cast<unsigned long long>(a));
    }
  }
}

at::Tensor owners(const at::Tensor& index, int64_t num_rows) {
  auto owner = at::full({num_rows}, -1, index.options());  // all bits set: kNone as unsigned
  const int64_t n = index.numel();
  if (n > 0 && num_rows > 0) {
    owner_kernel<<<blocks_for(n), kBlockThreads, 0, current_stream()>>>(
        index.data_ptr<int64_t>(), n, num_rows, reinterpret_cast<unsigned long long*>(owner.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return owner;
}

template <typename scalar_t, typename opmath_t, int kVec>
__global__ void scatter_rows_kernel(const scalar_t* __restrict__ src, const int64_t* __restrict__ owner,
                                    const opmath_t* __restrict__ weights, int64_t k, int64_t num_rows, int64_t d,
                                    scalar_t* __restrict__ out) {
  using V = Vec<scalar_t, kVec>;
  const int64_t chunks = d / kVec;
  const int64_t total = num_rows * chunks;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / chunks, c = i - r * chunks;
    const int64_t a = owner[r];
    V value;
    if (a < 0) {
#pragma unroll
      for (int v = 0; v < kVec; ++v) value.v[v] = scalar_t(0);
    } else {
      value = reinterpret_cast<const V*>(src + (a / k) * d)[c];
      if (weights != nullptr) {
        const opmath_t scale = weights[a];
#pragma unroll
        for (int v = 0; v < kVec; ++v) value.v[v] = static_cast<scalar_t>(scale * static_cast<opmath_t>(value.v[v]));
      }
    }
    reinterpret_cast<V*>(out + r * d)[c] = value;
  }
}

template <typename scalar_t, typename opmath_t, int kVec>
__global__ void gather_rows_kernel(const scalar_t* __restrict__ src, int64_t src_rows, const int64_t* __restrict__ index,
                                   const opmath_t* __restrict__ weights, int64_t T, int64_t k, int64_t d,
                                   scalar_t* __restrict__ out) {
  using V = Vec<scalar_t, kVec>;
  const int64_t chunks = d / kVec;
  const int64_t total = T * chunks;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / chunks, c = i - t * chunks;
    opmath_t acc[kVec];
#pragma unroll
    for (int v = 0; v < kVec; ++v) acc[v] = opmath_t(0);
    // Fixed order j = 0, 1, ...: the sum of a token's contributions is the same on every run.
    for (int64_t j = 0; j < k; ++j) {
      const int64_t from = index[t * k + j];
      if (from < 0 || from >= src_rows) continue;
      const opmath_t scale = weights == nullptr ? opmath_t(1) : weights[t * k + j];
      const V row = reinterpret_cast<const V*>(src + from * d)[c];
#pragma unroll
      for (int v = 0; v < kVec; ++v) acc[v] += scale * static_cast<opmath_t>(row.v[v]);
    }
    V value;
#pragma unroll
    for (int v = 0; v < kVec; ++v) value.v[v] = static_cast<scalar_t>(acc[v]);
    reinterpret_cast<V*>(out + t * d)[c] = value;
  }
}

// One warp per (t, j): lanes stride over the row, then a shuffle tree (fixed order).
template <typename scalar_t, typename opmath_t>
__global__ void row_dots_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ src, int64_t src_rows,
                                const int64_t* __restrict__ index, int64_t pairs, int64_t k, int64_t d,
                                opmath_t* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  const int64_t warps_per_grid = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32; p < pairs;
       p += warps_per_grid) {
    const int64_t from = index[p];
    opmath_t dot = 0;
    if (from >= 0 && from < src_rows) {
      const scalar_t* arow = a + (p / k) * d;
      const scalar_t* row = src + from * d;
      for (int64_t c = lane; c < d; c += 32) dot += static_cast<opmath_t>(arow[c]) * static_cast<opmath_t>(row[c]);
    }
#pragma unroll
    for (int mask = 16; mask > 0; mask >>= 1) dot += shfl_xor(dot, mask);
    if (lane == 0) out[p] = dot;
  }
}

at::Tensor weights_as(const std::optional<at::Tensor>& weights, at::ScalarType dtype) {
  if (!weights.has_value() || !weights->defined()) return at::Tensor();
  return weights->to(dtype).contiguous();
}

// What both range kernels read: the index tensor contiguous, its values per row, and the rows to check (mask).
struct RangeOperands {
  at::Tensor t;
  int64_t per_row;
  at::Tensor mask;
  RangeOperands(const at::Tensor& t_in, const at::Tensor* rows_to_check) : t(t_in.contiguous()) {
    const int64_t rows = t.dim() > 0 ? t.size(0) : 1;
    per_row = rows > 0 ? t.numel() / rows : 1;
    if (rows_to_check != nullptr && rows_to_check->defined()) mask = rows_to_check->contiguous();
  }
  const bool* mask_ptr() const { return mask.defined() ? mask.data_ptr<bool>() : nullptr; }
};

}  // namespace

void check_index_range(const char* op, const char* name, const at::Tensor& t_in, int64_t low, int64_t high,
                       const at::Tensor* rows_to_check) {
  if (t_in.numel() == 0 || !t_in.is_cuda() || !value_checks_enabled()) return;
  const c10::cuda::CUDAGuard guard(t_in.device());
  const RangeOperands in(t_in, rows_to_check);
  const auto& t = in.t;
  auto first_bad = at::full({1}, -1, t.options());
  find_out_of_range_kernel<<<blocks_for(t.numel()), kBlockThreads, 0, current_stream()>>>(
      t.data_ptr<int64_t>(), t.numel(), in.per_row, in.mask_ptr(), low, high,
      reinterpret_cast<unsigned long long*>(first_bad.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t bad = first_bad.item<int64_t>();  // -1 (all bits set) when every value is in range
  if (bad < 0) return;
  const int64_t v = t.reshape(-1)[bad].item<int64_t>();
  TORCH_MOE_CHECK(false, "torch_moe.{}: argument '{}' must hold values in [{}, {}), got {} at flat index {}", op, name,
                  low, high, v, bad);
}

void assert_index_range(const char* op, const char* name, const at::Tensor& t_in, int64_t low, int64_t high,
                        const at::Tensor* rows_to_check) {
  if (t_in.numel() == 0 || !t_in.is_cuda()) return;
  if (value_checks_enabled()) {
    // Asked for host-side checks: the CPU's user error, at the cost of a sync.
    check_index_range(op, name, t_in, low, high, rows_to_check);
    return;
  }
  const c10::cuda::CUDAGuard guard(t_in.device());
  const RangeOperands in(t_in, rows_to_check);
  const auto& t = in.t;
  assert_in_range_kernel<<<blocks_for(t.numel()), kBlockThreads, 0, current_stream()>>>(
      t.data_ptr<int64_t>(), t.numel(), in.per_row, in.mask_ptr(), low, high,
      make_label(op, name));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_unique_destinations(const char* op, const char* name, const at::Tensor& index_in, int64_t num_rows) {
  if (index_in.numel() == 0 || !index_in.is_cuda() || !value_checks_enabled()) return;
  const c10::cuda::CUDAGuard guard(index_in.device());
  const auto index = index_in.contiguous();
  const auto owner = owners(index, num_rows);
  auto first_dup = at::full({1}, -1, index.options());
  const int64_t n = index.numel();
  first_duplicate_kernel<<<blocks_for(n), kBlockThreads, 0, current_stream()>>>(
      index.data_ptr<int64_t>(), n, num_rows, reinterpret_cast<const unsigned long long*>(owner.data_ptr<int64_t>()),
      reinterpret_cast<unsigned long long*>(first_dup.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t dup = first_dup.item<int64_t>();
  if (dup < 0) return;
  const int64_t dest = index.reshape(-1)[dup].item<int64_t>();
  const int64_t first = owner[dest].item<int64_t>();
  TORCH_MOE_CHECK(false,
                  "torch_moe.{}: argument '{}' gives assignments {} and {} (flat [T, k] positions) the same "
                  "row {}; every row belongs to one assignment",
                  op, name, first, dup, dest);
}

at::Tensor scatter_rows(const at::Tensor& src_in, const at::Tensor& index_in, const std::optional<at::Tensor>& weights,
                        int64_t num_rows) {
  const c10::cuda::CUDAGuard guard(src_in.device());
  const auto src = src_in.contiguous();
  const auto index = index_in.contiguous();
  const int64_t d = src.size(1), k = index.size(1);
  auto out = at::empty({num_rows, d}, src.options());
  if (num_rows == 0 || d == 0) return out;
  // Destination-major: each output row is written exactly once (copied or zeroed) from its owning assignment.
  const auto owner = owners(index, num_rows);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "torch_moe_scatter_rows_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto w = weights_as(weights, c10::CppTypeToScalarType<opmath_t>::value);
    const opmath_t* wp = w.defined() ? w.data_ptr<opmath_t>() : nullptr;
    const scalar_t* sp = src.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t* owner_p = owner.data_ptr<int64_t>();
    constexpr int kWide = 16 / sizeof(scalar_t);
    if (vector_width<scalar_t>(d, {sp, op}) == kWide) {
      scatter_rows_kernel<scalar_t, opmath_t, kWide><<<blocks_for(num_rows * (d / kWide)), kBlockThreads, 0, stream>>>(
          sp, owner_p, wp, k, num_rows, d, op);
    } else {
      scatter_rows_kernel<scalar_t, opmath_t, 1><<<blocks_for(num_rows * d), kBlockThreads, 0, stream>>>(
          sp, owner_p, wp, k, num_rows, d, op);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor gather_rows(const at::Tensor& src_in, const at::Tensor& index_in, const std::optional<at::Tensor>& weights) {
  const c10::cuda::CUDAGuard guard(src_in.device());
  const auto src = src_in.contiguous();
  const auto index = index_in.contiguous();
  const int64_t T = index.size(0), k = index.size(1), d = src.size(1);
  auto out = at::empty({T, d}, src.options());
  if (T == 0 || d == 0) return out.zero_();
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "torch_moe_gather_rows_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto w = weights_as(weights, c10::CppTypeToScalarType<opmath_t>::value);
    const opmath_t* wp = w.defined() ? w.data_ptr<opmath_t>() : nullptr;
    const scalar_t* sp = src.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t* ip = index.data_ptr<int64_t>();
    const int64_t src_rows = src.size(0);
    constexpr int kWide = 16 / sizeof(scalar_t);
    if (vector_width<scalar_t>(d, {sp, op}) == kWide) {
      gather_rows_kernel<scalar_t, opmath_t, kWide><<<blocks_for(T * (d / kWide)), kBlockThreads, 0, stream>>>(
          sp, src_rows, ip, wp, T, k, d, op);
    } else {
      gather_rows_kernel<scalar_t, opmath_t, 1><<<blocks_for(T * d), kBlockThreads, 0, stream>>>(sp, src_rows, ip, wp,
                                                                                                 T, k, d, op);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor row_dots(const at::Tensor& a_in, const at::Tensor& src_in, const at::Tensor& index_in,
                    at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(a_in.device());
  const auto a = a_in.contiguous();
  const auto src = src_in.contiguous().to(a.scalar_type());
  const auto index = index_in.contiguous();
  const int64_t T = index.size(0), k = index.size(1), d = a.size(1);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "torch_moe_row_dots_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    auto acc = at::zeros({T, k}, a.options().dtype(c10::CppTypeToScalarType<opmath_t>::value));
    const int64_t pairs = T * k;
    if (pairs > 0 && d > 0) {
      constexpr int kWarpsPerBlock = kBlockThreads / 32;
      const unsigned int blocks = blocks_for((pairs + kWarpsPerBlock - 1) / kWarpsPerBlock, 1);
      row_dots_kernel<scalar_t, opmath_t><<<blocks, kBlockThreads, 0, current_stream()>>>(
          a.data_ptr<scalar_t>(), src.data_ptr<scalar_t>(), src.size(0), index.data_ptr<int64_t>(), pairs, k, d,
          acc.data_ptr<opmath_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    out = acc.to(out_dtype);
  });
  return out;
}

void zero_rows_past_end(at::Tensor& out, const at::Tensor& offsets) {
  // rows [offsets[E], N): a mask built on the device, so no host read of offsets[E].
  const int64_t N = out.size(0);
  if (N == 0 || out.size(1) == 0) return;
  const auto end = offsets.narrow(0, offsets.size(0) - 1, 1);
  const auto past = at::arange(N, offsets.options()).ge(end).unsqueeze(1);
  out.masked_fill_(past, 0);
}

}  // namespace torch_moe::cuda
