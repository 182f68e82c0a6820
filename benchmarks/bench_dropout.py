"""The cost of in-kernel attention dropout: pallas_flash_attention with and without it, on the GPU.

Times, in one process, forward and forward+backward of: cuDNN (no dropout: JAX exposes none), the
Pallas kernel without dropout (``backend="auto"``, which may be the Mosaic lowering, and
``backend="triton"``), and the Pallas kernel with ``dropout_rate`` (the Triton lowering: Mosaic
has no dropout yet). Median of ``--iters`` timed calls after a warm-up, ``block_until_ready``.
Also checks that the dropped output equals ``standard_attention``'s with the same key (the masks
are the same function of the key and the indices) on a small slice.

  python benchmarks/bench_dropout.py --out $OUT/dropout      # writes dropout.json and dropout.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from attnax.kernels import causal_mod, pallas_flash_attention, standard_attention


def _time(fn, *args, iters: int) -> float:
  jax.block_until_ready(fn(*args))        # compile
  jax.block_until_ready(fn(*args))        # warm
  ts = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def _kernels(rate: float, key):
  t = lambda x: jnp.swapaxes(x, 1, 2)

  def cudnn(q, k, v, causal):
    return t(jax.nn.dot_product_attention(t(q), t(k), t(v), is_causal=causal,
                                          implementation="cudnn"))

  def pallas(backend, dropout):
    def fn(q, k, v, causal):
      kw = dict(dropout_rate=rate, dropout_rng=key) if dropout else {}
      return pallas_flash_attention(q, k, v, score_mod=causal_mod() if causal else None,
                                    backend=backend, **kw)
    return fn

  return {"cudnn": cudnn, "pallas-auto": pallas("auto", False),
          "pallas-triton": pallas("triton", False),
          f"pallas-triton-dropout{rate}": pallas("triton", True)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--seq", type=int, nargs="+", default=[4096, 16384])
  ap.add_argument("--tokens", type=int, default=16384, help="batch * seq")
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--head-dim", type=int, default=128)
  ap.add_argument("--rate", type=float, default=0.1)
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--out", default=None, help="path prefix: writes PATH.json and PATH.md")
  args = ap.parse_args()
  key = jax.random.key(0)
  rows = []

  # Correctness first: the Triton kernel's dropped output is the reference's (same key).
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 4, 512, args.head_dim)), jnp.bfloat16)
             for _ in range(3))
  got = pallas_flash_attention(q, k, v, score_mod=causal_mod(), backend="triton",
                               dropout_rate=args.rate, dropout_rng=key)
  with jax.enable_x64(True):
    up = lambda x: jnp.asarray(np.asarray(x, np.float64))
    want = standard_attention(up(q), up(k), up(v), score_mod=causal_mod(),
                              dropout_rate=args.rate, dropout_rng=key)
  err = float(np.linalg.norm(np.asarray(got, np.float64) - np.asarray(want))
              / np.linalg.norm(np.asarray(want)))
  print(f"check: triton dropout vs float64 standard_attention, same key: rel err {err:.2e}")
  assert err < 1e-2, err

  for s in args.seq:
    b = max(1, args.tokens // s)
    shape = (b, args.heads, s, args.head_dim)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for _ in range(3))
    for causal in (False, True):
      flops = 4 * b * args.heads * s * s * args.head_dim * (0.5 if causal else 1.0)
      for name, fn in _kernels(args.rate, key).items():
        fwd = jax.jit(lambda q, k, v, fn=fn: fn(q, k, v, causal))
        bwd = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(
            fn(q, k, v, causal).astype(jnp.float32)), argnums=(0, 1, 2)))
        row = dict(seq=s, batch=b, causal=causal, kernel=name)
        for mode, f, mult in (("fwd", fwd, 1.0), ("fwd+bwd", bwd, 3.5)):
          try:
            sec = _time(f, q, k, v, iters=args.iters)
            row[mode + "_ms"] = 1e3 * sec
            row[mode + "_tflops"] = flops * mult / sec / 1e12
          except Exception as e:   # noqa: BLE001 - a kernel that cannot run prints n/a
            row[mode + "_ms"] = None
            row[mode + "_error"] = f"{type(e).__name__}: {str(e)[:120]}"
        rows.append(row)
        fmt = lambda m: ("n/a" if row.get(m + "_ms") is None else
                         f"{row[m + '_ms']:8.3f} ms {row[m + '_tflops']:6.1f} TFLOP/s")
        print(f"S={s:6d} causal={causal!s:5} {name:28s} fwd {fmt('fwd')}  "
              f"fwd+bwd {fmt('fwd+bwd')}", flush=True)

  if args.out:
    meta = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                date=time.strftime("%Y-%m-%d"), rate=args.rate, heads=args.heads,
                head_dim=args.head_dim, check_rel_err=err)
    with open(args.out + ".json", "w") as f:
      json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(args.out + ".md", "w") as f:
      f.write(f"# dropout cost ({meta})\n\n| S | causal | kernel | fwd ms | fwd+bwd ms |\n"
              "|---|---|---|---|---|\n")
      for r in rows:
        ms = lambda m: "n/a" if r.get(m + "_ms") is None else f"{r[m + '_ms']:.3f}"
        f.write(f"| {r['seq']} | {r['causal']} | {r['kernel']} | {ms('fwd')} | "
                f"{ms('fwd+bwd')} |\n")


if __name__ == "__main__":
  main()
