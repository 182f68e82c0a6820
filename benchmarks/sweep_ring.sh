#!/usr/bin/env bash
# One device call (2026-12-02, fourth session): the ring's Pallas steps on one GPU (tests and
# bench_ring.py), and the threshold row at softmax_threshold=1e-3 (issue 13's third value).
#   run(command="bash benchmarks/sweep_ring.sh", carry=[".whl"], timeout_s=600)
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/attnax_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "== $1 at $(( $(date +%s) - T0 ))s"; }
stamp tests
timeout 150 python3 -m pytest -m gpu -v -p no:cacheprovider -o addopts="" tests/kernels/test_ring.py \
  > "$OUT/ring_tests.log" 2>&1
echo "tests rc=$?"; grep -E "PASSED|FAILED|passed|failed|Error" "$OUT/ring_tests.log" | cut -c1-250 | tail -8
stamp bench
timeout 240 python3 benchmarks/bench_ring.py --seqs 32768,131072 --out "$OUT/ring" 2>&1 \
  | grep -v "^WARNING\|^I0000\|^W0000" | cut -c1-250 | tail -16
stamp threshold
timeout 130 python3 benchmarks/bench_threshold.py --budget-s 0.2 --thresholds 1e-3 \
  --epsilons 1e-2,1e-3 --out "$OUT/threshold" > "$OUT/threshold.log" 2>&1
echo "threshold rc=$?"; grep "^|" "$OUT/threshold.log" | tail -14
stamp done
