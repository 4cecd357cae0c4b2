// The CUDA row movement kernels (row_ops_cuda.h) behind one type, the device twin of CpuRows (row_backend.h).
// Included by .cu files only.
#pragma once

#include <c10/cuda/CUDAGuard.h>

#include "common/row_ops_cuda.h"

namespace torch_moe {

struct CudaRows {
  using Guard = c10::cuda::CUDAGuard;
  static constexpr auto scatter_rows = &cuda::scatter_rows;
  static constexpr auto gather_rows = &cuda::gather_rows;
  static constexpr auto row_dots = &cuda::row_dots;
  static constexpr auto check_unique_destinations = &cuda::check_unique_destinations;
  // Slots and row indices: a device-side assert, or the host check when value checks are on.
  static constexpr auto check_index_range = &cuda::assert_index_range;
};

}  // namespace torch_moe
