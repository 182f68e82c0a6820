"""Where AETHER's time goes on a GPU (not a test): planner alone, the Pallas kernel dense, the Pallas
kernel given an all-kept BlockMask, and AETHER end to end; bf16, D=128.

  python tests/kernels/aether/gpu_profile.py
"""

import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from attnax.kernels import create_block_mask  # noqa: E402
from attnax.kernels.pallas import pallas_flash_attention  # noqa: E402
from attnax.kernels.aether import aether_attention, plan_aether  # noqa: E402
from benchmarks.bench_attention import clustered_qkv  # noqa: E402


def timeit(f, *args, n=10):
  jax.block_until_ready(f(*args))
  ts = []
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t)
  ts.sort()
  return 1e3 * ts[len(ts) // 2]


def main():
  for (b, h, s, keys) in [(4, 16, 4096, "iid"), (1, 16, 32768, "iid"), (1, 16, 32768, "clustered"),
                          (1, 8, 131072, "clustered")]:
    key = jax.random.key(0)
    if keys == "clustered":
      q, k, v = clustered_qkv(key, b, h, s, 128)
    else:
      q, k, v = (jax.random.normal(x, (b, h, s, 128)) for x in jax.random.split(key, 3))
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    plan = jax.jit(lambda q, k: plan_aether(q, k, scale=128 ** -0.5, score_fn=None, mask_fn=None,
                                            block_q=128, block_k=128).block_mask.tiles)
    full = create_block_mask(None, q_len=s, kv_len=s, block_q=128, block_k=128)
    dense = jax.jit(functools.partial(pallas_flash_attention, block_q=128, block_k=128))
    listed = jax.jit(functools.partial(pallas_flash_attention, block_mask=full))
    aeth = jax.jit(functools.partial(aether_attention, epsilon=1e-3))
    row = {"plan": timeit(plan, q, k), "pallas dense": timeit(dense, q, k, v),
           "pallas all-kept BlockMask": timeit(listed, q, k, v), "aether": timeit(aeth, q, k, v)}
    print(f"B={b} H={h} S={s} {keys}: " + ", ".join(f"{n} {t:.3f} ms" for n, t in row.items()),
          flush=True)


if __name__ == "__main__":
  main()
