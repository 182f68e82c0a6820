#!/usr/bin/env python3
"""A short GPU timing of differentiated mod arrays (one device call under three minutes).

  python benchmarks/quick_mod_grads.py            # bf16, D=128, one process

Rows: ALiBi + causal with slopes ``(H,)`` (B=4 H=16 S=4096), gated attention with alpha, delta
``(B, H, S)`` (B=1 H=8 S=32768), a bias row ``(B, 1, 1, S)`` + causal (B=4 H=16 S=4096), and the
``(1, H, S, S)`` bias table (B=4 H=16 S=4096). Each row: fwd+bwd median ms with gradients for q, k,
v only (``qkv``) and for q, k, v and the mod's arrays (``+arrays``), through ``backend="auto"``
(the Mosaic lowering; its backward where it can run the plan) and with
``MosaicConfig(bwd="triton")`` (the Triton backward). ``+arrays / qkv`` is the issue's figure
(target <= 1.3x for the bias table). Timing: bench_attention.time_fn.
"""
import dataclasses
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention as ba  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import attnax.kernels as ak  # noqa: E402
from attnax.kernels.pallas import mosaic_gpu as mg  # noqa: E402


def fwd_bwd(fn, args, consts):
  """Median seconds of fwd+bwd of ``fn(*args, *consts)``, differentiating ``args`` only."""
  def step(args, consts):
    out, pull = jax.vjp(lambda *a: fn(*a, *consts), *args)
    return pull(jnp.ones_like(out))
  timing, _ = ba.time_fn(jax.jit(step), [(args, consts)], budget_s=0.2)
  return timing.median_s


def rows(key):
  k1, k2, k3 = jax.random.split(key, 3)
  yield ("alibi+causal 4k", (4, 16, 4096), (0.5 * jax.random.uniform(k1, (16,)),),
         lambda slopes: ak.compose_score_mods(ak.alibi_mod(slopes=slopes), ak.causal_mod()))
  yield ("gated 32k", (1, 8, 32768), (jax.random.normal(k1, (1, 8, 32768)),
                                      jax.random.normal(k2, (1, 8, 32768))), ak.gated_mod)
  yield ("bias row+causal 4k", (4, 16, 4096), (jax.random.normal(k3, (4, 1, 1, 4096)),),
         lambda bias: ak.compose_score_mods(ak.additive_bias_mod(bias), ak.causal_mod()))
  yield ("bias table 4k", (4, 16, 4096), (jax.random.normal(k3, (1, 16, 4096, 4096)),),
         ak.additive_bias_mod)


def main():
  key = jax.random.key(0)
  print("| row | bwd | qkv ms | +arrays ms | +arrays / qkv |")
  print("|---|---|---|---|---|")
  for name, (b, h, s), arrays, make in rows(key):
    q, k, v = (jax.random.normal(x, (b, h, s, 128), jnp.bfloat16)
               for x in jax.random.split(key, 3))
    for bwd in ("auto", "triton"):
      cfg = dataclasses.replace(mg.default_config(128, jnp.bfloat16, masked=True), bwd=bwd)
      fn = lambda q, k, v, *a, cfg=cfg: ak.pallas_flash_attention(
          q, k, v, score_mod=make(*a), backend="mosaic", config=cfg)
      try:
        t_qkv = fwd_bwd(fn, (q, k, v), arrays)
        t_all = fwd_bwd(fn, (q, k, v) + arrays, ())
      except Exception as e:  # noqa: BLE001 -- one failing row must not hide the others
        print(f"| {name} | {bwd} | error: {type(e).__name__}: {str(e)[:300]} | | |", flush=True)
        traceback.print_exc()
        continue
      print(f"| {name} | {bwd} | {t_qkv * 1e3:.3f} | {t_all * 1e3:.3f} | {t_all / t_qkv:.2f}x |",
            flush=True)


if __name__ == "__main__":
  main()
