#!/usr/bin/env python3
"""The Mosaic backward's two forms (two-pass, and fused with dQ by TMA reductions) at ring depths
2 and 3, fwd+bwd at S=4096 B=4 H=16 D=128 bf16, dense and causal, beside cuDNN (one process).

  python benchmarks/bench_mosaic_bwd_forms.py     # on the GPU (about 2 minutes, mostly compiles)
"""
import dataclasses
import os
import sys

import jax, jax.numpy as jnp
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import time_fn
from attnax.kernels import causal_mod
from attnax.kernels.pallas import pallas_flash_attention, mosaic_gpu as mg

bf16 = jnp.bfloat16
STAGES = [int(x) for x in os.environ.get("FORMS_STAGES", "2,3").split(",")]
for causal in (False, True):
  b, h, s, d = 4, 16, 4096, 128
  ks = jax.random.split(jax.random.key(0), 4)
  q, k, v, ct = (jax.random.normal(x, (b, h, s, d), bf16) for x in ks)
  flops = 4 * b * h * s * s * d * 3.5 / (2 if causal else 1)
  def loss_of(f):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * ct),
                            argnums=(0, 1, 2)))
  cudnn = loss_of(lambda q, k, v: jax.nn.dot_product_attention(
      q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
      is_causal=causal, implementation="cudnn").transpose(0, 2, 1, 3))
  t_ref, _ = time_fn(cudnn, [(q, k, v)], budget_s=0.3)
  print(f"causal={causal} cudnn {t_ref.median_s*1e3:.3f} ms", flush=True)
  base = mg.default_config(d, masked=causal)
  kw = dict(score_mod=causal_mod()) if causal else {}
  for det in (True, False):
    for stages in STAGES:
      cfg = dataclasses.replace(base, bwd="mosaic", deterministic=det, bwd_num_stages=stages)
      f = loss_of(lambda q, k, v, cfg=cfg: pallas_flash_attention(q, k, v, backend="mosaic",
                                                                 config=cfg, **kw))
      try:
        t, _ = time_fn(f, [(q, k, v)], budget_s=0.3)
      except Exception as e:
        print(f"  det={det} stages={stages}: {type(e).__name__} {str(e)[:200]}", flush=True)
        continue
      print(f"  det={det} stages={stages}: {t.median_s*1e3:.3f} ms "
            f"{t_ref.median_s / t.median_s:.2f}x cuDNN {flops / t.median_s / 1e12:.0f} TF/s "
            f"compile {t.compile_s:.1f}s", flush=True)
