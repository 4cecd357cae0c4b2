// Row movement kernels shared by dispatch/combine (capacity mode) and permute/unpermute (dropless):
// both are "move token rows to/from flat row indices", so one CPU implementation serves both.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace torch_moe::cpu {

// Rows per at::parallel_for task so that a task moves at least ~32K elements of row_elems each.
int64_t grain_for(int64_t row_elems);

// out [num_rows, d] zero-filled; out[index[t, j]] = w[t, j] * src[t] for every index >= 0 (w = 1 when absent).
// Destinations must be distinct (callers check). Computed in opmath, stored in src's dtype.
at::Tensor scatter_rows(const at::Tensor& src, const at::Tensor& index, const std::optional<at::Tensor>& weights,
                        int64_t num_rows);

// y [T, d] with y[t] = sum over j with index[t, j] >= 0 of w[t, j] * src[index[t, j]], accumulated in opmath
// in increasing j (deterministic), stored in src's dtype.
at::Tensor gather_rows(const at::Tensor& src, const at::Tensor& index, const std::optional<at::Tensor>& weights);

// dots [T, k] in out_dtype: <a[t], src[index[t, j]]> accumulated in opmath, 0 where index < 0.
at::Tensor row_dots(const at::Tensor& a, const at::Tensor& src, const at::Tensor& index, at::ScalarType out_dtype);

// Refuses two assignments that write the same destination row (their gradients would collide).
void check_unique_destinations(const char* op, const char* name, const at::Tensor& index, int64_t num_rows);

}  // namespace torch_moe::cpu
