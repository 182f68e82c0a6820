#!/usr/bin/env bash
# Last device call of 2026-12-02 (budget ~7 min): the GPU tests of the in-kernel mod-array
# gradients, threshold and gated kernels; gated attention and the threshold row at 32k; bench_mod_grads.
#   run(command="bash benchmarks/sweep_final.sh", timeout_s=450)
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/attnax_out}; mkdir -p $OUT; export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
q() { grep -v "^WARNING\|^I0000\|^W0000" | cut -c1-300; }
timeout 125 python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" tests/kernels/pallas/test_gpu.py tests/kernels/test_threshold.py tests/kernels/test_gated.py -k "mod_array or threshold or gated or sparse" > $OUT/tests.log 2>&1; echo "tests rc=$?"; q < $OUT/tests.log | grep -i "passed\|failed\|error" | tail -8
timeout 110 python3 benchmarks/bench_threshold.py --budget-s 0.2 --inputs clustered --thresholds 5e-2 --epsilons 1e-2,1e-3 --out $OUT/threshold > $OUT/threshold.log 2>&1; echo "threshold rc=$?"; q < $OUT/threshold.log | grep "^|" | tail -12
timeout 120 python3 benchmarks/bench_mod_grads.py --json $OUT/mod_grads.json --deadline-s 110 --budget-s 0.2 > $OUT/mod_grads.log 2>&1; echo "modgrads rc=$?"; q < $OUT/mod_grads.log | grep "^|" | tail -30
