// Which expert-compute path the CUDA grouped_mm family took last (read by the Python layer to report it).
#pragma once

namespace torch_moe::cuda {

// "grouped_mm" (torch's grouped GEMM), "per_expert_loop" (one GEMM per non-empty expert, offsets read on the host)
// or "" before the first CUDA call; per thread, set by every CUDA grouped_mm-family call.
const char* last_grouped_mm_path();

}  // namespace torch_moe::cuda
