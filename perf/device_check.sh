#!/usr/bin/env bash
# One run on a lent GPU machine (the device tool): offline install, kernel self-check, the bench, the barrier /
# tagged exchange A/B, the GPU tests. Every step is bounded (STEP_TIMEOUT scales them) so that the whole stays
# inside the device tool's 10 minutes per command; measurements come before the tests so that a run cut short
# still brings back numbers. The tool brings back at most 8 files, so everything is written to a work folder
# and packed into $OUT/results.tgz after every step (a run killed at its limit keeps the steps it finished).
#   device run: bash perf/device_check.sh      (then unpack results.tgz into perf/results/<gpu>-<date>/)
# Environment: BENCH_ARGS (default --quick; "--modes fwd,fwdbwd" runs the whole matrix), BENCH_TIMEOUT (200),
# GPU_TESTS=0 skips the tests, TESTS_K selects them (pytest -k; default skips the tuner test, which compiles
# many candidates), TESTS_TIMEOUT (140), STACK_BENCH=0 skips the stack benchmark, EXCHANGE_AB=0 the exchange
# A/B (EXCHANGE_TIMEOUT, 120), TUNE_ARGS="..." runs the tuner on those shapes (TUNE_TIMEOUT, default 240 s).
set -uo pipefail
OUT=${OUT:-perf-out}
W=${WORK_DIR:-/tmp/tritonlstm-device}
rm -rf "$W" && mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1
py=python3
step() { echo "== $* ($(date +%T))"; }
pack() { tar czf "$OUT/results.tgz" -C "$W" . && cp "$W/summary.txt" "$OUT/summary.txt" 2>/dev/null; true; }
touch "$W/summary.txt"

step install
$py -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$W/install.log" 2>&1 || {
    tail -20 "$W/install.log"; pack; exit 1; }
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
  $py -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn',
  torch.backends.cudnn.version(), 'triton', triton.__version__, torch.cuda.get_device_name(0),
  torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"; } > "$W/environment.txt" 2>&1
cat "$W/environment.txt"

step "self-check (python -m tritonlstm)"
timeout 60 $py -m tritonlstm 2>&1 | tee "$W/selfcheck.txt"
echo "selfcheck rc=${PIPESTATUS[0]}" | tee -a "$W/summary.txt"
pack

step "bench ${BENCH_ARGS---quick}"
timeout "${BENCH_TIMEOUT:-200}" $py -m tritonlstm.bench ${BENCH_ARGS---quick} --out "$W/bench" \
    2> "$W/bench.stderr" | tee "$W/bench.txt"
echo "bench rc=${PIPESTATUS[0]}" | tee -a "$W/summary.txt"
pack

if [ "${EXCHANGE_AB:-1}" != 0 ]; then
    step "A/B: h exchange through a barrier or tagged words (perf/exchange.py)"
    timeout "${EXCHANGE_TIMEOUT:-120}" $py perf/exchange.py --batch 16 --json "$W/exchange.json" \
        2> "$W/exchange.stderr" | tee "$W/exchange.txt"
    echo "exchange A/B rc=${PIPESTATUS[0]}" | tee -a "$W/summary.txt"
    pack
fi

if [ -n "${TUNE_ARGS:-}" ]; then
    # e.g. TUNE_ARGS="--hidden 256,512,1024 --batch 16 --dtypes float16,bfloat16". The winners land in
    # tuned/, to be committed as kernels/configs/<gpu>.json.
    step "tune $TUNE_ARGS"
    export TRITONLSTM_CACHE_DIR="$W/tuned"
    timeout "${TUNE_TIMEOUT:-240}" $py -m tritonlstm.tune $TUNE_ARGS 2>&1 | tee "$W/tune.txt"
    echo "tune rc=${PIPESTATUS[0]}" | tee -a "$W/summary.txt"
    unset TRITONLSTM_CACHE_DIR
    pack
fi

if [ "${GPU_TESTS:-1}" != 0 ]; then
    step "GPU tests"
    timeout "${TESTS_TIMEOUT:-140}" $py -m pytest -q -m gpu tests/ -p no:cacheprovider --timeout 60 -rfE \
        -k "${TESTS_K:-not tune}" > "$W/gpu-tests.txt" 2>&1
    echo "gpu tests rc=$?: $(tail -1 "$W/gpu-tests.txt")" | tee -a "$W/summary.txt"
    grep -E "^(FAILED|ERROR)" "$W/gpu-tests.txt" | head -30
    pack
fi
if [ "${STACK_BENCH:-1}" != 0 ]; then
    step "stack training with and without dropout (pytest-benchmark)"
    timeout 60 $py -m pytest -q perf/test_perf.py -k stack_training --benchmark-only -p no:cacheprovider \
        --benchmark-json "$W/stack-bench.json" > "$W/stack-bench.txt" 2>&1
    echo "stack bench rc=$?: $(tail -1 "$W/stack-bench.txt")" | tee -a "$W/summary.txt"
    pack
fi
step done
cat "$W/summary.txt"
