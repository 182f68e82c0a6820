#!/usr/bin/env bash
# One device call after the in-kernel mod-array gradients (BENCHMARKS.md "Mod-array gradients" and
# "Threshold-sparse and gated attention"): GPU tests of the touched kernels, bench_mod_grads,
# bench_threshold (with gated attention), then fwd+bwd cells of the Mosaic backward's targets.
#   run(command="bash benchmarks/sweep_mod_grads.sh", carry=[".whl"], timeout_s=600)
# SKIP="tests modgrads threshold bench" skips parts. Logs under $OUT.
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/attnax_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T0=$(date +%s)
skip() { [[ " $SKIP " == *" $1 "* ]]; }
stamp() { echo "== $1 at $(( $(date +%s) - T0 ))s"; }
quiet() { grep -v "^WARNING\|^I0000\|^W0000" | cut -c1-400; }
if ! skip tests; then
  stamp tests
  timeout 170 python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" -x \
    tests/kernels/pallas/test_gpu.py tests/kernels/test_threshold.py tests/kernels/test_gated.py \
    tests/kernels/test_dropout.py tests/kernels/pallas/test_mosaic_gpu.py > "$OUT/tests.log" 2>&1
  echo "tests rc=$?"; quiet < "$OUT/tests.log" | grep -v "^\s*$" | tail -12
fi
if ! skip modgrads; then
  stamp modgrads
  timeout 75 python3 benchmarks/bench_mod_grads.py --json "$OUT/mod_grads.json" --deadline-s 70 \
    --budget-s 0.25 > "$OUT/mod_grads.log" 2>&1
  echo "modgrads rc=$?"; quiet < "$OUT/mod_grads.log" | grep "^|\|costs" | tail -30
fi
if ! skip threshold; then
  stamp threshold
  timeout 120 python3 benchmarks/bench_threshold.py --budget-s 0.25 --out "$OUT/threshold" \
    > "$OUT/threshold.log" 2>&1
  echo "threshold rc=$?"; quiet < "$OUT/threshold.log" | grep "^|\|n/a\|^##" | tail -30
fi
if ! skip bench; then
  stamp bench
  cases=${BENCH_CASES:-window32k,docs32k,alibi8k,s4k-d256,s16k-causal}
  SWEEP_BUDGET_S=${BENCH_BUDGET_S:-190} bash benchmarks/gpu_sweep.sh bench --cases "$cases" \
    --kernels cudnn,tokamax-mosaic,flex,attnax-mosaic --modes fwd+bwd --budget-s 0.2 \
    2>&1 | grep "^|\|^###\|done" | tail -60
fi
stamp done
