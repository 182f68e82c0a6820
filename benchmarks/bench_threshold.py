#!/usr/bin/env python3
"""Threshold-sparse attention: speed and measured error, beside AETHER and the dense kernel.

Issue 13's measurement (the numbers go in BENCHMARKS.md):

  python benchmarks/bench_threshold.py                 # H200: B=1 H=8 S=32768 D=128 bf16
  python benchmarks/bench_threshold.py --causal        # the same under a causal mask
  python benchmarks/bench_threshold.py --small         # tiny shapes, runs on a CPU (smoke test)
  python benchmarks/bench_threshold.py --out /tmp/thr  # also writes /tmp/thr.json and /tmp/thr.md

For iid and clustered inputs (``bench_attention.clustered_qkv``: keys in runs of 512 around random
centroids, each run of queries aimed at one of them) it times, with ``bench_attention.time_fn``:

* ``dense``: ``pallas_flash_attention`` (``backend="auto"``: Mosaic on an H200) -- the reference
  output every error is measured against -- and ``dense-triton`` (the Triton lowering, which is the
  one that runs the threshold kernel: the like-for-like baseline; its error is the noise floor);
* ``threshold``: ``threshold_sparse_attention`` at its default ``softmax_threshold``
  (``head_dim / Sk``) and at the ``--thresholds`` values;
* ``aether``: ``aether_attention`` tuned to each threshold row's measured error: the largest
  ``epsilon`` of ``--epsilons`` whose measured relative L2 error is at most the threshold row's
  (the smallest epsilon when none is that accurate).

Columns: fwd and fwd+bwd median times (``fwd+bwd``: ``jax.vjp`` then the pullback of a fixed
cotangent, as bench_attention), the ratio to ``dense-triton`` (``x dense``: above 1 is faster),
the mean skipped fraction, and the output's error against ``dense``: max abs and relative L2
(``||out - dense|| / ||dense||``).

With ``attnax.kernels.gated_mod`` present it also times gated attention
(``score_mod=gated_mod(alpha, delta)``, gradients for q, k, v, alpha, delta) against the ungated
kernel, forward and forward+backward (issue 13's target: at most 1.15x).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import traceback

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)

import bench_attention as ba  # noqa: E402  (puts the repo root on sys.path)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import attnax.kernels as ak  # noqa: E402

EPSILONS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5, 1e-6)
MODES = ("fwd", "fwd+bwd")


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seq", type=int, default=32768)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--causal", action="store_true", help="a causal mask on every row")
  p.add_argument("--thresholds", default="1e-3,5e-2",
                 help="softmax_threshold values besides the default (comma separated)")
  p.add_argument("--epsilons", default=",".join(f"{e:g}" for e in EPSILONS),
                 help="AETHER epsilons searched for a matching error")
  p.add_argument("--inputs", default="iid,clustered")
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--cluster-len", type=int, default=512)
  p.add_argument("--block", type=int, default=None,
                 help="block_q = block_k of the threshold and AETHER rows (default: theirs)")
  p.add_argument("--budget-s", type=float, default=1.5, help="timing seconds per cell")
  p.add_argument("--no-gated", action="store_true")
  p.add_argument("--small", action="store_true",
                 help="tiny shapes (S=256, H=2, D=64, clusters of 64, 32-wide tiles, three "
                      "epsilons): a CPU smoke run")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="write PATH.json and PATH.md")
  p.add_argument("--verbose", action="store_true")
  args = p.parse_args(argv)
  if args.small:
    args.seq, args.batch, args.heads, args.head_dim, args.cluster_len = 256, 1, 2, 64, 64
    args.budget_s = min(args.budget_s, 0.3)
    args.block = args.block or 32
    if args.epsilons == p.get_default("epsilons"):
      args.epsilons = "1e-1,1e-2,1e-4"
  return args


def timed(jf, args, budget_s):
  """``bench_attention.time_fn`` after a compiling call, so that it always makes its untimed warm
  call too (a first run after compiling can be slow: lazy initialisation, the interpreter)."""
  out0 = jax.block_until_ready(jf(*args))
  return ba.time_fn(jf, [args], budget_s=budget_s, first_out=out0)


class Bench:

  def __init__(self, args):
    self.args = args
    self.dtype = jnp.dtype(args.dtype)
    self.modes = [m for m in args.modes.split(",") if m]
    self.records: list[dict] = []
    self.md: list[str] = []
    self.mod = ak.causal_mod() if args.causal else None

  def out(self, line: str = ""):
    print(line, flush=True)
    self.md.append(line)

  # ------------------------------------------------------------------ pieces

  def inputs(self, kind: str):
    a = self.args
    key = jax.random.PRNGKey(a.seed)
    kg, kct = jax.random.split(key)
    shape = (a.batch, a.heads, a.seq, a.head_dim)
    if kind == "clustered":
      q, k, v = ba.clustered_qkv(kg, *shape, cluster_len=a.cluster_len)
    else:
      q, k, v = (jax.random.normal(x, shape, jnp.float32) for x in jax.random.split(kg, 3))
    ct = jax.random.normal(kct, shape, jnp.float32)
    return jax.block_until_ready(tuple(x.astype(self.dtype) for x in (q, k, v, ct)))

  def kw(self):
    return {} if self.mod is None else {"score_mod": self.mod}

  def sparse_kw(self):
    """Options of the threshold and AETHER rows: the mask, and ``--block`` when given."""
    b = self.args.block
    return dict(self.kw(), **({} if b is None else {"block_q": b, "block_k": b}))

  def time(self, fn, args, mode):
    """``(Timing, output of the first call)`` of ``fn(q, k, v)`` in ``mode``."""
    q, k, v, ct = args
    if mode == "fwd":
      jf = jax.jit(lambda q, k, v, ct: fn(q, k, v))
    else:
      def fb(q, k, v, ct):
        o, pull = jax.vjp(fn, q, k, v)
        return (o,) + tuple(pull(ct))
      jf = jax.jit(fb)
    return timed(jf, (q, k, v, ct), self.args.budget_s)

  def errors(self, out, ref):
    rel, mx = ba._errs(out, ref)
    return float(mx), float(rel)

  def row(self, inp: str, name: str, setting: str, fn, args, ref, *, skipped=None, t_base=None,
          extra=None):
    rec = {"inputs": inp, "row": name, "setting": setting, "skipped": skipped}
    rec.update(extra or {})
    out = None
    for mode in self.modes:
      try:
        timing, res = self.time(fn, args, mode)
        rec[f"{mode}_ms"] = 1e3 * timing.median_s
        if out is None:
          out = res if mode == "fwd" else res[0]
      except Exception as e:  # noqa: BLE001
        rec[f"{mode}_ms"] = None
        rec[f"{mode}_na"] = ba._short(e)
        if self.args.verbose:
          traceback.print_exc()
    if out is not None and ref is not None:
      rec["max_abs"], rec["rel_l2"] = self.errors(out, ref)
    for mode in self.modes:
      t, b = rec.get(f"{mode}_ms"), (t_base or {}).get(f"{mode}_ms")
      rec[f"{mode}_x"] = b / t if t and b else None
    self.records.append(rec)
    self.print_row(rec)
    return rec, out

  def print_header(self):
    cols = ["inputs", "row", "setting", "skipped", "max abs", "rel L2"]
    for m in self.modes:
      cols += [f"{m} ms", f"{m} x dense"]
    self.out("| " + " | ".join(cols) + " |")
    self.out("|" + "---|" * len(cols))

  def print_row(self, r):
    f = lambda x, spec: "n/a" if x is None else format(x, spec)
    cells = [r["inputs"], r["row"], r["setting"], f(r.get("skipped"), ".3f"),
             f(r.get("max_abs"), ".2e"), f(r.get("rel_l2"), ".2e")]
    for m in self.modes:
      t = r.get(f"{m}_ms")
      cells += [f(t, ".3f") if t is not None else f"n/a ({r.get(m + '_na', '')})",
                f(r.get(f"{m}_x"), ".2f")]
    self.out("| " + " | ".join(cells) + " |")

  # ------------------------------------------------------------------ one input kind

  def run_inputs(self, kind: str):
    a = self.args
    args = self.inputs(kind)
    q, k, v, _ = args
    kw = self.kw()
    self.out(f"### {kind} inputs")
    self.out("")
    self.print_header()
    dense_fn = lambda q, k, v: ak.pallas_flash_attention(q, k, v, **kw)
    _, ref = self.row(kind, "dense", "pallas auto", dense_fn, args, None)
    if ref is None:
      ref = jax.jit(dense_fn)(q, k, v)
    base, _ = self.row(kind, "dense-triton", "pallas triton",
                       lambda q, k, v: ak.pallas_flash_attention(q, k, v, backend="triton", **kw),
                       args, ref)
    if base.get("fwd_ms") is None and base.get("fwd+bwd_ms") is None:
      base = self.records[-2]   # no Triton lowering here (a CPU): compare with dense itself

    kw = self.sparse_kw()
    thresholds = [None] + [float(t) for t in a.thresholds.split(",") if t]
    thr_rows = []
    for t in thresholds:
      fn = lambda q, k, v, t=t: ak.threshold_sparse_attention(q, k, v, softmax_threshold=t, **kw)
      _, _, stats = jax.jit(lambda q, k, v, t=t: ak.threshold_sparse_attention(
          q, k, v, softmax_threshold=t, return_lse=True, return_stats=True, **kw))(q, k, v)
      label = (f"default {stats.softmax_threshold:.3g}" if t is None
               else f"softmax_threshold={t:g}")
      rec, _ = self.row(kind, "threshold", label, fn, args, ref,
                        skipped=float(jnp.mean(stats.skipped_fraction)), t_base=base,
                        extra={"softmax_threshold": stats.softmax_threshold})
      thr_rows.append(rec)

    # AETHER at a matching error: measure each epsilon's forward error once.
    eps_err = {}
    for eps in (float(e) for e in a.epsilons.split(",") if e):
      try:
        out, _, st = jax.jit(lambda q, k, v, eps=eps: ak.aether_attention(
            q, k, v, epsilon=eps, return_lse=True, return_stats=True, **kw))(q, k, v)
        eps_err[eps] = (self.errors(out, ref)[1], float(jnp.mean(st.skipped_fraction)))
      except Exception as e:  # noqa: BLE001
        self.out(f"aether epsilon={eps:g}: n/a ({ba._short(e)})")
    if not eps_err:
      return
    self.out("")
    self.out(f"AETHER's measured errors ({kind}): " + ", ".join(
        f"eps={e:g}: rel {r:.2e} skip {s:.3f}" for e, (r, s) in sorted(eps_err.items())))
    self.out("")
    self.print_header()
    done = set()
    for rec in thr_rows:
      target = rec.get("rel_l2")
      if target is None:
        continue
      ok = [e for e, (r, _) in eps_err.items() if r <= target]
      eps = max(ok) if ok else min(eps_err)
      if eps in done:
        continue
      done.add(eps)
      fn = lambda q, k, v, eps=eps: ak.aether_attention(q, k, v, epsilon=eps, **kw)
      self.row(kind, "aether", f"epsilon={eps:g} (vs {rec['setting']})", fn, args, ref,
               skipped=eps_err[eps][1], t_base=base,
               extra={"epsilon": eps, "matched": rec["setting"], "matched_err": target})

  # ------------------------------------------------------------------ gated

  def run_gated(self):
    gated_mod = getattr(ak, "gated_mod", None)
    if gated_mod is None:
      try:
        from attnax.kernels.gated import gated_mod
      except ImportError:
        self.out("gated: n/a (attnax.kernels.gated_mod not present yet)")
        return
    a = self.args
    q, k, v, ct = self.inputs("iid")
    ka, kd = jax.random.split(jax.random.PRNGKey(a.seed + 1))
    alpha = jax.random.normal(ka, (a.batch, a.heads, a.seq), jnp.float32)
    delta = jax.random.normal(kd, (a.batch, a.heads, a.seq), jnp.float32)
    mod = self.mod

    def gated(q, k, v, alpha, delta):
      g = gated_mod(alpha, delta)
      sm = g if mod is None else ak.compose_score_mods(mod, g)
      return ak.pallas_flash_attention(q, k, v, score_mod=sm)

    ungated = lambda q, k, v: ak.pallas_flash_attention(q, k, v, **self.kw())
    cells = {}
    for name, fn, args in (("ungated", ungated, (q, k, v)),
                           ("gated", gated, (q, k, v, alpha, delta))):
      for mode in self.modes:
        if mode == "fwd":
          jf = jax.jit(fn)
        else:
          def fb(*xs, fn=fn):
            o, pull = jax.vjp(fn, *xs)
            return (o,) + tuple(pull(ct))
          jf = jax.jit(fb)
        try:
          cells[(name, mode)] = 1e3 * timed(jf, args, a.budget_s)[0].median_s
        except Exception as e:  # noqa: BLE001
          cells[(name, mode)] = None
          self.out(f"gated {name} {mode}: n/a ({ba._short(e)})")
          if a.verbose:
            traceback.print_exc()
    self.out("")
    self.out("| gated vs ungated (pallas auto) | " + " | ".join(self.modes) + " |")
    self.out("|---|" + "---|" * len(self.modes))
    for name in ("ungated", "gated"):
      ms = [cells.get((name, m)) for m in self.modes]
      self.out(f"| {name} ms | " + " | ".join("n/a" if t is None else f"{t:.3f}" for t in ms)
               + " |")
    ratio = []
    for m in self.modes:
      g, u = cells.get(("gated", m)), cells.get(("ungated", m))
      ratio.append(None if not (g and u) else g / u)
    self.out("| gated / ungated (target <= 1.15 fwd+bwd) | "
             + " | ".join("n/a" if r is None else f"{r:.3f}" for r in ratio) + " |")
    self.records.append({"row": "gated", **{f"{n}_{m}_ms": cells.get((n, m))
                                             for n in ("ungated", "gated") for m in self.modes}})

  # ------------------------------------------------------------------ all

  def main(self):
    a = self.args
    dev = jax.devices()[0]
    self.out(f"## bench_threshold {datetime.date.today().isoformat()}: {dev.device_kind} "
             f"({jax.default_backend()}), jax {jax.__version__}, "
             f"python {platform.python_version()}")
    self.out(f"B={a.batch} H={a.heads} S={a.seq} D={a.head_dim} {self.dtype.name}"
             f"{', causal' if a.causal else ''}; command: python benchmarks/bench_threshold.py "
             + " ".join(sys.argv[1:]))
    self.out("")
    for kind in a.inputs.split(","):
      try:
        self.run_inputs(kind)
      except Exception as e:  # noqa: BLE001
        self.out(f"{kind}: n/a ({ba._short(e)})")
        traceback.print_exc()
      self.out("")
    if not a.no_gated:
      self.run_gated()
    if a.out:
      with open(a.out + ".json", "w") as f:
        json.dump({"args": vars(a), "device": dev.device_kind, "jax": jax.__version__,
                   "records": self.records}, f, indent=1)
      with open(a.out + ".md", "w") as f:
        f.write("\n".join(self.md) + "\n")
    return 0


def main(argv=None):
  return Bench(parse(argv)).main()


if __name__ == "__main__":
  sys.exit(main())
