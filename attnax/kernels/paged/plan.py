"""The backend-neutral plan of one ``paged_attention`` call: checks, sizes, positions and mods.

Everything both backends (:mod:`~attnax.kernels.paged.jax_backend`,
:mod:`~attnax.kernels.paged.pallas`) must agree on is decided here, once:

* the cache layout and its validation (ValueErrors at trace time; concrete ``lengths`` and
  ``block_tables`` checked by value; the run-time guard for traced ones);
* the packed query rows: the ``G = Hq // Hkv`` query heads of a kv head and their ``Sq`` new tokens
  fold into ``G * Sq`` rows of one matrix, row ``r`` being head ``kv_head * G + r // Sq`` at
  absolute position ``lengths[b] - Sq + r % Sq`` (:func:`row_positions`);
* the mods: their score and mask parts with their operand arrays (:mod:`attnax.kernels.operands`),
  and the causal mask at absolute positions that every backend adds (:meth:`PagedPlan.mod_fns`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnax.kernels import _checks
from attnax.kernels import operands as ops_lib
from attnax.kernels import score_mods as sm

__all__ = ["PagedPlan", "build_plan", "gather_pages", "check_values", "bad_entries",
           "row_positions"]

KERNEL = "paged_attention"


def gather_pages(pages: jax.Array, block_tables: jax.Array) -> jax.Array:
  """The contiguous cache of every sequence: ``(Hkv, P, ps, ...)`` pages -> ``(B, Hkv, n * ps, ...)``.

  ``block_tables`` ``(B, n)`` names the pages in order. Works on key/value pages
  ``(Hkv, P, ps, D)`` and on per-token scales ``(Hkv, P, ps)``. Handy for tests and for prefill
  kernels that want contiguous K/V (it is a copy: the paged kernels never make it).
  """
  g = pages[:, block_tables]                       # (Hkv, B, n, ps, ...)
  hkv, b, n, ps = g.shape[:4]
  return jnp.swapaxes(g, 0, 1).reshape((b, hkv, n * ps) + g.shape[4:])


@dataclasses.dataclass(frozen=True)
class PagedPlan:
  """Everything static about one call, whichever backend runs it.

  Attributes:
    batch, q_heads, kv_heads, q_len: ``B``, ``Hq``, ``Hkv``, ``Sq``.
    head_dim, v_dim: ``D``, ``Dv``.
    num_pages, page_size, pages_per_sequence: the pool and the block tables.
    scale: multiplies ``q . k`` (before the score mod).
    dtype: q's dtype (name); the output's.
    quantized: int8 pages with per-token f32 scales (dequantised in the kernel).
    mods: the static part of ``(score part, mask part)``; their arrays travel as operands.
  """
  batch: int
  q_heads: int
  kv_heads: int
  q_len: int
  head_dim: int
  v_dim: int
  num_pages: int
  page_size: int
  pages_per_sequence: int
  scale: float
  dtype: str
  quantized: bool
  mods: ops_lib.ModOperands

  @property
  def groups(self) -> int:
    return self.q_heads // self.kv_heads

  @property
  def rows(self) -> int:
    """Packed query rows per kv head: ``G * Sq``."""
    return self.groups * self.q_len

  @property
  def capacity(self) -> int:
    return self.pages_per_sequence * self.page_size

  def mod_fns(self, operands) -> tuple[Any, Any]:
    """``(score_fn, mask_fn)`` around ``operands`` (arrays, or RefArrays inside a kernel), with
    the causal mask on absolute positions and-ed in (keys at or before the query's position)."""
    score_fn, mask_fn = self.mods.rebuild(operands)
    if self.q_len > 1:   # Sq = 1: the query sits at lengths - 1, the length mask covers it
      mask_fn = sm.and_masks(sm.CausalMask(0), mask_fn)
    return score_fn, mask_fn


def row_positions(row, length, q_len: int, groups: int, first_kv_head=0):
  """``(head, absolute query position)`` of packed query rows ``row`` (int32 arrays).

  Row ``r`` of kv head ``hk`` is query head ``hk * G + r // Sq``; its query is token ``r % Sq``
  of the ``Sq`` new ones, at absolute position ``length - Sq + r % Sq``.
  """
  g = jax.lax.div(row, jnp.int32(q_len))
  i = row - g * q_len
  return first_kv_head * groups + g, length - q_len + i


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def bad_entries(xp, bt, ln, *, pages_per_sequence, num_pages, page_size):
  """``(bad lengths (B,), bad used pages (B, n))`` under the rules of ``paged_attention``.

  ``xp`` is numpy (concrete values, for the ValueError) or jax.numpy (the run-time guard). Either
  array may be None (not concrete): its result is then None; with ``ln`` None every page counts
  as used.
  """
  capacity = pages_per_sequence * page_size
  bad_len = None if ln is None else (ln < 0) | (ln > capacity)
  if bt is None:
    return bad_len, None
  used = (xp.ones(bt.shape, bool) if ln is None else
          xp.arange(pages_per_sequence)[None, :] * page_size < ln[:, None])
  return bad_len, used & ((bt < 0) | (bt >= num_pages))


def check_values(bt, ln, *, num_pages, page_size):
  """ValueErrors for bad lengths / page indices, where their values are concrete (not traced)."""
  capacity = bt.shape[1] * page_size
  lv = np.asarray(ln).astype(np.int64) if _is_concrete(ln) else None
  tv = np.asarray(bt).astype(np.int64) if _is_concrete(bt) else None
  bad_len, bad_page = bad_entries(np, tv, lv, pages_per_sequence=bt.shape[1],
                                  num_pages=num_pages, page_size=page_size)
  if bad_len is not None and bad_len.any():
    raise ValueError(
        f"{KERNEL}: lengths must lie in [0, capacity] = [0, {capacity}] (capacity = "
        f"pages_per_sequence * page_size = {bt.shape[1]} * {page_size}); got lengths "
        f"{lv.tolist()} (bad rows {np.flatnonzero(bad_len).tolist()}) for block_tables "
        f"{tuple(bt.shape)}")
  if bad_page is not None and bad_page.any():
    rows, cols = np.nonzero(bad_page)
    raise ValueError(
        f"{KERNEL}: block_tables {tuple(bt.shape)} holds page indices outside [0, num_pages) = "
        f"[0, {num_pages}): e.g. block_tables[{rows[0]}, {cols[0]}] = {tv[rows[0], cols[0]]} "
        f"({bad_page.sum()} bad entries); k_pages/v_pages have {num_pages} pages")


def _check_scales(k_pages, v_pages, k_scales, v_scales):
  """int8 pages need per-token f32 scales ``(Hkv, num_pages, page_size)``, float pages none."""
  int8 = [jnp.dtype(x.dtype) == jnp.int8 for x in (k_pages, v_pages)]
  given = [s is not None for s in (k_scales, v_scales)]
  shapes = (f"k_pages {k_pages.dtype}{tuple(k_pages.shape)}, v_pages "
            f"{v_pages.dtype}{tuple(v_pages.shape)}")
  if int8[0] != int8[1]:
    raise ValueError(f"{KERNEL}: k_pages and v_pages must both be int8 (quantised) or both "
                     f"floating point; got {shapes}")
  if not int8[0]:
    if any(given):
      raise ValueError(f"{KERNEL}: k_scales/v_scales are for int8 pages; got {shapes}")
    return False
  if not all(given):
    raise ValueError(f"{KERNEL}: int8 pages need k_scales and v_scales (float32 "
                     f"(num_kv_heads, num_pages, page_size) = {tuple(k_pages.shape[:3])}); got "
                     f"k_scales {None if k_scales is None else 'given'}, v_scales "
                     f"{None if v_scales is None else 'given'}")
  for name, s in (("k_scales", k_scales), ("v_scales", v_scales)):
    if (not hasattr(s, "shape") or tuple(s.shape) != tuple(k_pages.shape[:3])
        or jnp.dtype(s.dtype) != jnp.float32):
      raise ValueError(f"{KERNEL}: {name} must be float32 (num_kv_heads, num_pages, page_size) "
                       f"= {tuple(k_pages.shape[:3])}; got "
                       f"{getattr(s, 'dtype', type(s).__name__)}{tuple(getattr(s, 'shape', ()))}"
                       f" for {shapes}")
  return True


def check_paged(q, k_pages, v_pages, block_tables, lengths, k_scales=None, v_scales=None):
  """Shapes, dtypes and (where concrete) values; returns ``(bt, ln, quantized)`` as int32."""
  for arg, x in (("k_pages", k_pages), ("v_pages", v_pages)):
    if not hasattr(x, "ndim") or x.ndim != 4:
      raise ValueError(f"{KERNEL}: {arg} must have rank 4 (num_kv_heads, num_pages, page_size, "
                       f"head_dim); got shape {getattr(x, 'shape', None)}")
  if k_pages.shape[:3] != v_pages.shape[:3]:
    raise ValueError(f"{KERNEL}: k_pages {k_pages.shape} and v_pages {v_pages.shape} must agree "
                     "on (num_kv_heads, num_pages, page_size)")
  bt, ln = jnp.asarray(block_tables), jnp.asarray(lengths)
  if bt.ndim != 2 or not jnp.issubdtype(bt.dtype, jnp.integer):
    raise ValueError(f"{KERNEL}: block_tables must be integer (batch, pages_per_sequence); got "
                     f"{bt.dtype}{bt.shape}")
  if ln.ndim != 1 or not jnp.issubdtype(ln.dtype, jnp.integer):
    raise ValueError(f"{KERNEL}: lengths must be integer (batch,); got {ln.dtype}{ln.shape}")
  if bt.shape[1] == 0:
    raise ValueError(f"{KERNEL}: block_tables {bt.shape} has no page column")
  b = q.shape[0] if getattr(q, "ndim", 0) == 4 else None
  if b is not None and (bt.shape[0] != b or ln.shape[0] != b):
    raise ValueError(f"{KERNEL}: batch sizes differ: q {q.shape}, block_tables {bt.shape}, "
                     f"lengths {ln.shape}")
  quantized = _check_scales(k_pages, v_pages, k_scales, v_scales)
  ps = k_pages.shape[2]
  # The logical (contiguous) view lets the shared validation check ranks, heads, dims and dtypes
  # (int8 pages are read as q's dtype: they are dequantised to it).
  dtype = lambda x: getattr(q, "dtype", x.dtype) if quantized else x.dtype
  view = lambda x: jax.ShapeDtypeStruct((bt.shape[0], x.shape[0], bt.shape[1] * ps, x.shape[3]),
                                        dtype(x))
  # float64 runs in the pure-JAX backend (the Pallas backends say they cannot run it).
  _checks.check_qkv(q, view(k_pages), view(v_pages), kernel=KERNEL, allow_f64=True)
  check_values(bt, ln, num_pages=k_pages.shape[1], page_size=ps)
  return bt.astype(jnp.int32), ln.astype(jnp.int32), quantized


def build_plan(q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales, *, score_mod,
               mask_mod, scale, softcap):
  """Checks and the plan: ``(plan, operands, block_tables, lengths, bad_row)``.

  The returned ``block_tables`` and ``lengths`` are clamped into range (every read stays inside
  the pool); ``bad_row`` ``(B,)`` marks the rows whose traced values broke the rules (their
  output becomes NaN).
  """
  bt, ln, quantized = check_paged(q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales)
  if softcap is not None:
    score_mod = sm.compose_score_mods(sm.softcap_mod(softcap), score_mod)
  b, hq, sq, d = q.shape
  hkv, num_pages, ps, dv = v_pages.shape
  n_pages = bt.shape[1]
  capacity = n_pages * ps
  # Query and key positions are absolute, up to the capacity: the mods' arrays must cover it.
  score_fn, mask_fn = sm.resolve_mods(score_mod, mask_mod, batch=b, heads=hq, q_len=capacity,
                                      kv_len=capacity)
  mods, operands = ops_lib.collect(score_fn, mask_fn)
  plan = PagedPlan(batch=b, q_heads=hq, kv_heads=hkv, q_len=sq, head_dim=d, v_dim=dv,
                   num_pages=num_pages, page_size=ps, pages_per_sequence=n_pages,
                   scale=_checks.default_scale(scale, d), dtype=jnp.dtype(q.dtype).name,
                   quantized=quantized, mods=mods)
  # Run-time guard (the values may be traced): rows with bad lengths / used pages become NaN.
  bad_len, bad_page = bad_entries(jnp, bt, ln, pages_per_sequence=n_pages, num_pages=num_pages,
                                  page_size=ps)
  bad_row = bad_len | jnp.any(bad_page, axis=1)
  return plan, operands, jnp.clip(bt, 0, num_pages - 1), jnp.clip(ln, 0, capacity), bad_row
