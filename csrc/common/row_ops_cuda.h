// CUDA row movement kernels (the device twins of row_ops.h) and the device side of the data-dependent checks.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace torch_moe::cuda {

// out [num_rows, d]; out[index[t, j]] = w[t, j] * src[t] for every index in [0, num_rows) (w = 1 when absent),
// every other row zero. Each output row is written once; should two assignments name one row, the lower flat
// [T, k] position wins (callers check for duplicates first).
at::Tensor scatter_rows(const at::Tensor& src, const at::Tensor& index, const std::optional<at::Tensor>& weights,
                        int64_t num_rows);

// y [T, d] with y[t] = sum over j with index[t, j] in [0, rows) of w[t, j] * src[index[t, j]], accumulated in
// opmath in increasing j (deterministic, no atomics), stored in src's dtype.
at::Tensor gather_rows(const at::Tensor& src, const at::Tensor& index, const std::optional<at::Tensor>& weights);

// dots [T, k] in out_dtype: <a[t], src[index[t, j]]> accumulated in opmath (fixed reduction tree), 0 where the
// index is out of range.
at::Tensor row_dots(const at::Tensor& a, const at::Tensor& src, const at::Tensor& index, at::ScalarType out_dtype);

// The device versions of check_index_range and check_unique_destinations (same messages): host-side checks (a sync
// each), skipped unless value checks are on (see value_checks_enabled in cuda_utils.cuh).
void check_index_range(const char* op, const char* name, const at::Tensor& t, int64_t low, int64_t high,
                       const at::Tensor* rows_to_check = nullptr);
// The range check of slots and row indices, always on: check_index_range when value checks are on, else a small
// kernel whose device-side assert (CUDA_KERNEL_ASSERT, printing the CPU's message) fires on a value outside
// [low, high): no host sync, the same meaning as on the CPU, and the error surfaces at the next sync.
void assert_index_range(const char* op, const char* name, const at::Tensor& t, int64_t low, int64_t high,
                        const at::Tensor* rows_to_check = nullptr);
void check_unique_destinations(const char* op, const char* name, const at::Tensor& index, int64_t num_rows);

// Zeroes rows [offsets[E], rows) of out [rows, cols] reading offsets on the device (no host sync).
void zero_rows_past_end(at::Tensor& out, const at::Tensor& offsets);

}  // namespace torch_moe::cuda
