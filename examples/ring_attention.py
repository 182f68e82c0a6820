"""Ring attention: one causal sequence spread over the devices of a mesh, with documents + ALiBi.

Splits the sequence over every visible device (on a CPU: ``--devices`` emulated host devices),
permutes it into the zig-zag layout that balances causal work, runs ``ring_attention`` forward
and backward (each step on the Pallas flash kernels on a GPU, or with ``--step-kernel pallas``
anywhere; the pure-JAX step otherwise), and checks output and gradients (ALiBi slopes included)
against ``standard_attention`` on one device.

  .venv/bin/python examples/ring_attention.py [--devices 4] [--seq 256] [--step-kernel auto]

Exits 1 if they disagree. Several hosts: see docs/ring.rst.
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, default=4, help="emulated CPU devices (no GPU)")
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--kv-heads", type=int, default=2)
  parser.add_argument("--dim", type=int, default=32)
  parser.add_argument("--step-kernel", default="auto", choices=["auto", "jax", "pallas"])
  args = parser.parse_args()
  # Emulated devices must be asked for before JAX starts (a GPU's devices are used as they are).
  flag = f"--xla_force_host_platform_device_count={args.devices}"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from attnax.kernels import (alibi_mod, causal_mod, compose_score_mods, document_mask_mod,
                              from_zigzag, ring_attention, standard_attention, to_zigzag)

  mesh = Mesh(np.array(jax.devices()), ("sp",))
  n = mesh.shape["sp"]
  b, s, hq, hkv, d = 1, args.seq, args.heads, args.kv_heads, args.dim
  if s % (2 * n):
    print(f"--seq must be divisible by 2 * devices = {2 * n}")
    return 1
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
             for shape in ((b, hq, s, d), (b, hkv, s, d), (b, hkv, s, d)))
  # Three documents of the whole sequence, by absolute position: the mods see natural-order
  # positions whatever the layout, so the same mod serves the ring and the reference.
  docs = jnp.asarray(np.sort(rng.integers(0, 3, (b, s)), axis=1), jnp.int32)
  ct = jnp.asarray(rng.standard_normal((b, hq, s, d)), jnp.float32)
  seq = NamedSharding(mesh, P(None, None, "sp", None))

  def ring_loss(q, k, v, alibi):
    mod = compose_score_mods(alibi, document_mask_mod(docs))
    qz, kz, vz = (jax.lax.with_sharding_constraint(to_zigzag(x, n), seq) for x in (q, k, v))
    out = ring_attention(qz, kz, vz, mesh=mesh, axis_name="sp", causal=True, zigzag=True,
                         score_mod=mod, step_kernel=args.step_kernel)
    out = from_zigzag(out, n)
    return jnp.sum(out * ct), out

  def reference_loss(q, k, v, alibi):
    mod = compose_score_mods(causal_mod(), alibi, document_mask_mod(docs))
    out = standard_attention(q, k, v, score_mod=mod)
    return jnp.sum(out * ct), out

  alibi = alibi_mod(num_heads=hq)
  grad = lambda f: jax.jit(jax.grad(f, argnums=(0, 1, 2, 3), has_aux=True))
  (g_ring, out_ring) = grad(ring_loss)(q, k, v, alibi)
  (g_ref, out_ref) = grad(reference_loss)(q, k, v, alibi)
  rel = lambda a, r: float(jnp.linalg.norm(a - r) / jnp.maximum(jnp.linalg.norm(r), 1e-30))
  errors = {"out": rel(out_ring, out_ref)}
  for name, a, r in zip(("dq", "dk", "dv", "dslopes"), jax.tree.leaves(g_ring),
                        jax.tree.leaves(g_ref)):
    errors[name] = rel(a, r)
  kind = jax.devices()[0].device_kind
  print(f"ring over {n} x {kind}, S={s} (zig-zag chunks of {s // (2 * n)}), step_kernel="
        f"{args.step_kernel}")
  for name, err in errors.items():
    print(f"  {name:8s} rel. error vs standard_attention: {err:.2e}")
  # f32 throughout; a GPU's f32 matmuls run TF32 (about 1e-3 relative).
  limit = 5e-3 if jax.default_backend() == "gpu" else 1e-4
  ok = all(err < limit for err in errors.values())
  print("ring attention agrees with standard_attention" if ok else "DISAGREE")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
