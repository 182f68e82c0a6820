#!/usr/bin/env bash
# GPU diagnosis in one device call: each case in its own process under a timeout (a hang is a result).
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/attnax_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
run() { local t=$1; shift; echo "== $* (timeout $t s)"; timeout "$t" python3 benchmarks/diag_gpu.py "$@" 2>&1 \
  | grep -v "^WARNING\|^I0000\|^W0000" | cut -c1-700 | tail -25; echo "rc=${PIPESTATUS[0]}"; }
run 90 threshold
run 60 mosaic-causal 16384 3 64 3
run 60 mosaic-causal 16384 2 128 3
run 60 mosaic-causal 16384 3 64 3 triton
run 60 mosaic-causal 4096 3 64 20
run 60 mosaic-causal 8192 3 64 3
