"""Tuning and target check for pallas_flash_attention on one GPU (issue 3).

One process, side by side with cuDNN (``jax.nn.dot_product_attention(implementation="cudnn")``)
and JAX's own Pallas ``mha``: sweeps FlashConfig variants on S=4096 (bf16, D=128), picks the best
forward and backward tilings, then measures the target cases with them. Prints a table and writes
JSON lines to ``$OUT/tune_pallas.jsonl`` (or ``--out``).

  PYTHONPATH=$PWD python3 benchmarks/tune_pallas.py [--quick] [--skip-1m]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
import warnings

warnings.filterwarnings("ignore")

import jax
import jax.numpy as jnp
import numpy as np

from attnax.kernels import causal_mod, sliding_window_mod
from attnax.kernels.pallas import FlashConfig, pallas_flash_attention, default_config

ROWS = []
OUT = None


def log(**rec):
  ROWS.append(rec)
  print(json.dumps(rec), flush=True)
  if OUT:
    with open(OUT, "a") as f:
      f.write(json.dumps(rec) + "\n")


def bench(fn, *args, min_time=0.3, reps=5):
  """Median seconds per call (warm, block_until_ready around batches of calls)."""
  jax.block_until_ready(fn(*args))
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  one = max(time.perf_counter() - t, 1e-6)
  n = max(1, min(200, int(min_time / one)))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    for _ in range(n):
      r = fn(*args)
    jax.block_until_ready(r)
    times.append((time.perf_counter() - t) / n)
  return float(np.median(times))


def flops(b, h, sq, sk, d, causal_frac=1.0, bwd=False):
  f = 4.0 * b * h * sq * sk * d * causal_frac
  return f * (3.5 if bwd else 1.0)   # fwd + bwd = 1 + 2.5


def qkv(b, h, s, d, dtype=jnp.bfloat16, hkv=None, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  hkv = h if hkv is None else hkv
  q = jax.random.normal(ks[0], (b, h, s, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, hkv, s, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, hkv, s, d), jnp.float32).astype(dtype)
  return q, k, v


def fwd_fn(attn):
  return jax.jit(attn)


def fwdbwd_fn(attn):
  def loss(q, k, v, do):
    return jnp.sum(attn(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def t_(x):
  return jnp.swapaxes(x, 1, 2)


def cudnn_attn(causal=False, window=None, dense_window=None):
  def f(q, k, v):
    kw = {}
    mask = None
    if window is not None:
      kw["local_window_size"] = (window - 1, 0)
    if dense_window is not None:   # the window as a dense boolean mask (built inside the jit)
      ii = jnp.arange(q.shape[2])[:, None]
      jj = jnp.arange(k.shape[2])[None, :]
      mask = ((ii - jj >= 0) & (ii - jj < dense_window))[None, None]
    return t_(jax.nn.dot_product_attention(t_(q), t_(k), t_(v), is_causal=causal, mask=mask,
                                           implementation="cudnn", **kw))
  return f


def ours(score_mod=None, config=None, **kw):
  return lambda q, k, v: pallas_flash_attention(q, k, v, score_mod=score_mod, config=config, **kw)


def mha_attn(causal):
  from jax.experimental.pallas.ops.gpu import attention as pa

  def f(q, k, v):
    return t_(pa.mha(t_(q), t_(k), t_(v), None, sm_scale=q.shape[-1] ** -0.5, causal=causal))
  return f


def measure(name, case, attn, args, fl_f, fl_b, do_bwd=True, ref=None):
  rec = dict(case=case, impl=name)
  try:
    tf = bench(fwd_fn(attn), *args)
    rec.update(fwd_ms=tf * 1e3, fwd_tflops=fl_f / tf / 1e12)
    if do_bwd:
      do = jax.random.normal(jax.random.key(9), args[0].shape[:3] + (args[2].shape[-1],),
                             jnp.float32).astype(args[0].dtype)
      tb = bench(fwdbwd_fn(attn), *args, do)
      rec.update(fwdbwd_ms=tb * 1e3, fwdbwd_tflops=fl_b / tb / 1e12)
    if ref is not None:
      out = np.asarray(jax.jit(attn)(*args), np.float32)
      r = np.asarray(ref, np.float32)
      rec["rel_err_vs_cudnn"] = float(np.linalg.norm(out - r) / np.linalg.norm(r))
  except Exception as e:  # keep sweeping
    rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
  log(**rec)
  return rec


def main():
  global OUT
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "tune_pallas.jsonl"))
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--skip-1m", action="store_true")
  ap.add_argument("--skip-sweep", action="store_true")
  a = ap.parse_args()
  OUT = a.out
  print("device", jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
  d = 128
  base = default_config(128, interpret=False)

  # ---------------------------------------------------------------- sweep at S=4096, B=4, H=16
  best_f, best_b = {}, {}
  b, h, s = 4, 16, 4096
  args = qkv(b, h, s, d)
  fwd_variants = [
      (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4), (64, 64, 4, 3),
      (128, 128, 8, 2), (128, 64, 8, 4), (64, 128, 4, 3),
  ]
  bwd_variants = [
      (128, 32, 128, 32, 8, 2), (128, 64, 128, 64, 8, 2), (64, 64, 64, 64, 4, 2),
      (128, 32, 128, 32, 4, 3), (64, 32, 64, 32, 4, 3), (128, 64, 128, 32, 8, 3),
      (128, 32, 64, 64, 8, 2),
  ]
  if a.quick:
    fwd_variants, bwd_variants = fwd_variants[:2], bwd_variants[:2]
  for causal in (False, True):
    case = f"sweep S={s} {'causal' if causal else 'dense'}"
    sm = causal_mod() if causal else None
    frac = 0.5 if causal else 1.0
    ref = cudnn_attn(causal)(*args)
    measure("cudnn", case, cudnn_attn(causal), args, flops(b, h, s, s, d, frac),
            flops(b, h, s, s, d, frac, True))
    measure("jax_pallas_mha", case, mha_attn(causal), args, flops(b, h, s, s, d, frac),
            flops(b, h, s, s, d, frac, True))
    if a.skip_sweep:
      continue
    for fr, fc, w, st in fwd_variants:
      cfg = dataclasses.replace(base, fwd_rows=fr, fwd_cols=fc, fwd_num_warps=w,
                                fwd_num_stages=st)
      r = measure(f"ours fwd {fr}x{fc} w{w} s{st}", case, ours(sm, cfg), args,
                  flops(b, h, s, s, d, frac), 0, do_bwd=False, ref=ref)
      if "fwd_ms" in r and r["fwd_ms"] < best_f.get(causal, (1e9,))[0]:
        best_f[causal] = (r["fwd_ms"], (fr, fc, w, st))
    if not causal:  # the BlockMask list walk instead of the dense range walk
      always = lambda bb, hh, i, j: i >= 0
      fr, fc, w, st = best_f[causal][1] if causal in best_f else (128, 64, 8, 3)
      cfg = dataclasses.replace(base, fwd_rows=fr, fwd_cols=fc, fwd_num_warps=w,
                                fwd_num_stages=st)
      measure("ours fwd via lists (mask_mod=all)", case, ours(None, cfg, mask_mod=always), args,
              flops(b, h, s, s, d, frac), 0, do_bwd=False)
    for qr, qc, kr, kc, w, st in bwd_variants:
      fwdv = best_f.get(causal, (0, (128, 64, 8, 3)))[1]
      cfg = FlashConfig(128, 128, fwdv[0], fwdv[1], fwdv[2], fwdv[3], qr, qc, kr, kc, w, st)
      r = measure(f"ours bwd dq {qr}x{qc} dkv {kr}x{kc} w{w} s{st}", case, ours(sm, cfg), args,
                  flops(b, h, s, s, d, frac), flops(b, h, s, s, d, frac, True))
      if "fwdbwd_ms" in r and r["fwdbwd_ms"] < best_b.get(causal, (1e9,))[0]:
        best_b[causal] = (r["fwdbwd_ms"], (qr, qc, kr, kc, w, st))
  print("best fwd", best_f, "best bwd", best_b, flush=True)

  def best_cfg(causal):
    f = best_f.get(causal, (0, (base.fwd_rows, base.fwd_cols, base.fwd_num_warps,
                                base.fwd_num_stages)))[1]
    bb = best_b.get(causal, (0, (base.dq_rows, base.dq_cols, base.dkv_rows, base.dkv_cols,
                                 base.bwd_num_warps, base.bwd_num_stages)))[1]
    return FlashConfig(128, 128, *f, *bb)

  # ---------------------------------------------------------------- target cases
  for s, b in ((4096, 4), (16384, 1)):
    args = qkv(b, 16, s, d, seed=1)
    for causal in (False, True):
      case = f"S={s} B={b} H=16 {'causal' if causal else 'dense'}"
      frac = 0.5 if causal else 1.0
      fl = (flops(b, 16, s, s, d, frac), flops(b, 16, s, s, d, frac, True))
      measure("cudnn", case, cudnn_attn(causal), args, *fl)
      if s == 16384:
        measure("jax_pallas_mha", case, mha_attn(causal), args, *fl)
      measure("attnax default", case, ours(causal_mod() if causal else None), args, *fl)
      measure("attnax tuned", case, ours(causal_mod() if causal else None, best_cfg(causal)),
              args, *fl)

  # sliding window 1024 at S=32768 (B=1, H=16)
  s, w = 32768, 1024
  args = qkv(1, 16, s, d, seed=2)
  case = f"S={s} window {w}"
  frac = (w * s - w * (w - 1) / 2) / (s * s)
  fl = (flops(1, 16, s, s, d, frac), flops(1, 16, s, s, d, frac, True))
  measure("cudnn local_window_size", case, cudnn_attn(window=w), args, *fl)
  measure("cudnn dense mask", case, cudnn_attn(dense_window=w), args, *fl)
  measure("attnax tuned", case, ours(sliding_window_mod(w), best_cfg(True)), args, *fl)

  # 8 documents of 4096 packed into 32768, causal within each, vs dense causal over 32768
  s = 32768
  args = qkv(1, 16, s, d, seed=3)
  cu = jnp.arange(9, dtype=jnp.int32) * 4096
  fl_doc = (flops(8, 16, 4096, 4096, d, 0.5), flops(8, 16, 4096, 4096, d, 0.5, True))
  fl_c = (flops(1, 16, s, s, d, 0.5), flops(1, 16, s, s, d, 0.5, True))
  measure("cudnn causal 32768", "S=32768 causal (dense)", cudnn_attn(True), args, *fl_c)
  measure("attnax causal 32768", "S=32768 causal (dense)", ours(causal_mod(), best_cfg(True)),
          args, *fl_c)
  measure("attnax varlen 8x4096 causal", "8 docs x 4096 packed",
          ours(causal_mod(), best_cfg(True), cu_seqlens_q=cu), args, *fl_doc)

  # 1M tokens causal, B=1, H=8: forward and backward once each
  if not a.skip_1m:
    s = 1 << 20
    args = qkv(1, 8, s, d, seed=4)
    rec = dict(case="S=1048576 B=1 H=8 causal", impl="attnax tuned")
    try:
      attn = ours(causal_mod(), best_cfg(True))
      f = jax.jit(attn).lower(*args).compile()
      jax.block_until_ready(f(*args))
      t = time.perf_counter()
      out = jax.block_until_ready(f(*args))
      rec["fwd_ms"] = (time.perf_counter() - t) * 1e3
      rec["fwd_tflops"] = flops(1, 8, s, s, d, 0.5) / rec["fwd_ms"] * 1e3 / 1e12
      rec["finite"] = bool(jnp.isfinite(out.astype(jnp.float32)).all())
      del out
      do = jax.random.normal(jax.random.key(1), args[0].shape, jnp.bfloat16)
      g = fwdbwd_fn(attn).lower(*args, do).compile()
      t = time.perf_counter()
      grads = jax.block_until_ready(g(*args, do))
      rec["fwdbwd_ms"] = (time.perf_counter() - t) * 1e3
      rec["fwdbwd_tflops"] = flops(1, 8, s, s, d, 0.5, True) / rec["fwdbwd_ms"] * 1e3 / 1e12
      rec["grads_finite"] = bool(all(jnp.isfinite(x.astype(jnp.float32)).all() for x in grads))
    except Exception as e:
      rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
      traceback.print_exc()
    log(**rec)

  # ---------------------------------------------------------------- table
  print("\n| case | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | err |")
  print("|---|---|---|---|---|---|---|")
  for r in ROWS:
    fm = lambda k: f"{r[k]:.3f}" if k in r else "-"
    print(f"| {r['case']} | {r['impl']} | {fm('fwd_ms')} | {fm('fwd_tflops')} | "
          f"{fm('fwdbwd_ms')} | {fm('fwdbwd_tflops')} | {r.get('error', '')[:60]} |")


if __name__ == "__main__":
  main()
