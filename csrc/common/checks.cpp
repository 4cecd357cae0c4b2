// Implementations of the shared argument checks.
#include "common/checks.h"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace torch_moe {

std::string dtype_name(at::ScalarType dtype) { return std::string(c10::getDtypeNames(dtype).first); }

std::string shape_str(const at::Tensor& t) {
  std::vector<std::string> parts;
  for (const auto& s : t.sym_sizes()) {
    parts.push_back(s.is_symbolic() ? std::string("s") : std::to_string(s.as_int_unchecked()));
  }
  return fmt::format("[{}]", fmt::join(parts, ", "));
}

void check_defined(const char* op, const char* name, const at::Tensor& t) {
  TORCH_MOE_CHECK(t.defined(), "torch_moe.{}: argument '{}' must be a tensor, got an undefined tensor", op, name);
}

void check_floating(const char* op, const char* name, const at::Tensor& t) {
  check_defined(op, name, t);
  const auto dt = t.scalar_type();
  TORCH_MOE_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
                  "torch_moe.{}: argument '{}' must be float32, float64, bfloat16 or float16, got {}", op, name,
                  dtype_name(dt));
}

void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType expected) {
  check_defined(op, name, t);
  TORCH_MOE_CHECK(t.scalar_type() == expected, "torch_moe.{}: argument '{}' must be {}, got {}", op, name,
                  dtype_name(expected), dtype_name(t.scalar_type()));
}

void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* layout) {
  check_defined(op, name, t);
  TORCH_MOE_CHECK(t.dim() == dim, "torch_moe.{}: argument '{}' must be a {}-D tensor {}, got shape {}", op, name,
                  dim, layout, shape_str(t));
}

void check_size(const char* op, const char* name, const at::Tensor& t, int64_t dim, int64_t expected,
                const char* what) {
  TORCH_MOE_CHECK(t.size(dim) == expected, "torch_moe.{}: argument '{}' must have size {} ({}) in dim {}, got shape {}",
                  op, name, expected, what, dim, shape_str(t));
}

void check_same_shape(const char* op, const char* name, const at::Tensor& t, const char* other_name,
                      const at::Tensor& other) {
  TORCH_MOE_CHECK(t.sizes() == other.sizes(), "torch_moe.{}: argument '{}' must have the shape of '{}' {}, got {}",
                  op, name, other_name, shape_str(other), shape_str(t));
}

void check_same_device(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> args) {
  const std::pair<const char*, const at::Tensor*>* first = nullptr;
  for (const auto& arg : args) {
    if (!arg.second->defined()) continue;
    if (first == nullptr) {
      first = &arg;
      continue;
    }
    TORCH_MOE_CHECK(arg.second->device() == first->second->device(),
                    "torch_moe.{}: all tensors must be on one device: '{}' is on {} but '{}' is on {}", op, arg.first,
                    arg.second->device().str(), first->first, first->second->device().str());
  }
}

void check_index_range(const char* op, const char* name, const at::Tensor& t, int64_t low, int64_t high,
                       const at::Tensor* rows_to_check) {
  if (t.numel() == 0 || !t.device().is_cpu()) return;
  const auto c = t.contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  const int64_t rows = c.dim() > 0 ? c.size(0) : 1;
  const int64_t per_row = rows > 0 ? c.numel() / rows : 0;
  const bool* keep = nullptr;
  at::Tensor mask;
  if (rows_to_check != nullptr && rows_to_check->defined()) {
    mask = rows_to_check->contiguous();
    keep = mask.data_ptr<bool>();
  }
  for (int64_t r = 0; r < rows; ++r) {
    if (keep != nullptr && !keep[r]) continue;
    for (int64_t i = 0; i < per_row; ++i) {
      const int64_t v = p[r * per_row + i];
      TORCH_MOE_CHECK(v >= low && v < high, "torch_moe.{}: argument '{}' must hold values in [{}, {}), got {} at flat index {}",
                      op, name, low, high, v, r * per_row + i);
    }
  }
}

namespace {
std::atomic<int> g_cuda_value_checks{-1};  // -1: as the environment says
}  // namespace

bool cuda_value_checks_requested() {
  const int mode = g_cuda_value_checks.load(std::memory_order_relaxed);
  if (mode >= 0) return mode == 1;
  static const bool from_env = [] {
    const char* v = std::getenv("TORCH_MOE_CUDA_CHECKS");
    return v != nullptr && (std::strcmp(v, "1") == 0 || std::strcmp(v, "on") == 0 || std::strcmp(v, "true") == 0);
  }();
  return from_env;
}

void set_cuda_value_checks(int mode) {
  TORCH_MOE_CHECK(mode >= -1 && mode <= 1, "torch_moe.set_cuda_value_checks: argument 'mode' must be -1, 0 or 1, got {}",
                  mode);
  g_cuda_value_checks.store(mode, std::memory_order_relaxed);
}

void check_valid_mask(const char* op, const std::optional<at::Tensor>& valid_mask, const at::Tensor& tokens,
                      const char* tokens_name) {
  if (!valid_mask.has_value() || !valid_mask->defined()) return;
  check_dtype(op, "valid_mask", *valid_mask, at::kBool);
  check_dim(op, "valid_mask", *valid_mask, 1, "[T]");
  const std::string what = fmt::format("tokens of {}", tokens_name);
  check_size(op, "valid_mask", *valid_mask, 0, tokens.size(0), what.c_str());
  check_same_device(op, {{tokens_name, &tokens}, {"valid_mask", &*valid_mask}});
}

int64_t checked_mul(const char* op, const char* name, const char* expr, int64_t a, int64_t b) {
  int64_t out = 0;
  TORCH_MOE_CHECK(!__builtin_mul_overflow(a, b, &out),
                  "torch_moe.{}: argument '{}' is too large: {} = {} * {} overflows int64", op, name, expr, a, b);
  return out;
}

int64_t checked_add(const char* op, const char* name, const char* expr, int64_t a, int64_t b) {
  int64_t out = 0;
  TORCH_MOE_CHECK(!__builtin_add_overflow(a, b, &out),
                  "torch_moe.{}: argument '{}' is too large: {} = {} + {} overflows int64", op, name, expr, a, b);
  return out;
}

int64_t check_alloc_bytes(const char* op, const char* name, const char* what, int64_t numel, int64_t itemsize) {
  int64_t bytes = 0;
  const bool overflow = __builtin_mul_overflow(numel, itemsize, &bytes);
  TORCH_MOE_CHECK(!overflow && bytes <= kMaxAllocBytes,
                  "torch_moe.{}: argument '{}' is too large: {} of {} elements would need {} bytes, more than the {} "
                  "bytes one allocation can have",
                  op, name, what, numel, overflow ? fmt::format("{} * {}", numel, itemsize) : std::to_string(bytes),
                  kMaxAllocBytes);
  return bytes;
}

void throw_alloc_failure(const char* op, const char* name, int64_t value, int64_t bytes, const char* cause) {
  TORCH_MOE_CHECK(false,
                  "torch_moe.{}: argument '{}' = {} is too large: the request would need at least {} bytes, which could not be "
                  "allocated ({})",
                  op, name, value, bytes, cause);
  TORCH_INTERNAL_ASSERT(false);
}

void throw_alloc_failure(const char* op, const char* name, const std::string& what, int64_t bytes, const char* cause) {
  TORCH_MOE_CHECK(false,
                  "torch_moe.{}: argument '{}' is too large: {} would need at least {} bytes, which could not be "
                  "allocated ({})",
                  op, name, what, bytes, cause);
  TORCH_INTERNAL_ASSERT(false);
}

bool is_cpu_alloc_failure(const c10::Error& e) {
  return std::string(e.what_without_backtrace()).find("DefaultCPUAllocator") != std::string::npos;
}

}  // namespace torch_moe
