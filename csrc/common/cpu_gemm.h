// Which library computes the CPU kernels' float32 GEMM blocks: oneDNN (bundled in torch), ATen's at::mm (MKL in
// torch's x86 wheels) or, for GEMMs of few rows, torch_moe's own kernel (common/small_gemm_cpu.h).
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace torch_moe::cpu {

// Why a second library: torch's float32 at::mm calls MKL, which on some CPUs reaches half the throughput of the
// oneDNN inside torch (on the 2-core AMD VM of benchmarks/NOTES.md section 19: 112 against 240 GFLOP/s on one core,
// consistent with MKL running 256-bit kernels on a CPU with full-width AVX-512). torch exposes no float32 oneDNN
// GEMM on dense tensors except the exported at::native::mkldnn_matmul, which is found at run time (a torch without
// it, or a CPU it refuses, falls back to at::mm) rather than linked, so that no torch build fails to load this
// extension.

// A float32 GEMM whose smallest side (an expert's rows, or the rows summed over in its weight gradient) is at most
// this many is a few-row GEMM: per-call setup is a large share of its time. On the AMD VM of benchmarks/NOTES.md
// section 20, torch_moe's kernel beat or matched oneDNN on every GEMM of the grouped ops up to 128 rows (and MKL,
// which takes them below 4 rows), and lost to oneDNN on a Mixtral-sized input gradient from 256 rows on.
constexpr int64_t kFewRows = 128;

// The library float32 blocks use now: "onednn", "aten" or "torch_moe" when one library takes every block, else
// "torch_moe+onednn" or "torch_moe+aten" (few-row GEMMs on torch_moe's kernel, the others on the second).
std::string cpu_gemm_library();
// mode: "auto" (the default, or what TORCH_MOE_CPU_GEMM says): oneDNN where torch has it, this CPU runs it and a
// one-time probe finds it clearly faster than at::mm, else at::mm; few-row GEMMs on torch_moe's kernel where this
// CPU runs it and the probe finds it faster than that library on a 16-row GEMM. "onednn" / "aten": that library
// for every block; "torch_moe": torch_moe's kernel for every block (an error where it is not available).
void set_cpu_gemm_library(const std::string& mode);

// What "auto" measured (run once, at the first float32 GEMM block or the first call of this), single-threaded
// GFLOP/s: both libraries on one expert-sized GEMM (256 x 512 x 256; 0 for oneDNN where it is not available), then
// torch_moe's kernel and the library "auto" picked on a 16-row one (16 x 512 x 256; 0 where the kernel is not
// available).
struct GemmProbe {
  double onednn_gflops = 0;
  double aten_gflops = 0;
  bool onednn_faster = false;
  double few_rows_torch_moe_gflops = 0;
  double few_rows_library_gflops = 0;
  bool torch_moe_faster = false;
};
GemmProbe cpu_gemm_probe();

// True when out = a @ b for these operands goes to torch_moe's kernel (small_gemm): float32 operands, a few-row
// GEMM (or every GEMM in mode "torch_moe") and the kernel chosen.
bool small_gemm_wanted(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

// True when out = a @ b (out += a @ b when accumulate) for these operands goes to oneDNN: float32 operands, oneDNN
// chosen and available.
bool onednn_gemm_wanted(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

// out = a @ b (out += a @ b when accumulate) through oneDNN, on the calling thread's OpenMP team (one thread inside
// a parallel region). Only after onednn_gemm_wanted said yes.
void onednn_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate);

}  // namespace torch_moe::cpu
