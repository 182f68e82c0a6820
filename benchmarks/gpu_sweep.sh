#!/usr/bin/env bash
# One device call: install the carried wheels, print versions and nvidia-smi, run the GPU tests, run
# the benchmark. Logs and tables go to $OUT (the device tool's output folder; /tmp/attnax_out here).
#
#   bash benchmarks/gpu_sweep.sh                          # tests, then bench with its default cases
#   bash benchmarks/gpu_sweep.sh bench --cases s4k,s4k-causal --kernels peers
#   bash benchmarks/gpu_sweep.sh tests                    # only `pytest -m gpu`
#   bash benchmarks/gpu_sweep.sh tests bench --cases main -- -k pallas   # args after -- go to pytest
#
# Parts (any order, default "tests bench"): tests, bench. Arguments from the first one starting with
# "--" (up to a lone "--") go to bench_attention.py; those after a lone "--" go to pytest.
# SWEEP_BUDGET_S (default 560) bounds the whole script so that a 600 s device call returns its logs:
# tests get at most TESTS_BUDGET_S (default 240) of it, the benchmark the rest (its --deadline-s).
# Device call: run(command="bash benchmarks/gpu_sweep.sh ...", carry=[".whl"], timeout_s=600).

set -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-/tmp/attnax_out}
mkdir -p "$OUT"
T0=$(date +%s)
BUDGET=${SWEEP_BUDGET_S:-560}
TESTS_BUDGET=${TESTS_BUDGET_S:-240}
PY=${PYTHON:-python3}

parts=()
while [[ $# -gt 0 && $1 != --* ]]; do parts+=("$1"); shift; done
[[ ${#parts[@]} -eq 0 ]] && parts=(tests bench)
bench_args=()
while [[ $# -gt 0 && $1 != "--" ]]; do bench_args+=("$1"); shift; done
[[ $# -gt 0 ]] && shift
pytest_args=("$@")
for p in "${parts[@]}"; do
  [[ $p == tests || $p == bench ]] || { echo "unknown part '$p' (use tests, bench)"; exit 2; }
done
has() { local x; for x in "${parts[@]}"; do [[ $x == "$1" ]] && return 0; done; return 1; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

# ---------------------------------------------------------------- carried wheels
source benchmarks/carried_wheels.sh

# ---------------------------------------------------------------- versions
{
  echo "== $(date -Is) $(hostname) parts: ${parts[*]}  bench args: ${bench_args[*]}"
  "$PY" - <<'EOF'
import importlib.metadata as md, platform, sys, warnings
warnings.filterwarnings("ignore")
print("python", platform.python_version(), sys.executable)
for n in ("jax", "jaxlib", "jax-cuda13-plugin", "flax", "numpy", "tokamax", "pydantic", "qwix",
          "triton", "torch", "matplotlib", "pytest"):
  try:
    print(f"  {n} {md.version(n)}")
  except md.PackageNotFoundError:
    print(f"  {n} absent")
import jax
print("devices", jax.devices())
try:
  import tokamax  # noqa: F401  (needs benchmarks/xprof_stub on the path; bench adds it)
except Exception as e:
  print("tokamax import without the xprof stub:", type(e).__name__, str(e)[:100])
EOF
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu \
    --format=csv 2>&1 || echo "nvidia-smi unavailable"
} 2>&1 | tee "$OUT/env.txt"

rc=0
# ---------------------------------------------------------------- tests
if has tests; then
  t=$(( $(left) < TESTS_BUDGET ? $(left) : TESTS_BUDGET ))
  echo "== pytest -m gpu (timeout ${t}s)"
  timeout "$t" "$PY" -m pytest -m gpu -q -p no:cacheprovider "${pytest_args[@]}" 2>&1 \
    | tee "$OUT/tests.log"
  trc=$?
  if [[ $trc -eq 5 ]]; then echo "(no GPU tests collected)"; trc=0; fi
  [[ $trc -ne 0 ]] && { echo "tests exited $trc"; rc=$trc; }
fi

# ---------------------------------------------------------------- benchmark
if has bench; then
  t=$(( $(left) - 5 ))
  if (( t < 30 )); then
    echo "== bench skipped: ${t}s left of SWEEP_BUDGET_S=$BUDGET"; rc=${rc:-1}
  else
    extra=()
    [[ " ${bench_args[*]} " == *" --deadline-s"* ]] || extra=(--deadline-s $(( t - 60 > 20 ? t - 60 : 20 )))
    echo "== bench (timeout ${t}s): ${bench_args[*]} ${extra[*]}"
    timeout "$t" "$PY" benchmarks/bench_attention.py --out "$OUT/bench" "${extra[@]}" \
      "${bench_args[@]}" 2>&1 | tee "$OUT/bench.log"
    brc=$?
    [[ $brc -ne 0 ]] && { echo "bench exited $brc"; rc=$brc; }
  fi
fi
echo "== done in $(( $(date +%s) - T0 ))s, rc=$rc"
exit $rc
