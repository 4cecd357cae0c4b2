// The CPU block cache (see cpu_cache.h): a c10::Allocator that keeps freed blocks, best fit by size.
#include "common/cpu_cache.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/accumulate.h>
#include <c10/util/Exception.h>

#include <pthread.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <string>

namespace torch_moe::cpu {
namespace {

// Sizes are rounded up to this so that blocks of nearly equal sizes serve each other.
constexpr size_t kGranule = size_t{64} << 10;
// A cached block serves a request at most 1/8 smaller than itself, so little memory idles inside used blocks.
constexpr size_t kSlackDivisor = 8;

int64_t default_limit() {
  // TORCH_MOE_CPU_CACHE_MB=0 turns the cache off for the whole process.
  if (const char* env = std::getenv("TORCH_MOE_CPU_CACHE_MB")) {
    char* end = nullptr;
    const long long mb = std::strtoll(env, &end, 10);
    TORCH_CHECK(end != env && *end == '\0' && mb >= 0,
                "torch_moe: TORCH_MOE_CPU_CACHE_MB must be a non-negative integer (MiB), got '", env, "'");
    return static_cast<int64_t>(mb) << 20;
  }
  return int64_t{1} << 30;
}

class CachingCpuAllocator;
CachingCpuAllocator& cache();

struct Block {
  void* ptr;
  size_t size;
};

class CachingCpuAllocator final : public c10::Allocator {
 public:
  CachingCpuAllocator() : limit_(default_limit()) {
    // A child forked while another thread held the lock (a DataLoader worker, say) would wait on it forever.
    pthread_atfork(nullptr, nullptr, [] { new (&cache().mutex_) std::mutex(); });
  }

  c10::DataPtr allocate(size_t nbytes) override {
    const c10::Device device(c10::DeviceType::CPU);
    if (nbytes == 0) return c10::DataPtr(nullptr, nullptr, nullptr, device);
    const size_t size = (nbytes + kGranule - 1) / kGranule * kGranule;
    Block* block = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first - size <= size / kSlackDivisor) {
        block = it->second;
        free_.erase(it);
        cached_ -= block->size;
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (block == nullptr) block = new Block{system_alloc(size), size};
    report(block, /*allocated=*/true);
    return c10::DataPtr(block->ptr, block, &CachingCpuAllocator::release, device);
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  CacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return CacheStats{static_cast<int64_t>(in_use_), static_cast<int64_t>(cached_), limit_, hits_, misses_};
  }

  void set_limit(int64_t bytes) {
    TORCH_CHECK(bytes >= 0, "torch_moe: the CPU cache limit must be >= 0 bytes, got ", bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = bytes;
    trim_locked(static_cast<size_t>(limit_));
  }

  void empty() {
    std::lock_guard<std::mutex> lock(mutex_);
    trim_locked(0);
  }

 private:
  static void release(void* ctx);

  // When the system refuses, the cached blocks (free by definition) are given back and the request tried once more.
  void* system_alloc(size_t size) {
    try {
      return c10::alloc_cpu(size);
    } catch (const c10::Error&) {
      empty();
      return c10::alloc_cpu(size);
    }
  }

  void give_back(Block* block) {
    report(block, /*allocated=*/false);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + block->size <= static_cast<size_t>(limit_)) {
        free_.emplace(block->size, block);
        cached_ += block->size;
        return;
      }
    }
    c10::free_cpu(block->ptr);
    delete block;
  }

  // Updates the in-use count and tells the profiler, as c10's default CPU allocator does, so that
  // profile_memory=True sees these blocks (the benchmarks' peak memory column depends on it).
  void report(Block* block, bool allocated) {
    size_t in_use = 0, reserved = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (allocated) {
        in_use_ += block->size;
      } else {
        in_use_ -= block->size;
      }
      in_use = in_use_;
      reserved = in_use_ + cached_;
    }
    if (c10::memoryProfilingEnabled()) {
      const auto bytes = static_cast<int64_t>(block->size);
      c10::reportMemoryUsageToProfiler(block->ptr, allocated ? bytes : -bytes, in_use, reserved,
                                       c10::Device(c10::DeviceType::CPU));
    }
  }

  void trim_locked(size_t keep_bytes) {
    while (cached_ > keep_bytes) {
      auto largest = std::prev(free_.end());
      Block* block = largest->second;
      free_.erase(largest);
      cached_ -= block->size;
      c10::free_cpu(block->ptr);
      delete block;
    }
  }

  std::mutex mutex_;
  std::multimap<size_t, Block*> free_;
  size_t cached_ = 0;
  size_t in_use_ = 0;
  int64_t limit_;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

// Never destroyed: tensors from the cache may be freed during interpreter teardown, after static destructors ran.
CachingCpuAllocator& cache() {
  static auto* allocator = new CachingCpuAllocator();
  return *allocator;
}

void CachingCpuAllocator::release(void* ctx) { cache().give_back(static_cast<Block*>(ctx)); }

}  // namespace

at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu(), "empty_cached: CPU tensors only");
  const auto dtype = c10::typeMetaToScalarType(options.dtype());
  const int64_t nbytes = c10::multiply_integers(sizes) * static_cast<int64_t>(c10::elementSize(dtype));
  if (nbytes < kCachedMinBytes) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &cache(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   c10::MemoryFormat::Contiguous);
}

at::Tensor zeros_cached(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return empty_cached(sizes, options).zero_();
}

CacheStats cache_stats() { return cache().stats(); }

void set_cache_limit(int64_t bytes) { cache().set_limit(bytes); }

void empty_cache() { cache().empty(); }

}  // namespace torch_moe::cpu
