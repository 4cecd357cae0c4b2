// Argument checks shared by every op: TORCH_CHECK with fmt-formatted messages that name the op,
// the argument, what was expected and what came.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <fmt/format.h>

#include <initializer_list>
#include <new>
#include <stdexcept>
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
// The signature of a backend's index range check (the CPU's above, cuda::assert_index_range on CUDA), which the
// shared argument checks take so that no backend can skip it.
using IndexRangeCheck = void (*)(const char* op, const char* name, const at::Tensor& t, int64_t low, int64_t high,
                                 const at::Tensor* rows_to_check);

// Whether the CUDA kernels should run their host-side value checks (index ranges with the CPU's messages,
// duplicate destinations, offsets), each of which reads a result back to the host: a sync. Off unless the
// environment sets TORCH_MOE_CUDA_CHECKS=1 (or on/true) or set_cuda_value_checks(1) asked for them; without them
// the range of slots and row indices is still checked on the device (a device-side assert, no sync). Kept here,
// in code every build compiles, so that the switch itself is testable without a GPU.
bool cuda_value_checks_requested();
// 1: on, 0: off, -1: back to what the environment says.
void set_cuda_value_checks(int mode);

// Size arithmetic. A size argument (num_experts, capacity, ...) comes from the user, so every product or sum of sizes
// that sizes an allocation or an index goes through these: on int64 overflow they raise a user error naming the
// argument (`name`) and the expression (`expr`, e.g. "num_experts * capacity") instead of wrapping around.
int64_t checked_mul(const char* op, const char* name, const char* expr, int64_t a, int64_t b);
int64_t checked_add(const char* op, const char* name, const char* expr, int64_t a, int64_t b);

// No one allocation can exceed the 47-bit user address space of x86-64 / aarch64 Linux (128 TiB); a request above it
// is refused before anything is allocated, with the same message as torch_moe/_fake.py gives.
constexpr int64_t kMaxAllocBytes = int64_t{1} << 47;

// Bytes of a tensor `what` (e.g. "buffer [E, C, d]") of `numel` elements of `itemsize` bytes, which argument `name`
// sizes: a user error naming the argument and the bytes it would need when that overflows or exceeds kMaxAllocBytes.
int64_t check_alloc_bytes(const char* op, const char* name, const char* what, int64_t numel, int64_t itemsize);

// Runs body(); an allocation failure inside it (std::bad_alloc, std::length_error, c10::OutOfMemoryError, the
// DefaultCPUAllocator's error) comes back as a user error naming argument `name` = `value` and the `bytes` the
// request needs, instead of a bare std::bad_alloc.
// Where no one size argument made the request (a tensor's shape did), `value` is instead a description of what was
// requested, e.g. "the output [N, M] of 12 * 2^38 elements".
[[noreturn]] void throw_alloc_failure(const char* op, const char* name, int64_t value, int64_t bytes,
                                      const char* cause);
[[noreturn]] void throw_alloc_failure(const char* op, const char* name, const std::string& what, int64_t bytes,
                                      const char* cause);
bool is_cpu_alloc_failure(const c10::Error& e);
template <typename V, typename F>
decltype(auto) rethrow_alloc_failure(const char* op, const char* name, const V& value, int64_t bytes, F&& body) {
  try {
    return body();
  } catch (const c10::OutOfMemoryError& e) {
    throw_alloc_failure(op, name, value, bytes, e.what_without_backtrace());
  } catch (const c10::Error& e) {
    if (!is_cpu_alloc_failure(e)) throw;
    throw_alloc_failure(op, name, value, bytes, e.what_without_backtrace());
  } catch (const std::bad_alloc& e) {
    throw_alloc_failure(op, name, value, bytes, e.what());
  } catch (const std::length_error& e) {
    throw_alloc_failure(op, name, value, bytes, e.what());
  }
}

}  // namespace torch_moe
