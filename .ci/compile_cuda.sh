#!/usr/bin/env bash
# CUDA compile check for machines without a GPU: compiles every csrc/**/*.cu to an object (no link) with nvcc
# against the installed torch's headers, with the flags of the real CUDA build, so a CUDA compile error fails CI.
# Usage: .ci/compile_cuda.sh [source_dir]   (env: CUDA_ARCH=90, JOBS=2, BUILD_DIR=build/cuda-check,
#        ONLY=<regex> to compile only the matching files)
set -euo pipefail
src_dir=$(cd "${1:-$(dirname "$0")/..}" && pwd)
cd "$src_dir"

nvcc=""
if command -v nvcc >/dev/null 2>&1; then
  nvcc=$(command -v nvcc)
elif [ -x /usr/local/cuda/bin/nvcc ]; then
  nvcc=/usr/local/cuda/bin/nvcc
fi
if [ -z "$nvcc" ]; then
  echo "##################################################################################################" >&2
  echo "ci: WARNING: nvcc not found (PATH, /usr/local/cuda/bin): the CUDA sources were NOT compile-checked" >&2
  echo "##################################################################################################" >&2
  exit 0
fi

python=${PYTHON:-python3}
arch=${CUDA_ARCH:-90}
jobs=${JOBS:-2}
build_dir=${BUILD_DIR:-$src_dir/build/cuda-check}
mkdir -p "$build_dir"

read -r torch_version cxx11_abi < <("$python" -c 'import torch; print(torch.__version__, int(torch._C._GLIBCXX_USE_CXX11_ABI))')
mapfile -t torch_includes < <("$python" -c 'import torch.utils.cpp_extension as c; print("\n".join(c.include_paths()))')

# As in CMakeLists.txt: <fmt/...> must resolve to the system fmt (libfmt-dev), not the copy inside torch's include
# directory, so a forwarding directory goes first.
fmt_dir=""
for candidate in /usr/include /usr/local/include; do
  if [ -f "$candidate/fmt/format.h" ]; then fmt_dir=$candidate; break; fi
done
include_flags=(-I"$src_dir/csrc")
if [ -n "$fmt_dir" ]; then
  mkdir -p "$build_dir/fmt-forward"
  ln -sfn "$fmt_dir/fmt" "$build_dir/fmt-forward/fmt"
  include_flags=(-I"$build_dir/fmt-forward" "${include_flags[@]}")
fi
for inc in "${torch_includes[@]}"; do include_flags+=(-isystem "$inc"); done

flags=(
  -std=c++17 -c -O2 -Xcompiler -fPIC
  --expt-relaxed-constexpr --expt-extended-lambda
  -gencode "arch=compute_${arch},code=sm_${arch}"
  -D_GLIBCXX_USE_CXX11_ABI="$cxx11_abi"
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__
  -DTORCH_MOE_WITH_CUDA=1 "-DTORCH_MOE_TORCH_VERSION=\"$torch_version\"" "-DTORCH_MOE_CUDA_ARCHS=\"${arch}\""
  -Werror all-warnings -Xcompiler -Wall,-Wno-unused-parameter
)

# A CPU build of torch ships the c10/cuda headers but not the one generated at torch's configure time (it only
# holds a Windows export switch); tell CUDAMacros.h not to look for it.
for inc in "${torch_includes[@]}"; do
  if [ -d "$inc/c10/cuda" ] && [ ! -f "$inc/c10/cuda/impl/cuda_cmake_macros.h" ]; then
    flags+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
  fi
done

mapfile -t sources < <(find csrc -name '*.cu' | sort | grep -E "${ONLY:-.}")
if [ "${#sources[@]}" -eq 0 ]; then
  echo "ci: no .cu files under csrc" >&2
  exit 1
fi
echo "ci: nvcc $("$nvcc" --version | tail -n 1) on ${#sources[@]} file(s), sm_${arch}, torch ${torch_version}, ${jobs} job(s)"

status_dir=$(mktemp -d)
trap 'rm -rf "$status_dir"' EXIT
compile_one() {
  local src=$1 obj="$build_dir/${1//\//_}.o" log="$status_dir/${1//\//_}.log"
  local start=$SECONDS
  if "$nvcc" "${flags[@]}" "${include_flags[@]}" "$src" -o "$obj" >"$log" 2>&1; then
    echo "ci:   ok   $src ($((SECONDS - start)) s)"
  else
    echo "ci:   FAIL $src"
    cat "$log"
    echo
    touch "$status_dir/failed"
  fi
}
running=0
for src in "${sources[@]}"; do
  compile_one "$src" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then wait -n || true; running=$((running - 1)); fi
done
wait
if [ -e "$status_dir/failed" ]; then
  echo "ci: CUDA compile check FAILED" >&2
  exit 1
fi
echo "ci: CUDA compile check passed"
