#!/usr/bin/env bash
# One device call (2026-12-02, fourth session): the ring's Pallas steps on one GPU (tests and
# bench_ring.py), then the threshold row at softmax_threshold=1e-3 (issue 13's third value).
#   run(command="bash benchmarks/sweep_ring.sh", carry=[".whl"], timeout_s=600)
# PARTS (default "tests bench threshold") picks parts. Logs under $OUT.
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/attnax_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PARTS=${PARTS:-tests bench threshold}
T0=$(date +%s)
has() { [[ " $PARTS " == *" $1 "* ]]; }
stamp() { echo "== $1 at $(( $(date +%s) - T0 ))s"; }
if has tests; then
  stamp tests
  timeout ${TESTS_S:-120} python3 -m pytest -m gpu -v -p no:cacheprovider -o addopts="" \
    tests/kernels/test_ring.py > "$OUT/ring_tests.log" 2>&1
  echo "tests rc=$?"; grep -E "PASSED|FAILED|passed|failed|Error" "$OUT/ring_tests.log" | cut -c1-250 | tail -8
fi
if has bench; then
  stamp bench
  timeout ${BENCH_S:-200} python3 benchmarks/bench_ring.py --seqs ${SEQS:-32768,131072} --out "$OUT/ring" 2>&1 \
    | grep -v "^WARNING\|^I0000\|^W0000" | cut -c1-250 | tail -16
fi
if has threshold; then
  stamp threshold
  timeout ${THRESHOLD_S:-130} python3 benchmarks/bench_threshold.py --budget-s 0.2 --thresholds 1e-3 \
    --epsilons 1e-2,1e-3 --out "$OUT/threshold" > "$OUT/threshold.log" 2>&1
  echo "threshold rc=$?"; grep "^|" "$OUT/threshold.log" | tail -14
fi
stamp done
