#!/usr/bin/env bash
# One run on a lent GPU machine (the device tool): offline install, kernel self-check, the A/B of launch
# configs (perf/kernel_ab.py, on request), the bench, the GPU tests, the pytest-benchmark stack rows. Every
# step has its own time limit; the default run takes about 3-4 minutes on an H100 (run 1: self-check ~40 s,
# the whole bench matrix 89 s, GPU tests 76 s), inside the device tool's 10 minutes per command. Measurements
# come before the tests so that a run cut short still brings back numbers. The tool brings back at most 8
# files, so everything is written to a work folder and packed into $OUT/results.tgz after every step (a run
# killed at its limit keeps the steps it finished).
#   device run: bash perf/device_check.sh      (then unpack results.tgz into perf/results/<gpu>-<date>/)
# Environment (each step: NAME=0 skips it): SELFCHECK; BENCH with BENCH_ARGS (default --quick; "--modes
# fwd,fwdbwd" runs the whole matrix) and BENCH_TIMEOUT (200); KERNEL_AB=1 (off by default, ~2 min) runs
# perf/kernel_ab.py with KERNEL_AB_ARGS and KERNEL_AB_TIMEOUT (150), and KERNEL_AB2_ARGS="..." a second A/B
# (KERNEL_AB2_TIMEOUT); TUNE_ARGS="..." runs the tuner on those shapes (TUNE_TIMEOUT, 240; every candidate's time
# in tune-log.json; "--quick" searches the named variants alone), and TUNE2_ARGS="..." a second set of keys
# (TUNE2_TIMEOUT; tune2-log.json); TUNED_BENCH_ARGS="..." runs the bench again after the tuner, with its winners (TUNED_BENCH_TIMEOUT, 200);
# HALF_GRADS_BENCH_ARGS="..." the bench with TRITONLSTM_HALF_GRADS=1 (HALF_GRADS_BENCH_TIMEOUT, 150); GPU_TESTS with TESTS_K (pytest -k; default skips the tuner test, which compiles many candidates),
# TESTS_TIMEOUT (140) and TESTS_WORKERS (pytest-xdist processes sharing the GPU, default 8, 0 = none: the tests
# compile more than they run, and kernels of different processes time-slice rather than share SMs, so persistent
# launches keep every program resident; run 4: 106 tests in 45 s on 8 workers); STACK_AB=1 (off by default, ~1 min) runs perf/kernel_ab.py on the
# stack kernels (2 and 4 layers, H = 512, B = 16, every dtype); PERF_SUITE runs `pytest perf/ --benchmark-only`
# with -k PERF_SUITE_K (default "stack_training"; PERF_SUITE_K= runs the whole suite, 160 tests: give it
# PERF_SUITE_TIMEOUT=400) and PERF_SUITE_TIMEOUT (60); FLOOR=1 (off by default, ~1 min) runs perf/floor_probe.py
# with FLOOR_ARGS and FLOOR_TIMEOUT (120); GEMM=1 (off by default, ~20 s) runs perf/gemm_probe.py with GEMM_ARGS
# and GEMM_TIMEOUT (60); MEMORY=1 (off by default, ~2 x 30 s) runs perf/memory_probe.py (twice: as is, and with cuBLAS's workspaces off) with
# MEMORY_ARGS and MEMORY_TIMEOUT (90); NCU_ARGS="..." profiles one launch (perf/profile_one.py;
# NCU_KERNEL=lstm_bwd_kernel with --kernel bwd) with Nsight Compute; NCU_SOURCE_ARGS="..." the same launch's stall
# samples per SASS instruction (ncu-source.txt, perf/ncu_source.py; NCU_SOURCE_TIMEOUT, 90); SPREAD=1 (off by default, ~30 s) runs
# perf/launch_spread.py with SPREAD_ARGS and SPREAD_TIMEOUT (90); TIMELINE=1 (off by default, ~30-60 s) runs
# perf/step_timeline.py with TIMELINE_ARGS and TIMELINE_TIMEOUT (150), its Chrome traces kept in traces/ and a
# cProfile of our calls' host path in hostprof/; HOSTOPS=1 (off by default, ~10-20 s) runs perf/host_ops.py with
# HOSTOPS_ARGS and HOSTOPS_TIMEOUT (60): the host's time per launching op and per call, ours and cuDNN's.
set -uo pipefail
OUT=${OUT:-perf-out}
W=${WORK_DIR:-/tmp/tritonlstm-device}
rm -rf "$W" && mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1
py=python3
step() { echo "== $* ($(date +%T))"; }
pack() { tar czf "$OUT/results.tgz" -C "$W" . && cp "$W/summary.txt" "$OUT/summary.txt" 2>/dev/null; true; }
# measure NAME TIMEOUT CMD...: one measuring step; its output in NAME.txt (stderr in NAME.stderr), rc in the summary.
measure() {
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" 2> "$W/$name.stderr" | tee "$W/$name.txt"
    echo "$name rc=${PIPESTATUS[0]}" | tee -a "$W/summary.txt"
    pack
}
touch "$W/summary.txt"

step install
$py -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$W/install.log" 2>&1 || {
    tail -20 "$W/install.log"; pack; exit 1; }
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
  $py -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn',
  torch.backends.cudnn.version(), 'triton', triton.__version__, torch.cuda.get_device_name(0),
  torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"; } > "$W/environment.txt" 2>&1
cat "$W/environment.txt"

if [ "${SELFCHECK:-1}" != 0 ]; then
    step "self-check (python -m tritonlstm)"
    timeout 60 $py -m tritonlstm 2>&1 | tee "$W/selfcheck.txt"
    echo "selfcheck rc=${PIPESTATUS[0]}" | tee -a "$W/summary.txt"
    pack
fi

if [ "${KERNEL_AB:-0}" != 0 ]; then
    step "A/B of launch configs, recurrence kernels alone (perf/kernel_ab.py ${KERNEL_AB_ARGS:-})"
    measure kernel_ab "${KERNEL_AB_TIMEOUT:-150}" $py perf/kernel_ab.py ${KERNEL_AB_ARGS:-} --json "$W/kernel_ab.json"
fi
if [ -n "${KERNEL_AB2_ARGS:-}" ]; then
    step "a second A/B (perf/kernel_ab.py $KERNEL_AB2_ARGS)"
    measure kernel_ab2 "${KERNEL_AB2_TIMEOUT:-150}" $py perf/kernel_ab.py $KERNEL_AB2_ARGS --json "$W/kernel_ab2.json"
fi

if [ "${FLOOR:-0}" != 0 ]; then
    step "floor of a persistent step: exchange alone against the forward kernel (perf/floor_probe.py ${FLOOR_ARGS:-})"
    measure floor "${FLOOR_TIMEOUT:-120}" $py perf/floor_probe.py ${FLOOR_ARGS:-} --json "$W/floor.json"
fi

if [ "${GEMM:-0}" != 0 ]; then
    step "float32 GEMMs: kernels.matmul TF32 against torch.mm (perf/gemm_probe.py ${GEMM_ARGS:-})"
    measure gemm "${GEMM_TIMEOUT:-60}" $py perf/gemm_probe.py ${GEMM_ARGS:-} --json "$W/gemm.json"
fi

if [ "${MEMORY:-0}" != 0 ]; then
    step "where a training step's peak memory goes (perf/memory_probe.py ${MEMORY_ARGS:-})"
    measure memory "${MEMORY_TIMEOUT:-90}" $py perf/memory_probe.py ${MEMORY_ARGS:-} --json "$W/memory.json"
    # The same cells with cuBLAS's and cuBLASLt's workspaces off: if the part beyond the counted tensors is theirs,
    # it goes (perf/memory_probe.py's docstring).
    measure memory-no-blas-workspace "${MEMORY_TIMEOUT:-90}" env CUBLAS_WORKSPACE_CONFIG=:0:0 CUBLASLT_WORKSPACE_SIZE=0 \
        $py perf/memory_probe.py ${MEMORY_ARGS:-} --json "$W/memory-no-blas-workspace.json"
fi

if [ "${STACK_AB:-0}" != 0 ]; then
    step "A/B of launch configs, stack kernels alone"
    measure stack_ab "${STACK_AB_TIMEOUT:-120}" $py perf/kernel_ab.py --kernels stack,stack_bwd --layers 2,4 \
        --hidden 512 --batch 16 --dtypes float16,bfloat16,float32 \
        --variants unsplit,unsplit-w4,split,split4,streamed,transposed,transposed-streamed --json "$W/stack_ab.json"
fi

if [ "${BENCH:-1}" != 0 ]; then
    step "bench ${BENCH_ARGS---quick}"
    measure bench "${BENCH_TIMEOUT:-200}" $py -m tritonlstm.bench ${BENCH_ARGS---quick} --out "$W/bench"
fi

# tune NAME TIMEOUT ARGS...: the tuner into the work folder's cache (tuned/, to be committed as
# kernels/configs/<gpu>.json through perf/merge_tuned.py), every candidate's time in NAME-log.json.
tune() {
    local name=$1 limit=$2
    shift 2
    step "tune $*"
    TRITONLSTM_CACHE_DIR="$W/tuned" timeout "$limit" $py -m tritonlstm.tune "$@" --log "$W/$name-log.json" 2>&1 \
        | tee "$W/$name.txt"
    echo "$name rc=${PIPESTATUS[0]}" | tee -a "$W/summary.txt"
    pack
}
# e.g. TUNE_ARGS="--hidden 256,512,1024 --batch 16 --dtypes float16,bfloat16"; TUNE2_ARGS: a second set of keys
# (another kernel or dtype), into the same cache, its log apart.
[ -n "${TUNE_ARGS:-}" ] && tune tune "${TUNE_TIMEOUT:-240}" $TUNE_ARGS
[ -n "${TUNE2_ARGS:-}" ] && tune tune2 "${TUNE2_TIMEOUT:-240}" $TUNE2_ARGS
if [ -n "${TUNED_BENCH_ARGS:-}" ]; then
    # The bench again with the configs just tuned (the user's cache first, then the shipped ones): e.g. after
    # TUNE_ARGS="--quick --kernels bwd", TUNED_BENCH_ARGS="--modes fwdbwd" times training with the new winners
    # in the same call, before they are committed as shipped configs.
    step "bench with the tuned configs ($TUNED_BENCH_ARGS)"
    export TRITONLSTM_CACHE_DIR="$W/tuned"
    measure bench-tuned "${TUNED_BENCH_TIMEOUT:-200}" $py -m tritonlstm.bench $TUNED_BENCH_ARGS --out "$W/bench-tuned"
    unset TRITONLSTM_CACHE_DIR
fi

if [ -n "${HALF_GRADS_BENCH_ARGS:-}" ]; then
    # The bench again with the gradients' GEMMs on float16 operands and cuBLAS (kernels.matmul HALF_GRADS,
    # v0.61-v0.62), e.g. HALF_GRADS_BENCH_ARGS="--modes fwdbwd --dtypes float32 --no-stacks".
    step "bench with TRITONLSTM_HALF_GRADS=1 ($HALF_GRADS_BENCH_ARGS)"
    measure bench-half-grads "${HALF_GRADS_BENCH_TIMEOUT:-150}" env TRITONLSTM_HALF_GRADS=1 $py -m tritonlstm.bench \
        $HALF_GRADS_BENCH_ARGS --out "$W/bench-half-grads"
fi

# After the bench, whose parallel compile has built these cells' kernels.
if [ "${SPREAD:-0}" != 0 ]; then
    step "launch-to-launch spread, kernel alone up to the module, beside cuDNN (perf/launch_spread.py ${SPREAD_ARGS:-})"
    measure spread "${SPREAD_TIMEOUT:-90}" $py perf/launch_spread.py ${SPREAD_ARGS:-} --json "$W/spread.json"
fi

if [ "${HOSTOPS:-0}" != 0 ]; then
    step "the host's time per op and per call (perf/host_ops.py ${HOSTOPS_ARGS:-})"
    measure host-ops "${HOSTOPS_TIMEOUT:-60}" $py perf/host_ops.py ${HOSTOPS_ARGS:-} --json "$W/host-ops.json"
fi

if [ "${TIMELINE:-0}" != 0 ]; then
    step "a call's GPU time kernel by kernel, gaps included (perf/step_timeline.py ${TIMELINE_ARGS:-})"
    measure timeline "${TIMELINE_TIMEOUT:-150}" $py perf/step_timeline.py ${TIMELINE_ARGS:-} --json "$W/timeline.json" \
        --traces "$W/traces" --host-profile "$W/hostprof"
fi

if [ "${GPU_TESTS:-1}" != 0 ]; then
    step "GPU tests"
    # -v: a line per test as it ends, so that a step cut at its time limit still says which passed and which failed
    # (-q's dots name none, and the failures' summary comes only at the end).
    timeout "${TESTS_TIMEOUT:-140}" $py -m pytest -v -m gpu tests/ -p no:cacheprovider --timeout 60 -rfE \
        -n "${TESTS_WORKERS:-8}" -k "${TESTS_K:-not tune}" > "$W/gpu-tests.txt" 2>&1
    echo "gpu tests rc=$?: $(tail -1 "$W/gpu-tests.txt")" | tee -a "$W/summary.txt"
    grep -E "^(FAILED|ERROR)|\] (FAILED|ERROR) " "$W/gpu-tests.txt" | head -30
    pack
fi
if [ "${PERF_SUITE:-1}" != 0 ]; then
    step "pytest perf/ --benchmark-only -k '${PERF_SUITE_K-stack_training}'"
    timeout "${PERF_SUITE_TIMEOUT:-60}" $py -m pytest -q perf/ -k "${PERF_SUITE_K-stack_training}" --benchmark-only \
        -p no:cacheprovider --benchmark-json "$W/perf-suite.json" > "$W/perf-suite.txt" 2>&1
    echo "perf suite rc=$?: $(tail -1 "$W/perf-suite.txt")" | tee -a "$W/summary.txt"
    pack
fi
if [ -n "${NCU_ARGS:-}" ]; then
    # e.g. NCU_ARGS="--hidden 1024 --batch 256 --dtype float16 --variant wide": where one launch's warps stall.
    step "Nsight Compute, one launch ($NCU_ARGS)"
    timeout "${NCU_TIMEOUT:-90}" ncu --clock-control none --section SpeedOfLight --section WarpStateStats \
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
        -k "regex:${NCU_KERNEL:-lstm_fwd_kernel}" --launch-skip 1 -c 1 $py perf/profile_one.py $NCU_ARGS \
        > "$W/ncu.txt" 2>&1
    echo "ncu rc=$?" | tee -a "$W/summary.txt"
    grep -E "stalled|Duration|Warp Cycles|Throughput" "$W/ncu.txt" | sort -k3 -g -r | head -30
    pack
fi
if [ -n "${NCU_SOURCE_ARGS:-}" ]; then
    # e.g. NCU_SOURCE_ARGS="--hidden 256 --batch 16 --dtype float16 --variant transposed-cluster": the stall samples
    # of one launch instruction by instruction (SASS), ranked by perf/ncu_source.py (perf/NOTES.md "Session 25").
    step "Nsight Compute source counters, one launch ($NCU_SOURCE_ARGS)"
    timeout "${NCU_SOURCE_TIMEOUT:-90}" ncu --clock-control none --section SourceCounters --section WarpStateStats \
        -k "regex:${NCU_KERNEL:-lstm_fwd_kernel}" --launch-skip 1 -c 1 -f -o "$W/ncu-source" \
        $py perf/profile_one.py $NCU_SOURCE_ARGS > "$W/ncu-source.log" 2>&1
    echo "ncu source rc=$?" | tee -a "$W/summary.txt"
    ncu --import "$W/ncu-source.ncu-rep" --page source --csv --print-source sass > "$W/ncu-source.csv" 2>&1
    $py perf/ncu_source.py "$W/ncu-source.csv" --top 40 | tee "$W/ncu-source.txt" | head -60
    pack
fi
step done
cat "$W/summary.txt"
