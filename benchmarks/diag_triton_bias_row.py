#!/usr/bin/env python3
"""Which Triton kernel of a bias-row plan runs out of shared memory on the H200.

Seen 2026-12-03 (BENCHMARKS.md, seventh session): ``MosaicConfig(bwd="triton")`` on a causal
plan with a bias row ``(B, 1, 1, S)`` failed to launch, 262144 > 232448 bytes. This times nothing:
it runs the Triton lowering's forward, then its backward without and with the bias differentiated,
with the default config and with one knob changed at a time, and prints ok / FAIL per run.

Run 2026-12-03 (eighth session): every run failed, the forward too (262144-360448 bytes), since
``score_mods.take`` gathered the row as a whole (bq, bk) tile. After the fix (one (1, bk) load)
every run is ok (``benchmarks/results/2026-12-03-h200-triton-bias-row-diag.log``).

  PYTHONPATH=$PWD python3 benchmarks/diag_triton_bias_row.py      # GPU, about a minute
"""
import dataclasses, jax, jax.numpy as jnp
import attnax.kernels as ak
from attnax.kernels.pallas import triton as tk
b, h, s = 4, 16, 4096
key = jax.random.key(0)
q, k, v = (jax.random.normal(x, (b, h, s, 128), jnp.bfloat16) for x in jax.random.split(key, 3))
bias = jax.random.normal(key, (b, 1, 1, s))
base = tk.default_config(128, interpret=False, dtype=jnp.bfloat16)
def run(name, cfg, diff, causal=True):
  mod = lambda bb: ak.compose_score_mods(ak.additive_bias_mod(bb), ak.causal_mod()) if causal else ak.additive_bias_mod(bb)
  f = lambda q, k, v, bb: ak.pallas_flash_attention(q, k, v, score_mod=mod(bb), backend="triton", config=cfg)
  try:
    if diff:
      g = jax.jit(jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3)))(q, k, v, bias)
    else:
      g = jax.jit(jax.grad(lambda q, k, v: f(q, k, v, bias).astype(jnp.float32).sum(), argnums=(0, 1, 2)))(q, k, v)
    jax.block_until_ready(g); print(name, diff, "ok", flush=True)
  except Exception as e:
    print(name, diff, "FAIL", str(e).split("\n")[0][:200], flush=True)
try:
  jax.block_until_ready(ak.pallas_flash_attention(q, k, v, score_mod=ak.additive_bias_mod(bias), backend="triton")); print("fwd ok")
except Exception as e: print("fwd FAIL", str(e)[:200])
for diff in (False, True):
  run("default", base, diff)
  run("dq_stages1", dataclasses.replace(base, dq_num_stages=1), diff)
  run("dkv_stages1", dataclasses.replace(base, dkv_num_stages=1), diff)
  run("clamp", dataclasses.replace(base, mod_loads="clamp"), diff)
run("default-nocausal", base, True, causal=False)
