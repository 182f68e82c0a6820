#!/usr/bin/env python3
"""The Mosaic forward's program forms (per work item, persistent) and its reduction scratch, at
S=4096 B=4 H=16 bf16, dense, head dims 64/128/256, beside cuDNN (one process, forward only).

  python benchmarks/diag_mosaic_fwd.py      # on the GPU (about a minute)
"""
import dataclasses
import os
import sys

import jax, jax.numpy as jnp
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import time_fn
from attnax.kernels.pallas import pallas_flash_attention, mosaic_gpu as mg

for d in (64, 128, 256):
  b, h, s = 4, 16, 4096
  q, k, v = (jax.random.normal(x, (b, h, s, d), jnp.bfloat16)
             for x in jax.random.split(jax.random.key(d), 3))
  flops = 4 * b * h * s * s * d
  t_ref, _ = time_fn(jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
      *(x.transpose(0, 2, 1, 3) for x in (q, k, v)), implementation="cudnn")),
      [(q, k, v)], budget_s=0.3)
  print(f"D={d} cudnn {t_ref.median_s * 1e3:.3f} ms", flush=True)
  cfg = mg.default_config(d)
  for scratch in (0, 2048):
    for persistent in (False, True):
      mg._FWD_REDUCTION_SCRATCH = scratch
      fn = jax.jit(lambda q, k, v, c=dataclasses.replace(cfg, persistent=persistent):
                   pallas_flash_attention(q, k, v, backend="mosaic", config=c))
      try:
        t, _ = time_fn(fn, [(q, k, v)], budget_s=0.3)
      except Exception as e:   # noqa: BLE001 - a diagnostic prints what failed and goes on
        print(f"  scratch={scratch} persistent={persistent}: {type(e).__name__} {str(e)[:150]}")
        continue
      print(f"  scratch={scratch} persistent={persistent}: {t.median_s * 1e3:.3f} ms "
            f"{t_ref.median_s / t.median_s:.2f}x cuDNN {flops / t.median_s / 1e12:.0f} TF/s "
            f"compile {t.compile_s:.1f}s", flush=True)
  mg._FWD_REDUCTION_SCRATCH = 0
