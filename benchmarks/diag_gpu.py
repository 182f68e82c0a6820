#!/usr/bin/env python3
"""One GPU diagnosis case per process (``diag_gpu.sh`` runs each under a timeout).

  python benchmarks/diag_gpu.py mosaic-causal S STAGES DQ_COLS REPEATS   # fwd+bwd timing, grads
  python benchmarks/diag_gpu.py threshold                                 # the Triton threshold kernel
"""
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import attnax.kernels as ak
from attnax.kernels.pallas import mosaic_gpu as mg


def mosaic_causal(s, stages, cols, repeats, bwd="mosaic"):
  b = max(1, 16384 // s)
  key = jax.random.key(0)
  q, k, v = (jax.random.normal(kk, (b, 16, s, 128), jnp.bfloat16) for kk in jax.random.split(key, 3))
  cfg = mg.MosaicConfig(block_q=128, block_k=128, num_stages=3, bwd=bwd, bwd_num_stages=stages,
                        bwd_dq_block_k=cols)
  f = lambda q, k, v: ak.pallas_flash_attention(q, k, v, score_mod=ak.causal_mod(),
                                                backend="mosaic", config=cfg)
  g = jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)[1](jnp.ones_like(q)))
  t0 = time.perf_counter()
  lowered = g.lower(q, k, v).compile()
  print(f"compile {time.perf_counter() - t0:.1f} s", flush=True)
  for r in range(repeats):
    t0 = time.perf_counter()
    out = lowered(q, k, v)
    jax.block_until_ready(out)
    print(f"run {r}: {1e3 * (time.perf_counter() - t0):.2f} ms", flush=True)
  ref = jax.jit(lambda q, k, v: jax.vjp(lambda q, k, v: ak.pallas_flash_attention(
      q, k, v, score_mod=ak.causal_mod(), backend="triton"), q, k, v)[1](jnp.ones_like(q)))(q, k, v)
  for name, a, r in zip("qkv", out, ref):
    a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
    print(f"d{name} rel err vs triton {np.linalg.norm(a - r) / np.linalg.norm(r):.2e}")


def threshold():
  key = jax.random.key(1)
  for s, dtype in ((256, jnp.float32), (1024, jnp.bfloat16)):
    q, k, v = (jax.random.normal(kk, (1, 2, s, 64), dtype) for kk in jax.random.split(key, 3))
    try:
      out = ak.threshold_sparse_attention(q, k, v, softmax_threshold=1e-2, backend="pallas")
      jax.block_until_ready(out)
      print(f"threshold fwd S={s} {dtype.__name__}: ok", flush=True)
      dq = jax.grad(lambda q: ak.threshold_sparse_attention(
          q, k, v, softmax_threshold=1e-2, backend="pallas").astype(jnp.float32).sum())(q)
      jax.block_until_ready(dq)
      print(f"threshold bwd S={s}: ok", flush=True)
    except Exception as e:  # noqa: BLE001 - the diagnosis is the message
      msg = str(e)
      cut = msg.find("module:")
      print(f"threshold S={s} {dtype.__name__}: {type(e).__name__}: {msg[:600]}")
      for line in msg.splitlines():
        if "error" in line.lower() and len(line) < 2000:
          print("  |", line[:500])
      if cut >= 0:
        print("  | ... after 'module:':", repr(msg[cut:cut + 300]))


if __name__ == "__main__":
  what = sys.argv[1]
  if what == "mosaic-causal":
    s, stages, cols, reps = map(int, sys.argv[2:6])
    mosaic_causal(s, stages, cols, reps, *(sys.argv[6:7]))
  elif what == "threshold":
    threshold()
