// Argument checks shared by the CPU and CUDA kernels of dispatch, combine, permute and unpermute.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/checks.h"

namespace torch_moe {

// expert_ids and slots [T, k] int64 on one device, slots in [-1, capacity) by the backend's range check (on the host
// on the CPU, a device-side assert on CUDA); the range of the ids of kept slots is each backend's to check.
inline void check_slot_plan(const char* op, const at::Tensor& expert_ids, const at::Tensor& slots, int64_t capacity,
                            IndexRangeCheck check_range) {
  check_dtype(op, "expert_ids", expert_ids, at::kLong);
  check_dim(op, "expert_ids", expert_ids, 2, "[T, k]");
  check_dtype(op, "slots", slots, at::kLong);
  check_same_shape(op, "slots", slots, "expert_ids", expert_ids);
  check_same_device(op, {{"expert_ids", &expert_ids}, {"slots", &slots}});
  check_range(op, "slots", slots, -1, capacity, nullptr);
}

// row_index [T, k] int64 in [-1, num_rows), by the backend's range check as above.
inline void check_row_index(const char* op, const at::Tensor& row_index, int64_t num_rows, IndexRangeCheck check_range) {
  check_dtype(op, "row_index", row_index, at::kLong);
  check_dim(op, "row_index", row_index, 2, "[T, k]");
  check_range(op, "row_index", row_index, -1, num_rows, nullptr);
}

inline void check_weights(const char* op, const at::Tensor& weights, const at::Tensor& index, const char* index_name) {
  check_floating(op, "weights", weights);
  check_dim(op, "weights", weights, 2, "[T, k]");
  check_same_shape(op, "weights", weights, index_name, index);
  check_same_device(op, {{index_name, &index}, {"weights", &weights}});
}

inline void check_tokens(const char* op, const char* name, const at::Tensor& t, int64_t T, int64_t d) {
  check_floating(op, name, t);
  check_dim(op, name, t, 2, "[T, d]");
  check_size(op, name, t, 0, T, "tokens");
  if (d >= 0) check_size(op, name, t, 1, d, "model width");
}

inline void check_buffer(const char* op, const char* name, const at::Tensor& buffer) {
  check_floating(op, name, buffer);
  check_dim(op, name, buffer, 3, "[E, C, d]");
}

}  // namespace torch_moe
