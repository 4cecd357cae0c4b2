// Process-wide counts of which GEMM path each grouped GEMM of the grouped_mm family took, per (op, pass, path).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <tuple>

namespace torch_moe {

// Where a grouped GEMM runs: the public op ("grouped_mm", "gather_grouped_mm", "gather_grouped_glu",
// "grouped_mm_unpermute") and the pass ("forward", "backward_input": the activation gradient, "backward_weight":
// the weight gradient).
struct GemmSite {
  const char* op;
  const char* pass;
};

// Paths: "grouped_mm" (CUDA, torch's grouped GEMM), "per_expert_loop" (CUDA, one GEMM per non-empty expert),
// "cpu_loop" (the CPU kernels' per-segment GEMMs).
constexpr const char* kPathGroupedMm = "grouped_mm";
constexpr const char* kPathPerExpertLoop = "per_expert_loop";
constexpr const char* kPathCpuLoop = "cpu_loop";

// Adds one to the count of (site.op, site.pass, path): one per grouped GEMM (a gated op's two projections count
// two). Process-wide, not per thread, because autograd runs a CUDA backward on its own thread.
void record_gemm_path(GemmSite site, const char* path);
std::map<std::tuple<std::string, std::string, std::string>, int64_t> gemm_path_counts();
void reset_gemm_path_counts();

}  // namespace torch_moe
