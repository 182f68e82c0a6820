"""AETHER vs the dense attnax Pallas kernel vs cuDNN, in one process (not a test); bf16, D=128.

Per case: the planner's screen and full plan alone, the Pallas kernel dense, cuDNN, AETHER end to
end (forward; forward+backward where marked), the skipped fraction, the certified bound and the
measured error against cuDNN. Inputs: ``benchmarks.bench_attention.clustered_qkv`` (clustered) or
N(0, 1) (iid).

  python tests/kernels/aether/gpu_profile.py [--cases 4k-iid,32k-clustered,...]
"""

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from attnax.kernels.pallas import pallas_flash_attention  # noqa: E402
from attnax.kernels.aether import aether_attention, certify  # noqa: E402
from benchmarks.bench_attention import clustered_qkv  # noqa: E402

CASES = {"4k-iid": (4, 16, 4096, "iid", True), "4k-clustered": (4, 16, 4096, "clustered", True),
         "32k-iid": (1, 16, 32768, "iid", True), "32k-clustered": (1, 16, 32768, "clustered", True),
         "128k-iid": (1, 8, 131072, "iid", False),
         "128k-clustered": (1, 8, 131072, "clustered", False)}


def timeit(f, *args, n=10):
  jax.block_until_ready(f(*args))
  ts = []
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t)
  ts.sort()
  return 1e3 * ts[len(ts) // 2]


def fwd_bwd(f):
  def g(q, k, v, ct):
    out, pull = jax.vjp(f, q, k, v)
    return pull(ct)
  return jax.jit(g)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--cases", default=",".join(CASES))
  args = p.parse_args()
  print("| case | plan: screen / full ms | dense Pallas fwd ms | cuDNN fwd ms | AETHER fwd ms | "
        "x dense | x cuDNN | dense Pallas fwd+bwd ms | cuDNN fwd+bwd ms | AETHER fwd+bwd ms | "
        "x dense | x cuDNN | skipped | mass bound max | err vs cuDNN max-abs (2 eps max|v|) |")
  print("|" + "---|" * 16)
  for name in args.cases.split(","):
    b, h, s, keys, bwd = CASES[name]
    key = jax.random.key(0)
    if keys == "clustered":
      q, k, v = clustered_qkv(key, b, h, s, 128)
    else:
      q, k, v = (jax.random.normal(x, (b, h, s, 128)) for x in jax.random.split(key, 3))
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    ct = jax.random.normal(jax.random.key(1), q.shape).astype(jnp.bfloat16)
    n = 10 if s <= 32768 else 4
    kw = dict(scale=128 ** -0.5, score_fn=None, mask_fn=None, block_q=128, block_k=128)
    scr = jax.jit(lambda q, k: certify.screen(certify.prepare(q, k, **kw)))
    full = jax.jit(lambda q, k: certify.decide(certify.prepare(q, k, **kw)).block_mask.tiles)
    dense = functools.partial(pallas_flash_attention, block_q=128, block_k=128)
    cudnn = lambda q, k, v: jnp.swapaxes(jax.nn.dot_product_attention(
        *(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), implementation="cudnn"), 1, 2)
    aeth = functools.partial(aether_attention, epsilon=1e-3)
    t = {"screen": timeit(scr, q, k, n=n), "full": timeit(full, q, k, n=n)}
    for nm, f in (("dense", dense), ("cudnn", cudnn), ("aether", aeth)):
      t[nm] = timeit(jax.jit(f), q, k, v, n=n)
      t[nm + "_b"] = timeit(fwd_bwd(f), q, k, v, ct, n=n) if bwd else float("nan")
    out, st = jax.jit(functools.partial(aeth, return_stats=True))(q, k, v)
    ref = jax.jit(cudnn)(q, k, v)
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
    bound = 2e-3 * float(jnp.max(jnp.abs(v.astype(jnp.float32))))
    r = lambda a, c: t[a] / t[c]
    print(f"| {name} (B={b} H={h}) | {t['screen']:.2f} / {t['full']:.2f} | {t['dense']:.3f} | "
          f"{t['cudnn']:.3f} | {t['aether']:.3f} | {r('dense', 'aether'):.2f} | "
          f"{r('cudnn', 'aether'):.2f} | {t['dense_b']:.3f} | {t['cudnn_b']:.3f} | "
          f"{t['aether_b']:.3f} | {r('dense_b', 'aether_b'):.2f} | "
          f"{r('cudnn_b', 'aether_b'):.2f} | "
          f"{float(np.mean(st.skipped_fraction)):.3f} | {float(jnp.max(st.mass_bound)):.1e} | "
          f"{err:.1e} ({bound:.1e}) |", flush=True)


if __name__ == "__main__":
  main()
