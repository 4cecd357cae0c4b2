// A cache of large CPU blocks for the outputs and scratch tensors of this library's CPU kernels.
//
// glibc serves blocks of 32 MiB and more (and, until its threshold adapts, smaller ones) with fresh mmaps, so every
// such output is page-faulted and zeroed by the kernel on first touch, and that costs more than the copy or GEMM that
// fills it (benchmarks/NOTES.md, section 9). A training step allocates the same sizes every time, so blocks freed by
// one step are kept here and handed to the next, as the CUDA caching allocator does on the GPU. Only tensors this
// library allocates come from here; the rest of the process is untouched.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace torch_moe::cpu {

// Uninitialised CPU tensor [sizes] (contiguous). Blocks of at least kCachedMinBytes come from the cache (or are
// allocated and later returned to it); smaller ones from at::empty.
at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options);
at::Tensor zeros_cached(at::IntArrayRef sizes, const at::TensorOptions& options);

inline constexpr int64_t kCachedMinBytes = int64_t{1} << 20;

struct CacheStats {
  int64_t in_use_bytes;   // blocks from the cache held by live tensors
  int64_t cached_bytes;   // free blocks kept for reuse
  int64_t limit_bytes;    // most free bytes kept; a freed block beyond it goes back to the system
  int64_t hits;           // allocations served by a cached block
  int64_t misses;         // allocations that had to ask the system
};

CacheStats cache_stats();
// Sets the limit on free bytes kept (0 keeps none) and frees cached blocks above it, largest first.
void set_cache_limit(int64_t bytes);
// Returns every free cached block to the system (blocks in use are not affected).
void empty_cache();

}  // namespace torch_moe::cpu
