#!/usr/bin/env bash
# Nsight Compute profiles of one fwd+bwd step (benchmarks/profile_ncu.py), in one device call:
# ptxas's register/spill report and SASS of the Mosaic kernels, wall-clock times, then `ncu --set
# full` per (kind, mask) in PROFILES, each report printed as text ($OUT/ncu-*.txt).
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/attnax_out}; mkdir -p "$OUT"
ROOT=$PWD PY=${PY:-python3}
export PYTHONUNBUFFERED=1
source benchmarks/carried_wheels.sh
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"; "$NCU" --version | tail -1
ARGS=${ARGS:-}
prof() { timeout "${2:-120}" "$PY" benchmarks/profile_ncu.py $1 $ARGS; }
# DUMPS: "kind:mask[:flag,flag]" (flags: overlap, shared-probs, head-dim=N), ptxas's report of each
# Mosaic kernel (registers, spills, and wgmma serialisation warnings) and its SASS.
DUMPS=${DUMPS-"attnax:dense attnax:dense:overlap attnax:causal attnax:alibi attnax:dense:head-dim=256 attnax:dense:head-dim=256,shared-probs"}
n=0
for spec in $DUMPS; do
  IFS=: read -r kind mask flags <<< "$spec"; n=$((n + 1))
  extra=$(echo "$flags" | tr ',' '\n' | sed '/^$/d; s/^/--/; s/=/ /' | tr '\n' ' ')
  dir="$OUT/dump-$n"
  MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_SASS=1 MOSAIC_GPU_DUMP_TO="$dir" \
    timeout 200 "$PY" benchmarks/profile_ncu.py $kind $mask $extra $ARGS > "$dir.log" 2>&1
  echo "dump $n ($spec) rc=$?"; grep -h -i "registers\|spill\|stack\|serializ\|performance" \
    "$dir"/* "$dir.log" 2>/dev/null | sort | uniq -c | head -20
done
for spec in ${TIMES:-"attnax dense" "attnax dense --overlap" "attnax causal" \
    "attnax causal --overlap" "cudnn dense" "cudnn causal"}; do
  prof "$spec --time 30" 200 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tail -2
done
for spec in ${PROFILES:-attnax:dense cudnn:dense attnax:causal}; do
  kind=${spec%%:*} mask=${spec##*:} name=ncu-$kind-$mask
  t0=$(date +%s)
  timeout "${NCU_S:-240}" "$NCU" --clock-control none --set full --import-source no -f \
    -o "$OUT/$name" "$PY" benchmarks/profile_ncu.py $kind $mask $ARGS > "$OUT/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - t0 )) s"; tail -3 "$OUT/$name.log"
  "$NCU" -i "$OUT/$name.ncu-rep" --page details --print-units base > "$OUT/$name.txt" 2>&1
  "$NCU" -i "$OUT/$name.ncu-rep" --page raw --csv > "$OUT/$name.raw.csv" 2>&1
  grep -E "^  [^ ].*\(|Duration|Registers Per|Achieved Occupancy|Local" "$OUT/$name.txt" | head -60
  ls -la "$OUT/$name.ncu-rep"
done
