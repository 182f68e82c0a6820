#!/usr/bin/env python3
"""Plots of bench_attention.py results: TFLOP/s against sequence length, one figure per mask kind.

Reads one or more JSON files written by ``bench_attention.py --out PATH`` (``PATH.json``); a later
file's cell replaces an earlier one's for the same (case, kernel, mode) unless it did not run, so
the JSON of several device calls (``--cases main``, then ``--cases masks``...) merge into one set
of figures. Needs only
matplotlib (no JAX, no GPU):

  python benchmarks/plot_bench.py /tmp/run1/bench.json /tmp/run2/bench.json --out docs/_static/bench

Writes, per mask kind present (dense, causal, window, documents, alibi, prefix, aether-*), at head
dim 128 (or the commonest head dim of that kind, e.g. in ``--quick`` runs), ``tflops_<kind>.png``: TFLOP/s (the case's useful FLOPs, as in the tables) against the
sequence length, one line per kernel, forward and forward+backward side by side. Where a mask kind
was measured at several head dims (the ``s4k-d64`` ... cases), also ``tflops_headdim_<kind>.png``:
TFLOP/s against the head dim at each sequence length measured. Cells that did not run (``n/a``)
leave a gap. Rows that compute another function (cuDNN's plain causal baseline in the document,
ALiBi and prefix-LM cases) are labelled as such.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Iterable

MODES = ("fwd", "fwd+bwd")
KIND_TITLES = {
    "dense": "dense (no mask)",
    "causal": "causal",
    "window": "causal sliding window",
    "documents": "packed causal documents",
    "alibi": "ALiBi + causal",
    "prefix": "prefix LM",
}
# Kinds whose cuDNN row is plain causal attention: a baseline, not the same function.
BASELINE_KINDS = ("documents", "alibi", "prefix")


def case_meta_from_name(name: str) -> dict[str, Any]:
  """Shape and mask kind from a case name (for JSON written before records carried them)."""
  meta: dict[str, Any] = {"head_dim": 128}
  m = re.search(r"-d(\d+)(?:-|$)", name)
  if m:
    meta["head_dim"] = int(m.group(1))
  size = re.search(r"(\d+)([km])(?:-|$)", name)
  if size:
    meta["seq"] = int(size.group(1)) * (1024 if size.group(2) == "k" else 1 << 20)
  if name.startswith("aether-"):
    meta["mask"] = "aether-" + name.rsplit("-", 1)[-1]
  elif name.startswith("window"):
    meta["mask"] = "window"
  elif name.startswith("docs"):
    meta["mask"] = "documents"
  elif name.startswith("alibi"):
    meta["mask"] = "alibi"
  elif name.startswith("prefix"):
    meta["mask"] = "prefix"
  else:
    meta["mask"] = "causal" if name.endswith("-causal") else "dense"
  return meta


def load(paths: Iterable[str]) -> list[dict[str, Any]]:
  """The timed cells of all files (later files win, except that a cell which did not run --
  ``n/a`` -- never hides an earlier file's measurement), each with ``seq``, ``mask``,
  ``head_dim``."""
  cells: dict[tuple[str, str, str], dict[str, Any]] = {}
  for path in paths:
    with open(path) as f:
      data = json.load(f)
    cases = data.get("cases", {})
    for r in data.get("results", []):
      if r.get("mode") not in MODES or "case" not in r:
        continue
      rec = dict(case_meta_from_name(r["case"]))
      rec.update({k: v for k, v in cases.get(r["case"], {}).items() if v is not None})
      rec.update({k: v for k, v in r.items() if v is not None})
      key = (r["case"], r["kernel"], r["mode"])
      if "na" in rec and key in cells and "na" not in cells[key]:
        continue
      cells[key] = rec
  return list(cells.values())


def _kernel_order(cells) -> list[str]:
  seen: list[str] = []
  for c in cells:
    if c["kernel"] not in seen:
      seen.append(c["kernel"])
  return seen


def _style(kernels: list[str]):
  import matplotlib.pyplot as plt
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  markers = "osD^v<>ph*X"
  return {k: (colors[i % len(colors)], markers[i % len(markers)]) for i, k in enumerate(kernels)}


def _label(kernel: str, kind: str) -> str:
  if kernel == "cudnn" and kind in BASELINE_KINDS:
    return "cudnn (plain causal: baseline)"
  return kernel


def _lines(cells, x_key: str):
  """{kernel: [(x, tflops, case), ...]} sorted by x (cells that ran only)."""
  lines: dict[str, list] = {}
  for c in cells:
    if c.get("tflops") is None or "na" in c or c.get(x_key) is None:
      continue
    lines.setdefault(c["kernel"], []).append((c[x_key], c["tflops"], c["case"]))
  return {k: sorted(v) for k, v in lines.items()}


def _figure(panels, title: str, xlabel: str, path: str, style, kind: str, log2_x: bool):
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.6), squeeze=False)
  for ax, (mode, lines) in zip(axes[0], panels):
    xs = sorted({x for pts in lines.values() for x, _, _ in pts})
    for kernel, pts in lines.items():
      color, marker = style[kernel]
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color,
              linestyle="--" if kernel == "cudnn" and kind in BASELINE_KINDS else "-",
              label=_label(kernel, kind))
    if log2_x and xs:
      ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([(f"{x // 1024}k" if x % 1024 == 0 and x >= 1024 else str(x))
                        if log2_x else str(x) for x in xs])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("TFLOP/s (useful FLOPs)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{mode}")
    ax.grid(True, alpha=0.3)
    if lines:
      ax.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _device(paths) -> str:
  """The device and the run dates (one per file: merged files are separate runs)."""
  devices, dates = [], []
  for path in paths:
    try:
      with open(path) as f:
        meta = json.load(f).get("meta", {})
    except Exception:  # noqa: BLE001
      continue
    devices.append(meta.get("device", "?"))
    dates.append(str(meta.get("date", "?")))
  if not devices:
    return "?"
  runs = dates[0] if len(dates) == 1 else f"{len(dates)} runs, {dates[0]} .. {dates[-1]}"
  return f"{', '.join(dict.fromkeys(devices))}, {runs}"


def plot(paths: list[str], out_dir: str) -> list[str]:
  """Write the PNGs for the JSON files ``paths`` into ``out_dir``; returns the files written."""
  import matplotlib
  matplotlib.use("Agg")
  cells = load(paths)
  os.makedirs(out_dir, exist_ok=True)
  style = _style(_kernel_order(cells))
  dev = _device(paths)
  written = []
  kinds = []
  for c in cells:
    if c.get("mask") and c["mask"] not in kinds:
      kinds.append(c["mask"])
  for kind in kinds:
    of_kind = [c for c in cells if c.get("mask") == kind]
    dims = sorted({c.get("head_dim", 128) for c in of_kind})
    # The sequence-length figure at D=128 (the benchmark's main head dim), else the commonest one.
    main_dim = 128 if 128 in dims else max(
        dims, key=lambda d: sum(c.get("head_dim", 128) == d for c in of_kind))
    at_dim = [c for c in of_kind if c.get("head_dim", 128) == main_dim]
    panels = [(m, _lines([c for c in at_dim if c["mode"] == m], "seq")) for m in MODES
              if any(c["mode"] == m for c in at_dim)]
    path = os.path.join(out_dir, f"tflops_{kind}.png")
    _figure(panels, f"{KIND_TITLES.get(kind, kind)}, D={main_dim} ({dev})", "sequence length",
            path, style, kind, log2_x=True)
    written.append(path)
    if len(dims) > 1:
      seqs = sorted({c["seq"] for c in of_kind
                     if c.get("head_dim", 128) != main_dim and "seq" in c})
      for s in seqs:
        at_s = [c for c in of_kind if c.get("seq") == s]
        panels = [(m, _lines([c for c in at_s if c["mode"] == m], "head_dim")) for m in MODES
                  if any(c["mode"] == m for c in at_s)]
        tag = "" if len(seqs) == 1 else f"_s{s}"
        path = os.path.join(out_dir, f"tflops_headdim_{kind}{tag}.png")
        _figure(panels, f"{KIND_TITLES.get(kind, kind)}, S={s} ({dev})", "head dim", path, style,
                kind, log2_x=True)
        written.append(path)
  return written


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("json", nargs="+", help="bench_attention.py JSON files (later ones win)")
  p.add_argument("--out", required=True, help="folder for the PNGs")
  args = p.parse_args(argv)
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    print("plot_bench: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    return 1
  for path in plot(args.json, args.out):
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
