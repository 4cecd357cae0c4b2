// The CPU row movement kernels (row_ops.h) behind one type. An op whose CPU and CUDA kernels differ only in these
// calls and a device guard is written once, as a template over such a type (CpuRows here, CudaRows in
// row_backend_cuda.h), and instantiated by each backend's file.
#pragma once

#include <c10/core/Device.h>

#include "common/checks.h"
#include "common/row_ops.h"

namespace torch_moe {

// The CPU needs no device guard.
struct NoDeviceGuard {
  explicit NoDeviceGuard(c10::Device) {}
};

struct CpuRows {
  using Guard = NoDeviceGuard;
  static constexpr auto scatter_rows = &cpu::scatter_rows;
  static constexpr auto gather_rows = &cpu::gather_rows;
  static constexpr auto row_dots = &cpu::row_dots;
  static constexpr auto check_unique_destinations = &cpu::check_unique_destinations;
  // Reads the values: CPU tensors only.
  static constexpr auto check_index_range = &::torch_moe::check_index_range;
};

}  // namespace torch_moe
