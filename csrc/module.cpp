// The pybind11 face of torch_moe._C: build information, the CPU block cache's controls, the grouped GEMM path
// counters and the switch of the host-side CUDA value checks (the ops register themselves on load).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <string>

#include "common/checks.h"
#include "common/cpu_cache.h"
#include "common/cpu_gemm.h"
#include "common/gemm_paths.h"

#ifndef TORCH_MOE_WITH_CUDA
#define TORCH_MOE_WITH_CUDA 0
#endif

namespace torch_moe {
#if TORCH_MOE_WITH_CUDA
int cuda_runtime_version();  // defined in cuda/build_info.cu
namespace cuda {
const char* last_grouped_mm_path();  // defined in experts/grouped_mm_cuda.cu
}  // namespace cuda
#endif
}  // namespace torch_moe

PYBIND11_MODULE(_C, m) {
  m.doc() = "torch_moe C++/CUDA extension: registers torch.ops.torch_moe.* and reports how it was built";
  m.def("torch_version", [] { return std::string(TORCH_MOE_TORCH_VERSION); },
        "The torch version this extension was compiled against.");
  m.def("with_cuda", [] { return static_cast<bool>(TORCH_MOE_WITH_CUDA); }, "Whether CUDA kernels were compiled in.");
  m.def("cuda_arch_list", [] { return std::string(TORCH_MOE_CUDA_ARCHS); },
        "The CUDA architectures compiled for (empty without CUDA).");
  m.def("cuda_runtime_version", [] {
#if TORCH_MOE_WITH_CUDA
    return torch_moe::cuda_runtime_version();
#else
    return 0;
#endif
  }, "CUDART_VERSION the CUDA code was compiled with (0 without CUDA).");
  m.def("last_grouped_mm_path", [] {
#if TORCH_MOE_WITH_CUDA
    return std::string(torch_moe::cuda::last_grouped_mm_path());
#else
    return std::string();
#endif
  }, "Path of this thread's last CUDA grouped_mm-family call: grouped_mm or per_expert_loop (empty before any).");
  m.def("gemm_path_counts", &torch_moe::gemm_path_counts,
        "Process-wide counts of grouped GEMMs per (op, pass, path) since the last reset (common/gemm_paths.h).");
  m.def("reset_gemm_path_counts", &torch_moe::reset_gemm_path_counts, "Zero the grouped GEMM path counts.");
  m.def("set_cuda_value_checks", &torch_moe::set_cuda_value_checks,
        "Host-side CUDA value checks: 1 on, 0 off, -1 as TORCH_MOE_CUDA_CHECKS says.");
  m.def("cuda_value_checks_requested", &torch_moe::cuda_value_checks_requested,
        "Whether host-side CUDA value checks are asked for.");
  m.def("cpu_gemm_library", &torch_moe::cpu::cpu_gemm_library,
        "The library of the CPU kernels' float32 GEMM blocks now (common/cpu_gemm.h).");
  m.def("set_cpu_gemm_library", &torch_moe::cpu::set_cpu_gemm_library,
        "Choose the library of the CPU kernels' float32 GEMM blocks: auto, onednn, aten or torch_moe.");
  m.def("cpu_gemm_probe", [] {
    const auto probe = torch_moe::cpu::cpu_gemm_probe();
    return std::map<std::string, double>{{"onednn_gflops", probe.onednn_gflops},
                                         {"aten_gflops", probe.aten_gflops},
                                         {"onednn_faster", probe.onednn_faster ? 1.0 : 0.0},
                                         {"few_rows_torch_moe_gflops", probe.few_rows_torch_moe_gflops},
                                         {"few_rows_library_gflops", probe.few_rows_library_gflops},
                                         {"torch_moe_faster", probe.torch_moe_faster ? 1.0 : 0.0}};
  }, "What set_cpu_gemm_library('auto') measured: single-threaded GFLOP/s of oneDNN, at::mm and torch_moe's kernel.");
  m.def("cpu_cache_stats", [] {
    const auto s = torch_moe::cpu::cache_stats();
    return std::map<std::string, int64_t>{{"in_use_bytes", s.in_use_bytes}, {"cached_bytes", s.cached_bytes},
                                          {"limit_bytes", s.limit_bytes}, {"hits", s.hits}, {"misses", s.misses}};
  }, "Counters of the CPU block cache (see csrc/common/cpu_cache.h).");
  m.def("set_cpu_cache_limit", &torch_moe::cpu::set_cache_limit, "Most free bytes the CPU block cache keeps.");
  m.def("empty_cpu_cache", &torch_moe::cpu::empty_cache, "Return the CPU block cache's free blocks to the system.");
}
