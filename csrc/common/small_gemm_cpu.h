// torch_moe's own float32 GEMM for the few-row products of small experts (AVX-512, one thread, no per-call setup).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace torch_moe::cpu {

// Why a kernel of our own: an expert that receives ~16 rows (OLMoE-mini at T=128: 64 experts, top-8) makes each of
// its GEMMs 16 x 512 x 256, ~20 us of arithmetic, and oneDNN's matmul spends another ~11 us per call building
// descriptors, looking up its primitive cache, allocating a scratchpad and packing b (benchmarks/NOTES.md section
// 20). This kernel has no setup: register tiles of rows x 16-float vectors, b read in place, every product summed
// over k in order, so a result does not depend on how the caller cut the GEMM into blocks either.

// True when this CPU (and its OS) runs AVX-512F and AVX-512VL code; the kernel needs both.
bool small_gemm_available();

// C = A @ B (C += A @ B when accumulate) in float32, C [m, n], A [m, k], B [k, n], by element strides:
// C(i, j) = c[i * c_row + j * c_col], A(i, p) = a[i * a_row + p * a_col], B(p, j) = b[p * b_row + j] (B's rows
// contiguous). Only after small_gemm_available().
void small_gemm_f32(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_row, int64_t a_col, const float* b,
                    int64_t b_row, float* c, int64_t c_row, int64_t c_col, bool accumulate);

// out = a @ b (out += a @ b when accumulate) for 2-D float32 CPU tensors of any strides, through small_gemm_f32:
// when b's rows are not contiguous it computes out^T = b^T @ a^T instead, packing a^T when a's columns are not
// contiguous either. Only after small_gemm_available().
void small_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate);

}  // namespace torch_moe::cpu
