"""BlockMask: which (q block, kv block) tiles are empty, partial or full.

FlexAttention's layout. For every q block: the count and ascending indices of its *partial* kv
blocks (visible in part: the kernel applies the elementwise mask) and of its *full* kv blocks
(visible everywhere: no mask work). The transposed lists, per kv block, serve the dK/dV pass.
Empty tiles appear in no list, so kernels never load them.

Building never materialises the ``(Sq, Sk)`` mask: the built-in mask mods classify tiles from index
ranges (``tile_visibility``); any other mask mod is evaluated one q block at a time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnax.kernels import _checks
from attnax.kernels import score_mods as sm

__all__ = ["BlockMask", "create_block_mask", "fit_block_mask", "EMPTY", "PARTIAL", "FULL"]

EMPTY, PARTIAL, FULL = 0, 1, 2


def _indices(flags: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Counts and ascending indices of the True entries of the last axis (padding repeats the last)."""
  n = flags.shape[-1]
  count = flags.sum(-1, dtype=jnp.int32)
  # Stable sort of the key (not flag, position) puts True entries first, in ascending order.
  order = jnp.argsort(jnp.where(flags, 0, n) + jnp.arange(n, dtype=jnp.int32), axis=-1)
  order = order.astype(jnp.int32)
  last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  pos = jnp.arange(n, dtype=jnp.int32)
  return count, jnp.where(pos < count[..., None], order, last)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMask:
  """Tile classification of a mask for one tiling.

  Shapes use ``B'``/``H'``: 1 when the mask does not depend on the batch row / head (read with
  :meth:`batch_head_index`), else ``B``/``H``. ``nq = ceil(Sq / block_q)``, ``nk = ceil(Sk / block_k)``.

  Attributes:
    tiles: int8 ``(B', H', nq, nk)``: ``EMPTY`` (0), ``PARTIAL`` (1) or ``FULL`` (2).
    kv_counts, kv_indices: partial kv blocks per q block, ``(B', H', nq)`` and ``(B', H', nq, nk)``.
    full_kv_counts, full_kv_indices: full kv blocks per q block, same shapes.
    q_counts, q_indices: partial q blocks per kv block, ``(B', H', nk)``, ``(B', H', nk, nq)``.
    full_q_counts, full_q_indices: full q blocks per kv block, same shapes.
  """
  tiles: jax.Array
  kv_counts: jax.Array
  kv_indices: jax.Array
  full_kv_counts: jax.Array
  full_kv_indices: jax.Array
  q_counts: jax.Array
  q_indices: jax.Array
  full_q_counts: jax.Array
  full_q_indices: jax.Array
  block_q: int = dataclasses.field(metadata=dict(static=True), default=128)
  block_k: int = dataclasses.field(metadata=dict(static=True), default=128)
  q_len: int = dataclasses.field(metadata=dict(static=True), default=0)
  kv_len: int = dataclasses.field(metadata=dict(static=True), default=0)

  @classmethod
  def from_tiles(cls, tiles: jax.Array, *, block_q: int, block_k: int, q_len: int,
                 kv_len: int) -> "BlockMask":
    """Build the index lists from a tile map ``(B', H', nq, nk)`` of EMPTY/PARTIAL/FULL."""
    tiles = jnp.asarray(tiles, jnp.int8)
    partial, full = tiles == PARTIAL, tiles == FULL
    kv_c, kv_i = _indices(partial)
    fkv_c, fkv_i = _indices(full)
    q_c, q_i = _indices(jnp.swapaxes(partial, -1, -2))
    fq_c, fq_i = _indices(jnp.swapaxes(full, -1, -2))
    return cls(tiles, kv_c, kv_i, fkv_c, fkv_i, q_c, q_i, fq_c, fq_i,
               block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.tiles.shape)

  def batch_head_index(self, b, h):
    """Index into the leading ``(B', H')`` axes for batch row ``b`` and head ``h``."""
    return (b if self.tiles.shape[0] > 1 else 0, h if self.tiles.shape[1] > 1 else 0)

  def density(self) -> jax.Array:
    """Fraction of tiles that are not empty."""
    return jnp.mean((self.tiles != EMPTY).astype(jnp.float32))

  def to_dense(self) -> jax.Array:
    """Tile states expanded to a ``(B', H', Sq, Sk)`` int8 map (tests and small inputs only)."""
    t = jnp.repeat(jnp.repeat(self.tiles, self.block_q, axis=2), self.block_k, axis=3)
    return t[:, :, :self.q_len, :self.kv_len]


def evaluate_tiles(mask_mod, batch, heads, block_q, block_k, q_len, kv_len):
  """Exact (any, all) per tile of an arbitrary mask mod, one q block at a time."""
  nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
  kv_pad = nk * block_k
  b, h, _, _ = sm.index_grid(batch, heads, 1, 1)
  kv = jnp.arange(kv_pad, dtype=jnp.int32).reshape(1, 1, 1, -1)
  kv_ok = kv < kv_len

  def one_block(qb):
    q = (qb * block_q + jnp.arange(block_q, dtype=jnp.int32)).reshape(1, 1, -1, 1)
    ok = (q < q_len) & kv_ok
    vis = jnp.asarray(mask_mod(b, h, q, kv), bool)
    lead = vis.shape[:2]
    vis = jnp.broadcast_to(vis, lead + (block_q, kv_pad)).reshape(lead + (block_q, nk, block_k))
    ok = jnp.broadcast_to(ok, (1, 1, block_q, kv_pad)).reshape(1, 1, block_q, nk, block_k)
    return (vis & ok).any(axis=(2, 4)), (vis | ~ok).all(axis=(2, 4))

  any_, all_ = jax.lax.map(one_block, jnp.arange(nq, dtype=jnp.int32))
  # lax.map stacks on axis 0: (nq, B', H', nk) -> (B', H', nq, nk)
  return jnp.moveaxis(any_, 0, 2), jnp.moveaxis(all_, 0, 2)


def visibility(mask_mod, batch, heads, block_q, block_k, q_len, kv_len):
  if isinstance(mask_mod, sm.AndMask):
    parts = [visibility(m, batch, heads, block_q, block_k, q_len, kv_len)
             for m in mask_mod.masks]
    any_, all_ = parts[0]
    for a, f in parts[1:]:
      any_, all_ = any_ & a, all_ & f   # `any` of a conjunction: an over-approximation, allowed
    return any_, all_
  if isinstance(mask_mod, sm.OrMask):
    parts = [visibility(m, batch, heads, block_q, block_k, q_len, kv_len)
             for m in mask_mod.masks]
    any_, all_ = parts[0]
    for a, f in parts[1:]:
      any_, all_ = any_ | a, all_ | f   # `all` of a disjunction: an under-approximation, allowed
    return any_, all_
  if hasattr(mask_mod, "tile_visibility"):
    return mask_mod.tile_visibility(block_q, block_k, q_len, kv_len)
  return evaluate_tiles(mask_mod, batch, heads, block_q, block_k, q_len, kv_len)


def create_block_mask(mask_mod: Any, *, q_len: int, kv_len: int, block_q: int = 128,
                      block_k: int = 128, batch: int = 1, heads: int = 1) -> BlockMask:
  """Classify every ``(block_q, block_k)`` tile of ``mask_mod`` over ``(q_len, kv_len)``.

  ``mask_mod=None`` means no mask: every tile is full, except the ragged tail tiles (partial, so
  the kernel masks positions past ``q_len``/``kv_len``). ``batch``/``heads`` are needed only by mask
  mods that depend on ``b``/``h`` and carry no tile rule of their own.
  """
  for name, value in (("q_len", q_len), ("kv_len", kv_len), ("block_q", block_q),
                      ("block_k", block_k), ("batch", batch), ("heads", heads)):
    _checks.check_positive_int(f"create_block_mask: {name}", value)
  sm.check_mod(mask_mod, 4, "mask_mod")
  sm.check_mod_shapes(mask_mod, batch=None, heads=None, q_len=q_len, kv_len=kv_len,
                      name="mask_mod")
  nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
  if mask_mod is None:
    any_, all_ = jnp.ones((1, 1, nq, nk), bool), jnp.ones((1, 1, nq, nk), bool)
  else:
    any_, all_ = visibility(mask_mod, batch, heads, block_q, block_k, q_len, kv_len)
  lead = tuple(max(a, b) for a, b in zip(jnp.shape(any_)[:2], jnp.shape(all_)[:2]))
  any_ = jnp.broadcast_to(any_, lead + (nq, nk))
  all_ = jnp.broadcast_to(all_, lead + (nq, nk))
  tiles = jnp.where(any_, jnp.where(all_, FULL, PARTIAL), EMPTY).astype(jnp.int8)
  tiles = _demote_ragged(tiles, block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len)
  return BlockMask.from_tiles(tiles, block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len)


def _demote_ragged(tiles: jax.Array, *, block_q: int, block_k: int, q_len: int,
                   kv_len: int) -> jax.Array:
  """FULL tiles that reach past ``q_len``/``kv_len`` become PARTIAL: the kernel masks their tail."""
  nq, nk = tiles.shape[-2:]
  ragged = np.zeros((nq, nk), bool)
  if q_len % block_q:
    ragged[-1, :] = True
  if kv_len % block_k:
    ragged[:, -1] = True
  if not ragged.any():
    return tiles
  return jnp.where(ragged & (tiles == FULL), jnp.int8(PARTIAL), tiles).astype(jnp.int8)


def fit_block_mask(block_mask: Any, *, batch: int, q_heads: int, kv_heads: int, q_len: int,
                   kv_len: int, kernel: str) -> BlockMask:
  """Check a caller's BlockMask against the inputs; FULL tiles at ragged edges become PARTIAL.

  The mask must be a :class:`BlockMask` built for ``(q_len, kv_len)`` with leading axes
  ``B' in (1, batch)`` and ``H' in (1, kv_heads, q_heads)``; otherwise a ValueError names what
  differs.
  """
  if not isinstance(block_mask, BlockMask):
    raise ValueError(f"{kernel}: block_mask must be an attnax BlockMask, got "
                     f"{type(block_mask).__name__}")
  bq, bk = block_mask.block_q, block_mask.block_k
  nq, nk = -(-q_len // bq), -(-kv_len // bk)
  shape = tuple(block_mask.tiles.shape)
  if len(shape) != 4 or shape[2:] != (nq, nk) or (block_mask.q_len, block_mask.kv_len) != (
      q_len, kv_len):
    raise ValueError(f"{kernel}: block_mask was built for q_len={block_mask.q_len}, "
                     f"kv_len={block_mask.kv_len} with tiles {shape} of ({bq}, {bk}); the inputs "
                     f"have Sq={q_len}, Sk={kv_len}, which need (B', H', {nq}, {nk}) tiles")
  if shape[0] not in (1, batch) or shape[1] not in (1, kv_heads, q_heads):
    raise ValueError(f"{kernel}: block_mask tiles {shape} must have B' in (1, {batch}) and H' in "
                     f"(1, Hkv={kv_heads}, Hq={q_heads})")
  if not (q_len % bq or kv_len % bk):
    return block_mask
  tiles = _demote_ragged(block_mask.tiles.astype(jnp.int8), block_q=bq, block_k=bk, q_len=q_len,
                         kv_len=kv_len)
  return BlockMask.from_tiles(tiles, block_q=bq, block_k=bk, q_len=q_len, kv_len=kv_len)
