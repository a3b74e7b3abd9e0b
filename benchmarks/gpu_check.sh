#!/usr/bin/env bash
# One pass on a GPU machine: build the extension with its CUDA kernels, run the GPU tests,
# compute-sanitizer (memcheck, racecheck) on each op once, then the benchmark. Logs and results
# go to $OUT (default benchmarks/results/gpu_check); a short Markdown table is printed last.
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh [extra bench_gpu.py arguments]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
SUMMARY=()

# step NAME COMMAND...: runs COMMAND with its output appended to the log, records the outcome
step() {
  local name=$1 start rc
  shift
  echo "=== $name: $*" | tee -a "$LOG"
  start=$(date +%s)
  "$@" >>"$LOG" 2>&1
  rc=$?
  SUMMARY+=("| $name | $([ $rc -eq 0 ] && echo ok || echo "FAILED ($rc)") | $(($(date +%s) - start)) s |")
  return $rc
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nvcc --version | tail -n 2
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} >>"$LOG" 2>&1

# Build tools only; torch is never reinstalled (the machine's build is the one to test).
for tool in ninja pytest; do
  $PY -c "import $tool" 2>/dev/null || $PY -m pip install -q "$tool" >>"$LOG" 2>&1
done

export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if step build $PY -m pip install --no-build-isolation --no-deps -e .; then
  step tests $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py
  SUMMARY[-1]="${SUMMARY[-1]% |} ($(grep -E '(passed|failed|error).* in [0-9.]+s' "$LOG" | tail -n 1)) |"

  SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for tool in memcheck racecheck; do
    # Only this library's kernels are instrumented (torch's own would only slow the run);
    # without torch's caching allocator each tensor is its own allocation, so memcheck sees
    # an access past a tensor's end rather than into a neighbour in the same block.
    step "$tool" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" \
      --kernel-name kns=efficientvit --error-exitcode 1 $PY benchmarks/bench_gpu.py --smoke
  done

  step bench $PY benchmarks/bench_gpu.py --out "$OUT/bench_gpu.json" "$@"
fi

echo
grep -E '^note:|MISMATCH' "$LOG" | head -n 20
echo
echo "| step | result | time |"
echo "|---|---|---|"
printf '%s\n' "${SUMMARY[@]}"
if [ -f "$OUT/bench_gpu.md" ]; then
  echo
  # fp16 rows only, to keep it short; bench_gpu.md and bench_gpu.json hold everything
  grep -E '^\| layer|^\|---' "$OUT/bench_gpu.md"
  grep -E '^\|.*\| float16 \|' "$OUT/bench_gpu.md"
fi
