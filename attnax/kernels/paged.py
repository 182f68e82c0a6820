"""paged_attention: decoding (and short prefill) over a paged KV cache, split-K with an LSE merge.

The cache layout is that of ``jax.experimental.pallas.ops.gpu.paged_attention``: ``k_pages`` and
``v_pages`` are ``(Hkv, num_pages, page_size, D)`` pools shared by every sequence; row ``b`` of
``block_tables`` lists the pages of sequence ``b`` in order, and ``lengths[b]`` says how many of its
tokens are valid. Logical position ``p`` of sequence ``b`` lives at
``k_pages[:, block_tables[b, p // page_size], p % page_size]``.

The kernel splits each sequence's pages into groups of ``pages_per_split`` (split-K), computes a
partial ``(out, lse)`` per group with the query heads of each kv head packed together (K/V are read
once per kv head, never repeated), and merges the partials with
:func:`~attnax.kernels.merge_attentions`. A group that lies past every sequence's length is skipped.

The semantics (positions, masks, soft-cap, mods) live in :func:`_split_partials` and the shared tile
maths of :func:`attnax.kernels.ring.attend_packed`; a Pallas backend produces the same partials
and plugs in beside ``"jax"`` in :func:`paged_attention`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnax.kernels import _checks
from attnax.kernels import score_mods as sm
from attnax.kernels.gqa import pack_gqa, unpack_gqa
from attnax.kernels.merge import merge_attentions
from attnax.kernels.ring import Positions, attend_packed

__all__ = ["paged_attention", "gather_pages", "BACKENDS"]

BACKENDS = ("jax",)


def gather_pages(pages: jax.Array, block_tables: jax.Array) -> jax.Array:
  """The contiguous cache of every sequence: ``(Hkv, P, ps, D)`` pages -> ``(B, Hkv, n * ps, D)``.

  ``block_tables`` ``(B, n)`` names the pages in order. Handy for tests and for prefill kernels
  that want contiguous K/V.
  """
  g = pages[:, block_tables]                       # (Hkv, B, n, ps, D)
  hkv, b, n, ps, d = g.shape
  return jnp.swapaxes(g, 0, 1).reshape(b, hkv, n * ps, d)


def _check_paged(q, k_pages, v_pages, block_tables, lengths):
  name = "paged_attention"
  for arg, x in (("k_pages", k_pages), ("v_pages", v_pages)):
    if not hasattr(x, "ndim") or x.ndim != 4:
      raise ValueError(f"{name}: {arg} must have rank 4 (num_kv_heads, num_pages, page_size, "
                       f"head_dim); got shape {getattr(x, 'shape', None)}")
  if k_pages.shape[:3] != v_pages.shape[:3]:
    raise ValueError(f"{name}: k_pages {k_pages.shape} and v_pages {v_pages.shape} must agree on "
                     "(num_kv_heads, num_pages, page_size)")
  bt, ln = jnp.asarray(block_tables), jnp.asarray(lengths)
  if bt.ndim != 2 or not jnp.issubdtype(bt.dtype, jnp.integer):
    raise ValueError(f"{name}: block_tables must be integer (batch, pages_per_sequence); got "
                     f"{bt.dtype}{bt.shape}")
  if ln.ndim != 1 or not jnp.issubdtype(ln.dtype, jnp.integer):
    raise ValueError(f"{name}: lengths must be integer (batch,); got {ln.dtype}{ln.shape}")
  hkv, _, ps, _ = k_pages.shape
  b = q.shape[0] if getattr(q, "ndim", 0) == 4 else None
  if b is not None and (bt.shape[0] != b or ln.shape[0] != b):
    raise ValueError(f"{name}: batch sizes differ: q {q.shape}, block_tables {bt.shape}, "
                     f"lengths {ln.shape}")
  # The logical (contiguous) view lets the shared validation check ranks, heads, dims and dtypes.
  view = lambda x: jax.ShapeDtypeStruct((bt.shape[0], x.shape[0], bt.shape[1] * ps, x.shape[3]),
                                        x.dtype)
  _checks.check_qkv(q, view(k_pages), view(v_pages), kernel=name)
  _check_values(bt, ln, sq=q.shape[2], num_pages=k_pages.shape[1], page_size=ps)
  return bt.astype(jnp.int32), ln.astype(jnp.int32)


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _bad_entries(xp, bt, ln, *, sq, pages_per_sequence, num_pages, page_size):
  """``(bad lengths (B,), bad used pages (B, n))`` under the rules of :func:`paged_attention`.

  ``xp`` is numpy (concrete values, for the ValueError) or jax.numpy (the run-time guard). Either
  array may be None (not concrete): its result is then None; with ``ln`` None every page counts
  as used.
  """
  capacity = pages_per_sequence * page_size
  bad_len = None if ln is None else (ln < 0) | (ln > capacity) | ((ln > 0) & (ln < sq))
  if bt is None:
    return bad_len, None
  used = (xp.ones(bt.shape, bool) if ln is None else
          xp.arange(pages_per_sequence)[None, :] * page_size < ln[:, None])
  return bad_len, used & ((bt < 0) | (bt >= num_pages))


def _check_values(bt, ln, *, sq, num_pages, page_size):
  """ValueErrors for bad lengths / page indices, where their values are concrete (not traced)."""
  name = "paged_attention"
  capacity = bt.shape[1] * page_size
  lv = np.asarray(ln).astype(np.int64) if _is_concrete(ln) else None
  tv = np.asarray(bt).astype(np.int64) if _is_concrete(bt) else None
  bad_len, bad_page = _bad_entries(np, tv, lv, sq=sq, pages_per_sequence=bt.shape[1],
                                   num_pages=num_pages, page_size=page_size)
  if bad_len is not None and bad_len.any():
    raise ValueError(
        f"{name}: lengths must be 0 (an empty sequence) or in [Sq, capacity] = [{sq}, "
        f"{capacity}] (the Sq new queries must be in the cache; capacity = "
        f"pages_per_sequence * page_size = {bt.shape[1]} * {page_size}); got lengths "
        f"{lv.tolist()} (bad rows {np.flatnonzero(bad_len).tolist()}) for q with Sq={sq}, "
        f"block_tables {tuple(bt.shape)}")
  if bad_page is not None and bad_page.any():
    rows, cols = np.nonzero(bad_page)
    raise ValueError(
        f"{name}: block_tables {tuple(bt.shape)} holds page indices outside [0, num_pages) = "
        f"[0, {num_pages}): e.g. block_tables[{rows[0]}, {cols[0]}] = {tv[rows[0], cols[0]]} "
        f"({bad_page.sum()} bad entries); k_pages/v_pages have {num_pages} pages")


def _split_partials(q5, k_pages, v_pages, block_tables, lengths, *, pages_per_split, scale,
                    score_fn, mask_fn):
  """Partial attention of every split of pages: f32 ``(n_splits, B, Hkv, G, Sq, Dv)`` and lses.

  Query ``i`` of sequence ``b`` sits at absolute position ``lengths[b] - Sq + i`` and sees the keys
  at positions up to its own and below ``lengths[b]`` (``mask_fn`` already holds the causal part).
  """
  b, hkv, g, sq, _ = q5.shape
  ps = k_pages.shape[2]
  dv = v_pages.shape[-1]
  n_pages = block_tables.shape[1]
  n_splits = -(-n_pages // pages_per_split)
  pad = n_splits * pages_per_split - n_pages
  # Padding pages sit past every length (lengths <= n_pages * page_size): they are masked.
  bt = jnp.pad(block_tables, ((0, 0), (0, pad)))
  bt = jnp.moveaxis(bt.reshape(b, n_splits, pages_per_split), 1, 0)
  split_len = pages_per_split * ps
  q_pos = lengths[:, None] - sq + jnp.arange(sq, dtype=jnp.int32)
  kv_len = lengths.reshape(-1, 1, 1, 1, 1)
  longest = jnp.max(lengths)

  def one(xs):
    tables, s = xs
    start = s * split_len
    pos = Positions.make(b, hkv, g, q_pos, start + jnp.arange(split_len, dtype=jnp.int32),
                         kv_len=kv_len)

    def compute():
      # Slots at or past a sequence's length hold garbage (possibly NaN, inf): zero them so that
      # they contribute exactly 0 (0 * NaN in p @ V would be NaN) and get zero gradients.
      valid = (start + jnp.arange(split_len, dtype=jnp.int32))[None, None, :, None] < kv_len[:, 0]
      k = jnp.where(valid, gather_pages(k_pages, tables), 0)
      v = jnp.where(valid, gather_pages(v_pages, tables), 0)
      return attend_packed(q5, k, v, pos, scale=scale, score_fn=score_fn, mask_fn=mask_fn)

    empty = lambda: (jnp.zeros(q5.shape[:-1] + (dv,), jnp.float32),
                     jnp.full(q5.shape[:-1], -jnp.inf, jnp.float32))
    return lax.cond(start < longest, compute, empty)

  return lax.map(one, (bt, jnp.arange(n_splits, dtype=jnp.int32)))


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
                    lengths: jax.Array, *, score_mod: Any = None, mask_mod: Any = None,
                    scale: float | None = None, softcap: float | None = None,
                    return_lse: bool = False, pages_per_split: int | None = None,
                    backend: str = "jax") -> Any:
  """Attention of a few new queries per sequence over a paged KV cache.

  For decoding ``Sq = 1``; for ``Sq > 1`` (short prefill, speculative verification) the queries are
  the *last* ``Sq`` tokens of each sequence: query ``i`` of row ``b`` sits at absolute position
  ``lengths[b] - Sq + i`` and attends causally to keys at positions up to its own (and
  ``< lengths[b]``). The new tokens' K/V must already be written to the cache.

  Args:
    q: ``(B, Hq, Sq, D)``, ``Hq % Hkv == 0`` (the ``Hq / Hkv`` query heads of a kv head are packed).
    k_pages: ``(Hkv, num_pages, page_size, D)`` key pages shared by all sequences.
    v_pages: ``(Hkv, num_pages, page_size, Dv)``.
    block_tables: int ``(B, pages_per_sequence)``: the pages of each sequence, in order, each in
      ``[0, num_pages)``; entries past the pages that hold a sequence's ``lengths[b]`` tokens are
      ignored (any value).
    lengths: int ``(B,)``: valid tokens per sequence, ``0`` (an empty or inactive row: output 0,
      lse ``-inf``) or ``Sq <= lengths <= capacity = pages_per_sequence * page_size``. Cache slots
      at or past ``lengths[b]`` may hold anything (even NaN): they contribute exactly 0.
    score_mod, mask_mod: mods evaluated on absolute positions (``q_idx`` as above, ``kv_idx`` the
      key's position in its sequence; ``h`` the query head). The arrays they carry are checked
      against ``batch=B``, ``heads=Hq`` and ``q_len = kv_len = capacity`` (positions run up to
      the capacity), e.g. document ids need one entry per cache position.
    scale: default ``D ** -0.5``.
    softcap: shorthand for ``compose_score_mods(softcap_mod(softcap), score_mod)``: scores become
      ``softcap * tanh(scale * q.k / softcap)`` (Gemma 2) after scaling, before the score mod.
    return_lse: also return the f32 lse ``(B, Hq, Sq)``.
    pages_per_split: pages per split-K group; default ``ceil(pages_per_sequence / 8)``.
    backend: ``"jax"`` (pure JAX; runs everywhere). A Pallas backend will be added beside it.

  Returns:
    ``out`` ``(B, Hq, Sq, Dv)`` in q's dtype, or ``(out, lse)``.

  Raises:
    ValueError: bad shapes or dtypes; mod arrays that do not fit; and, where ``lengths`` /
      ``block_tables`` are concrete (not traced), lengths outside the rule above or page indices
      (of the pages a sequence uses) outside ``[0, num_pages)``.

  Under ``jit`` those values cannot be checked. Then a row ``b`` whose length breaks the rule, or
  whose used pages lie outside ``[0, num_pages)``, gets output NaN and lse NaN (the indices are
  clamped into range for the computation, which is then discarded): never a plausible-looking
  wrong answer. The other rows are unaffected.
  """
  bt, ln = _check_paged(q, k_pages, v_pages, block_tables, lengths)
  if backend not in BACKENDS:
    raise ValueError(f"paged_attention: backend {backend!r} is not available; supported: "
                     f"{', '.join(BACKENDS)}")
  n_pages = bt.shape[1]
  if pages_per_split is None:
    pages_per_split = max(1, -(-n_pages // 8))
  _checks.check_block("pages_per_split", pages_per_split)
  pages_per_split = min(pages_per_split, n_pages)
  if softcap is not None:
    score_mod = sm.compose_score_mods(sm.softcap_mod(softcap), score_mod)
  scale = _checks.default_scale(scale, q.shape[-1])
  hkv, num_pages, ps, _ = k_pages.shape
  capacity = n_pages * ps
  # Query and key positions are absolute, up to the capacity: the mods' arrays must cover it.
  score_fn, mask_fn = sm.resolve_mods(score_mod, mask_mod, batch=q.shape[0], heads=q.shape[1],
                                      q_len=capacity, kv_len=capacity)
  mask_fn = sm.and_masks(sm.CausalMask(0), mask_fn)   # keys at or before the query's position

  # Run-time guard (the values may be traced): rows with bad lengths / used pages become NaN.
  sq = q.shape[2]
  bad_len, bad_page = _bad_entries(jnp, bt, ln, sq=sq, pages_per_sequence=n_pages,
                                   num_pages=num_pages, page_size=ps)
  bad_row = bad_len | jnp.any(bad_page, axis=1)
  bt = jnp.clip(bt, 0, num_pages - 1)
  ln = jnp.clip(ln, 0, capacity)

  q5 = pack_gqa(q, hkv)
  outs, lses = _split_partials(q5, k_pages, v_pages, bt, ln, pages_per_split=pages_per_split,
                               scale=scale, score_fn=score_fn, mask_fn=mask_fn)
  out, lse = merge_attentions(outs, lses, out_dtype=q.dtype)
  out, lse = unpack_gqa(out), unpack_gqa(lse)
  out = jnp.where(bad_row[:, None, None, None], jnp.asarray(jnp.nan, out.dtype), out)
  lse = jnp.where(bad_row[:, None, None], jnp.nan, lse)
  return (out, lse) if return_lse else out
