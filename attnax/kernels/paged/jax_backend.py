"""The pure-JAX backend of ``paged_attention``: split-K over groups of pages, in plain JAX.

Each split gathers its group of pages into a contiguous block (a copy: this is the readable
path, and the one every device runs; the Pallas backend reads the pages in place) and computes
partial ``(out, lse)`` with the shared packed-GQA tile maths of
:func:`attnax.kernels.ring.attend_packed`. A split that lies past every sequence's length is
skipped. Differentiable by plain autodiff (q, the pages, the scales and the mods' float arrays).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from attnax.kernels import tiles
from attnax.kernels.paged.plan import PagedPlan, gather_pages
from attnax.kernels.ring import Positions, attend_packed

__all__ = ["partials"]


def _dequantised(pages, scales, tables, dtype):
  """Gathered pages ``(B, Hkv, L, D)``; int8 pages times their per-token scales, in ``dtype``."""
  x = gather_pages(pages, tables)
  if scales is None:
    return x
  return x.astype(dtype) * gather_pages(scales, tables).astype(dtype)[..., None]


def partials(plan: PagedPlan, q5, k_pages, v_pages, k_scales, v_scales, block_tables, lengths,
             operands, *, pages_per_split: int):
  """Partial attention of every split of pages: ``(n_splits, B, Hkv, G, Sq, Dv)`` and lses, f32
  (f64 for float64 inputs).

  Query ``i`` of sequence ``b`` sits at absolute position ``lengths[b] - Sq + i`` and sees the keys
  at positions up to its own and below ``lengths[b]``.
  """
  b, hkv, g, sq, _ = q5.shape
  ps, dv = plan.page_size, plan.v_dim
  n_pages = plan.pages_per_sequence
  n_splits = -(-n_pages // pages_per_split)
  pad = n_splits * pages_per_split - n_pages
  # Padding pages sit past every length (lengths <= n_pages * page_size): they are masked.
  bt = jnp.pad(block_tables, ((0, 0), (0, pad)))
  bt = jnp.moveaxis(bt.reshape(b, n_splits, pages_per_split), 1, 0)
  split_len = pages_per_split * ps
  q_pos = lengths[:, None] - sq + jnp.arange(sq, dtype=jnp.int32)
  kv_len = lengths.reshape(-1, 1, 1, 1, 1)
  longest = jnp.max(lengths)
  score_fn, mask_fn = plan.mod_fns(operands)
  acc = tiles.acc_dtype(q5.dtype)

  def one(xs):
    tables, s = xs
    start = s * split_len
    pos = Positions.make(b, hkv, g, q_pos, start + jnp.arange(split_len, dtype=jnp.int32),
                         kv_len=kv_len)

    def compute():
      # Slots at or past a sequence's length hold garbage (possibly NaN, inf): zero them so that
      # they contribute exactly 0 (0 * NaN in p @ V would be NaN) and get zero gradients.
      valid = (start + jnp.arange(split_len, dtype=jnp.int32))[None, None, :, None] < kv_len[:, 0]
      k = jnp.where(valid, _dequantised(k_pages, k_scales, tables, acc), 0)
      v = jnp.where(valid, _dequantised(v_pages, v_scales, tables, acc), 0)
      return attend_packed(q5, k, v, pos, scale=plan.scale, score_fn=score_fn, mask_fn=mask_fn)

    empty = lambda: (jnp.zeros(q5.shape[:-1] + (dv,), acc),
                     jnp.full(q5.shape[:-1], -jnp.inf, acc))
    return lax.cond(start < longest, compute, empty)

  return lax.map(one, (bt, jnp.arange(n_splits, dtype=jnp.int32)))
