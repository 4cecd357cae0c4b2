#!/usr/bin/env bash
# The GPU session's steps, one per call so that each fits a 10-minute command limit:
#   tools/gpu_session.sh build      CUDA build of the extension (sm_90) with the C++ tests, then build_info
#   tools/gpu_session.sh test       tests/test_cuda.py, then every suite (CUDA-parametrised ones included), then ctest
#   tools/gpu_session.sh sanitize   tools/sanitize.sh (compute-sanitizer memcheck + racecheck)
#   tools/gpu_session.sh bench      benchmarks/bench_gpu.py --quick, then the full run writing RESULTS-gpu.md
# Logs go to $OUT (the device tool's output folder) when set, else build/gpu-session.
set -euo pipefail
cd "$(dirname "$0")/.."
logs=${OUT:-build/gpu-session}
mkdir -p "$logs"
python=${PYTHON:-python3}
export PATH="/usr/local/cuda/bin:$PATH"

step=${1:-}
case "$step" in
  build)
    nvidia-smi | tee "$logs/nvidia-smi.txt"
    "$python" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))' | tee "$logs/versions.txt"
    TORCH_MOE_CUDA=ON TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      "$python" -m pip install --no-build-isolation -v -C build-dir=build/gpu \
      -C cmake.define.TORCH_MOE_BUILD_TESTS=ON -e . >"$logs/build.log" 2>&1 || { tail -n 80 "$logs/build.log"; exit 1; }
    "$python" -c 'import torch_moe; info = torch_moe.build_info(); print(info); assert info["with_cuda"], info' | tee -a "$logs/versions.txt"
    ;;
  test)
    "$python" -m pytest -q -rs tests/test_cuda.py 2>&1 | tee "$logs/test_cuda.log"
    "$python" -m pytest -q -rs tests 2>&1 | tail -n 60 | tee "$logs/test_all.log"
    ctest --test-dir build/gpu --output-on-failure 2>&1 | tail -n 20 | tee "$logs/ctest.log"
    ;;
  sanitize)
    LOG_DIR="$logs/sanitize" tools/sanitize.sh 2>&1 | tee "$logs/sanitize.txt"
    ;;
  bench)
    "$python" benchmarks/bench_gpu.py --quick --out "$logs/RESULTS-gpu-quick.md"
    "$python" benchmarks/bench_gpu.py 2>&1 | tee "$logs/bench.log"
    cp benchmarks/RESULTS-gpu.md "$logs/" 2>/dev/null || true
    ;;
  *)
    echo "usage: tools/gpu_session.sh build|test|sanitize|bench" >&2
    exit 2
    ;;
esac
