#!/usr/bin/env bash
# The device calls left for the next session (2026-12-02 note): the GPU tests of the row/column
# summed mod-array cotangents (commit 436705c, run only on CPU so far), their timing
# (quick_mod_grads.py), and the Mosaic backward's fwd+bwd cells not reached on 2026-12-02.
#   run(command="bash benchmarks/sweep_next.sh", carry=[".whl"], timeout_s=600)        # call 1
#   run(command="PARTS=cells2 bash benchmarks/sweep_next.sh", carry=[".whl"], ...)      # call 2
# PARTS (default "tests quick cells1"): tests, quick, cells1 (ALiBi 8k, 16k causal), cells2
# (D=256, AETHER 32k), ring (the ring's GPU tests and bench_ring.py on every visible GPU),
# threshold (bench_threshold at softmax_threshold=1e-3). Logs under $OUT.
#   run(command="PARTS='ring threshold' bash benchmarks/sweep_next.sh", carry=[".whl"], ...)
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/attnax_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PARTS=${PARTS:-tests quick cells1}
T0=$(date +%s)
has() { [[ " $PARTS " == *" $1 "* ]]; }
stamp() { echo "== $1 at $(( $(date +%s) - T0 ))s"; }
quiet() { grep -v "^WARNING\|^I0000\|^W0000" | cut -c1-300; }
bench() {
  SWEEP_BUDGET_S=$2 bash benchmarks/gpu_sweep.sh bench --cases "$1" \
    --kernels cudnn,tokamax-mosaic,flex,attnax-mosaic,aether --modes fwd+bwd --budget-s 0.2 \
    2>&1 | grep "^|\|^###\|done" | tail -40
}
if has tests; then
  stamp tests
  timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" \
    tests/kernels/pallas/test_gpu.py tests/kernels/test_gated.py tests/kernels/test_threshold.py \
    > "$OUT/tests.log" 2>&1
  echo "tests rc=$?"; quiet < "$OUT/tests.log" | grep -i "passed\|failed\|error" | tail -8
fi
if has quick; then
  stamp quick
  timeout 170 python3 benchmarks/quick_mod_grads.py 2>&1 | quiet | grep "ms" | tail -12
fi
if has cells1; then stamp cells1; bench alibi8k,s16k-causal 230; fi
if has cells2; then stamp cells2; bench s4k-d256,aether-32k-clustered 500; fi
if has ring; then
  stamp ring
  timeout 130 python3 -m pytest -m gpu -v -p no:cacheprovider -o addopts="" tests/kernels/test_ring.py \
    > "$OUT/ring_tests.log" 2>&1
  echo "ring tests rc=$?"; quiet < "$OUT/ring_tests.log" | grep -E "PASSED|FAILED|passed|failed" | tail -6
  timeout 200 python3 benchmarks/bench_ring.py --seqs 32768,131072 --out "$OUT/ring" 2>&1 | quiet | tail -16
fi
if has threshold; then
  stamp threshold
  timeout 150 python3 benchmarks/bench_threshold.py --budget-s 0.2 --thresholds 1e-3 \
    --epsilons 1e-2,1e-3 --out "$OUT/threshold" > "$OUT/threshold.log" 2>&1
  echo "threshold rc=$?"; grep "^|" "$OUT/threshold.log" | tail -14
fi
stamp done
