// The float32 GEMM block library switch of the CPU kernels (see the header for why oneDNN).
#include "common/cpu_gemm.h"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>

#include "common/checks.h"
#include "common/fixed_tasks_cpu.h"
#include "common/small_gemm_cpu.h"

namespace torch_moe::cpu {
namespace {

// at::native::mkldnn_matmul(mat1, mat2, result, beta, alpha): result = beta * result + alpha * mat1 @ mat2.
using MkldnnMatmul = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, float, float);
constexpr const char* kMkldnnMatmulSymbol = "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff";

MkldnnMatmul find_mkldnn_matmul() {
  for (const char* library : {"libtorch_cpu.so", "libtorch_cpu.dylib"}) {
    void* handle = dlopen(library, RTLD_NOLOAD | RTLD_LAZY);
    if (handle == nullptr) continue;
    void* symbol = dlsym(handle, kMkldnnMatmulSymbol);
    dlclose(handle);
    if (symbol != nullptr) return reinterpret_cast<MkldnnMatmul>(symbol);
  }
  return nullptr;
}

// The function when torch has it and it computes a float32 product on this CPU (it refuses CPUs without AVX-512 or
// AVX-NE-CONVERT, and torch builds without oneDNN), checked once against at::mm.
MkldnnMatmul available_mkldnn_matmul() {
  static const MkldnnMatmul fn = []() -> MkldnnMatmul {
    const MkldnnMatmul candidate = find_mkldnn_matmul();
    if (candidate == nullptr) return nullptr;
    try {
      const auto a = at::arange(24, at::kFloat).reshape({4, 6}).div(7);
      const auto b = at::arange(30, at::kFloat).reshape({6, 5}).div(11);
      auto out = at::empty({4, 5}, at::kFloat);
      candidate(a, b, out, 0.f, 1.f);
      return at::allclose(out, at::mm(a, b), 1e-5, 1e-6) ? candidate : nullptr;
    } catch (const std::exception&) {
      return nullptr;
    }
  }();
  return fn;
}

// "auto" takes oneDNN only where it is clearly faster than at::mm: a GEMM of one expert's size (256 x 512 x 256,
// float32), single-threaded as the kernels run their blocks, best of five calls each after a warm-up. The VMs this
// was built on differ: on an AMD one with full-width AVX-512, oneDNN reached 2.2x MKL's throughput; on an earlier
// Xeon, 0.83x (benchmarks/NOTES.md sections 14 and 19). The 1.25x margin keeps a noisy measurement from flipping
// the choice (and with it the last bits of every result) between runs on one machine.
constexpr double kOneDnnMargin = 1.25;
// torch_moe's kernel takes the few-row GEMMs when it is at least this much faster there (measured here: 1.3x
// oneDNN, 2x at::mm, at 16 x 512 x 256).
constexpr double kTorchMoeMargin = 1.1;

// Best single-threaded seconds of gemm(out, a, b) over five calls after a warm-up (oneDNN builds its kernel for
// the shape on the first).
template <typename Gemm>
double best_seconds(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const Gemm& gemm) {
  double best = 1e30;
  run_fixed_tasks(1, [&](int64_t) {
    for (int rep = 0; rep < 6; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      gemm(out, a, b);
      const auto t1 = std::chrono::steady_clock::now();
      if (rep > 0) best = std::min(best, std::chrono::duration<double>(t1 - t0).count());
    }
  });
  return best;
}

// Operands from arange, not from a generator: the probe must not move the user's random stream.
std::pair<at::Tensor, at::Tensor> probe_operands(int64_t m, int64_t k, int64_t n) {
  return {at::arange(m * k, at::kFloat).remainder(17).sub(8).div(8).reshape({m, k}),
          at::arange(k * n, at::kFloat).remainder(13).sub(6).div(16).reshape({k, n})};
}

GemmProbe run_probe() {
  GemmProbe probe;
  const MkldnnMatmul onednn = available_mkldnn_matmul();
  auto by_onednn = [&](at::Tensor& out, const at::Tensor& a, const at::Tensor& b) { onednn(a, b, out, 0.f, 1.f); };
  auto by_aten = [](at::Tensor& out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); };
  {
    const int64_t m = 256, k = 512, n = 256;
    const auto [a, b] = probe_operands(m, k, n);
    auto out = at::empty({m, n}, at::kFloat);
    const double flop = 2.0 * m * k * n;
    const double aten_seconds = best_seconds(out, a, b, by_aten);
    probe.aten_gflops = flop / aten_seconds / 1e9;
    if (onednn != nullptr) {
      const double onednn_seconds = best_seconds(out, a, b, by_onednn);
      probe.onednn_gflops = flop / onednn_seconds / 1e9;
      probe.onednn_faster = onednn_seconds * kOneDnnMargin < aten_seconds;
    }
  }
  if (small_gemm_available()) {
    // An expert's share of OLMoE-mini at T=128 (64 experts, top-8): the case the kernel is for.
    const int64_t m = 16, k = 512, n = 256;
    const auto [a, b] = probe_operands(m, k, n);
    auto out = at::empty({m, n}, at::kFloat);
    const double flop = 2.0 * m * k * n;
    const double library_seconds = probe.onednn_faster ? best_seconds(out, a, b, by_onednn)
                                                       : best_seconds(out, a, b, by_aten);
    const double torch_moe_seconds = best_seconds(
        out, a, b, [](at::Tensor& o, const at::Tensor& x, const at::Tensor& y) { small_gemm(o, x, y, false); });
    probe.few_rows_library_gflops = flop / library_seconds / 1e9;
    probe.few_rows_torch_moe_gflops = flop / torch_moe_seconds / 1e9;
    probe.torch_moe_faster = torch_moe_seconds * kTorchMoeMargin < library_seconds;
  }
  return probe;
}

const GemmProbe& probe_once() {
  static const GemmProbe probe = run_probe();
  return probe;
}

enum Mode : int { kAuto = 0, kOneDnn = 1, kAten = 2, kTorchMoe = 3, kFromEnvironment = -1 };
std::atomic<int> g_mode{kFromEnvironment};

Mode parse_mode(const std::string& mode, const char* where) {
  if (mode == "auto") return kAuto;
  if (mode == "onednn") return kOneDnn;
  if (mode == "aten") return kAten;
  if (mode == "torch_moe") return kTorchMoe;
  TORCH_MOE_CHECK(false, "torch_moe.{}: must be 'auto', 'onednn', 'aten' or 'torch_moe', got '{}'", where, mode);
  return kAuto;
}

Mode current_mode() {
  const int mode = g_mode.load(std::memory_order_relaxed);
  if (mode != kFromEnvironment) return static_cast<Mode>(mode);
  static const Mode from_env = [] {
    const char* v = std::getenv("TORCH_MOE_CPU_GEMM");
    return v == nullptr || *v == '\0' ? kAuto : parse_mode(v, "TORCH_MOE_CPU_GEMM (environment)");
  }();
  return from_env;
}

// The library of GEMMs that are not few-row ones (mode "torch_moe": none, the kernel takes them all).
bool use_onednn() {
  switch (current_mode()) {
    case kAten:
    case kTorchMoe:
      return false;
    case kOneDnn:
      return available_mkldnn_matmul() != nullptr;
    default:
      return available_mkldnn_matmul() != nullptr && probe_once().onednn_faster;
  }
}

// Whether few-row GEMMs (every GEMM in mode "torch_moe") go to torch_moe's kernel.
bool use_small_gemm() {
  switch (current_mode()) {
    case kTorchMoe:
      return small_gemm_available();
    case kAuto:
      return small_gemm_available() && probe_once().torch_moe_faster;
    default:
      return false;
  }
}

// Only float32 GEMMs change library: the others keep at::mm (bfloat16 and float16 already reach oneDNN there).
bool float32_operands(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  return out.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat;
}

}  // namespace

GemmProbe cpu_gemm_probe() { return probe_once(); }

std::string cpu_gemm_library() {
  if (current_mode() == kTorchMoe && small_gemm_available()) return "torch_moe";
  const std::string library = use_onednn() ? "onednn" : "aten";
  return use_small_gemm() ? "torch_moe+" + library : library;
}

void set_cpu_gemm_library(const std::string& mode) {
  const Mode parsed = parse_mode(mode, "set_cpu_gemm_library: argument 'library'");
  TORCH_MOE_CHECK(parsed != kOneDnn || available_mkldnn_matmul() != nullptr,
                  "torch_moe.set_cpu_gemm_library: oneDNN's float32 GEMM is not available with this torch build or "
                  "CPU (at::native::mkldnn_matmul missing or refusing float32); use 'auto' or 'aten'");
  TORCH_MOE_CHECK(parsed != kTorchMoe || small_gemm_available(),
                  "torch_moe.set_cpu_gemm_library: torch_moe's float32 GEMM kernel needs an x86-64 CPU with AVX-512F, "
                  "which this one is not; use 'auto', 'onednn' or 'aten'");
  g_mode.store(parsed, std::memory_order_relaxed);
}

bool onednn_gemm_wanted(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  return float32_operands(out, a, b) && out.numel() > 0 && a.size(1) > 0 && use_onednn();
}

bool small_gemm_wanted(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (!float32_operands(out, a, b)) return false;
  const int64_t fewest = std::min({out.size(0), out.size(1), a.size(1)});
  return (fewest <= kFewRows || current_mode() == kTorchMoe) && use_small_gemm();
}

void onednn_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  available_mkldnn_matmul()(a, b, out, accumulate ? 1.f : 0.f, 1.f);
}

}  // namespace torch_moe::cpu
