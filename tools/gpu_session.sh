#!/usr/bin/env bash
# The GPU session's checks. A device session is rare and short, so every step runs whatever the earlier ones did,
# keeps its whole log, and the summary reports each step's outcome on its own:
#   tools/gpu_session.sh all        build, test, sanitize, bench-quick in one call (~9 min on an H200, 16 cores)
#   tools/gpu_session.sh build      CUDA build of the extension (sm_90) with the C++ tests, then build_info
#   tools/gpu_session.sh test       tests/test_cuda.py, then every suite (CUDA-parametrised ones included), then ctest
#   tools/gpu_session.sh sanitize   tools/sanitize.sh (compute-sanitizer memcheck + racecheck)
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

# run NAME LOG CMD...: runs CMD with stdout and stderr to LOG (kept whole), records NAME's status and time.
run() {
  local name=$1 log=$2
  shift 2
  local start=$SECONDS
  "$@" >"$log" 2>&1
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

step_test() {
  run test_cuda "$logs/test_cuda.log" "$python" -m pytest -q -rs tests/test_cuda.py
  run test_all "$logs/test_all.log" "$python" -m pytest -q -rs tests
  run ctest "$logs/ctest.log" ctest --test-dir build/gpu --output-on-failure
}

step_sanitize() {
  run sanitize "$logs/sanitize.txt" env LOG_DIR="$logs/sanitize" tools/sanitize.sh
}

step_bench_quick() {
  run bench-quick "$logs/bench-quick.log" "$python" benchmarks/bench_gpu.py --quick --out "$logs/RESULTS-gpu-quick.md"
}

step_bench() {
  step_bench_quick
  run bench "$logs/bench.log" "$python" benchmarks/bench_gpu.py
  cp benchmarks/RESULTS-gpu.md "$logs/" 2>/dev/null || true
}

case "${1:-}" in
  all) step_build; step_test; step_sanitize; step_bench_quick ;;
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
