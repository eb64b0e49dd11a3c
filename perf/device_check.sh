#!/usr/bin/env bash
# One run on a lent GPU machine (the device tool): offline install, kernel self-check, the quick bench, the
# barrier / tagged exchange A/B, the GPU tests, everything written under $OUT. Every step is bounded so that the
# whole stays under 10 minutes (the device tool's limit per command; about 7-8 expected); the measurements come
# before the tests so that a run cut short still brings back numbers.
#   device run: bash perf/device_check.sh      (then commit $OUT as perf/results/<gpu>-<date>/)
# Environment: BENCH_ARGS (default --quick), GPU_TESTS=0 skips the tests, TESTS_K selects them (pytest -k;
# default skips the tuner test, which compiles many candidates), STACK_BENCH=0 skips the stack benchmark,
# EXCHANGE_AB=0 the exchange A/B, TUNE_ARGS="..." runs the tuner on those shapes (TUNE_TIMEOUT, default 240 s).
set -uo pipefail
OUT=${OUT:-perf-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
py=python3
step() { echo "== $* ($(date +%T))"; }

step install
$py -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/install.log" 2>&1 || {
    tail -20 "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv \
    > "$OUT/nvidia-smi.csv" 2>&1

step "self-check (python -m tritonlstm)"
timeout 60 $py -m tritonlstm 2>&1 | tee "$OUT/selfcheck.txt"
echo "selfcheck rc=${PIPESTATUS[0]}" | tee -a "$OUT/summary.txt"

step "bench ${BENCH_ARGS:---quick}"
timeout 200 $py -m tritonlstm.bench ${BENCH_ARGS:---quick} --out "$OUT/bench" 2> "$OUT/bench.stderr" \
    | tee "$OUT/bench.txt"
echo "bench rc=${PIPESTATUS[0]}" | tee -a "$OUT/summary.txt"

if [ "${EXCHANGE_AB:-1}" != 0 ]; then
    step "A/B: h exchange through a barrier or tagged words (perf/exchange.py)"
    timeout 120 $py perf/exchange.py --batch 16 --json "$OUT/exchange.json" 2> "$OUT/exchange.stderr" \
        | tee "$OUT/exchange.txt"
    echo "exchange A/B rc=${PIPESTATUS[0]}" | tee -a "$OUT/summary.txt"
fi

if [ -n "${TUNE_ARGS:-}" ]; then
    # e.g. TUNE_ARGS="--hidden 256,512,1024 --batch 16 --dtypes float16,bfloat16": ~15-20 s per (kernel, dtype,
    # H, batch) key on an H100 (candidates compile on a thread pool). The winners land in $OUT/tuned/, to be
    # committed as kernels/configs/<gpu>.json.
    step "tune $TUNE_ARGS"
    export TRITONLSTM_CACHE_DIR="$OUT/tuned"
    timeout "${TUNE_TIMEOUT:-240}" $py -m tritonlstm.tune $TUNE_ARGS 2>&1 | tee "$OUT/tune.txt"
    echo "tune rc=${PIPESTATUS[0]}" | tee -a "$OUT/summary.txt"
    unset TRITONLSTM_CACHE_DIR
fi

if [ "${GPU_TESTS:-1}" != 0 ]; then
    step "GPU tests"
    timeout 140 $py -m pytest -q -m gpu tests/ -p no:cacheprovider --timeout 120 \
        -k "${TESTS_K:-not tune}" > "$OUT/gpu-tests.txt" 2>&1
    echo "gpu tests rc=$?: $(tail -1 "$OUT/gpu-tests.txt")" | tee -a "$OUT/summary.txt"
fi
if [ "${STACK_BENCH:-1}" != 0 ]; then
    step "stack training with and without dropout (pytest-benchmark)"
    timeout 60 $py -m pytest -q perf/test_perf.py -k stack_training --benchmark-only -p no:cacheprovider \
        --benchmark-json "$OUT/stack-bench.json" > "$OUT/stack-bench.txt" 2>&1
    echo "stack bench rc=$?: $(tail -1 "$OUT/stack-bench.txt")" | tee -a "$OUT/summary.txt"
fi
step done
cat "$OUT/summary.txt"
