"""PagedKVCache: a pool of KV pages, block tables and lengths as arrays, for jitted decoding.

Every piece of state is an array in one pytree, so a whole decode step -- take pages for the new
tokens, write each layer's keys and values, attend, free finished sequences -- is one jitted
function, and the cache can be donated to it (the pools are then updated in place)::

  cache = PagedKVCache.create(batch=8, num_pages=512, page_size=16, pages_per_sequence=64,
                              num_kv_heads=2, head_dim=64, num_layers=4)
  cache, ok = cache.allocate(num_new)            # room for num_new[b] more tokens per row
  for layer in range(4):
    cache = cache.append(layer, k, v)            # (B, Hkv, S, D): the step's new keys/values
    out = cache.attend(layer, q)                 # paged_attention over the cache
  cache = cache.free(finished)                   # finished rows' pages back to the pool

Layout (that of :func:`~attnax.kernels.paged_attention`): per layer, ``k_pages`` /
``v_pages`` ``(Hkv, num_pages, page_size, D)`` pools shared by every sequence; row ``b`` of
``block_tables`` lists sequence ``b``'s pages in order; ``lengths[b]`` tokens are valid. The
``num_pages`` pages are shared by all rows and layers' pools are indexed alike, so one table
serves every layer. ``is_free`` marks the pages in the pool (no row holds them).

Steps are right-aligned: a step writes ``S`` token slots per row, of which the last
``pending[b]`` (the tokens :meth:`allocate` granted that row) are real; they land at positions
``lengths[b] - pending[b] .. lengths[b] - 1``, and the step's queries sit at
``lengths[b] - S .. lengths[b] - 1``, which is where ``paged_attention`` places them. A row that
takes fewer than ``S`` tokens (a shorter prompt chunk, or an idle row with ``pending = 0``) has
padding queries in front: their outputs are meaningless and should be ignored.

int8 caches (``dtype=jnp.int8``) store per-token scales (``k_scales`` / ``v_scales``
``(Hkv, num_pages, page_size)`` f32 per layer): :meth:`append` quantises each key / value row
symmetrically (:func:`quantize_kv`) and ``paged_attention`` dequantises in the kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from attnax.kernels import _checks
from attnax.kernels.paged.api import paged_attention
from attnax.kernels.paged.plan import gather_pages

__all__ = ["PagedKVCache", "quantize_kv", "dequantize_kv"]

f32 = jnp.float32


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 quantisation of every row ``x[..., :]``: ``(int8 x, f32 scales x.shape[:-1])``.

  ``scale = max|row| / 127`` (1 for an all-zero row), ``x ~= int8 * scale[..., None]``; the
  rounding error is at most ``scale / 2`` per entry. NaN or inf in a row gives a NaN scale, so it
  propagates through dequantisation instead of being hidden.
  """
  xf = x.astype(f32)
  amax = jnp.max(jnp.abs(xf), axis=-1)
  scale = jnp.where(amax == 0, 1.0, amax / 127.0)
  scale = jnp.where(jnp.isfinite(amax), scale, jnp.nan)
  q = jnp.clip(jnp.round(xf / scale[..., None]), -127, 127)
  return jnp.where(jnp.isnan(q), 0, q).astype(jnp.int8), scale


def dequantize_kv(q: jax.Array, scales: jax.Array) -> jax.Array:
  """The f32 values of int8 rows: ``q * scales[..., None]``."""
  return q.astype(f32) * scales[..., None]


def _row_mask(rows: Any, batch: int, what: str) -> jax.Array:
  """``rows`` as a bool ``(batch,)`` mask: a bool mask, or integer row indices."""
  rows = jnp.asarray(rows)
  if rows.dtype == jnp.bool_:
    if rows.shape != (batch,):
      raise ValueError(f"PagedKVCache.{what}: a row mask must have shape ({batch},), got "
                       f"{rows.shape}")
    return rows
  if not jnp.issubdtype(rows.dtype, jnp.integer) or rows.ndim > 1:
    raise ValueError(f"PagedKVCache.{what}: rows must be a bool ({batch},) mask or integer row "
                     f"indices, got {rows.dtype}{rows.shape}")
  return jnp.zeros((batch,), bool).at[rows].set(True, mode="drop")


def _cdiv(a, b):
  return (a + b - 1) // b


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
  """A paged KV cache: page pools per layer, block tables, lengths and the free pages.

  Attributes:
    k_pages, v_pages: per layer, ``(Hkv, num_pages, page_size, D)`` / ``(..., Dv)`` pools.
    k_scales, v_scales: per layer, f32 ``(Hkv, num_pages, page_size)`` (int8 caches), else None.
    block_tables: int32 ``(B, pages_per_sequence)``; entries past a row's pages are meaningless.
    lengths: int32 ``(B,)``, valid tokens per row (those of the step in progress included).
    pending: int32 ``(B,)``, tokens the last :meth:`allocate` granted each row (what
      :meth:`append` writes).
    is_free: bool ``(num_pages,)``, True where a page is in the pool.
  """
  k_pages: tuple
  v_pages: tuple
  k_scales: tuple | None
  v_scales: tuple | None
  block_tables: jax.Array
  lengths: jax.Array
  pending: jax.Array
  is_free: jax.Array

  # --------------------------------------------------------------------------- creation

  @classmethod
  def create(cls, *, batch: int, num_pages: int, page_size: int, pages_per_sequence: int,
             num_kv_heads: int, head_dim: int, v_dim: int | None = None, num_layers: int = 1,
             dtype: Any = jnp.bfloat16) -> "PagedKVCache":
    """An empty cache: every page free, every row of length 0.

    Args:
      batch: rows (sequence slots) decoded together.
      num_pages: pages in the pool, shared by all rows.
      page_size: tokens per page.
      pages_per_sequence: most pages one row may hold (its capacity is
        ``pages_per_sequence * page_size`` tokens).
      num_kv_heads, head_dim, v_dim: the kv heads and their key / value sizes (``v_dim``
        defaults to ``head_dim``).
      num_layers: layers sharing the tables (one pool pair per layer).
      dtype: of the pools: a float dtype, or ``jnp.int8`` (quantised, with per-token scales).
    """
    for name, val in (("batch", batch), ("num_pages", num_pages), ("page_size", page_size),
                      ("pages_per_sequence", pages_per_sequence),
                      ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                      ("num_layers", num_layers)):
      _checks.check_positive_int(f"PagedKVCache.create: {name}", val)
    v_dim = head_dim if v_dim is None else _checks.check_positive_int(
        "PagedKVCache.create: v_dim", v_dim)
    dtype = jnp.dtype(dtype)
    if dtype != jnp.int8 and not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"PagedKVCache.create: dtype must be a float dtype or int8, got {dtype}")
    pool = lambda d: tuple(jnp.zeros((num_kv_heads, num_pages, page_size, d), dtype)
                           for _ in range(num_layers))
    scales = None
    if dtype == jnp.int8:
      scales = lambda: tuple(jnp.ones((num_kv_heads, num_pages, page_size), f32)
                             for _ in range(num_layers))
    return cls(k_pages=pool(head_dim), v_pages=pool(v_dim),
               k_scales=None if scales is None else scales(),
               v_scales=None if scales is None else scales(),
               block_tables=jnp.zeros((batch, pages_per_sequence), jnp.int32),
               lengths=jnp.zeros((batch,), jnp.int32), pending=jnp.zeros((batch,), jnp.int32),
               is_free=jnp.ones((num_pages,), bool))

  # --------------------------------------------------------------------------- sizes

  @property
  def batch(self) -> int:
    return self.lengths.shape[0]

  @property
  def num_layers(self) -> int:
    return len(self.k_pages)

  @property
  def num_pages(self) -> int:
    return self.is_free.shape[0]

  @property
  def page_size(self) -> int:
    return self.k_pages[0].shape[2]

  @property
  def pages_per_sequence(self) -> int:
    return self.block_tables.shape[1]

  @property
  def capacity(self) -> int:
    """Most tokens one row can hold."""
    return self.pages_per_sequence * self.page_size

  @property
  def quantized(self) -> bool:
    return self.k_scales is not None

  def num_free_pages(self) -> jax.Array:
    """int32 scalar: pages in the pool."""
    return jnp.sum(self.is_free.astype(jnp.int32))

  # --------------------------------------------------------------------------- pages

  def allocate(self, num_new: Any) -> tuple["PagedKVCache", jax.Array]:
    """Make room for ``num_new[b]`` more tokens in every row: ``(cache, ok (B,) bool)``.

    Pages come from the pool as rows need them; ``lengths`` grows by ``num_new`` and ``pending``
    records it for :meth:`append`. A new sequence is a row of length 0 that gets its prompt's
    length (e.g. after :meth:`free`); a decode step gives every active row 1, idle rows 0.

    A row whose request does not fit (past its capacity, or once the pool has run out: rows are
    served in order) gets nothing: ``ok[b]`` is False, its length and pages are unchanged and its
    ``pending`` is 0, so :meth:`append` writes nothing for it. Check ``ok`` (or keep
    :meth:`num_free_pages` in view) before relying on the row's output.
    """
    b, n, ps, total = self.batch, self.pages_per_sequence, self.page_size, self.num_pages
    num_new = jnp.broadcast_to(jnp.asarray(num_new, jnp.int32), (b,))
    held = _cdiv(self.lengths, ps)
    target = self.lengths + num_new
    fits = (num_new >= 0) & (target <= n * ps)
    need = jnp.where(fits, _cdiv(target, ps) - held, 0)
    ok = fits & ((need == 0) | (jnp.cumsum(need) <= self.num_free_pages()))
    granted = jnp.where(ok, need, 0)
    offset = jnp.cumsum(granted) - granted
    free_list = jnp.nonzero(self.is_free, size=total, fill_value=total)[0]
    j = jnp.arange(n, dtype=jnp.int32)[None, :]
    take = j < granted[:, None]
    pages = jnp.where(take, free_list[jnp.clip(offset[:, None] + j, 0, total - 1)], total)
    cols = jnp.where(take, held[:, None] + j, n)                   # out of range: dropped
    rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, n))
    tables = self.block_tables.at[rows, cols].set(pages, mode="drop")
    is_free = self.is_free.at[pages.reshape(-1)].set(False, mode="drop")
    grown = jnp.where(ok, num_new, 0)
    cache = dataclasses.replace(self, block_tables=tables, is_free=is_free,
                                lengths=self.lengths + grown, pending=grown)
    return cache, ok

  def free(self, rows: Any) -> "PagedKVCache":
    """Return the pages of ``rows`` (a bool ``(B,)`` mask or row indices) to the pool; those rows
    become empty (length 0), ready for a new sequence."""
    mask = _row_mask(rows, self.batch, "free")
    held = _cdiv(self.lengths, self.page_size)
    j = jnp.arange(self.pages_per_sequence, dtype=jnp.int32)[None, :]
    release = mask[:, None] & (j < held[:, None])
    pages = jnp.where(release, self.block_tables, self.num_pages)
    is_free = self.is_free.at[pages.reshape(-1)].set(True, mode="drop")
    zero = lambda x: jnp.where(mask, 0, x)
    return dataclasses.replace(self, is_free=is_free, lengths=zero(self.lengths),
                               pending=zero(self.pending))

  # --------------------------------------------------------------------------- keys and values

  def append(self, layer: int, k: jax.Array, v: jax.Array) -> "PagedKVCache":
    """Write one layer's keys and values of the step's tokens (see :meth:`allocate`).

    Args:
      layer: static layer index.
      k: ``(B, Hkv, S, D)``, v: ``(B, Hkv, S, Dv)``: the step's ``S`` token slots per row; of
        row ``b`` the last ``pending[b]`` are written, at positions
        ``lengths[b] - pending[b] .. lengths[b] - 1``, the others ignored.
    """
    layer = _checks.static_int("PagedKVCache.append: layer", layer)
    if not 0 <= layer < self.num_layers:
      raise ValueError(f"PagedKVCache.append: layer {layer} out of range for {self.num_layers} "
                       "layers")
    hkv, _, ps, d = self.k_pages[layer].shape
    dv = self.v_pages[layer].shape[-1]
    for name, x, dim in (("k", k, d), ("v", v, dv)):
      if (getattr(x, "ndim", 0) != 4 or x.shape[0] != self.batch or x.shape[1] != hkv
          or x.shape[3] != dim or x.shape[2] != k.shape[2]):
        raise ValueError(f"PagedKVCache.append: {name} must be (batch, num_kv_heads, S, dim) = "
                         f"({self.batch}, {hkv}, S, {dim}); got k {getattr(k, 'shape', None)}, "
                         f"v {getattr(v, 'shape', None)}")
    s = k.shape[2]
    step = jnp.arange(s, dtype=jnp.int32)[None, :]
    pos = self.lengths[:, None] - s + step                          # (B, S)
    write = step >= s - self.pending[:, None]
    col = jnp.clip(pos // ps, 0, self.pages_per_sequence - 1)
    page = jnp.where(write, jnp.take_along_axis(self.block_tables, col, axis=1), self.num_pages)
    slot = jnp.where(write, pos % ps, 0)

    def put(pools, layer_pages, x):
      x = jnp.swapaxes(x, 0, 1)                                     # (Hkv, B, S, dim)
      new = layer_pages.at[:, page, slot].set(x.astype(layer_pages.dtype), mode="drop")
      return pools[:layer] + (new,) + pools[layer + 1:]

    if not self.quantized:
      return dataclasses.replace(self, k_pages=put(self.k_pages, self.k_pages[layer], k),
                                 v_pages=put(self.v_pages, self.v_pages[layer], v))
    (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
    return dataclasses.replace(
        self, k_pages=put(self.k_pages, self.k_pages[layer], kq),
        v_pages=put(self.v_pages, self.v_pages[layer], vq),
        k_scales=put(self.k_scales, self.k_scales[layer], ks),
        v_scales=put(self.v_scales, self.v_scales[layer], vs))

  def attend(self, layer: int, q: jax.Array, **kwargs: Any) -> Any:
    """:func:`~attnax.kernels.paged_attention` of ``q`` ``(B, Hq, S, D)`` over layer ``layer``
    (``kwargs``: its options: mods, ``scale``, ``softcap``, ``backend``, ...). The step's queries
    sit at positions ``lengths[b] - S .. lengths[b] - 1``."""
    scales = {}
    if self.quantized:
      scales = dict(k_scales=self.k_scales[layer], v_scales=self.v_scales[layer])
    return paged_attention(q, self.k_pages[layer], self.v_pages[layer], self.block_tables,
                           self.lengths, **scales, **kwargs)

  def contiguous(self, layer: int) -> tuple[jax.Array, jax.Array]:
    """Every row's keys and values as contiguous ``(B, Hkv, capacity, D)`` arrays (a copy, for
    tests and inspection; int8 caches dequantised to f32). Slots past ``lengths`` are garbage."""
    k = gather_pages(self.k_pages[layer], self.block_tables)
    v = gather_pages(self.v_pages[layer], self.block_tables)
    if self.quantized:
      k = dequantize_kv(k, gather_pages(self.k_scales[layer], self.block_tables))
      v = dequantize_kv(v, gather_pages(self.v_scales[layer], self.block_tables))
    return k, v
