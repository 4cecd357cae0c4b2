// Which library computes the CPU kernels' float32 GEMM blocks: oneDNN (bundled in torch) or ATen's at::mm (MKL in
// torch's x86 wheels).
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

// "onednn" or "aten": the library float32 blocks use now.
std::string cpu_gemm_library();
// mode: "auto" (oneDNN where torch has it, this CPU runs it and a one-time probe finds it clearly faster than
// at::mm; the default, or what TORCH_MOE_CPU_GEMM says), "onednn" (an error if it is not available) or "aten".
void set_cpu_gemm_library(const std::string& mode);

// What "auto" measured (run once, at the first float32 GEMM block or the first call of this): single-threaded
// GFLOP/s of both libraries on one expert-sized GEMM (0 for oneDNN where it is not available).
struct GemmProbe {
  double onednn_gflops = 0;
  double aten_gflops = 0;
  bool onednn_faster = false;
};
GemmProbe cpu_gemm_probe();

// True when out = a @ b (out += a @ b when accumulate) for these operands goes to oneDNN: float32 operands, oneDNN
// chosen and available.
bool onednn_gemm_wanted(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

// out = a @ b (out += a @ b when accumulate) through oneDNN, on the calling thread's OpenMP team (one thread inside
// a parallel region). Only after onednn_gemm_wanted said yes.
void onednn_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate);

}  // namespace torch_moe::cpu
