#!/usr/bin/env bash
# The GPU check, one command on a machine with a CUDA GPU: build the extension with its CUDA
# kernels for that GPU, run the GPU tests, compute-sanitizer (memcheck, racecheck) on one small
# call of every kernel (CUDA and Triton), then time whole models (bench_models_gpu.py).
# Quick by default: at most about 7 minutes, build included. --full: every test, M0-M5 with
# torch.compile max-autotune, and bench_gpu.py's layer table (an hour or two). --profile: the
# build, then Nsight Compute's counters for each kernel of one M4 forward per backend
# (gpu_profile.py; about 5 minutes). --tests EXPR runs only the GPU tests pytest's -k EXPR
# selects; --gdb runs them in one process under cuda-gdb, which prints the native backtrace of
# a crash (a segmentation fault) to tests.log.
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh [--full | --profile] [--tests EXPR [--gdb]]
#
# Every step runs under `timeout`: its budget (BUDGET below) plus what the steps before it left
# unused, so the run ends by the sum of the budgets. A step out of time is TIMEOUT, and the run
# goes on where that makes sense (no tests without a GPU or a build).
# Written as it comes: $OUT/env.txt (the machine, first), $OUT/<step>.log, $OUT/summary.tsv (a
# line per finished step), $OUT/tests.xml, $OUT/models.jsonl (a line per measurement),
# $OUT/warm-up.log; at the end $OUT/models.md and $OUT/summary.md, and all but those tables
# packed into $OUT/logs.tar.gz (a lent machine returns at most 8 files). Printed last: failures in
# brief, the summary table (step | result | seconds), then the speed table. Exit status 0 only
# when every step passed.
# shellcheck disable=SC2317  # the step functions run in `bash -c` (export -f), out of its sight
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

MODE=quick
TESTS=
GDB=0
while [ $# -gt 0 ]; do
  case "$1" in
    --full) MODE=full ;;
    --profile) MODE=profile ;;
    --tests) TESTS=${2:?--tests needs an expression}; shift ;;
    --gdb) GDB=1 ;;
    *) echo "usage: OUT=DIR bash benchmarks/gpu_check.sh [--full | --profile] [--tests EXPR [--gdb]]" >&2
       exit 2 ;;
  esac
  shift
done
OUT=${OUT:-benchmarks/results/gpu_check_$(date +%F)}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
rm -f "$OUT/summary.tsv" "$OUT/models.md" "$OUT/models.jsonl" "$OUT/tests.xml" "$OUT/logs.tar.gz"
export OUT PY MODE TESTS GDB PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# One Triton cache for every step (not under $OUT, which comes back): the compile step fills it,
# so the later steps spend their time on the kernels, not on compiling them.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/efficientvit_gpu_check/triton}
# backend "auto"'s choices measured afresh in each run, by the models step on a GPU of its own
# (not kept from an earlier run on this machine, nor from the warm-up)
EFFICIENTVIT_CACHE_DIR=$(mktemp -d)
export EFFICIENTVIT_CACHE_DIR

# Budgets in seconds; quick: 400 in all, so that the run ends within 7 minutes. env: torch's
# first import from a cold disk (6-9 s on the H200); build: 59-73 s there (the .cu files and
# the CPU sources, 16 cores, one architecture); compile: the Triton kernels the models and the
# quick tests launch, on up to 16 processes (gpu_precompile.py, the models' first;
# tests/test_gpu_budget.py holds them to this budget), so that the later steps load them: in
# the second H200 run 15 of 16 processes had compiled their 35-36 launches at 115 s, and the
# tests (bf16 still among them) then spent 88 s, 20-56 s a Triton attention case; tests: those
# not marked gpu_full, on up to 16 workers; memcheck, racecheck: mostly their start-up; models:
# M0 and M4, torch.compile last, compiled beforehand by the warm-up. Unused seconds pass on to
# the next step.
STEPS=(env build compile tests smoke memcheck racecheck models)
declare -A BUDGET
COMPILE_ARGS=()
if [ "$MODE" = quick ]; then
  BUDGET=([env]=15 [build]=80 [compile]=100 [tests]=70 [smoke]=20 [memcheck]=20 [racecheck]=20
          [models]=75)
  MODEL_ARGS=()
elif [ "$MODE" = profile ]; then
  # profile: about 40 s per backend under ncu for M0 once Triton has compiled (M4's not yet
  # measured: its eager pass may not fit); the compile step compiles the models' kernels only
  STEPS=(env build compile tests profile)
  BUDGET=([env]=15 [build]=80 [compile]=40 [tests]=20 [profile]=200)
  COMPILE_ARGS=(--models-only)
else
  STEPS+=(layers)
  BUDGET=([env]=30 [build]=600 [compile]=120 [tests]=1800 [smoke]=120 [memcheck]=600 [racecheck]=600
          [models]=2400 [layers]=2400)
  MODEL_ARGS=(--models m0 m1 m2 m3 m4 m5 --compile-mode max-autotune-no-cudagraphs)
fi
START=$(date +%s)
TOTAL=0
for s in "${STEPS[@]}"; do TOTAL=$((TOTAL + BUDGET[$s])); done
DEADLINE=$((START + TOTAL))
declare -A RESULT
SUMMARY=()

# time_left STEP: seconds STEP may run: up to the deadline, less the budgets of the steps after it
time_left() {
  local reserve=0 after=0 s
  for s in "${STEPS[@]}"; do
    [ "$after" = 1 ] && reserve=$((reserve + BUDGET[$s]))
    [ "$s" = "$1" ] && after=1
  done
  echo $((DEADLINE - $(date +%s) - reserve))
}

# record STEP RESULT SECONDS
record() {
  RESULT[$1]=$2
  SUMMARY+=("| $1 | $2 | $3 |")
  printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$OUT/summary.tsv"
  echo "    $1: $2 ($3 s)"
}

# run STEP SIGNAL SECONDS COMMAND...: COMMAND under `timeout` (SIGNAL at SECONDS, SIGKILL 10 s
# later), its output to $OUT/STEP.log; returns COMMAND's status (124 or 137 when out of time).
run() {
  local name=$1 sig=$2 t=$3 start rc took
  shift 3
  if [ "$t" -lt 5 ]; then
    record "$name" "SKIPPED (no time left)" 0
    return 1
  fi
  echo "=== $name (at most $t s): $*"
  start=$(date +%s)
  timeout -s "$sig" -k 10 "$t" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  took=$(($(date +%s) - start))
  if [ $rc -eq 0 ]; then
    record "$name" ok "$took"
  elif [ $rc -eq 124 ] || { [ $rc -eq 137 ] && [ "$took" -ge "$t" ]; }; then
    record "$name" "TIMEOUT (at $t s)" "$took"
  else
    record "$name" "FAILED (exit $rc)" "$took"
  fi
  return $rc
}

skip() {
  record "$1" "SKIPPED ($2)" 0
}

# Stops the background warm-up (WARM) and its compile workers, and adds its line to the summary
# (not a step: an unfinished warm-up fails nothing).
stop_warm_up() {
  local state=finished rc
  if kill -0 "$WARM" 2>/dev/null; then
    state="stopped unfinished"
    # its own process group once it has started (bench_models_gpu.warm_up), else the process
    kill -TERM -- -"$WARM" 2>/dev/null || kill -TERM "$WARM"
    for _ in 1 2 3 4 5; do kill -0 "$WARM" 2>/dev/null && sleep 1; done
    kill -KILL -- -"$WARM" 2>/dev/null || kill -KILL "$WARM" 2>/dev/null
  fi
  wait "$WARM"
  rc=$?
  if [ "$state" = finished ] && [ $rc -ne 0 ]; then state="FAILED (exit $rc, see warm-up.log)"; fi
  SUMMARY+=("| (warm-up, beside smoke and sanitizer) | $state | $(($(date +%s) - WARM_START)) |")
}

# The machine and versions to $OUT/env.txt; fails without a CUDA GPU.
env_facts() {
  {
    echo "date: $(date -Is)  mode: $MODE  nproc: $(nproc)  host: $(hostname)"
    git rev-parse HEAD && git status --short | head -n 20
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm \
      --format=csv
    nvidia-smi
    nvcc --version | tail -n 2
    compute-sanitizer --version | tail -n 1
  } >"$OUT/env.txt" 2>&1
  "$PY" - >>"$OUT/env.txt" <<'PY'
import importlib.metadata as md
import sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version())
for pkg in ("triton", "pytest", "pytest-xdist", "ninja", "setuptools", "numpy"):
    try:
        print(pkg, md.version(pkg))
    except md.PackageNotFoundError:
        print(pkg, "not installed")
sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU: torch.cuda.is_available() is False")
PY
}

# Build tools only (torch is never reinstalled); without internet the install fails at once.
need() {
  "$PY" -c "import $1" 2>/dev/null || command -v "$1" >/dev/null ||
    timeout 60 "$PY" -m pip install -q --retries 0 --timeout 5 "$1" ||
    echo "$1 is missing and could not be installed"
}

build_ext() {
  need ninja
  TORCH_CUDA_ARCH_LIST=$CUDA_ARCH MAX_JOBS=$(nproc) \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . || return 1
  "$PY" -c "import sys; from efficientvit_kernels.ops import has_compiled_kernels
sys.exit(0 if has_compiled_kernels('cuda') else 'built without the CUDA kernels')"
}

run_tests() {
  need pytest
  # -v: a line per test as it ends, so a run stopped by SIGKILL still shows what failed
  local args=(-v -p no:cacheprovider -rf --durations=15 "--junitxml=$OUT/tests.xml")
  if [ "$MODE" != full ]; then args+=(-m "not gpu_full"); fi
  if [ -n "$TESTS" ]; then args+=(-k "$TESTS"); fi
  if [ "$GDB" = 1 ]; then
    local gdb
    gdb=$(command -v cuda-gdb || echo /usr/local/cuda/bin/cuda-gdb)
    # one process (no xdist workers), stopped where it faults; bt: where, native frames
    "$gdb" -q -batch -ex run -ex bt -ex "info registers rip" --args \
      "$PY" -m pytest "${args[@]}" -p no:xdist tests/test_gpu.py
    return
  fi
  if "$PY" -c "import xdist" 2>/dev/null; then
    args+=(-n "$(($(nproc) < 16 ? $(nproc) : 16))")
    # a CPU thread a worker for the float64 references, not nproc each beside the compilers
    export OMP_NUM_THREADS=1
  fi
  "$PY" -m pytest "${args[@]}" tests/test_gpu.py
}
# Nsight Compute's counters for each kernel of one M4 forward (gpu_profile.py; the speed goals'
# model: M0's are in the first two runs' results), a backend at a time, each to
# $OUT/ncu_<backend>.csv (one row per kernel). Clocks as found (METHOD: never change them).
# The sections: time and throughput, launch shape, occupancy, stall reasons, memory traffic;
# the metric: instructions executed, for the static profile's counts.
profile_kernels() {
  local ncu backend rc=0
  ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null |
    head -n 1)
  for backend in cuda triton eager; do
    "$ncu" --clock-control none --profile-from-start off --csv --page raw \
      --section SpeedOfLight --section LaunchStats --section Occupancy \
      --section WarpStateStats --section MemoryWorkloadAnalysis \
      --metrics smsp__inst_executed.sum \
      --log-file "$OUT/ncu_$backend.csv" \
      "$PY" benchmarks/gpu_profile.py --model m4 --batch 256 --backend "$backend" || rc=1
  done
  return $rc
}
export -f env_facts need build_ext run_tests profile_kernels

# SIGINT stops pytest cleanly (its summary, tests.xml), unless this shell started with SIGINT
# ignored (a background job without job control), which every child inherits: then SIGTERM.
SIGIGN=$(awk '/^SigIgn/ {print $2}' /proc/$$/status 2>/dev/null)
STOP_TESTS=INT
if [ $((0x${SIGIGN:-0} >> 1 & 1)) = 1 ]; then STOP_TESTS=TERM; fi

# The quick and full modes' steps after the tests: smoke, the sanitizers, the models (and the
# layers in full), with the warm-up beside the first three.
check_and_time() {
  local tool t
  # Beside the smoke and sanitizer steps, which barely use the GPU, a run of what the models
  # step will compile (the fused models' Triton kernels, torch.compile) fills the caches on
  # disk, so that the models step spends its budget measuring. It is stopped, with its compile
  # workers (its own process group), before the models step starts timing.
  WARM_START=$(date +%s)
  TORCHINDUCTOR_COMPILE_THREADS=$(($(nproc) / 2 + 1)) "$PY" benchmarks/bench_models_gpu.py \
    --warm-up "${MODEL_ARGS[@]}" >"$OUT/warm-up.log" 2>&1 &
  WARM=$!
  # The Triton autotuning results are cached too in the smoke and sanitizer runs only (the
  # tests' runs share the GPU; the models step autotunes afresh).
  run smoke TERM "$(time_left smoke)" env TRITON_CACHE_AUTOTUNING=1 \
    "$PY" benchmarks/bench_gpu.py --smoke
  SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for tool in memcheck racecheck; do
    if [ ! -x "$SANITIZER" ]; then
      record "$tool" "FAILED (compute-sanitizer not found)" 0
      continue
    fi
    # Only this library's kernels are instrumented (torch's own would only slow the run): the
    # CUDA ones by their namespace, the Triton ones by name; a kernel matching any of the
    # --kernel-name filters is checked. Without torch's caching allocator each tensor is its own
    # allocation, so memcheck sees an access past a tensor's end, not into a neighbour's.
    run "$tool" TERM "$(time_left "$tool")" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      TRITON_CACHE_AUTOTUNING=1 "$SANITIZER" --tool "$tool" --error-exitcode 1 \
      --kernel-name kns=efficientvit --kernel-name kns=_cga_kernel \
      --kernel-name kns=_dwconv_kernel --kernel-name kns=_ffn_kernel \
      --kernel-name kns=_ffn_staged_kernel --kernel-name kns=_conv3x3_stride2_kernel \
      --kernel-name kns=_conv3x3_stride2_pair_kernel \
      --kernel-name kns=_conv1x1_kernel --kernel-name kns=_squeeze_excite_gate_kernel \
      --kernel-name kns=_channel_mean_kernel --kernel-name kns=_channel_scale_kernel \
      "$PY" benchmarks/bench_gpu.py --smoke
  done
  stop_warm_up
  # The script stops its own measurements 15 s before the step's end, to write its tables.
  t=$(time_left models)
  run models TERM "$t" "$PY" benchmarks/bench_models_gpu.py --out "$OUT/models" \
    --budget "$((t > 20 ? t - 15 : 5))" "${MODEL_ARGS[@]}"
  if [ "$MODE" = full ]; then
    run layers TERM "$(time_left layers)" "$PY" benchmarks/bench_gpu.py \
      --out "$OUT/bench_gpu.json"
  fi
}

# (steps)
if run env TERM "$(time_left env)" bash -c env_facts; then
  CUDA_ARCH=$(timeout 10 nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1)
  CUDA_ARCH=${CUDA_ARCH:-$("$PY" -c \
    "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
  export CUDA_ARCH
  echo "    building for TORCH_CUDA_ARCH_LIST=$CUDA_ARCH"
  run build TERM "$(time_left build)" bash -c build_ext
  if [ "${RESULT[build]}" = ok ] ||
    timeout 60 "$PY" -c "import efficientvit_kernels" 2>/dev/null; then
    # the Triton kernels the tests and models launch, compiled in parallel into the shared cache
    run compile TERM "$(time_left compile)" "$PY" benchmarks/gpu_precompile.py \
      --jobs "$(($(nproc) < 16 ? $(nproc) : 16))" "${COMPILE_ARGS[@]}"
    run tests "$STOP_TESTS" "$(time_left tests)" bash -c run_tests
    if [ "$MODE" = profile ]; then
      run profile TERM "$(time_left profile)" bash -c profile_kernels
    else
      check_and_time
    fi
  else
    for s in "${STEPS[@]:2}"; do skip "$s" "no build"; done
  fi
else
  for s in "${STEPS[@]:1}"; do skip "$s" "no CUDA GPU"; done
fi

# (report)
{
  echo
  for s in "${STEPS[@]}"; do
    case "${RESULT[$s]:-}" in ok | SKIPPED*) continue ;; esac
    log="$OUT/$s.log"
    [ -f "$log" ] || continue
    echo "--- $s: ${RESULT[$s]} ($log)"
    case $s in
      build) pattern=' error:|^error|FAILED:|Error:' ;;  # compilers, pip, ninja, Python
      tests) pattern=' (FAILED|ERROR) |^(FAILED|ERROR) |[0-9]+ (passed|failed|error)' ;;
      memcheck | racecheck) pattern='^========= .*(Invalid|[Hh]azard|[Ee]rror|SUMMARY)' ;;
      *) pattern='^FAILED|Error|error:' ;;
    esac
    grep -E -m 15 "$pattern" "$log" || tail -n 10 "$log"
  done
  echo
  gpu=$(grep -s -m 1 -A 1 '^name, compute_cap' "$OUT/env.txt" | tail -n 1)
  echo "## GPU check ($MODE): ${gpu:-no GPU found}"
  echo
  echo "| step | result | seconds |"
  echo "|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
  echo "| total | of $TOTAL s budgeted | $(($(date +%s) - START)) |"
  if [ -s "$OUT/tests.log" ]; then
    echo
    echo "tests: $(grep -E '[0-9]+ (passed|failed|error)' "$OUT/tests.log" | tail -n 1 | tr -d '=' |
      xargs)"
  fi
  if [ -s "$OUT/models.md" ]; then
    echo
    cat "$OUT/models.md"
  elif [ -s "$OUT/models.jsonl" ]; then
    echo
    timeout 60 "$PY" benchmarks/bench_models_gpu.py --render "$OUT/models.jsonl"
  fi
  if [ -s "$OUT/bench_gpu.md" ]; then
    echo
    # fp16 rows only, to keep it short; bench_gpu.md and bench_gpu.json hold everything
    grep -E '^\| layer|^\|---' "$OUT/bench_gpu.md"
    grep -E '^\|.*\| float16 \|' "$OUT/bench_gpu.md"
  fi
} | tee "$OUT/summary.md"

# At most 8 files come back from a lent machine: the tables stay as they are, everything else
# (env.txt, the logs, tests.xml, summary.tsv, ncu_*.csv) goes into logs.tar.gz.
(cd "$OUT" && find . -maxdepth 1 -type f ! -name summary.md ! -name 'models.*' \
  ! -name 'bench_gpu.*' ! -name logs.tar.gz ! -name .packed -printf '%P\n' | sort >.packed &&
  tar -czf logs.tar.gz -T .packed && xargs rm -f <.packed && rm -f .packed)

for s in "${STEPS[@]}"; do
  [ "${RESULT[$s]:-}" = ok ] || exit 1
done
exit 0
