#!/usr/bin/env bash
# Set up attnax for development: find a Python >= 3.12, create .venv, install attnax[test,docs].
#
#   bash scripts/setup.sh          # idempotent: reuses a good .venv, reinstalls only when needed
#
# Environment:
#   ATTNAX_PYTHON=/path/to/python  try this interpreter first
#   ATTNAX_VENV=dir                where to put the virtual environment (default: .venv)
#   ATTNAX_FORCE_INSTALL=1         reinstall even if pyproject.toml did not change
#
# attnax needs Python >= 3.12 (the GPU machine runs 3.12 with jax/jaxlib 0.11.2; the test extra
# pins those). A name like `python3.12` proves nothing (a pyenv shim may exist and fail), so every
# candidate is *run* and asked for its version; the first that answers >= 3.12 wins, with 3.12
# itself preferred because it matches the GPU machine.
set -euo pipefail

MIN_MAJOR=3
MIN_MINOR=12
PREFERRED="3.12"

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=${ATTNAX_VENV:-.venv}
stamp="$venv/.attnax-setup-stamp"

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# Prints "MAJOR.MINOR.MICRO" if $1 runs, is >= 3.12 and can create a venv with pip; otherwise
# prints a short reason and fails.
probe() {
  local out
  local t=()
  command -v timeout >/dev/null 2>&1 && t=(timeout 20)
  out=$("${t[@]}" "$1" - 2>&1 <<'PY'
import sys
v = sys.version_info
if v < (3, 12):
  print(f"{v.major}.{v.minor}.{v.micro}: too old")
  sys.exit(1)
try:
  import ensurepip, venv  # noqa: F401  (Debian splits these into python3-venv)
except ImportError as e:
  print(f"{v.major}.{v.minor}.{v.micro}: no venv/ensurepip ({e.name})")
  sys.exit(1)
print(f"{v.major}.{v.minor}.{v.micro}")
PY
  ) || { printf '%s' "$(printf '%s' "$out" | tail -n 1 | cut -c1-80)"; return 1; }
  printf '%s' "$out"
}

candidates() {
  [ -n "${ATTNAX_PYTHON:-}" ] && echo "$ATTNAX_PYTHON"
  local n p r
  for n in python3.12 python3.13 python3.14 python3 python; do
    p=$(command -v "$n" 2>/dev/null) && echo "$p"
  done
  # pyenv: its shims fail unless a version is selected, so look at the installed versions directly.
  r=$( (command -v pyenv >/dev/null && pyenv root) 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
  for p in "$r"/versions/*/bin/python3; do [ -x "$p" ] && echo "$p"; done
  # uv-managed interpreters.
  if command -v uv >/dev/null 2>&1; then
    uv python find ">=$MIN_MAJOR.$MIN_MINOR" 2>/dev/null || true
    r=$(uv python dir 2>/dev/null || true)
    [ -n "$r" ] && for p in "$r"/*/bin/python3; do [ -x "$p" ] && echo "$p"; done
  fi
  for p in "$HOME"/.local/share/uv/python/*/bin/python3 /usr/local/bin/python3* /usr/bin/python3* \
           /opt/homebrew/bin/python3* /opt/python*/bin/python3 /opt/conda/bin/python3 \
           "$HOME"/miniconda3/bin/python3 "$HOME"/anaconda3/bin/python3; do
    case "$p" in *-config|*m-config|*'*'*) continue ;; esac
    [ -x "$p" ] && [ -f "$p" ] && echo "$p"
  done
  return 0
}

find_python() {
  local tried=() seen=" " best="" best_v="" c v
  while IFS= read -r c; do
    [ -n "$c" ] || continue
    case "$seen" in *" $c "*) continue ;; esac
    seen="$seen$c "
    if v=$(probe "$c"); then
      tried+=("  $c -> $v (ok)")
      if [ -z "$best" ]; then best=$c; best_v=$v; fi
      case "$v" in "$PREFERRED".*) best=$c; best_v=$v; break ;; esac
    else
      tried+=("  $c -> ${v:-does not run}")
    fi
  done < <(candidates)
  if [ -z "$best" ]; then
    {
      echo "[setup] ERROR: attnax needs Python >= $MIN_MAJOR.$MIN_MINOR with the venv module; none found."
      echo "[setup] Tried (each was run and asked for sys.version_info):"
      printf '%s\n' "${tried[@]:-  (no candidates on PATH, in pyenv, uv or the usual directories)}"
      echo "[setup] Install Python 3.12 (e.g. 'pyenv install 3.12', 'uv python install 3.12', or your"
      echo "[setup] distribution's python3.12 + python3.12-venv), or point ATTNAX_PYTHON at one."
    } >&2
    exit 1
  fi
  PY=$best
  PY_VERSION=$best_v
}

# ------------------------------------------------------------------ 1. the virtual environment
if [ -x "$venv/bin/python" ] && v=$(probe "$venv/bin/python"); then
  say "reusing $venv (Python $v)"
else
  [ -e "$venv" ] && say "$venv exists but is unusable (${v:-python does not run}); recreating it"
  say "looking for Python >= $MIN_MAJOR.$MIN_MINOR"
  find_python
  say "using $PY (Python $PY_VERSION)"
  "$PY" -m venv --clear "$venv" || die "'$PY -m venv $venv' failed"
  rm -f "$stamp"
fi
vpy="$venv/bin/python"

# ------------------------------------------------------------------ 2. attnax[test,docs]
# The stamp records what was installed; the install reruns when pyproject.toml changes.
want=$( { cat pyproject.toml; "$vpy" -c 'import sys; print(sys.version)'; } | cksum)
if [ -z "${ATTNAX_FORCE_INSTALL:-}" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] \
   && "$vpy" -c 'import attnax, jax, pytest, xdist, sphinx' >/dev/null 2>&1; then
  say "attnax[test,docs] already installed and up to date"
else
  say "installing attnax[test,docs] into $venv (a new .venv downloads jax/jaxlib: 1-3 min)"
  start=$SECONDS
  # pip stays quiet; its errors still show (minus noise about unreadable local index paths).
  quiet() { grep -v "^WARNING: Location 'file:.*' is ignored" >&2 || true; }
  { "$vpy" -m pip install --quiet --disable-pip-version-check -e '.[test,docs]' 2>&1 1>&3 | quiet; } 3>&1 \
    || die "pip install -e '.[test,docs]' failed (see pip's messages above)"
  echo "$want" > "$stamp"
  say "installed in $((SECONDS - start)) s"
fi

"$vpy" - <<'PY' || die "the installed environment does not import attnax"
import jax, attnax
print(f"[setup] ready: attnax {attnax.__version__}, jax {jax.__version__}, "
      f"devices {[d.platform for d in jax.devices()]}")
PY
