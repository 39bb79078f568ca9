#!/usr/bin/env bash
# One device call on the lent GPU machine: build, test and benchmark moe_ext inside the call's
# 10-minute limit, with every log kept. CI never runs this (it has no GPU).
#
#   .ci/gpu_session.sh [phase ...]        default phases: build test
#
# Phases (in the order given; each step is skipped, and says so, once the deadline is near):
#   build     pip wheels from .whl/ (nvidia-cutlass; carry it), then the extension in place
#             (setup.py build_ext --inplace, MAX_JOBS=16), unless moe_ext/_C.srchash says the .so
#             there was built from these very sources (a warm machine, or a carried .so). The
#             stripped .so comes back as $OUT/_C.so.part-* with $OUT/_C.srchash, to be carried.
#   cmake     the CMake build (kernel library, bench_*, test_*) and ctest, in the foreground.
#   cmake_bg  the same build started in the background (it competes for the CPU with what runs
#             meanwhile: not before timings); sanitize and bench wait for it, then run ctest.
#             NOTE: what a call leaves running is killed when the call returns, so a build is
#             only useful to the phases of the same call.
#   test      every tests/test_cuda_*.py, each under its own timeout, cheapest first; the grouped
#             GEMM once per kernel (portable; sm90 forward; sm90 weight gradient) so that a hang of
#             one costs only its own limit; the layer and ipc tests on the portable GEMM (a Hopper
#             GEMM bug must not mask theirs). MOE_EXT_TESTS="test_ep_ipc_worlds test_layer" runs only
#             the steps named (the names printed in summary.txt).
#   bench_py  the Python benchmarks (need only the extension): moe-ext bench, a kernel profile of the
#             layer and gating (bench/profile_kernels.py), bench/*.py, demo.
#   bench     the C++ benchmarks (need the cmake build), ep under MPS.
#   sanitize  compute-sanitizer memcheck/racecheck over small cases (C++ benchmarks, which check
#             their results, and a few pytest cases).
#   quick     a smoke test: one family of small cases per stage, stopping at the first failure.
#
# A 30-minute session, in calls of at most 10 minutes, carrying .whl (and the .so once built):
#   1. build quick test               the build, then as many tests as fit
#   2. build test                     (the .so carried; MOE_EXT_TESTS= the steps not yet run)
#   3. build bench_py cmake bench     the numbers for bench/RESULTS.md
#   4. build cmake sanitize           if device time is left
# MPS (GPU.md) is started at the beginning and stopped at the end: the ipc tests and bench_ep run
# 2, 4 and 8 ranks on the one GPU, which without MPS take turns in time slices.
#
# Output: a one-line verdict per step on stdout (the device reply keeps only the last 12,000
# characters), and every log in $OUT/logs.tgz (with $OUT/summary.txt). Environment:
# MOE_EXT_DEADLINE_S (seconds from the start after which nothing new starts; 560),
# MOE_EXT_TESTS (the test steps to run; default all), MOE_EXT_TEST_TIMEOUT_S (per pytest case,
# where pytest-timeout is installed; 150), MOE_EXT_PYTEST_ARGS (extra pytest arguments, no -k:
# the steps set their own).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/out}
LOGS=/tmp/moe_ext_gpu_logs
rm -rf "$LOGS" && mkdir -p "$LOGS" "$OUT"
START=$EPOCHSECONDS
DEADLINE=${MOE_EXT_DEADLINE_S:-560}
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$LOGS/summary.txt"
phases=("$@")
((${#phases[@]})) || phases=(build test)

say() { printf '[%4ds] %s\n' $((EPOCHSECONDS - START)) "$*" | tee -a "$SUMMARY"; }
left() { echo $((DEADLINE - (EPOCHSECONDS - START))); }

# run NAME TIMEOUT CMD...: runs CMD with its output in $LOGS/NAME.log under min(TIMEOUT, time left);
# prints one verdict line plus the log's failure lines. Returns CMD's status (124: timed out).
run() {
  local name=$1 limit=$2
  shift 2
  local l
  l=$(left)
  if ((l < 15)); then
    say "SKIP $name (deadline)"
    return 125
  fi
  ((limit > l)) && limit=$l
  local t0=$EPOCHSECONDS rc=0
  timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
  local verdict=ok
  ((rc == 124 || rc == 137)) && verdict="TIMEOUT after ${limit}s"
  ((rc != 0 && rc != 124 && rc != 137)) && verdict="FAILED rc=$rc"
  # pytest's own last line says how many passed/failed/skipped.
  local tail_line
  tail_line=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$LOGS/$name.log" | grep -E '^=*\s*[0-9]' | tail -n 1)
  say "$name: $verdict ($((EPOCHSECONDS - t0))s) ${tail_line}"
  if ((rc != 0)); then
    grep -E '^(FAILED|ERROR) |Error|error:|Timeout|timed out|mismatch|#wrong' "$LOGS/$name.log" | head -n 12 | sed 's/^/    /' | cut -c1-300 | tee -a "$SUMMARY"
    ((rc == 124 || rc == 137)) && tail -n 5 "$LOGS/$name.log" | sed 's/^/    | /' | cut -c1-300 | tee -a "$SUMMARY"
  fi
  return $rc
}

finish() {
  if [[ -n "${MPS_STARTED:-}" ]]; then echo quit | nvidia-cuda-mps-control >/dev/null 2>&1; fi
  say "done: phases ${phases[*]}"
  cp "$SUMMARY" "$OUT/summary.txt" 2>/dev/null
  tar czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null
}
trap finish EXIT

stop_mps() {  # before single-process timings: MPS would sit between them and the GPU
  [[ -n "${MPS_STARTED:-}" ]] || return 0
  echo quit | nvidia-cuda-mps-control >/dev/null 2>&1
  MPS_STARTED=
  sleep 1
  say "MPS stopped"
}

start_mps() {
  [[ -n "${MPS_STARTED:-}" ]] && return
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d 2>/dev/null; then MPS_STARTED=1; say "MPS started"; else say "MPS did not start (already running?)"; fi
}

say "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo '+dirty'), phases: ${phases[*]}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/gpu: /' | tee -a "$SUMMARY"
python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version() if torch.cuda.is_available() else None)' 2>&1 | tee -a "$SUMMARY"

# The nvidia-cutlass wheel (headers only) travels in .whl/; the machine has no registry.
if compgen -G ".whl/*.whl" >/dev/null; then
  python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1 &&
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

# The extension is rebuilt only when the sources changed: a content hash of csrc/ and setup.py
# is kept beside the .so (moe_ext/_C.srchash), so a .so carried from an earlier call is reused.
src_hash() { find csrc setup.py -type f | LC_ALL=C sort | xargs sha1sum | sha1sum | cut -c1-16; }
so_fresh() {
  compgen -G "moe_ext/_C*.so" >/dev/null && [[ -f moe_ext/_C.srchash ]] && [[ "$(cat moe_ext/_C.srchash)" == "$(src_hash)" ]]
}

phase_build() {
  if so_fresh; then
    say "build: moe_ext/_C*.so matches the sources (moe_ext/_C.srchash), not rebuilt (nor returned)"
  else
    rm -f moe_ext/_C.srchash
    run build 540 python setup.py build_ext --inplace || return 1
    src_hash >moe_ext/_C.srchash
    # Bring the .so back at once (a failed import check below must not lose a 9-minute build):
    # stripped, in pieces under the 16 MiB limit of a returned file, for the next call to carry:
    # cat _C.so.part-* > moe_ext/<name>; cp _C.srchash moe_ext/.
    local so
    so=$(ls moe_ext/_C*.so | head -n 1)
    strip --strip-unneeded -o /tmp/_C.so "$so" 2>/dev/null || cp "$so" /tmp/_C.so
    split -b 15M -d /tmp/_C.so "$OUT/_C.so.part-"
    cp moe_ext/_C.srchash "$OUT/_C.srchash"
    say "build: $(basename "$so"), $(du -h /tmp/_C.so | cut -f1) stripped, in \$OUT/_C.so.part-* (+ _C.srchash)"
  fi
  run import 60 python -c "import torch, moe_ext; assert torch.cuda.is_available(); x = torch.randn(4, 8, device='cuda'); print(moe_ext.__file__, moe_ext.topk_gating(x, 2)[0].cpu())" || return 1
  # An error message that formats an integer: it crashed the process when the .so carried its own
  # static libstdc++ (a compiler without a shared one; setup.py now avoids such a compiler).
  run import_error 60 python -c "
import torch, moe_ext
try:
    moe_ext.topk_gating(torch.randn(4, 1025, device='cuda'), 2)
except RuntimeError as e:
    assert '1025' in str(e), e
else:
    raise SystemExit('no error raised')" || return 1
}

# The CMake build (bench_*, test_*) compiles the kernels again; started in the background it
# overlaps the GPU-bound tests. The bench and sanitize phases wait for it.
phase_cmake_bg() {
  ( cmake -S . -B build/cmake -G Ninja -DPython3_EXECUTABLE="$(command -v python)" &&
    nice -n 10 cmake --build build/cmake -j "$MAX_JOBS" ) >"$LOGS/cmake_bg.log" 2>&1 &
  CMAKE_PID=$!
  say "cmake: building in the background (pid $CMAKE_PID)"
}
wait_cmake() {
  [[ -n "${CMAKE_PID:-}" ]] || return 0
  local t0=$EPOCHSECONDS
  while kill -0 "$CMAKE_PID" 2>/dev/null && (($(left) > 20)); do sleep 2; done
  if kill -0 "$CMAKE_PID" 2>/dev/null; then say "cmake: still building at the deadline"; return 1; fi
  wait "$CMAKE_PID"; local rc=$?
  CMAKE_PID=
  say "cmake: background build rc=$rc (waited $((EPOCHSECONDS - t0))s)"
  ((rc == 0)) || { grep -E 'error|FAILED' "$LOGS/cmake_bg.log" | head -n 10 | sed 's/^/    /' | tee -a "$SUMMARY"; return 1; }
  run ctest 180 ctest --test-dir build/cmake --output-on-failure --timeout 120
}

phase_cmake() {
  run cmake_configure 120 cmake -S . -B build/cmake -G Ninja -DPython3_EXECUTABLE="$(command -v python)" || return 1
  run cmake_build 540 cmake --build build/cmake -j "$MAX_JOBS" || return 1
  run ctest 240 ctest --test-dir build/cmake --output-on-failure --timeout 120
}

# Per-case time limit where pytest-timeout is installed: a stuck case then fails alone and the
# file's summary is still printed (a step killed by `timeout` prints none; -v at least names each
# case as it finishes). A kernel that never returns blocks the signal: the step's limit ends it.
# CASE_TIMEOUT=S before a pytest_file call sets it for that step: the multi-rank files need more
# than their worlds' own limits (run_world), so that those report which rank hung first.
HAVE_PYTEST_TIMEOUT=
python -c "import pytest_timeout" 2>/dev/null && HAVE_PYTEST_TIMEOUT=1
read -ra PYTEST_EXTRA <<<"${MOE_EXT_PYTEST_ARGS:-}"

want() {  # step name: is it among MOE_EXT_TESTS (all when unset)?
  [[ -z "${MOE_EXT_TESTS:-}" ]] && return 0
  [[ " $MOE_EXT_TESTS " == *" $1 "* ]]
}

pytest_file() {  # name timeout file [pytest args...]: one test file, every failure listed
  local name=$1 limit=$2 file=$3
  shift 3
  want "$name" || return 0
  local case_limit=()
  [[ -n $HAVE_PYTEST_TIMEOUT ]] &&
    case_limit=(--timeout="${CASE_TIMEOUT:-${MOE_EXT_TEST_TIMEOUT_S:-150}}" --timeout-method=signal)
  # NOTE: ${a[@]+"${a[@]}"}: an empty array under set -u is an error in bash < 4.4
  run "$name" "$limit" python -m pytest -v -rfE --tb=short --maxfail=40 -p no:cacheprovider \
    ${case_limit[@]+"${case_limit[@]}"} ${PYTEST_EXTRA[@]+"${PYTEST_EXTRA[@]}"} "$file" "$@"
}

phase_test() {
  # Single-process files first, without MPS (NCCL under MPS is untried here; none of them needs it).
  stop_mps
  pytest_file test_permute 360 tests/test_cuda_permute.py
  pytest_file test_swiglu 120 tests/test_cuda_swiglu.py
  pytest_file test_gating 360 tests/test_cuda_gating.py
  # The kernel is a parameter of the GEMM tests' ids: run each kernel on its own, so a hang of
  # the Hopper kernel (mbarrier phases) costs only its own time limit.
  pytest_file test_gemm_portable 240 tests/test_cuda_grouped_gemm.py -k "not sm90"
  pytest_file test_gemm_sm90 150 tests/test_cuda_grouped_gemm.py -k "sm90 and not wgrad"
  pytest_file test_wgrad_sm90 120 tests/test_cuda_grouped_gemm.py -k "sm90 and wgrad"
  # The Hopper kernels with one wgmma batch in flight across K-stages (not yet the default).
  MOE_EXT_SM90_MMA_IN_FLIGHT=1 pytest_file test_sm90_inflight 240 tests/test_cuda_grouped_gemm.py -k "sm90"
  CASE_TIMEOUT=170 pytest_file test_nccl 240 tests/test_cuda_nccl.py
  # Ranks sharing the GPU: MPS. Layer and ipc tests on the portable GEMM (a Hopper GEMM bug must
  # not mask theirs); a case limit past their worlds' own (run_world names the rank that hung).
  start_mps
  CASE_TIMEOUT=260 MOE_EXT_GROUPED_GEMM_KERNEL=portable pytest_file test_ep_ipc_worlds 360 tests/test_cuda_ep_ipc.py \
    -k "test_ipc_matches_gloo"
  CASE_TIMEOUT=240 MOE_EXT_GROUPED_GEMM_KERNEL=portable pytest_file test_ep_ipc 420 tests/test_cuda_ep_ipc.py \
    -k "not test_ipc_matches_gloo"
  CASE_TIMEOUT=170 MOE_EXT_GROUPED_GEMM_KERNEL=portable pytest_file test_layer 240 tests/test_cuda_layer.py
  CASE_TIMEOUT=220 MOE_EXT_GROUPED_GEMM_KERNEL=portable pytest_file test_parallel 240 tests/test_cuda_parallel.py
}

phase_sanitize() {
  wait_cmake
  stop_mps  # NOTE: compute-sanitizer does not run under MPS
  local cs=(compute-sanitizer --error-exitcode 9 --print-limit 20)
  local B=build/cmake
  if [[ -x $B/bench_permute ]]; then
    # The C++ benchmarks check their results, so one small case each under the sanitizer is a test.
    run san_permute_cpp 120 "${cs[@]}" --tool memcheck $B/bench_permute -s 4097x2056x8 -n 1 -w 0 -L 0
    run san_permute_race 120 "${cs[@]}" --tool racecheck $B/bench_permute -s 1000x520x8 -n 1 -w 0 -L 0
    run san_gating_cpp 120 "${cs[@]}" --tool memcheck $B/bench_gating -s 4097x256x8 -n 1 -w 0 -L 0
    run san_gating_race 120 "${cs[@]}" --tool racecheck $B/bench_gating -s 1000x60x6 -n 1 -w 0 -L 0
    run san_gemm_cpp 180 "${cs[@]}" --tool memcheck $B/test_grouped_gemm
  fi
  # Test ids: narrow_rows H-T-k-E; every_option_combination score-renorm-bias-groups-cf-noise-seq_len;
  # forward_matches_float64 ...dtype-activation-trans_b-kind-E. A few non-empty cases each.
  run san_permute_py 180 "${cs[@]}" --tool memcheck python -m pytest -q -x -p no:cacheprovider tests/test_cuda_permute.py -k "narrow_rows and (40-4097-8-256 or 8-3-2-8)"
  run san_gating_py 180 "${cs[@]}" --tool memcheck python -m pytest -q -x -p no:cacheprovider tests/test_cuda_gating.py -k "every_option_combination and (softmax-True-True-True-1.25-True-512 or sigmoid-False-False-False-None-False-None)"
  run san_gemm_py 180 "${cs[@]}" --tool memcheck python -m pytest -q -x -p no:cacheprovider tests/test_cuda_grouped_gemm.py -k "forward_matches_float64 and portable and dtype0-swiglu-False-odd and not 128 and not 256"
  run san_gemm_sm90_py 180 "${cs[@]}" --tool memcheck python -m pytest -q -x -p no:cacheprovider tests/test_cuda_grouped_gemm.py -k "forward_matches_float64 and sm90 and dtype0-swiglu-False-odd and not 128 and not 256"
}

phase_bench() {
  wait_cmake
  stop_mps
  local B=build/cmake J=$LOGS
  if [[ -x $B/bench_gating ]]; then
    run bench_gemm_cpp 240 $B/bench_grouped_gemm -J "$J/bench_grouped_gemm.json"
    run bench_gating_cpp 90 $B/bench_gating -d fp32 -J "$J/bench_gating.json"  # fp32 logits: the issue's baseline
    # Is the routing kernel latency-bound (smaller tiles / more blocks help) or issue-bound?
    run bench_gating_shapes 90 $B/bench_gating -d fp32 -s 16384x256x8x8x4,16384x8x2,128x256x8x8x4 \
      --tile-rows 0,8,16,32 --warps 0,4 -J "$J/bench_gating_shapes.json"
    run bench_permute_cpp 120 $B/bench_permute -s 16384x7168x8 -J "$J/bench_permute.json"
    run bench_wgrad_cpp 180 $B/bench_grouped_gemm -g 1 -l uniform -s 32768x8x4096x14336,32768x32x7168x4096,32768x32x2048x7168 -J "$J/bench_wgrad.json"
    MOE_EXT_SM90_MMA_IN_FLIGHT=1 run bench_wgrad_cpp_inflight 180 $B/bench_grouped_gemm -g 1 -l uniform \
      -s 32768x8x4096x14336,32768x32x7168x4096,32768x32x2048x7168 -J "$J/bench_wgrad_inflight.json"
    start_mps
    run bench_ep_2 90 $B/bench_ep --ranks 2 -J "$J/bench_ep_2.json"
    run bench_ep_4 90 $B/bench_ep --ranks 4 -J "$J/bench_ep_4.json"
    run bench_ep_8 120 $B/bench_ep --ranks 8 -J "$J/bench_ep_8.json"
    run bench_ep_2m 60 $B/bench_ep --ranks 2 --masked -T 128 -J "$J/bench_ep_2m.json"
    run bench_ep_8m 60 $B/bench_ep --ranks 8 --masked -T 128 -J "$J/bench_ep_8m.json"
    run bench_ep_nccl1 60 $B/bench_ep --ranks 1 --one-gpu-per-rank -J "$J/bench_ep_nccl1.json"  # the nccl code path
  else
    say "bench: no build/cmake executables (run the cmake phase first); C++ benchmarks skipped"
  fi
}

phase_bench_py() {
  # Single-process benchmarks first, without MPS (it would sit between them and the GPU); the
  # whole-pipeline table first: it is the one figure of every stage against its torch baseline.
  stop_mps
  local J=$LOGS
  run bench_cli 240 python -m moe_ext bench --device cuda --shape mixtral --json "$J/cli_mixtral.json"
  run profile 150 python bench/profile_kernels.py --json "$J/profile.json"  # which kernels the layer and gating spend on
  run bench_gemm_py 300 python bench/grouped_gemm_bench.py --kernels portable,sm90,sm90:1 --json "$J/gemm_py.json"
  run bench_gating_py 120 python bench/gating_bench.py --json "$J/gating_py.json"
  run bench_permute_py 120 python bench/permute_bench.py --json "$J/permute_py.json"
  run bench_layer_decode 150 python bench/layer_decode_bench.py --json "$J/layer_decode.json"  # world-1 decode steps
  # decode-sized permute: the one-block index (default) against the multi-kernel one (RESULTS.md, session 15)
  run bench_permute_decode 60 python bench/permute_bench.py --tokens 128 --iters 200 --json "$J/permute_decode.json"
  run bench_permute_decode_general 60 env MOE_EXT_PERMUTE_SMALL_INDEX=0 python bench/permute_bench.py --tokens 128 \
    --iters 200 --json "$J/permute_decode_general.json"
  start_mps
  run bench_ep_py_8 150 python bench/ep_bench.py --ranks 8 --profile 3 --json "$J/ep_py_8.json"
  run bench_ep_py_8_partial 150 python bench/ep_bench.py --ranks 8 --partial --json "$J/ep_py_8_partial.json"
  run bench_ep_py_2_decode 120 python bench/ep_bench.py --ranks 2 --tokens 128 --masked --iters 200 \
    --json "$J/ep_py_2_decode.json"
  run bench_ep_py_2_decode_partial 120 python bench/ep_bench.py --ranks 2 --tokens 128 --masked --partial \
    --iters 200 --json "$J/ep_py_2_decode_partial.json"
  run bench_ep_py_2_decode_grown 120 python bench/ep_bench.py --ranks 2 --tokens 128 --masked --grow-to 4096 \
    --num-sms 16 --iters 200 --json "$J/ep_py_2_decode_grown.json"  # vs the fresh buffer: RESULTS.md, session 13
  run bench_ep_tp 150 python bench/ep_tp_bench.py --ep 2 --tp 2 --device cuda --tokens 4096 --hidden 4096 --ffn 2048 \
    --experts 32 --k 4 --json "$J/ep_tp.json"
  run demo_cuda_w2 180 python -m moe_ext demo --device cuda --world 2 --steps 100 --no-progress --png none --skip-check
}

phase_quick() {
  stop_mps
  pytest_file quick_permute 60 tests/test_cuda_permute.py -x -k "narrow_rows"
  pytest_file quick_gating 60 tests/test_cuda_gating.py -x -k "every_option_combination"
  pytest_file quick_gemm_portable 60 tests/test_cuda_grouped_gemm.py -x -k "forward_matches_float64 and portable"
  pytest_file quick_gemm_sm90 60 tests/test_cuda_grouped_gemm.py -x -k "forward_matches_float64 and sm90"
  start_mps
  CASE_TIMEOUT=260 MOE_EXT_GROUPED_GEMM_KERNEL=portable pytest_file quick_ep 280 tests/test_cuda_ep_ipc.py -x \
    -k "matches_gloo and 2"
}

for p in "${phases[@]}"; do
  if ! declare -F "phase_$p" >/dev/null; then say "unknown phase $p"; continue; fi
  say "== phase $p"
  "phase_$p"
  rc=$?
  if [[ $p == build ]] && ((rc != 0)); then say "build failed: later phases skipped"; exit 1; fi
done
