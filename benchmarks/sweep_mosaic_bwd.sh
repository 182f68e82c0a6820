#!/usr/bin/env bash
# One device call for the Mosaic backward and issue 13 (BENCHMARKS.md "Mosaic GPU backward" and
# "Threshold-sparse and gated attention"): tune the backward's knobs at D=128 and install the table
# in this working copy; the GPU tests of the new kernels; fwd+bwd of the target cases against cuDNN,
# tokamax and FlexAttention; mod-array gradient costs; threshold-sparse / gated attention at 32k.
#   run(command="bash benchmarks/sweep_mosaic_bwd.sh", carry=[".whl"], timeout_s=600)
# SKIP="tune tests bench modgrads threshold" skips parts; BENCH_CASES / BENCH_BUDGET_S override.
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/attnax_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T0=$(date +%s)
skip() { [[ " $SKIP " == *" $1 "* ]]; }
stamp() { echo "== $1 at $(( $(date +%s) - T0 ))s"; }
if ! skip tune; then
  stamp tune
  timeout 110 python3 benchmarks/tune_mosaic.py --backward --dims 128 --out "$OUT/tune" \
    > "$OUT/tune_bwd.log" 2>&1
  echo "tune rc=$?"; grep -v "^WARNING" "$OUT/tune_bwd.log" | grep -v "^ *\"\|^ *}\|^{" | tail -14
  [[ -f $OUT/tune/mosaic_gpu.json ]] && cp "$OUT/tune/mosaic_gpu.json" attnax/kernels/pallas/configs/
fi
if ! skip tests; then
  stamp tests
  timeout 80 python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" \
    tests/kernels/test_threshold.py tests/kernels/test_gated.py tests/kernels/test_dropout.py \
    2>&1 | tail -6
fi
if ! skip bench; then
  stamp bench
  cases=${BENCH_CASES:-s4k,s4k-causal,s16k-causal,window32k,docs32k,alibi8k,s4k-d256,aether-32k-clustered}
  SWEEP_BUDGET_S=${BENCH_BUDGET_S:-230} bash benchmarks/gpu_sweep.sh bench --cases "$cases" \
    --kernels cudnn,tokamax-mosaic,flex,attnax-mosaic,aether --modes fwd+bwd --budget-s 0.25 \
    2>&1 | grep "^|\|^###\|done" | tail -80
fi
if ! skip modgrads; then
  stamp modgrads
  timeout 60 python3 benchmarks/bench_mod_grads.py --json "$OUT/mod_grads.json" --deadline-s 55 \
    --budget-s 0.25 2>&1 | grep -v "^WARNING" | grep "^|\|costs" | tail -24
fi
if ! skip threshold; then
  stamp threshold
  timeout 100 python3 benchmarks/bench_threshold.py --budget-s 0.25 --out "$OUT/threshold" \
    2>&1 | grep -v "^WARNING" | tail -30
fi
stamp done
