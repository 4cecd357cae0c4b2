// The score function and router dtype of every routing and loss op, and the CPU's whole-tensor row scoring.
#include "common/router_math.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <string>

#include "common/checks.h"

namespace torch_moe {

ScoreFunc parse_score_func(const char* op, c10::string_view name) {
  if (name == "softmax") return ScoreFunc::kSoftmax;
  if (name == "sigmoid") return ScoreFunc::kSigmoid;
  TORCH_MOE_CHECK(false, "torch_moe.{}: argument 'score_func' must be \"softmax\" or \"sigmoid\", got \"{}\"", op,
                  std::string(name));
  return ScoreFunc::kSoftmax;
}

at::ScalarType router_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

namespace cpu {

at::Tensor score_rows(const at::Tensor& logits, ScoreFunc func) {
  auto scores = func == ScoreFunc::kSoftmax ? at::softmax(logits, 1) : at::sigmoid(logits);
  const int64_t T = logits.size(0), E = logits.size(1);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "torch_moe_score_rows", [&] {
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    scalar_t* sp = scores.data_ptr<scalar_t>();
    at::parallel_for(0, T, std::max<int64_t>(1, 16384 / std::max<int64_t>(E, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        bool has_nan = false;
        for (int64_t e = 0; e < E; ++e) has_nan |= std::isnan(sp[t * E + e]);
        if (has_nan) score_row(lp + t * E, E, func, sp + t * E);
      }
    });
  });
  return scores;
}

}  // namespace cpu
}  // namespace torch_moe
