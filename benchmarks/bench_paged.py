#!/usr/bin/env python3
"""Paged-attention decoding benchmark: attnax's Pallas kernel, its pure-JAX backend, JAX's own
Pallas paged kernel and a plain copy of the same bytes, side by side in one process.

  python benchmarks/bench_paged.py --out $OUT/paged            # the GPU run (about 3 minutes)
  python benchmarks/bench_paged.py --sweep --out $OUT/sweep    # PagedConfig sweep at 5 points
  python benchmarks/bench_paged.py --quick                     # tiny sizes, CPU (interpreted)

Cases (DESIGN.md section 9 rules): bf16 K/V, Hq=32 query heads over Hkv=8 kv heads of D=128, pages
of 16 tokens scattered over the pool by a random block table, every row ``context`` tokens long.
One query token per row at batch 8-64 and context 8k-32k; 8 query tokens per row (multi-token
decoding, causal at the last 8 positions) on a subset; int8 K/V (per-token f32 scales) at batch
32, context 16k beside bf16.

Columns:

* ``KV GB/s``: bytes of K and V (and int8 scales) the call must read, ``B * ctx * Hkv * (D + Dv)
  * itemsize``, over the median time. ``copy`` is a plain elementwise device copy of an array of
  the KV cache's size, counted as bytes read plus bytes written (the streaming bandwidth the
  memory system reaches in this run); ``% copy`` is a kernel's KV read rate over it.
* ``tok/s``: query tokens per second, ``B * Sq / time`` (one attention layer).
* ``x JAX``: attnax Pallas time ratio over JAX's Pallas kernel
  (``jax.experimental.pallas.ops.gpu.paged_attention``, defaults; single query token only). JAX's
  kernel does not scale q, so every kernel here runs with ``scale=1.0``; ``err`` is attnax's
  relative error against it (and against attnax's pure-JAX backend).

Timing: the house helper ``time_fn`` of ``bench_attention.py`` (compile, a warm call, then the
median over repeats of back-to-back calls closed by ``jax.block_until_ready``). The KV cache is far
larger than the L2 cache, so one input set is used. ``--deadline-s`` stops starting new cells.
Writes ``paged.json``, ``paged.md`` and (when matplotlib is importable) ``paged_gbps.png`` into
``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import sys
import time
import traceback
import warnings

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_ROOT, _HERE):
  if _p not in sys.path:
    sys.path.insert(0, _p)
warnings.filterwarnings("ignore", category=DeprecationWarning)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_attention import time_fn  # noqa: E402  (the house timing helper)
from attnax.kernels import paged_attention  # noqa: E402
from attnax.kernels.paged import PagedConfig, quantize_kv  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Point:
  batch: int
  context: int
  q_len: int = 1
  kv: str = "bf16"             # "bf16" or "int8"
  q_heads: int = 32
  kv_heads: int = 8
  head_dim: int = 128
  page_size: int = 16

  @property
  def name(self) -> str:
    ctx = f"{self.context // 1024}k" if self.context % 1024 == 0 else str(self.context)
    return f"Sq={self.q_len} B={self.batch} ctx={ctx} {self.kv}"

  @property
  def pages_per_sequence(self) -> int:
    return -(-self.context // self.page_size)

  @property
  def kv_bytes(self) -> int:
    """Bytes of K and V (and scales) one call reads."""
    per_token = self.kv_heads * 2 * (self.head_dim * (1 if self.kv == "int8" else 2)
                                     + (4 if self.kv == "int8" else 0))
    return self.batch * self.context * per_token


BATCHES = (8, 16, 32, 64)
CONTEXTS = (8192, 16384, 32768)


def default_points() -> list[Point]:
  pts = [Point(b, c) for c in CONTEXTS for b in BATCHES]
  pts += [Point(32, 16384, kv="int8")]
  pts += [Point(b, c, q_len=8) for c in (8192, 32768) for b in (8, 32, 64)]
  return pts


def applies(kernel: str, p: Point) -> bool:
  """The pure-JAX backend (the slow baseline) runs at a subset of the points, to keep the run
  short; JAX's Pallas kernel takes one query token per sequence only."""
  if kernel == "attnax-jax":
    return p.q_len == 1 and p.kv == "bf16" and p.batch in (8, 32, 64, 2)
  if kernel == "jax-pallas":
    return p.q_len == 1
  return True


def quick_points() -> list[Point]:
  small = dict(q_heads=4, kv_heads=2, head_dim=32, page_size=16)
  return [Point(2, 256, **small), Point(2, 256, q_len=4, **small),
          Point(2, 256, kv="int8", **small)]


# ============================================================================ inputs


def make_inputs(p: Point, seed: int = 0):
  """q (B, Hq, Sq, D) bf16; pools (Hkv, P, ps, D) (bf16, or int8 + f32 scales); a random block
  table over exactly B * pages_per_sequence pages; every row ``context`` tokens long."""
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  n = p.pages_per_sequence
  num_pages = p.batch * n
  pool = (p.kv_heads, num_pages, p.page_size, p.head_dim)
  q = jax.random.normal(kq, (p.batch, p.q_heads, p.q_len, p.head_dim), jnp.bfloat16)
  k_pages = jax.random.normal(kk, pool, jnp.bfloat16)
  v_pages = jax.random.normal(kv, pool, jnp.bfloat16)
  scales = {}
  if p.kv == "int8":
    (k_pages, ks), (v_pages, vs) = quantize_kv(k_pages), quantize_kv(v_pages)
    scales = dict(k_scales=ks, v_scales=vs)
  tables = np.random.default_rng(seed).permutation(num_pages).reshape(p.batch, n)
  tables = jnp.asarray(tables, jnp.int32)
  lengths = jnp.full((p.batch,), p.context, jnp.int32)
  return jax.block_until_ready((q, k_pages, v_pages, tables, lengths, scales))


# ============================================================================ kernels


def attnax_fn(backend: str, config: PagedConfig | None = None):
  def run(q, kp, vp, bt, ln, scales):
    return paged_attention(q, kp, vp, bt, ln, **scales, scale=1.0, backend=backend, config=config)
  return jax.jit(run)


def jax_pallas_fn(interpret: bool):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged

  def run(q, kp, vp, bt, ln, scales):
    if q.shape[2] != 1:
      raise NotImplementedError("one query token per sequence only")
    k_scales, v_scales = scales.get("k_scales"), scales.get("v_scales")
    out = jax_paged.paged_attention(q[:, :, 0], kp, vp, bt, ln, k_scales, v_scales,
                                    interpret=interpret)
    return out[:, :, None]
  return jax.jit(run)     # one dispatch per call, as for the attnax rows


def copy_fn():
  return jax.jit(lambda x: -x)      # read and write every byte once; XLA cannot elide it


# ============================================================================ running


def _short(e: BaseException) -> str:
  msg = str(e).strip().splitlines()
  first = msg[0] if msg else type(e).__name__
  if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
    return "OOM"
  return f"{type(e).__name__}: {first}"[:90]


def rel(x, ref) -> float:
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


class Runner:
  def __init__(self, args):
    self.args = args
    self.start = time.perf_counter()
    self.rows: list[dict] = []
    self.on_gpu = jax.default_backend() == "gpu"
    self.pallas_backend = "pallas" if self.on_gpu else "interpret"

  def past_deadline(self) -> bool:
    return time.perf_counter() - self.start > self.args.deadline_s

  def time(self, fn, args):
    out = jax.block_until_ready(fn(*args))      # compile (time_fn then warms up once more)
    timing, _ = time_fn(fn, [args], budget_s=self.args.budget_s, first_out=out)
    return timing.median_s, out

  def run_point(self, p: Point, kernels: list[str], config: PagedConfig | None = None,
                tag: str = "") -> dict:
    row = dict(point=dataclasses.asdict(p), name=p.name + tag, kv_gb=p.kv_bytes / 1e9,
               config=None if config is None else dataclasses.asdict(config), cells={})
    if self.past_deadline():
      row["cells"] = {k: dict(error="deadline") for k in kernels}
      return row
    try:
      inputs = make_inputs(p)
    except Exception as e:  # noqa: BLE001
      row["cells"] = {k: dict(error=_short(e)) for k in kernels}
      return row
    outs = {}
    for k in kernels:
      if not applies(k, p):
        continue
      if self.past_deadline():
        row["cells"][k] = dict(error="deadline")
        continue
      try:
        if k == "copy":
          x = jnp.zeros((p.kv_bytes // 2,), jnp.bfloat16)
          t, _ = self.time(copy_fn(), (x,))
          del x
          row["cells"][k] = dict(time_ms=t * 1e3, gbps=2 * p.kv_bytes / t / 1e9)
          continue
        if k == "attnax-pallas":
          fn = attnax_fn(self.pallas_backend, config)
        elif k == "attnax-jax":
          fn = attnax_fn("jax")
        elif k == "jax-pallas":
          fn = jax_pallas_fn(interpret=not self.on_gpu)
        else:
          raise ValueError(f"unknown kernel {k}")
        t, out = self.time(fn, inputs)
        outs[k] = out
        row["cells"][k] = dict(time_ms=t * 1e3, gbps=p.kv_bytes / t / 1e9,
                               tokens_per_s=p.batch * p.q_len / t)
      except Exception as e:  # noqa: BLE001
        row["cells"][k] = dict(error=_short(e))
        if self.args.verbose:
          traceback.print_exc()
      gc.collect()
    if "attnax-pallas" in outs:
      for other in ("jax-pallas", "attnax-jax"):
        if other in outs:
          row["cells"]["attnax-pallas"][f"err_vs_{other}"] = rel(outs["attnax-pallas"],
                                                                 outs[other])
    del inputs, outs
    gc.collect()
    return row

  def log(self, row: dict):
    cells = row["cells"]
    parts = []
    for k, c in cells.items():
      parts.append(f"{k} {c['error']}" if "error" in c else f"{k} {c['gbps']:.0f} GB/s")
    print(f"[{time.perf_counter() - self.start:6.1f}s] {row['name']}: " + ", ".join(parts),
          flush=True)


# ============================================================================ reporting


def _fmt(c: dict | None, key: str, fmt: str = "{:.0f}") -> str:
  if c is None:
    return ""
  if "error" in c:
    return f"n/a ({c['error']})" if key == "gbps" else ""
  return fmt.format(c[key]) if key in c else ""


def markdown(rows: list[dict], meta: dict) -> str:
  lines = [f"# Paged attention decoding ({meta['date']}, {meta['device']}, jax {meta['jax']})",
           "", f"Command: `{meta['command']}`", "",
           "| case | KV GB | copy GB/s | attnax pallas GB/s | % copy | tok/s | attnax jax GB/s | "
           "JAX pallas GB/s | x JAX | err vs JAX | err vs jax backend |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    c = r["cells"]
    pal, cp, jp = c.get("attnax-pallas"), c.get("copy"), c.get("jax-pallas")
    pct = ratio = ""
    if pal and cp and "gbps" in pal and "gbps" in cp:
      pct = f"{100 * pal['gbps'] / cp['gbps']:.0f}%"
    if pal and jp and "time_ms" in pal and "time_ms" in jp:
      ratio = f"{jp['time_ms'] / pal['time_ms']:.2f}"
    lines.append("| " + " | ".join([
        r["name"], f"{r['kv_gb']:.2f}", _fmt(cp, "gbps"), _fmt(pal, "gbps"), pct,
        _fmt(pal, "tokens_per_s", "{:.3g}"), _fmt(c.get("attnax-jax"), "gbps"), _fmt(jp, "gbps"),
        ratio, _fmt(pal, "err_vs_jax-pallas", "{:.1e}"), _fmt(pal, "err_vs_attnax-jax", "{:.1e}"),
    ]) + " |")
  int8 = [r for r in rows if r["point"]["kv"] == "int8"]
  for r in int8:
    p = r["point"]
    twin = next((s for s in rows if s["point"] == {**p, "kv": "bf16"}), None)
    a, b = r["cells"].get("attnax-pallas", {}), (twin or {}).get("cells", {}).get(
        "attnax-pallas", {})
    if "tokens_per_s" in a and "tokens_per_s" in b:
      lines += ["", f"int8 vs bf16 KV at B={p['batch']}, ctx={p['context']}: "
                f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x the tokens/s "
                f"({a['tokens_per_s']:.3g} vs {b['tokens_per_s']:.3g})"]
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> bool:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  q_lens = sorted({r["point"]["q_len"] for r in rows if r["point"]["kv"] == "bf16"})
  fig, axes = plt.subplots(1, len(q_lens), figsize=(6 * len(q_lens), 4.5), squeeze=False)
  styles = {"attnax-pallas": "-o", "jax-pallas": "--s", "attnax-jax": ":^", "copy": "-."}
  for ax, sq in zip(axes[0], q_lens):
    sel = [r for r in rows if r["point"]["q_len"] == sq and r["point"]["kv"] == "bf16"]
    for b in sorted({r["point"]["batch"] for r in sel}):
      pts = sorted((r for r in sel if r["point"]["batch"] == b),
                   key=lambda r: r["point"]["context"])
      for k, style in styles.items():
        xs = [r["point"]["context"] for r in pts if "gbps" in r["cells"].get(k, {})]
        ys = [r["cells"][k]["gbps"] for r in pts if "gbps" in r["cells"].get(k, {})]
        if xs and (k != "copy" or b == max(r["point"]["batch"] for r in sel)):
          ax.plot(xs, ys, style, label=f"{k} B={b}" if k != "copy" else "copy (read+write)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("KV read GB/s")
    ax.set_title(f"paged decoding, {sq} query token{'s' if sq > 1 else ''}, bf16")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return True


def write(rows: list[dict], out: str, meta: dict, stem: str = "paged"):
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, f"{stem}.json"), "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  with open(os.path.join(out, f"{stem}.md"), "w") as f:
    f.write(markdown(rows, meta))
  if stem == "paged":
    plot(rows, os.path.join(out, "paged_gbps.png"))


# ============================================================================ sweep


def sweep_configs() -> list[PagedConfig]:
  base = [PagedConfig(block_kv=bk, num_warps=w, num_stages=s)
          for bk in (32, 64, 128) for w, s in ((4, 2), (4, 3), (4, 5), (8, 3))]
  return base + [PagedConfig(waves=wv) for wv in (4, 16)] + [
      PagedConfig(block_kv=bk, num_warps=w, num_stages=s, waves=wv)   # int8: more in flight
      for bk, w, s, wv in ((64, 4, 2, 16), (128, 8, 2, 16), (128, 4, 4, 8), (128, 4, 6, 8),
                           (256, 4, 3, 8), (256, 4, 5, 8), (256, 8, 4, 8))]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=None, help="directory for paged.json/.md/.png")
  parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU: interpreted)")
  parser.add_argument("--sweep", action="store_true",
                      help="time PagedConfig variants of the Pallas kernel at 5 points")
  parser.add_argument("--sweep-points", default="",
                      help="with --sweep: only the points whose name contains one of these "
                           "comma-separated strings (e.g. 'int8')")
  parser.add_argument("--kernels", default="copy,attnax-pallas,attnax-jax,jax-pallas")
  parser.add_argument("--budget-s", type=float, default=0.3, help="timing seconds per cell")
  parser.add_argument("--deadline-s", type=float, default=170.0,
                      help="start no new cell after this many seconds")
  parser.add_argument("--verbose", action="store_true")
  args = parser.parse_args(argv)

  dev = jax.devices()[0]
  meta = dict(date=datetime.date.today().isoformat(), device=getattr(dev, "device_kind", str(dev)),
              jax=jax.__version__, python=platform.python_version(),
              command="python benchmarks/bench_paged.py " + " ".join(sys.argv[1:]))
  print(f"bench_paged: {meta['device']}, jax {meta['jax']}", flush=True)
  runner = Runner(args)
  kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
  rows = []
  if args.sweep:
    points = quick_points()[:1] if args.quick else [Point(8, 8192), Point(64, 32768),
                                                    Point(32, 16384, q_len=8),
                                                    Point(32, 16384), Point(32, 16384, kv="int8")]
    wanted = [w for w in args.sweep_points.split(",") if w]
    points = [p for p in points if not wanted or any(w in p.name for w in wanted)]
    for p in points:
      for cfg in sweep_configs():
        row = runner.run_point(p, ["attnax-pallas"], config=cfg,
                               tag=f" bk={cfg.block_kv} w={cfg.num_warps} s={cfg.num_stages} "
                                   f"waves={cfg.waves}")
        runner.log(row)
        rows.append(row)
      best = max((r for r in rows if r["point"] == dataclasses.asdict(p)
                  and "gbps" in r["cells"]["attnax-pallas"]),
                 key=lambda r: r["cells"]["attnax-pallas"]["gbps"], default=None)
      if best:
        print(f"best at {p.name}: {best['name']} "
              f"{best['cells']['attnax-pallas']['gbps']:.0f} GB/s", flush=True)
    if args.out:
      write(rows, args.out, meta, stem="sweep")
    return
  points = quick_points() if args.quick else default_points()
  for p in points:
    row = runner.run_point(p, kernels)
    runner.log(row)
    rows.append(row)
    if args.out:
      write(rows, args.out, meta)
  print()
  print(markdown(rows, meta))


if __name__ == "__main__":
  main()
