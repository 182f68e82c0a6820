#!/usr/bin/env python3
"""The Mosaic forward's program forms (per work item, persistent), its reduction scratch and
Pallas's automatic barriers, at S=4096 B=4 H=16 bf16, head dims 64/128/256 dense and D=128
causal, beside cuDNN (one process, forward only). Each variant's output is compared bitwise with
the default's.

  python benchmarks/diag_mosaic_fwd.py      # on the GPU (about a minute)
"""
import dataclasses
import os
import sys

import jax, jax.numpy as jnp
import numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import time_fn
from attnax.kernels import causal_mod
from attnax.kernels.pallas import pallas_flash_attention, mosaic_gpu as mg

VARIANTS = [  # (persistent, reduction scratch bytes, no auto barriers)
    (False, 0, False), (True, 0, False), (False, 2048, False), (True, 2048, False),
    (False, 0, True), (True, 0, True)]
for d, causal in ((64, False), (128, False), (256, False), (128, True)):
  b, h, s = 4, 16, 4096
  q, k, v = (jax.random.normal(x, (b, h, s, d), jnp.bfloat16)
             for x in jax.random.split(jax.random.key(d), 3))
  flops = 4 * b * h * s * s * d / (2 if causal else 1)
  t_ref, _ = time_fn(jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
      *(x.transpose(0, 2, 1, 3) for x in (q, k, v)), is_causal=causal, implementation="cudnn")),
      [(q, k, v)], budget_s=0.3)
  print(f"D={d} causal={causal} cudnn {t_ref.median_s * 1e3:.3f} ms", flush=True)
  cfg = mg.default_config(d, masked=causal)
  kw = dict(score_mod=causal_mod()) if causal else {}
  first = None
  for persistent, scratch, no_auto in VARIANTS:
    if causal and persistent:
      continue
    mg._FWD_REDUCTION_SCRATCH, mg._FWD_NO_AUTO_BARRIERS = scratch, no_auto
    fn = jax.jit(lambda q, k, v, c=dataclasses.replace(cfg, persistent=persistent):
                 pallas_flash_attention(q, k, v, backend="mosaic", config=c, **kw))
    name = f"persistent={persistent} scratch={scratch} no_auto_barriers={no_auto}"
    try:
      t, out = time_fn(fn, [(q, k, v)], budget_s=0.3)
    except Exception as e:   # noqa: BLE001 - a diagnostic prints what failed and goes on
      print(f"  {name}: {type(e).__name__} {str(e)[:150]}", flush=True)
      continue
    out = np.asarray(out, np.float32)
    first = out if first is None else first
    print(f"  {name}: {t.median_s * 1e3:.3f} ms {t_ref.median_s / t.median_s:.2f}x cuDNN "
          f"{flops / t.median_s / 1e12:.0f} TF/s compile {t.compile_s:.1f}s "
          f"{'same bits' if np.array_equal(out, first) else 'DIFFERENT BITS'}", flush=True)
  mg._FWD_REDUCTION_SCRATCH, mg._FWD_NO_AUTO_BARRIERS = 0, False
