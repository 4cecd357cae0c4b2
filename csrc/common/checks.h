// Argument checks shared by every op: TORCH_CHECK with fmt-formatted messages that name the op,
// the argument, what was expected and what came.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <fmt/format.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <utility>

namespace torch_moe {

// TORCH_CHECK only builds the message when the condition fails, so formatting costs nothing on success.
#define TORCH_MOE_CHECK(cond, ...) TORCH_CHECK((cond), ::fmt::format(__VA_ARGS__))

std::string shape_str(const at::Tensor& t);
// Python spelling of a dtype: "int64", "float32", ...
std::string dtype_name(at::ScalarType dtype);

void check_defined(const char* op, const char* name, const at::Tensor& t);
// One of float32, float64, bfloat16, float16.
void check_floating(const char* op, const char* name, const at::Tensor& t);
void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType expected);
// `layout` is how the docs write the shape, e.g. "[T, k]".
void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* layout);
void check_size(const char* op, const char* name, const at::Tensor& t, int64_t dim, int64_t expected,
                const char* what);
void check_same_shape(const char* op, const char* name, const at::Tensor& t, const char* other_name,
                      const at::Tensor& other);
// Every defined tensor on the device of the first.
void check_same_device(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> args);
// valid_mask, when given: bool [T] with T = tokens.size(0), on tokens' device ("tokens of <tokens_name>").
void check_valid_mask(const char* op, const std::optional<at::Tensor>& valid_mask, const at::Tensor& tokens,
                      const char* tokens_name);
// Every entry of an int64 tensor in [low, high) (CPU tensors only; device kernels check on the device).
void check_index_range(const char* op, const char* name, const at::Tensor& t, int64_t low, int64_t high,
                       const at::Tensor* rows_to_check = nullptr);

}  // namespace torch_moe
