#!/usr/bin/env bash
# Runs the CUDA op tests under compute-sanitizer (memcheck, then racecheck) with the caching allocator off, so
# that out-of-bounds accesses are caught at allocation granularity. Every selected test runs (no -x: one failing
# test must not hide the hazards of the others); per tool it reports CLEAN or NOT CLEAN from the sanitizer's own
# hazard count, and the test failures on their own line.
# Usage: tools/sanitize.sh [pytest selection]   (default: the CUDA op tests; env TOOLS="memcheck racecheck")
set -uo pipefail
cd "$(dirname "$0")/.."

sanitizer=$(command -v compute-sanitizer || true)
[ -z "$sanitizer" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && sanitizer=/usr/local/cuda/bin/compute-sanitizer
if [ -z "$sanitizer" ]; then
  echo "sanitize: compute-sanitizer not found (PATH, /usr/local/cuda/bin)" >&2
  exit 2
fi
python=${PYTHON:-python3}
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "sanitize: no CUDA GPU visible to torch" >&2
  exit 2
fi

# The op suites on CUDA (big-memory and graph tests excluded: they are slow under the sanitizer and add nothing; the
# device-side assert tests too: an assert is what they expect, and the sanitizer would count it).
if [ "$#" -gt 0 ]; then
  selection=("$@")
else
  selection=(tests/test_cuda.py tests/test_router_topk.py tests/test_capacity_plan.py tests/test_dispatch_combine.py
             tests/test_permute.py tests/test_grouped_mm.py tests/test_router_losses.py
             -k "cuda and not beyond_2_pow_31 and not graph_capture and not no_host_sync and not device_side_assert" \
             -p no:cacheprovider)
fi
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
log_dir=${LOG_DIR:-build/sanitize}
mkdir -p "$log_dir"
overall=0
for tool in ${TOOLS:-memcheck racecheck}; do
  log="$log_dir/$tool.log"
  extra=()
  [ "$tool" = memcheck ] && extra=(--leak-check no --report-api-errors no)
  echo "sanitize: $tool on ${selection[*]} (log: $log)"
  # --target-processes all: the tests that start a subprocess are checked too.
  "$sanitizer" --tool "$tool" --target-processes all --error-exitcode 86 "${extra[@]}" \
    "$python" -m pytest -q "${selection[@]}" >"$log" 2>&1
  rc=$?
  summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -n 1)
  errors=$(grep -cE "^========= (Invalid|Race|Error|Uninitialized|Malloc|Program hit)" "$log")
  tests=$(grep -E "[0-9]+ (passed|failed)" "$log" | tail -n 1)
  tail -n 3 "$log"
  # Exit 86 is the sanitizer's own verdict (--error-exitcode); any other non-zero exit is pytest's.
  if [ "$errors" -eq 0 ] && [ "$rc" -ne 86 ]; then
    echo "sanitize: $tool CLEAN (${summary:-no sanitizer summary})"
  else
    echo "sanitize: $tool NOT CLEAN ($errors reported hazard(s); ${summary:-see log})"
    overall=1
  fi
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 86 ]; then
    echo "sanitize: $tool: tests failed under the sanitizer (pytest exit $rc: ${tests:-see log})"
    overall=1
  fi
done
exit "$overall"
