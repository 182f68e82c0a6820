"""Gated attention (flash-sparse-attention's alpha/delta gates) on attnax's kernels.

Builds a causal gated attention layer's inputs, runs it with the block-sparse flash kernel and a
gate threshold, checks it against the reference kernel, shows how many tiles the gate threshold
made EMPTY (never computed), takes gradients of the gates, and calls the same thing through the
flash-sparse-attention names of ``attnax.flash_sparse``. Runs on a CPU in a few seconds.

  .venv/bin/python examples/gated_attention.py [--seq 192] [--heads 4] [--kv-heads 2]

Exits 1 if the kernels disagree.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from attnax import flash_sparse
from attnax.kernels import (causal_mod, create_block_mask, flash_attention, gated_mod,
                            score_mods, standard_attention)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq", type=int, default=192)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--kv-heads", type=int, default=2)
  parser.add_argument("--dim", type=int, default=32)
  parser.add_argument("--block", type=int, default=32)
  parser.add_argument("--gate-threshold", type=float, default=1e-3)
  args = parser.parse_args()
  b, s, hq, hkv, d = 1, args.seq, args.heads, args.kv_heads, args.dim

  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
             for shape in ((b, hq, s, d), (b, hkv, s, d), (b, hkv, s, d)))
  # Query gates > 0; the key gates close a few spans of the sequence (e.g. padding or
  # boilerplate a model learned to ignore).
  alpha = jnp.asarray(1.0 + rng.random((b, hq, s)), jnp.float32)
  closed = (np.arange(s) // args.block) % 3 == 1
  delta = jnp.asarray(rng.standard_normal((b, hkv, s)) - 100.0 * closed, jnp.float32)
  scale = d ** -0.5
  # flash-sparse-attention's convention: the gate is scaled with the scores (gate_scale = scale).
  options = dict(gate_scale=scale, gate_threshold=args.gate_threshold, is_logsigmoid_gate=False,
                 mask_mod=causal_mod())

  def attend(kernel, q, k, v, alpha, delta, **kw):
    return kernel(q, k, v, score_mod=gated_mod(alpha, delta, **options), scale=scale, **kw)

  fast = jax.jit(lambda *a: attend(flash_attention, *a, block_q=args.block, block_k=args.block))
  ref = jax.jit(lambda *a: attend(standard_attention, *a))
  out, want = fast(q, k, v, alpha, delta), ref(q, k, v, alpha, delta)
  err = float(jnp.linalg.norm(out - want) / jnp.linalg.norm(want))
  print(f"flash_attention vs standard_attention (gated, causal, gate_threshold="
        f"{args.gate_threshold}): relative error {err:.2e}")

  # The tiles the BlockMask of the mod's mask part (causal AND gate threshold) leaves.
  def tiles(alpha, delta):
    _, mask = score_mods.split_score_mod(gated_mod(alpha, delta, **options))
    return [create_block_mask(m, q_len=s, kv_len=s, block_q=args.block, block_k=args.block,
                              batch=b, heads=hq).tiles for m in (mask, causal_mod().mask_mod)]

  gate_tiles, causal_tiles = jax.jit(tiles)(alpha, delta)
  kept, kept_causal = float(jnp.mean(gate_tiles != 0)), float(jnp.mean(causal_tiles != 0))
  print(f"tiles computed: {kept:.0%} of all ({kept_causal:.0%} with the causal mask alone)")

  # Gradients of the gates (and of q, k, v) through the fast kernel.
  loss = lambda *a: jnp.sum(attend(flash_attention, *a, block_q=args.block,
                                   block_k=args.block) ** 2)
  grads = jax.jit(jax.grad(loss, argnums=(3, 4)))(q, k, v, alpha, delta)
  print(f"|d loss / d alpha| = {float(jnp.linalg.norm(grads[0])):.3e}, "
        f"|d loss / d delta| = {float(jnp.linalg.norm(grads[1])):.3e}")

  # The same layer with flash-sparse-attention's names and (batch, seq, heads, dim) layout.
  t = lambda x: jnp.swapaxes(x, 1, 2)
  compat = flash_sparse.flash_gated_attn_func(
      t(q), t(k), t(v), alpha, delta, is_causal=True, gate_threshold=args.gate_threshold,
      is_logsigmoid_gate=False, is_adapt_gate=False, implementation="flash")
  compat_err = float(jnp.linalg.norm(t(compat) - want) / jnp.linalg.norm(want))
  print(f"attnax.flash_sparse.flash_gated_attn_func: relative error {compat_err:.2e}")

  ok = err < 1e-5 and compat_err < 1e-5 and kept < kept_causal
  print("gated attention: kernels agree" if ok else "gated attention: DISAGREE")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
