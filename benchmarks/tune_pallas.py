"""Tuning and target check for pallas_flash_attention on one GPU (issue 3).

One process, side by side with cuDNN (``jax.nn.dot_product_attention(implementation="cudnn")``)
and JAX's own Pallas ``mha``: sweeps TritonConfig variants on S=4096 (bf16, D=128), picks the best
forward and backward tilings, then measures the target cases with them. Prints a table and writes
JSON lines to ``$OUT/tune_pallas.jsonl`` (or ``--out``).

  PYTHONPATH=$PWD python3 benchmarks/tune_pallas.py [--sections configs,bwd,fwd,targets,1m]
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
from attnax.kernels.pallas import TritonConfig, pallas_flash_attention, default_config

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


def _cfg(f, dq, dkv):
  return TritonConfig(128, 128, *f, *dq, *dkv[:4],
                     **({"dkv_transposed": dkv[4]} if len(dkv) > 4 else {}))


def section_configs():
  """Every default config compiles and runs (shared memory fits) for each head dim and dtype."""
  for d in (32, 64, 96, 128, 256):
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
      args = qkv(1, 2, 1024, d, dtype, seed=d)
      rec = dict(case=f"config D={d} {jnp.dtype(dtype).name}", impl="attnax default")
      try:
        do = jnp.ones(args[0].shape, dtype)
        g = fwdbwd_fn(ours(causal_mod()))(*args, do)
        rec["ok"] = bool(all(jnp.isfinite(x.astype(jnp.float32)).all() for x in g))
      except Exception as e:
        rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      log(**rec)


DQ_VARIANTS = [(128, 64, 8, 2), (128, 64, 4, 2), (128, 128, 8, 2), (64, 64, 4, 3)]
DKV_VARIANTS = [(64, 64, 4, 2, True), (64, 64, 4, 2, False), (128, 64, 8, 2, True),
                (128, 32, 4, 2, True), (128, 32, 8, 2, True), (64, 32, 4, 2, True),
                (128, 64, 4, 2, True), (128, 128, 8, 1, True), (64, 128, 4, 2, True)]


def section_bwd(causal, b=4, h=16, s=4096, d=128):
  """Time the dQ and dK/dV kernels separately for several tilings."""
  from attnax.kernels.pallas import api, triton as tk
  args = qkv(b, h, s, d, seed=5)
  frac = 0.5 if causal else 1.0
  # per kernel: 2 (QK, dO V) + 1 (dQ) or 2 (dV, dK) matmuls of the fwd's size each
  fl_dq = flops(b, h, s, s, d, frac) * 1.5
  fl_dkv = flops(b, h, s, s, d, frac) * 2.0
  best = {}
  for which in ("dq", "dkv"):
    for var in (DQ_VARIANTS if which == "dq" else DKV_VARIANTS):
      cfg = _cfg((128, 128, 8, 3), var[:4], var[:4])
      cfg = dataclasses.replace(cfg, dkv_transposed=var[4] if len(var) > 4 else True)
      rec = dict(case=f"bwd S={s} {'causal' if causal else 'dense'} D={d}", impl=f"{which} {var}")
      try:
        _, sp, arrays, qp, kp, vp = api._plan(
            *args, score_mod=causal_mod() if causal else None, mask_mod=None, scale=None,
            block_q=None, block_k=None, block_mask=None, softcap=None, cu_seqlens_q=None,
            cu_seqlens_k=None, backend="triton", num_warps=None, num_stages=None, config=cfg)
        leaves = api._flat(arrays.operands)
        out, lse = jax.jit(lambda q, k, v: tk.forward(sp, q, k, v, arrays.lists, leaves))(
            qp, kp, vp)
        do = jax.random.normal(jax.random.key(2), out.shape, jnp.float32).astype(out.dtype)
        delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), -1)
        if which == "dq":
          fn = jax.jit(lambda q, k, v, do, lse, delta: tk.backward_dq(
              sp, q, k, v, do, lse, delta, arrays.lists, leaves))
          fl = fl_dq
        else:
          fn = jax.jit(lambda q, k, v, do, lse, delta: tk.backward_dkv(
              sp, q, k, v, do, lse, delta, arrays.tlists, leaves))
          fl = fl_dkv
        t = bench(fn, qp, kp, vp, do, lse, delta)
        rec.update(ms=t * 1e3, tflops=fl / t / 1e12)
        if t < best.get(which, (1e9,))[0]:
          best[which] = (t, var)
      except Exception as e:
        rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      log(**rec)
  return best


def section_fwd(causal, d=128, b=4, h=16, s=4096, variants=None):
  args = qkv(b, h, s, d, seed=6)
  frac = 0.5 if causal else 1.0
  variants = variants or [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (64, 128, 4, 3)]
  best = None
  for var in variants:
    cfg = _cfg(var, (64, 64, 4, 2), (64, 64, 4, 2))
    r = measure(f"fwd {var}", f"fwd S={s} {'causal' if causal else 'dense'} D={d}",
                ours(causal_mod() if causal else None, cfg), args, flops(b, h, s, s, d, frac), 0,
                do_bwd=False)
    if "fwd_ms" in r and (best is None or r["fwd_ms"] < best[0]):
      best = (r["fwd_ms"], var)
  if not causal:
    always = lambda bb, hh, i, j: i >= 0
    measure(f"fwd {best[1]} via lists (mask_mod=all)", f"fwd S={s} dense D={d}",
            ours(None, _cfg(best[1], (64, 64, 4, 2), (64, 64, 4, 2)), mask_mod=always), args,
            flops(b, h, s, s, d, frac), 0, do_bwd=False)
  return best


def section_targets(cfg_dense, cfg_causal, d=128):
  for s, b in ((4096, 4), (16384, 1)):
    args = qkv(b, 16, s, d, seed=1)
    for causal in (False, True):
      case = f"S={s} B={b} H=16 {'causal' if causal else 'dense'}"
      frac = 0.5 if causal else 1.0
      fl = (flops(b, 16, s, s, d, frac), flops(b, 16, s, s, d, frac, True))
      measure("cudnn", case, cudnn_attn(causal), args, *fl)
      measure("jax_pallas_mha", case, mha_attn(causal), args, *fl)
      measure("attnax", case, ours(causal_mod() if causal else None,
                                   cfg_causal if causal else cfg_dense), args, *fl)


def section_sparse(cfg, d=128):
  s, w = 32768, 1024
  args = qkv(1, 16, s, d, seed=2)
  case = f"S={s} H=16 window {w}"
  frac = (w * s - w * (w - 1) / 2) / (s * s)
  fl = (flops(1, 16, s, s, d, frac), flops(1, 16, s, s, d, frac, True))
  measure("cudnn local_window_size", case, cudnn_attn(window=w), args, *fl)
  measure("cudnn dense mask", case, cudnn_attn(dense_window=w), args, *fl)
  measure("attnax", case, ours(sliding_window_mod(w), cfg), args, *fl)
  args = qkv(1, 16, s, d, seed=3)
  cu = jnp.arange(9, dtype=jnp.int32) * 4096
  fl_doc = (flops(8, 16, 4096, 4096, d, 0.5), flops(8, 16, 4096, 4096, d, 0.5, True))
  fl_c = (flops(1, 16, s, s, d, 0.5), flops(1, 16, s, s, d, 0.5, True))
  measure("cudnn causal", "S=32768 H=16 causal", cudnn_attn(True), args, *fl_c)
  measure("attnax causal", "S=32768 H=16 causal", ours(causal_mod(), cfg), args, *fl_c)
  measure("attnax varlen causal", "8 docs x 4096 packed in 32768",
          ours(causal_mod(), cfg, cu_seqlens_q=cu), args, *fl_doc)


def section_1m(cfg):
  s = 1 << 20
  d = 128
  args = qkv(1, 8, s, d, seed=4)
  rec = dict(case="S=1048576 B=1 H=8 causal", impl="attnax")
  try:
    attn = ours(causal_mod(), cfg)
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


def table():
  print("\n| case | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | ms | TFLOP/s | err |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in ROWS:
    fm = lambda k: f"{r[k]:.3f}" if k in r else "-"
    print(f"| {r['case']} | {r['impl']} | {fm('fwd_ms')} | {fm('fwd_tflops')} | "
          f"{fm('fwdbwd_ms')} | {fm('fwdbwd_tflops')} | {fm('ms')} | {fm('tflops')} | "
          f"{r.get('error', '')[:70]} |")


def main():
  global OUT
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "tune_pallas.jsonl"))
  ap.add_argument("--sections", default="configs,bwd,fwd,targets")
  a = ap.parse_args()
  OUT = a.out
  secs = a.sections.split(",")
  print("device", jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
  base = default_config(128, interpret=False)
  fwd_best = {c: (0, (base.fwd_rows, base.fwd_cols, base.fwd_num_warps, base.fwd_num_stages))
              for c in (False, True)}
  qdef = (0, (base.dq_rows, base.dq_cols, base.dq_num_warps, base.dq_num_stages))
  kdef = (0, (base.dkv_rows, base.dkv_cols, base.dkv_num_warps, base.dkv_num_stages,
              base.dkv_transposed))
  bwd_best = {c: {"dq": qdef, "dkv": kdef} for c in (False, True)}
  if "configs" in secs:
    section_configs()
  if "bwd" in secs:
    for causal in (False, True):
      bwd_best[causal].update(section_bwd(causal))
  if "fwd" in secs:
    for causal in (False, True):
      fwd_best[causal] = section_fwd(causal) or fwd_best[causal]
    section_fwd(True, d=256, variants=[(64, 32, 4, 1), (64, 64, 4, 1), (32, 32, 4, 1),
                                       (64, 32, 4, 2)])
  cfgs = {c: _cfg(fwd_best[c][1], bwd_best[c]["dq"][1], bwd_best[c]["dkv"][1])
          for c in (False, True)}
  print("chosen", cfgs, flush=True)
  log(case="chosen", impl=str(cfgs))
  if "targets" in secs:
    section_targets(cfgs[False], cfgs[True])
  if "sparse" in secs:
    section_sparse(cfgs[True])
  if "1m" in secs:
    section_1m(cfgs[True])
  table()


if __name__ == "__main__":
  main()
