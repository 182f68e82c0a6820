"""Long-context AETHER demo: certified block-sparse attention with its statistics (runs on a CPU).

AETHER bounds the scores of every key block by its centroid and radius, skips the (query tile, key
block) tiles whose softmax mass is certified below ``epsilon``, and hands the resulting BlockMask to
a dense block-sparse kernel (forward and backward run the same schedule).

  python examples/long_context_aether.py            # S=2048, a few seconds on a CPU
  python examples/long_context_aether.py --seq 8192
"""

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from attnax.kernels import (  # noqa: E402
    AetherAttention, aether_attention, causal_mod, flash_attention,
)
from attnax.kernels.aether import clustered_qkv  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv-heads", type=int, default=2)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--epsilon", type=float, default=1e-3)
  args = p.parse_args(argv)
  s = args.seq
  blocks = dict(block_q=128, block_k=128)

  for name, data in [
      ("clustered keys", clustered_qkv(jax.random.key(0), q_heads=args.heads,
                                       kv_heads=args.kv_heads, q_len=s, kv_len=s,
                                       head_dim=args.head_dim, num_clusters=16)),
      ("iid Gaussian", tuple(jax.random.normal(kk, shape) for kk, shape in zip(
          jax.random.split(jax.random.key(1), 3),
          [(1, args.heads, s, args.head_dim)] + [(1, args.kv_heads, s, args.head_dim)] * 2))),
  ]:
    q, k, v = data
    for mod_name, mod in [("bidirectional", None), ("causal", causal_mod())]:
      aether = jax.jit(functools.partial(aether_attention, score_mod=mod, epsilon=args.epsilon,
                                         return_lse=True, return_stats=True, **blocks))
      dense = jax.jit(functools.partial(flash_attention, score_mod=mod, return_lse=True, **blocks))
      out, lse, stats = jax.block_until_ready(aether(q, k, v))
      ref, ref_lse = jax.block_until_ready(dense(q, k, v))
      t0 = time.perf_counter()
      jax.block_until_ready(aether(q, k, v))
      t1 = time.perf_counter()
      jax.block_until_ready(dense(q, k, v))
      t2 = time.perf_counter()
      err = float(jnp.max(jnp.abs(out - ref)))
      bound = 2 * args.epsilon * float(jnp.max(jnp.abs(v)))
      print(f"{name:15s} {mod_name:13s} S={s}: skipped {float(stats.skipped_fraction.mean()):6.1%} "
            f"of tiles, max certified mass {float(stats.mass_bound.max()):.2e} "
            f"(epsilon {args.epsilon:g}), |out - dense| {err:.2e} <= {bound:.2e}, "
            f"lse low by {float(jnp.max(ref_lse - lse)):.2e}; "
            f"aether {1e3 * (t1 - t0):.1f} ms vs dense flash {1e3 * (t2 - t1):.1f} ms")

  # AetherAttention holds the settings and is itself an AttentionFn (e.g. for MultiHeadAttention).
  attn = AetherAttention(epsilon=args.epsilon, **blocks)
  q, k, v = clustered_qkv(jax.random.key(2), q_heads=args.heads, kv_heads=args.kv_heads,
                          q_len=s, kv_len=s, head_dim=args.head_dim)
  grads = jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v, score_mod=causal_mod()) ** 2),
                   argnums=(0, 1, 2))(q, k, v)
  print("gradients of the pruned forward:", [tuple(g.shape) for g in grads],
        "finite:", all(bool(np.all(np.isfinite(np.asarray(g)))) for g in grads))


if __name__ == "__main__":
  main()
