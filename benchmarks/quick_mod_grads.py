#!/usr/bin/env python3
"""A short GPU timing of differentiated mod arrays (one device call under two minutes).

  python benchmarks/quick_mod_grads.py     # gated 32k (alpha, delta grads) and bias 4k (dbias)

The bias rows also time the Triton lowering with TritonConfig.mod_loads "clamp" and "masked"
(is the bias backward's cost the clamped gather? see BENCHMARKS.md, mod-array gradients).

Prints fwd+bwd median ms of each row as soon as it is measured (bench_attention.time_fn).
"""
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention as ba  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import attnax.kernels as ak  # noqa: E402
from attnax.kernels.pallas import default_config  # noqa: E402


def fwd_bwd(fn, *args, argnums=None):
  def step(*args):
    out, pull = jax.vjp(fn, *args)
    return pull(jnp.ones_like(out))
  timing, _ = ba.time_fn(jax.jit(step), [args], budget_s=0.2)
  return timing.median_s


def main():
  key = jax.random.key(0)
  for name, (b, h, s) in (("gated 32k", (1, 8, 32768)), ("bias 4k", (4, 16, 4096))):
    q, k, v = (jax.random.normal(x, (b, h, s, 128), jnp.bfloat16)
               for x in jax.random.split(key, 3))
    plain = lambda q, k, v: ak.pallas_flash_attention(q, k, v)
    t0 = fwd_bwd(plain, q, k, v, argnums=(0, 1, 2))
    print(f"{name}: plain fwd+bwd {t0 * 1e3:.3f} ms", flush=True)
    if name.startswith("gated"):
      alpha = jax.random.normal(key, (b, h, s), jnp.float32)
      delta = jax.random.normal(key, (b, h, s), jnp.float32)
      mod = lambda q, k, v, a, d: ak.pallas_flash_attention(q, k, v, score_mod=ak.gated_mod(a, d))
      t1 = fwd_bwd(mod, q, k, v, alpha, delta, argnums=(0, 1, 2, 3, 4))
    else:
      bias = jax.random.normal(key, (1, h, s, s), jnp.float32)
      und = lambda q, k, v: ak.pallas_flash_attention(q, k, v,
                                                      score_mod=ak.additive_bias_mod(bias))
      t2 = fwd_bwd(und, q, k, v, argnums=(0, 1, 2))
      print(f"{name}: undifferentiated bias fwd+bwd {t2 * 1e3:.3f} ms", flush=True)
      mod = lambda q, k, v, bb: ak.pallas_flash_attention(q, k, v,
                                                          score_mod=ak.additive_bias_mod(bb))
      t1 = fwd_bwd(mod, q, k, v, bias, argnums=(0, 1, 2, 3))
      t0 = t2
    print(f"{name}: differentiated fwd+bwd {t1 * 1e3:.3f} ms = {t1 / t0:.2f}x", flush=True)
    if name.startswith("bias"):
      # The Triton lowering with the mods' arrays read clamped (default) or by masked loads.
      for loads in ("clamp", "masked"):
        cfg = dataclasses.replace(default_config(128, interpret=False), mod_loads=loads)
        tri = lambda q, k, v, bb, cfg=cfg: ak.pallas_flash_attention(
            q, k, v, score_mod=ak.additive_bias_mod(bb), backend="triton", config=cfg)
        t_und = fwd_bwd(lambda q, k, v: tri(q, k, v, bias), q, k, v)
        t_dif = fwd_bwd(tri, q, k, v, bias)
        print(f"{name}: triton mod_loads={loads}: bias fwd+bwd {t_und * 1e3:.3f} ms, "
              f"+dbias {t_dif * 1e3:.3f} ms", flush=True)


if __name__ == "__main__":
  main()
