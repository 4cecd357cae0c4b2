// The process-wide GEMM path counters of gemm_paths.h: a map under a mutex, touched once per grouped GEMM.
#include "common/gemm_paths.h"

#include <mutex>

namespace torch_moe {
namespace {

std::mutex& counts_mutex() {
  static std::mutex m;
  return m;
}

std::map<std::tuple<std::string, std::string, std::string>, int64_t>& counts() {
  static auto* c = new std::map<std::tuple<std::string, std::string, std::string>, int64_t>();  // never destroyed:
  return *c;  // a late autograd thread may still record during interpreter shutdown
}

}  // namespace

void record_gemm_path(GemmSite site, const char* path) {
  const std::lock_guard<std::mutex> lock(counts_mutex());
  ++counts()[{site.op, site.pass, path}];
}

std::map<std::tuple<std::string, std::string, std::string>, int64_t> gemm_path_counts() {
  const std::lock_guard<std::mutex> lock(counts_mutex());
  return counts();
}

void reset_gemm_path_counts() {
  const std::lock_guard<std::mutex> lock(counts_mutex());
  counts().clear();
}

}  // namespace torch_moe
