#!/usr/bin/env bash
# The Mosaic backward's device sweep (BENCHMARKS.md "Mosaic GPU backward"): tune the backward's
# knobs at D=128, install the tuned table in this working copy, then time fwd+bwd of the issue's
# target cases against cuDNN, tokamax and FlexAttention, and the mod-array gradient costs.
#   run(command="bash benchmarks/sweep_mosaic_bwd.sh", carry=[".whl"], timeout_s=600)
# Parts can be skipped: SKIP_TUNE=1, SKIP_MODGRADS=1; BENCH_CASES / BENCH_BUDGET_S override.
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/attnax_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T0=$(date +%s)
if [[ -z $SKIP_TUNE ]]; then
  timeout 170 python3 benchmarks/tune_mosaic.py --backward --dims 128 --out "$OUT/tune" \
    > "$OUT/tune_bwd.log" 2>&1
  echo "tune rc=$? in $(( $(date +%s) - T0 ))s"; grep -v "^WARNING" "$OUT/tune_bwd.log" | tail -30
  [[ -f $OUT/tune/mosaic_gpu.json ]] && cp "$OUT/tune/mosaic_gpu.json" attnax/kernels/pallas/configs/
fi
cases=${BENCH_CASES:-s4k,s4k-causal,s16k,s16k-causal,window32k,docs32k,alibi8k,s4k-d64,s4k-d64-causal,s4k-d256,aether-32k-clustered}
SWEEP_BUDGET_S=${BENCH_BUDGET_S:-300} bash benchmarks/gpu_sweep.sh bench --cases "$cases" \
  --kernels cudnn,tokamax-mosaic,flex,attnax-mosaic,attnax-mosaic-tbwd,aether --modes fwd+bwd \
  --budget-s 0.3 2>&1 | grep -v "^WARNING:absl" | grep -v "^$" | tail -120
if [[ -z $SKIP_MODGRADS ]]; then
  timeout 90 python3 benchmarks/bench_mod_grads.py --json "$OUT/mod_grads.json" --deadline-s 80 \
    2>&1 | grep -v "^WARNING" | tail -30
fi
echo "sweep done in $(( $(date +%s) - T0 ))s"
