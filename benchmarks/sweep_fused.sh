#!/usr/bin/env bash
# The Mosaic lowering against cuDNN, tokamax and FlexAttention, one process per table: the
# backward's two forms (the default two-pass: a dQ pass, then dK/dV; and the fused,
# MosaicConfig(deterministic=False): dQ by TMA reductions in the dK/dV kernel), fwd+bwd; the
# forward's two forms (persistent, per work item), fwd.
#   run(command="bash benchmarks/sweep_fused.sh", carry=[".whl"], timeout_s=600)
# PARTS (default "tests main"): tests (pytest -m gpu of the Mosaic lowering), conformance (the
# conformance suite's mosaic_gpu row), forms (bench_mosaic_bwd_forms.py: both forms at ring
# depths 2 and 3), main (s4k, s4k-causal, s16k-causal), masks (window32k, docs32k, alibi8k), more
# (s4k-d64, s4k-d256, aether-32k-clustered), d256 (fwd+bwd at D=256: the by-role Mosaic backward
# and its shared-P^T form, D256_KERNELS), paged (bench_paged.py --sweep at B=32 16k, bf16 and
# int8 pages), fwd (the forward alone: FWD_CASES, the default forward and its overlapped form beside
# cuDNN and tokamax), modgrads (quick_mod_grads.py: differentiated mod arrays, Mosaic and Triton
# backwards), abfwd (diag_mosaic_fwd_ab.py: the kernels against an earlier copy of themselves,
# benchmarks/_base_mosaic_gpu.py, made here by `git show REV:attnax/kernels/pallas/mosaic_gpu.py`;
# MODE=fwd+bwd times forward and backward).
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/attnax_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PARTS=${PARTS:-tests main}
T0=$(date +%s)
has() { [[ " $PARTS " == *" $1 "* ]]; }
stamp() { echo "== $1 at $(( $(date +%s) - T0 ))s"; }
quiet() { grep -v "^WARNING\|^I0000\|^W0000" | cut -c1-300; }
bench() {   # cases budget tag [kernels]
  SWEEP_BUDGET_S=$2 bash benchmarks/gpu_sweep.sh bench --cases "$1" \
    --kernels ${4:-cudnn,tokamax-mosaic,flex,attnax-mosaic,attnax-mosaic-fused} --modes fwd+bwd \
    --budget-s 0.3 --out "$OUT/$3" 2>&1 | grep "^|\|^###\|done\|rror" | tail -40
}
if has tests; then
  stamp tests
  timeout ${TESTS_S:-200} python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" \
    tests/kernels/pallas/test_mosaic_gpu.py -k "${TESTS_K:-}" > "$OUT/tests.log" 2>&1
  echo "tests rc=$?"; quiet < "$OUT/tests.log" | grep -i "passed\|failed\|error\|assert" | tail -12
fi
if has conformance; then
  stamp conformance
  timeout ${CONF_S:-240} python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" \
    tests/kernels/test_conformance.py -k "${CONF_K:-mosaic_gpu}" > "$OUT/conformance.log" 2>&1
  echo "conformance rc=$?"; quiet < "$OUT/conformance.log" | grep -i "passed\|failed\|error" | tail -30
fi
if has forms; then
  stamp forms
  timeout ${FORMS_S:-200} python3 benchmarks/bench_mosaic_bwd_forms.py 2>&1 | quiet \
    | grep -v "^$" | tee "$OUT/forms.log" | tail -20
fi
if has paged; then
  stamp paged
  timeout ${PAGED_TESTS_S:-120} python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" \
    tests/kernels/paged/test_gpu.py -k "${PAGED_K-int8}" > "$OUT/paged_tests.log" 2>&1
  echo "paged tests rc=$?"; quiet < "$OUT/paged_tests.log" | grep -i "passed\|failed\|error" | tail -8
  [ "${PAGED_S:-200}" -gt 0 ] && timeout ${PAGED_S:-200} python3 benchmarks/bench_paged.py --sweep --sweep-points "Sq=1 B=32 ctx=16k" \
    --budget-s 0.2 --out "$OUT/paged" 2>&1 | quiet | grep "GB/s\|best\|rror" | tail -40
fi
if has fwd; then
  stamp fwd
  SWEEP_BUDGET_S=${FWD_S:-300} bash benchmarks/gpu_sweep.sh bench \
    --cases "${FWD_CASES:-s4k,s16k,s4k-d64,s4k-d256,s4k-causal,s16k-causal}" \
    --kernels ${FWD_KERNELS:-cudnn,tokamax-mosaic,attnax-mosaic,attnax-mosaic-overlap} --modes fwd \
    --budget-s 0.3 --out "$OUT/fwd" 2>&1 | grep "^|\|^###\|done\|rror" | tail -40
fi
if has abfwd; then   # diag_mosaic_fwd_ab.py: the forward against benchmarks/_base_mosaic_gpu.py
  stamp abfwd
  ( ROOT=$PWD PY=python3; source benchmarks/carried_wheels.sh
    timeout ${ABFWD_S:-300} python3 benchmarks/diag_mosaic_fwd_ab.py 2>&1 | quiet \
      | tee "$OUT/abfwd.log" | grep "^|\|^###\|FAIL\|rror\|variants" | tail -60 )
fi
if has modgrads; then
  stamp modgrads
  timeout ${MODGRADS_S:-240} python3 benchmarks/quick_mod_grads.py 2>&1 | quiet \
    | tee "$OUT/modgrads.log" | grep "^|\|rror" | tail -20
fi
if has main; then stamp main; bench s4k,s4k-causal,s16k-causal ${MAIN_S:-330} main; fi
if has masks; then stamp masks; bench window32k,docs32k,alibi8k ${MASKS_S:-330} masks; fi
if has d256; then   # the Mosaic backward at D=256: by role, and with P^T shared (sharedp)
  stamp d256
  bench s4k-d256,s4k-d256-causal ${D256_S:-240} d256 \
    ${D256_KERNELS:-cudnn,tokamax-mosaic,attnax-mosaic,attnax-mosaic-sharedp}
fi
if has more; then stamp more; bench s4k-d64,s4k-d256,aether-32k-clustered ${MORE_S:-330} more; fi
stamp done
