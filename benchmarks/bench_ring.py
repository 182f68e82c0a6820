#!/usr/bin/env python3
"""ring_attention's Pallas steps against pallas_flash_attention on the same inputs.

  python benchmarks/bench_ring.py                        # every local GPU as the ring; S=32k, 128k
  python benchmarks/bench_ring.py --seqs 131072 --modes fwd,fwd+bwd --out /tmp/ring

Causal, bf16, B=1, H=16, D=128 (issue 14's shape). Rows: ``pallas`` (pallas_flash_attention with
causal_mod on one device, the whole sequence), ``ring-pallas`` and ``ring-zigzag`` (ring_attention
over a mesh of every visible device, step_kernel="pallas", natural and zig-zag layouts), and with
``--jax-step`` the pure-JAX step. Columns: median ms (bench_attention.time_fn), tokens/s, TFLOP/s
of the causal work per device, the ratio to ``pallas``, and peak device memory
(``memory_stats()['peak_bytes_in_use']`` of device 0, after each row; it only grows, so a row's
figure is an upper bound). On one GPU the ring's target is within 5% of ``pallas``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention as ba  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from attnax.kernels import causal_mod, pallas_flash_attention, ring_attention  # noqa: E402


def peak_gb() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use", 0) / 2**30


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--seqs", default="32768,131072")
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--modes", default="fwd,fwd+bwd")
  ap.add_argument("--budget-s", type=float, default=0.3)
  ap.add_argument("--jax-step", action="store_true")
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  devices = jax.devices()
  n = len(devices)
  mesh = Mesh(np.array(devices), ("sp",))
  seq_sharding = NamedSharding(mesh, P(None, None, "sp", None))
  rows = []
  print(f"devices: {n} x {devices[0].device_kind}; jax {jax.__version__}", flush=True)
  for s in map(int, args.seqs.split(",")):
    key = jax.random.key(s)
    q, k, v = (jax.random.normal(x, (1, args.heads, s, 128), jnp.bfloat16)
               for x in jax.random.split(key, 3))
    flops = 4 * s * s * 128 * args.heads / 2          # causal: half the square, fwd
    kernels = {"pallas": lambda q, k, v: pallas_flash_attention(q, k, v, score_mod=causal_mod())}
    for name, zz in (("ring-pallas", False), ("ring-zigzag", True)):
      kernels[name] = functools.partial(ring_attention, mesh=mesh, axis_name="sp", causal=True,
                                        zigzag=zz, step_kernel="pallas")
    if args.jax_step:
      kernels["ring-jax"] = functools.partial(ring_attention, mesh=mesh, axis_name="sp",
                                              causal=True, step_kernel="jax")
    ring_args = [jax.device_put(x, seq_sharding) for x in (q, k, v)]
    base = {}
    for mode in args.modes.split(","):
      for name, fn in kernels.items():
        inputs = (q, k, v) if name == "pallas" else ring_args
        if mode == "fwd":
          step = jax.jit(fn)
        else:
          def step(q, k, v, fn=fn):
            out, pull = jax.vjp(fn, q, k, v)
            return pull(jnp.ones_like(out))
          step = jax.jit(step)
        try:
          timing, _ = ba.time_fn(step, [inputs], budget_s=args.budget_s)
        except Exception as e:  # noqa: BLE001 (a row that fails is reported, the sweep goes on)
          print(f"S={s} {mode} {name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
          continue
        ms = timing.median_s * 1e3
        work = flops * (1 if mode == "fwd" else 3.5)
        base.setdefault(mode, ms if name == "pallas" else None)
        ratio = base[mode] / ms if base.get(mode) else float("nan")
        row = dict(seq=s, mode=mode, kernel=name, devices=n, ms=ms,
                   tokens_per_s=s / timing.median_s, tflops_per_device=work / timing.median_s / n
                   / 1e12, x_pallas=ratio, peak_gb=peak_gb(), compile_s=timing.compile_s)
        rows.append(row)
        print(f"S={s} {mode:8s} {name:12s} {ms:9.3f} ms  {row['tokens_per_s']:12.0f} tok/s  "
              f"{row['tflops_per_device']:6.1f} TFLOP/s/dev  x{ratio:.3f} pallas  "
              f"peak {row['peak_gb']:.1f} GiB  (compile {timing.compile_s:.1f} s)", flush=True)
  if args.out:
    with open(args.out + ".json", "w") as f:
      json.dump(dict(device=devices[0].device_kind, devices=n, jax=jax.__version__, rows=rows), f,
                indent=1)


if __name__ == "__main__":
  main()
