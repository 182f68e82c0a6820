#!/usr/bin/env python3
"""Gated 32k fwd+bwd (alpha, delta grads) on the Triton lowering, mod_loads "clamp" vs "masked".

  python benchmarks/quick_gated_loads.py
"""
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from quick_mod_grads import fwd_bwd  # noqa: E402

import attnax.kernels as ak  # noqa: E402
from attnax.kernels.pallas import default_config  # noqa: E402

key = jax.random.key(0)
b, h, s = 1, 8, 32768
q, k, v = (jax.random.normal(x, (b, h, s, 128), jnp.bfloat16) for x in jax.random.split(key, 3))
alpha = jax.random.normal(key, (b, h, s), jnp.float32)
delta = jax.random.normal(key, (b, h, s), jnp.float32)
for loads in ("clamp", "masked"):
  cfg = dataclasses.replace(default_config(128, interpret=False), mod_loads=loads)
  fn = lambda q, k, v, a, d, cfg=cfg: ak.pallas_flash_attention(
      q, k, v, score_mod=ak.gated_mod(a, d), backend="triton", config=cfg)
  t_und = fwd_bwd(lambda q, k, v: fn(q, k, v, alpha, delta), q, k, v)
  t_dif = fwd_bwd(fn, q, k, v, alpha, delta)
  print(f"gated 32k triton mod_loads={loads}: fwd+bwd {t_und * 1e3:.3f} ms, "
        f"+dalpha,ddelta {t_dif * 1e3:.3f} ms", flush=True)
