"""One fwd+bwd step of one kernel, for Nsight Compute (``ncu``) to profile kernel by kernel.

  ncu --clock-control none --set full -o prof python3 benchmarks/profile_ncu.py attnax dense

Inputs come from the host (no random-number kernels in the profile) and the step runs once: ncu
replays each kernel itself, with cold caches. ``KIND``: ``attnax`` (``backend="mosaic"``, the
default config), ``attnax-fused`` (``deterministic=False``) or ``cudnn``; ``MASK``: ``dense`` or
``causal`` or ``alibi`` (ALiBi + causal). B=4, H=16, S=4096, D=128 bf16 unless ``--seq``, ``--batch``, ``--head-dim`` say
otherwise; ``--overlap`` and ``--shared-probs`` set those MosaicConfig knobs. ``--time N`` times
N steps with wall-clock instead (outside ncu).
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def step_fn(kind: str, mask: str):
  causal = mask != "dense"
  if kind == "cudnn":
    if mask == "alibi":
      raise SystemExit("cudnn: no ALiBi here (profile its causal step instead)")
    attn = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="cudnn")
    layout = "bshd"
  else:
    import dataclasses

    import attnax.kernels as K
    from attnax.kernels.pallas import mosaic_gpu as mg
    cfg = mg.default_config(ARGS.head_dim, masked=causal)
    cfg = dataclasses.replace(cfg, deterministic=kind != "attnax-fused", overlap=ARGS.overlap,
                              bwd_shared_probs=ARGS.shared_probs)
    mod = {"dense": None, "causal": K.causal_mod(),
           "alibi": K.compose_score_mods(K.alibi_mod(num_heads=ARGS.heads), K.causal_mod())}[mask]
    attn = lambda q, k, v: K.pallas_flash_attention(q, k, v, score_mod=mod, backend="mosaic",
                                                    config=cfg)
    layout = "bhsd"

  def loss(q, k, v, do):
    return jnp.sum(attn(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2))), layout


def main():
  p = argparse.ArgumentParser()
  p.add_argument("kind", choices=("attnax", "attnax-fused", "cudnn"))
  p.add_argument("mask", choices=("dense", "causal", "alibi"))
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--time", type=int, default=0)
  p.add_argument("--overlap", action="store_true", help="MosaicConfig(overlap=True)")
  p.add_argument("--shared-probs", action="store_true",
                 help="MosaicConfig(bwd_shared_probs=True) (head dims above 128)")
  global ARGS
  ARGS = p.parse_args()
  fn, layout = step_fn(ARGS.kind, ARGS.mask)
  b, h, s, d = ARGS.batch, ARGS.heads, ARGS.seq, ARGS.head_dim
  shape = (b, h, s, d) if layout == "bhsd" else (b, s, h, d)
  rng = np.random.default_rng(0)
  q, k, v, do = (jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16)
                 for _ in range(4))
  compiled = fn.lower(q, k, v, do).compile()
  if not ARGS.time:
    jax.block_until_ready(compiled(q, k, v, do))
    return
  jax.block_until_ready(compiled(q, k, v, do))
  times = []
  for _ in range(ARGS.time):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v, do))
    times.append(time.perf_counter() - t0)
  print(f"{ARGS.kind} {ARGS.mask} {sys.argv[3:]}: best {min(times) * 1e3:.3f} ms, median "
        f"{sorted(times)[len(times) // 2] * 1e3:.3f} ms")


if __name__ == "__main__":
  main()
