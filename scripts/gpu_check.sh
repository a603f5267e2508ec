#!/usr/bin/env bash
# The one command a verification run on a card executes: from a fresh checkout on a fresh H100/H200 (torch
# 2.11 + triton 3.6 in its system Python, nvcc, cmake, ninja, no package registry), in at most 8 minutes
# wall including the build:
#
#   scripts/gpu_check.sh OUTDIR                 # on the card (wheels for diffusers/nvtx in .whl/, carried)
#   scripts/gpu_check.sh --dry-run OUTDIR       # the same phases on a CPU machine, tiny shapes (a CI test)
#
# Phases, in priority order, each time-boxed to what is left of the total (ARCOPO_CHECK_SECONDS, default
# 480) and each writing its results under OUTDIR as it finishes (a timeout keeps what finished):
#   0 wheels     pip install --no-index .whl/*.whl into /tmp (../shared/scripts/fetch-cuda-wheels.sh fills .whl)
#   1 build      pip install --no-build-isolation --no-deps -e . : the extension for the visible GPU's arch
#   2 doctor     versions, device, extension archs, backends         -> doctor.json
#   3 selftest   doctor --selftest: every kernel check, small + 1.3B  -> selftest.json
#   4 bench      doctor --bench --budget: the headline comparisons     -> bench_doctor.json
#   5 tests      the GPU tests (TRITON_INTERPRET=0)                    -> tests.xml
#   6 benchmarks pytest benchmarks/ with the time left                  -> bench.json, iteration_scaling.png
#   7 render     one Markdown page of all of it                         -> performance.md
# Every phase's output goes to OUTDIR/log.txt. At most 8 files in OUTDIR (what the device tool returns).
# Exit status: 0 when the self-test and the tests passed, 1 otherwise (the page is written either way).
set -uo pipefail

DRY=0
OUTDIR=""
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $a (usage: scripts/gpu_check.sh [--dry-run] OUTDIR)" >&2; exit 2 ;;
    *) OUTDIR="$a" ;;
  esac
done
if [ -z "$OUTDIR" ]; then
  echo "usage: scripts/gpu_check.sh [--dry-run] OUTDIR" >&2
  exit 2
fi
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TOTAL=${ARCOPO_CHECK_SECONDS:-480}
RESERVE=25  # seconds kept for the render
START=$(date +%s)
LOG="$OUTDIR/log.txt"
: > "$LOG"
export PYTHONUNBUFFERED=1
STATUS=0
PHASES=""

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( START + TOTAL - RESERVE - $(date +%s) )); }
note() { echo "[gpu_check +$(elapsed)s] $*" | tee -a "$LOG"; }

# phase NAME CAP_SECONDS CMD...: run CMD with at most min(CAP, time left) seconds; SIGINT first, so pytest
# and the doctor write what they have; its output is appended to log.txt.
phase() {
  local name=$1 cap=$2
  shift 2
  local budget
  budget=$(left)
  [ "$budget" -gt "$cap" ] && budget=$cap
  if [ "$budget" -lt 10 ]; then
    note "$name: skipped (no time left)"
    PHASES+="| $name | skipped | 0 | no time left |"$'\n'
    return 124
  fi
  note "$name: start (at most ${budget}s): $*"
  local t0 rc
  t0=$(date +%s)
  echo "===== $name =====" >> "$LOG"
  timeout -s INT -k 15 "$budget" "$@" >> "$LOG" 2>&1
  rc=$?
  note "$name: rc=$rc in $(( $(date +%s) - t0 ))s"
  local why=""
  { [ $rc -eq 124 ] || [ $rc -eq 130 ] || [ $rc -eq 2 ] && [ $(( $(date +%s) - t0 )) -ge "$budget" ]; } && why="time box reached"
  PHASES+="| $name | rc $rc | $(( $(date +%s) - t0 )) | $why |"$'\n'

  return $rc
}

note "gpu_check $( [ $DRY = 1 ] && echo '--dry-run ' )-> $OUTDIR, total ${TOTAL}s, $(git rev-parse --short=10 HEAD 2>/dev/null || echo 'no git')"

if [ $DRY = 0 ]; then
  # 0 wheels the card lacks (no registry there): installed into /tmp, found through PYTHONPATH
  if compgen -G ".whl/*.whl" > /dev/null; then
    phase wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/arcopo_site .whl/*.whl
    export PYTHONPATH="/tmp/arcopo_site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  # 1 the package and its extension, for the visible GPU (TORCH_CUDA_ARCH_LIST overrides)
  if ! phase build 150 "$PY" -m pip install --no-build-isolation --no-deps -e .; then
    note "build failed: installing without the extension (the torch fork serves; doctor says so)"
    ARCOPO_BUILD_EXTENSION=0 phase build_python_only 60 "$PY" -m pip install --no-build-isolation --no-deps -e .
  fi
  SELFTEST_ARGS=(--selftest --budget 75)  # the small shape first, then the 1.3B shape while time is left
  BENCH_ARGS=(--bench --budget 110)
  TESTS=(tests/test_gpu_paths.py tests/test_kv_fork.py tests/test_sampler_step.py tests/test_neighbour.py
         tests/test_qk_norm_rope.py tests/test_attention_op.py tests/test_block_attn.py tests/test_sampler_compile.py
         tests/test_block_attn_tma.py)
  BENCHES=(benchmarks/bench_attention.py benchmarks/bench_kv_fork.py benchmarks/bench_step.py
           benchmarks/bench_neighbour.py benchmarks/bench_e2e.py benchmarks/bench_iteration.py
           benchmarks/bench_decode.py benchmarks/bench_qk_norm_rope.py)
  export TRITON_INTERPRET=0
else
  note "dry run: no wheels, no build (the checkout is installed), tiny shapes on CPU"
  SELFTEST_ARGS=(--selftest --ops consistency_step,philox_normal,neighbour_logprobs,kv_fork)
  BENCH_ARGS=(--bench --budget 3 --ops kv_fork,step)
  TESTS=(tests/test_gpu_paths.py)
  BENCHES=(benchmarks/bench_kv_fork.py -k cpu_tiny)
fi

phase doctor 60 "$PY" -m arcopo_fast.doctor --json "$OUTDIR/doctor.json"
phase selftest 100 "$PY" -m arcopo_fast.doctor "${SELFTEST_ARGS[@]}" --json "$OUTDIR/selftest.json" || STATUS=1
phase bench 130 "$PY" -m arcopo_fast.doctor "${BENCH_ARGS[@]}" --json "$OUTDIR/bench_doctor.json"
phase tests 110 "$PY" -m pytest "${TESTS[@]}" -q -p no:cacheprovider --junitxml "$OUTDIR/tests.xml"
rc=$?
[ $rc -ne 0 ] && [ $rc -ne 5 ] && STATUS=1  # 5: nothing collected / all skipped (a CPU dry run)
phase benchmarks 100000 "$PY" -m pytest "${BENCHES[@]}" -q -p no:cacheprovider --benchmark-json "$OUTDIR/bench.json"

# 7 the page (the time reserve is for this)
{
  echo "# arcopo_fast on $("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["device"]["name"])' "$OUTDIR/doctor.json" 2>/dev/null || echo '?')$( [ $DRY = 1 ] && echo ' (dry run)')"
  echo
  echo "scripts/gpu_check.sh$( [ $DRY = 1 ] && echo ' --dry-run'), commit $(git rev-parse --short=10 HEAD 2>/dev/null || echo '?'), $(date -u +%Y-%m-%dT%H:%MZ), $(elapsed) s of ${TOTAL} s."
  echo
  echo "| phase | result | seconds | note |"
  echo "|---|---|---|---|"
  printf '%s' "$PHASES"
  echo
  echo "## Doctor: versions, device, backends"
  echo
  "$PY" -m arcopo_fast.doctor --markdown-from "$OUTDIR/doctor.json" 2>&1
  echo "## Self-test"
  echo
  "$PY" -m arcopo_fast.doctor --markdown-from "$OUTDIR/selftest.json" 2>&1 | sed -n '/^Self-test/,$p'
  echo "## Headline comparisons (doctor --bench)"
  echo
  "$PY" -m arcopo_fast.doctor --markdown-from "$OUTDIR/bench_doctor.json" 2>&1 | sed -n '/^| item/,$p'
  echo
  echo "## Tests"
  echo
  echo '```'
  sed -n '/===== tests =====/,/===== benchmarks =====/p' "$LOG" | grep -E "passed|failed|error|skipped" | tail -5
  echo '```'
  echo
  echo "## Benchmarks (pytest benchmarks/)"
  echo
  if [ -s "$OUTDIR/bench.json" ]; then
    "$PY" scripts/render_performance.py "$OUTDIR/bench.json" --plot "$OUTDIR/iteration_scaling.png" 2>&1
  else
    echo "(no bench.json: the benchmarks phase did not finish in time)"
  fi
} > "$OUTDIR/performance.md" 2>> "$LOG"
note "done in $(elapsed)s: $OUTDIR/performance.md (status $STATUS)"
exit $STATUS
