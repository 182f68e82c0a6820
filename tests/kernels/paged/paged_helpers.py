"""Shared inputs and references for the paged-attention tests."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attnax.kernels import paged_attention
from attnax.kernels.paged import gather_pages
from tests.helpers import reference_attention

PAGE = 4
PAGES_PER_SEQ = 7          # capacity 28 tokens per sequence
NUM_PAGES = 40


def make_cache(seed, *, batch=4, q_heads=4, kv_heads=2, q_len=1, head_dim=16, v_dim=None,
               lengths=(0, 13, 28, 5), dtype=jnp.float32):
  """Random pools, a random (distinct) page assignment per sequence, ragged lengths."""
  rng = np.random.RandomState(seed)
  v_dim = head_dim if v_dim is None else v_dim
  q = jnp.asarray(rng.randn(batch, q_heads, q_len, head_dim), dtype)
  k_pages = jnp.asarray(rng.randn(kv_heads, NUM_PAGES, PAGE, head_dim), dtype)
  v_pages = jnp.asarray(rng.randn(kv_heads, NUM_PAGES, PAGE, v_dim), dtype)
  tables = jnp.asarray(rng.permutation(NUM_PAGES)[:batch * PAGES_PER_SEQ]
                       .reshape(batch, PAGES_PER_SEQ), jnp.int32)
  lengths = jnp.asarray(lengths[:batch], jnp.int32)
  return q, k_pages, v_pages, tables, lengths


def paged(*args, **kw):
  return jax.jit(functools.partial(paged_attention, **kw))(*args)


def shifted(mod, offset):
  """A mod on absolute positions, as the contiguous reference sees it (query i is offset[b] + i)."""
  if mod is None:
    return None
  return lambda s, b, h, i, j: mod(s, b, h, i + offset[b], j)


def reference(q, k_pages, v_pages, tables, lengths, *, score_mod=None, mask_mod=None,
              softcap=None, k_scales=None, v_scales=None, **kw):
  """float64 standard_attention on the gathered (dequantised) cache: keys < length, causal on
  absolute positions (query i of row b at lengths[b] - Sq + i)."""
  sq = q.shape[2]
  k, v = gather_pages(k_pages, tables), gather_pages(v_pages, tables)
  if k_scales is not None:
    k = np.asarray(k, np.float64) * np.asarray(gather_pages(k_scales, tables), np.float64)[..., None]
    v = np.asarray(v, np.float64) * np.asarray(gather_pages(v_scales, tables), np.float64)[..., None]
  ln = np.asarray(lengths)
  offset = ln - sq                                    # absolute position of query 0
  user_mask = mask_mod
  mask = lambda b, h, i, j: ((j < ln[b]) & (j <= i + offset[b])
                             & (True if user_mask is None else user_mask(b, h, i + offset[b], j)))
  mods = []
  if softcap is not None:
    mods.append(lambda s, b, h, i, j: softcap * jnp.tanh(s / softcap))
  if score_mod is not None:
    mods.append(shifted(score_mod, offset))
  mod = None
  if mods:
    mod = lambda s, b, h, i, j: functools.reduce(lambda s, m: m(s, b, h, i, j), mods, s)
  return reference_attention(q, k, v, score_mod=mod, mask_mod=mask, **kw)


def with_garbage(cache, value=np.nan):
  """The cache with ``value`` in every slot past each sequence's length and in every free page."""
  q, k_pages, v_pages, tables, lengths = cache
  kp, vp = np.array(k_pages), np.array(v_pages)
  tb, ln = np.asarray(tables), np.asarray(lengths)
  free = np.setdiff1d(np.arange(NUM_PAGES), tb)
  kp[:, free], vp[:, free] = value, value
  for b in range(tb.shape[0]):
    for pos in range(ln[b], tb.shape[1] * PAGE):
      kp[:, tb[b, pos // PAGE], pos % PAGE] = value
      vp[:, tb[b, pos // PAGE], pos % PAGE] = value
  return q, jnp.asarray(kp), jnp.asarray(vp), tables, lengths
