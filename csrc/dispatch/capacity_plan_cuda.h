// Device planning steps shared by the CUDA kernels of capacity_plan and permute (the dropless plan).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace torch_moe::cuda {

// Stable ascending sort of int64 keys [n] -> (sorted keys, permutation), both contiguous.
std::tuple<at::Tensor, at::Tensor> stable_sort(const at::Tensor& keys);

// For sorted position p of expert e = sorted_keys[p] (keys outside [0, E) skipped), its rank inside the expert is
// p - (counts[0] + ... + counts[e - 1]). Capacity plan: out[flat_of_sorted[p]] = rank when rank < capacity.
// Dropless plan (capacity < 0): out[flat_of_sorted[p]] = p.
void assign(const at::Tensor& sorted_keys, const at::Tensor& flat_of_sorted, const at::Tensor& counts, int64_t E,
            int64_t capacity, at::Tensor& out);

}  // namespace torch_moe::cuda
