#!/usr/bin/env bash
# The GPU session's checks. A device session is rare and short, so every step runs whatever the earlier ones did,
# keeps its whole log, and the summary reports each step's outcome on its own:
#   tools/gpu_session.sh all        build, full suite, ctest, sanitizer subset, benchmark: one ~9-minute call on an
#                                   H200 (16 cores); each step has a time limit (STEP_LIMITS below) so that one slow
#                                   step cannot eat the others' time, and a step past its limit reports exit 124
#   tools/gpu_session.sh build      CUDA build of the extension (sm_90) with the C++ tests, then build_info
#   tools/gpu_session.sh test       tests/test_cuda.py, then every suite (CUDA-parametrised ones included), then ctest
#   tools/gpu_session.sh sanitize   tools/sanitize.sh (compute-sanitizer memcheck + racecheck) on a small subset
#   tools/gpu_session.sh bench      benchmarks/bench_gpu.py --quick, then the full run writing RESULTS-gpu.md
#   tools/gpu_session.sh bench-quick  benchmarks/bench_gpu.py --quick only
# Logs go to $OUT (the device tool's output folder) when set, else build/gpu-session; summary.txt lists every step
# with its exit status and seconds. The script's exit status is 0 only if every step passed.
set -u
cd "$(dirname "$0")/.."
logs=${OUT:-build/gpu-session}
mkdir -p "$logs"
python=${PYTHON:-python3}
export PATH="/usr/local/cuda/bin:$PATH"
summary="$logs/summary.txt"
failed=0

# Seconds per step in `all` (540 in total): build, the full pytest run, ctest, the sanitizer subset, the benchmark.
LIMIT_BUILD=${LIMIT_BUILD:-200}
LIMIT_TEST=${LIMIT_TEST:-150}
LIMIT_CTEST=${LIMIT_CTEST:-30}
LIMIT_SANITIZE=${LIMIT_SANITIZE:-60}
LIMIT_BENCH=${LIMIT_BENCH:-100}
limit=0  # the current step's limit in seconds; 0: none

# run NAME LOG CMD...: runs CMD with stdout and stderr to LOG (kept whole), records NAME's status and time; with a
# limit set, the command is stopped after it (exit 124).
run() {
  local name=$1 log=$2
  shift 2
  local start=$SECONDS
  if [ "$limit" -gt 0 ]; then
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  else
    "$@" >"$log" 2>&1
  fi
  local rc=$?
  local outcome=passed
  [ "$rc" -ne 0 ] && outcome="FAILED (exit $rc)" && failed=1
  printf '%-28s %-18s %5ds  %s\n' "$name" "$outcome" $((SECONDS - start)) "$log" | tee -a "$summary"
  tail -n 5 "$log"
  return 0
}

step_build() {
  run nvidia-smi "$logs/nvidia-smi.txt" nvidia-smi
  run versions "$logs/versions.txt" "$python" -c \
    'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'
  run build "$logs/build.log" env TORCH_MOE_CUDA=ON TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$python" -m pip install --no-build-isolation -v -C build-dir=build/gpu \
    -C cmake.define.TORCH_MOE_BUILD_TESTS=ON -e .
  run build-info "$logs/build-info.txt" "$python" -c \
    'import torch_moe; info = torch_moe.build_info(); print(info); assert info["with_cuda"], info'
}

# The full suite once (tests/test_cuda.py first, so its results come in even if the limit stops the rest), with
# the slowest tests listed; then the Catch2 tests.
# (A file named twice is collected once, in the order given.)
step_pytest() {
  run test_all "$logs/test_all.log" "$python" -m pytest -q -rs --durations=15 -p no:cacheprovider tests/test_cuda.py tests
}

step_ctest() {
  run ctest "$logs/ctest.log" ctest --test-dir build/gpu --output-on-failure
}

step_test() {
  step_pytest
  step_ctest
}

# A subset small enough for a minute under compute-sanitizer: the row movement, the grouped GEMM family (both
# paths), the capacity plan and the bad-id case, which must not read out of bounds.
SANITIZE_SUBSET=(tests/test_cuda.py -p no:cacheprovider -k
  "(dispatch_combine_agree and float32) or (permute_unpermute_agree and float32) or fused_dropless_ops_agree
   or (gather_grouped_glu_agrees and silu) or (grouped_mm_agrees_with_zero_token_experts and mixed)
   or (capacity_plan_agrees and 1000) or bad_ids_are_ignored")

step_sanitize() {
  run sanitize "$logs/sanitize.txt" env LOG_DIR="$logs/sanitize" tools/sanitize.sh "${SANITIZE_SUBSET[@]}"
}

step_bench_quick() {
  run bench-quick "$logs/bench-quick.log" "$python" benchmarks/bench_gpu.py --quick --out "$logs/RESULTS-gpu-quick.md"
}

# The benchmark's default cases (Mixtral-like and OLMoE-like at T = 8192 and 16384, decode T = 1, 8, 32), few
# repeats so that it fits the session; writes benchmarks/RESULTS-gpu.md, copied to the logs.
step_bench() {
  run bench "$logs/bench.log" "$python" benchmarks/bench_gpu.py --repeats "${BENCH_REPEATS:-5}" --warmup 1
  cp benchmarks/RESULTS-gpu.md "$logs/" 2>/dev/null || true
}

step_all() {
  limit=$LIMIT_BUILD; step_build
  limit=$LIMIT_TEST; step_pytest
  limit=$LIMIT_CTEST; step_ctest
  limit=$LIMIT_SANITIZE; step_sanitize
  limit=$LIMIT_BENCH; step_bench
  limit=0
}

case "${1:-}" in
  all) step_all ;;
  build) step_build ;;
  test) step_test ;;
  sanitize) step_sanitize ;;
  bench) step_bench ;;
  bench-quick) step_bench_quick ;;
  *)
    echo "usage: tools/gpu_session.sh all|build|test|sanitize|bench|bench-quick" >&2
    exit 2
    ;;
esac
echo "--- summary ($summary)"
cat "$summary"
exit "$failed"
