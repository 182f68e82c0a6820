# Sourced by the device scripts (ROOT and PY set): installs the carried wheels (.whl/, from
# run(carry=[".whl"])) into /tmp/site and puts it first on PYTHONPATH.
# Install into /tmp/site only wheels whose distribution is missing here or older; never jax, jaxlib,
# numpy, scipy, ml_dtypes or the CUDA plugins (the machine's own builds must stay in charge).
export PYTHONPATH=$ROOT
if compgen -G ".whl/*.whl" >/dev/null; then
  mapfile -t wheels < <("$PY" - .whl/*.whl <<'EOF'
import importlib.metadata as md, os, re, sys
from packaging.version import Version
protected = {"jax", "jaxlib", "numpy", "scipy", "ml-dtypes", "jax-cuda13-plugin",
             "jax-cuda13-pjrt", "jax-cuda12-plugin", "jax-cuda12-pjrt", "torch", "triton"}
for path in sys.argv[1:]:
  name, ver = os.path.basename(path).split("-")[:2]
  norm = re.sub(r"[-_.]+", "-", name).lower()
  if norm in protected:
    print(f"skip protected wheel {path}", file=sys.stderr)
    continue
  try:
    have = md.version(norm)
  except md.PackageNotFoundError:
    have = None
  if have is not None and Version(have) >= Version(ver):
    print(f"keep installed {norm} {have} (wheel {ver})", file=sys.stderr)
    continue
  print(path)
EOF
  )
  if [[ ${#wheels[@]} -gt 0 ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "${wheels[@]}" || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$ROOT
  fi
fi
