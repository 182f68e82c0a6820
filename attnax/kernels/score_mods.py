"""Score and mask mods: the prebuilt factories, composition, and conversions.

A :class:`~attnax.kernels.ScoreMod` is ``(score, b, h, q_idx, kv_idx) -> score`` and a
:class:`~attnax.kernels.MaskMod` is ``(b, h, q_idx, kv_idx) -> bool``. Every mod defined here is a
pytree: its arrays (document ids, ALiBi slopes, a bias table) are leaves, its settings are static.
A kernel can therefore hand the arrays to a Pallas kernel as operands and rebuild the mod around
the kernel's refs (FlexAttention's "captured buffers").

The mask-like factories (:func:`causal_mod`, :func:`sliding_window_mod`, :func:`prefix_lm_mod`,
:func:`document_mask_mod`) return a score mod that *carries* its mask mod, so a kernel can derive
block sparsity from a composed score mod. Mask mods also know how to classify whole tiles
(``tile_visibility``) without evaluating every element, which is what lets a
:class:`~attnax.kernels.BlockMask` be built at 1M tokens.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attnax.kernels import _checks

__all__ = [
    "MASK_VALUE", "causal_mod", "sliding_window_mod", "alibi_mod", "alibi_slopes",
    "prefix_lm_mod", "document_mask_mod", "additive_bias_mod", "compose_score_mods",
    "mask_mod_to_score_mod", "mask_mod_to_boolean_mask", "and_masks", "or_masks",
    "padding_mask_mod", "softcap_mod", "array_mask_mod", "local_window_mod",
    "CausalMask", "SlidingWindowMask", "PrefixLMMask", "DocumentMask", "PaddingLengthMask",
    "PaddingMask", "AndMask", "OrMask", "ArrayMask", "LocalWindowMask", "QueryLengthMask",
    "MaskScoreMod", "AlibiMod", "AdditiveBiasMod", "SoftcapMod", "ComposedScoreMod",
]

# Masked scores get a large finite negative (never -inf, never NaN); kernels additionally zero the
# probabilities of masked entries so that a fully masked row yields output 0 and lse -inf.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def take(arr: Any, *idx: Any) -> jax.Array:
  """``arr[idx]`` where size-1 axes of ``arr`` broadcast (they are read at index 0).

  Works on arrays and on the ref adaptors Pallas kernels pass in place of a mod's arrays.
  """
  if len(idx) != len(arr.shape):
    raise ValueError(f"indexing an array of shape {arr.shape} with {len(idx)} indices")
  # A broadcast axis reads index 0 through a zero of shape (1, ..., 1), not ``zeros_like(i)``:
  # the gather then has the shape of the axes that vary (a bias row inside a kernel's (bq, bk)
  # tile loads bk values once, not bq * bk), and broadcasting against the score does the rest.
  idx = tuple(jnp.zeros((1,) * jnp.ndim(i), jnp.int32) if arr.shape[d] == 1 else i
              for d, i in enumerate(idx))
  return arr[idx]


def _pytree(cls=None, *, data=(), meta=()):
  def wrap(cls):
    cls = dataclasses.dataclass(frozen=True)(cls)
    return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))
  return wrap


def _ranges(block: int, length: int):
  """Inclusive first/last valid position of every block of ``block`` over ``length``."""
  n = -(-length // block)
  lo = np.arange(n) * block
  hi = np.minimum(lo + block, length) - 1
  return jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32)


def _block_min_max(ids: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """Per-block min and max of ``ids`` ``(B, S)`` -> ``(B, nblocks)`` (tail padded by edge)."""
  s = ids.shape[-1]
  n = -(-s // block)
  padded = jnp.pad(ids, ((0, 0), (0, n * block - s)), mode="edge").reshape(ids.shape[0], n, block)
  return padded.min(-1), padded.max(-1)


# ----------------------------------------------------------------------------- mask mods
#
# tile_visibility(block_q, block_k, q_len, kv_len) -> (any, all): booleans broadcastable to
# (B, H, nq, nk). `any` may over-approximate (a tile then runs with the elementwise mask) but
# `all` must be exact or under-approximate, and `any=False` must be exact: both decide skipping.


@_pytree(meta=("offset",))
class CausalMask:
  """Keep ``kv_idx <= q_idx + offset``."""
  offset: int = 0

  def __call__(self, b, h, q_idx, kv_idx):
    return kv_idx <= q_idx + self.offset

  def tile_visibility(self, block_q, block_k, q_len, kv_len):
    q_lo, q_hi = _ranges(block_q, q_len)
    k_lo, k_hi = _ranges(block_k, kv_len)
    any_ = k_lo[None, :] <= q_hi[:, None] + self.offset
    all_ = k_hi[None, :] <= q_lo[:, None] + self.offset
    return any_[None, None], all_[None, None]


def _in_band(q_idx, kv_idx, offset: int, lo: int, hi: int):
  """``lo <= q_idx + offset - kv_idx <= hi``: the diagonal band every window mask keeps."""
  d = q_idx + offset - kv_idx
  return (d >= lo) & (d <= hi)


def _band_tiles(block_q, block_k, q_len, kv_len, offset: int, lo: int, hi: int):
  """Exact ``(any, all)`` tiles of :func:`_in_band`, ``(1, 1, nq, nk)``."""
  q_lo, q_hi = _ranges(block_q, q_len)
  k_lo, k_hi = _ranges(block_k, kv_len)
  d_min = q_lo[:, None] + offset - k_hi[None, :]
  d_max = q_hi[:, None] + offset - k_lo[None, :]
  any_ = (d_max >= lo) & (d_min <= hi)
  all_ = (d_min >= lo) & (d_max <= hi)
  return any_[None, None], all_[None, None]


@_pytree(meta=("window_size", "offset"))
class SlidingWindowMask:
  """Keep ``0 <= q_idx + offset - kv_idx < window_size``."""
  window_size: int
  offset: int = 0

  def __call__(self, b, h, q_idx, kv_idx):
    return _in_band(q_idx, kv_idx, self.offset, 0, self.window_size - 1)

  def tile_visibility(self, block_q, block_k, q_len, kv_len):
    return _band_tiles(block_q, block_k, q_len, kv_len, self.offset, 0, self.window_size - 1)


@_pytree(data=("prefix_length",))
class PrefixLMMask:
  """Keep ``kv_idx < prefix_length[b] or kv_idx <= q_idx``; ``prefix_length`` shape ``(B,)``."""
  prefix_length: jax.Array

  def __call__(self, b, h, q_idx, kv_idx):
    p = take(self.prefix_length, b)
    return (kv_idx < p) | (kv_idx <= q_idx)

  def tile_visibility(self, block_q, block_k, q_len, kv_len):
    q_lo, q_hi = _ranges(block_q, q_len)
    k_lo, k_hi = _ranges(block_k, kv_len)
    p = self.prefix_length[:, None, None, None]
    any_ = (k_lo[None, :] < p) | (k_lo[None, :] <= q_hi[:, None])
    all_ = (k_hi[None, :] < p) | (k_hi[None, :] <= q_lo[:, None])
    return any_, all_


@_pytree(data=("q_doc_ids", "kv_doc_ids"))
class DocumentMask:
  """Keep ``q_doc_ids[b, q_idx] == kv_doc_ids[b, kv_idx]``; ids ``(B, S)`` (``B`` may be 1)."""
  q_doc_ids: jax.Array
  kv_doc_ids: jax.Array

  def __call__(self, b, h, q_idx, kv_idx):
    return take(self.q_doc_ids, b, q_idx) == take(self.kv_doc_ids, b, kv_idx)

  def tile_visibility(self, block_q, block_k, q_len, kv_len):
    q_min, q_max = _block_min_max(self.q_doc_ids[:, :q_len], block_q)
    k_min, k_max = _block_min_max(self.kv_doc_ids[:, :kv_len], block_k)
    # Disjoint id ranges cannot share a document; one id on both sides makes the tile full.
    any_ = (q_min[:, :, None] <= k_max[:, None, :]) & (k_min[:, None, :] <= q_max[:, :, None])
    all_ = ((q_min == q_max)[:, :, None] & (k_min == k_max)[:, None, :]
            & (q_min[:, :, None] == k_min[:, None, :]))
    return any_[:, None], all_[:, None]


@_pytree(data=("lengths",))
class PaddingLengthMask:
  """Keep ``kv_idx < lengths[b]`` (right padding); ``lengths`` int32 ``(B,)`` (``B`` may be 1)."""
  lengths: jax.Array

  def __call__(self, b, h, q_idx, kv_idx):
    return kv_idx < take(self.lengths, b)

  def tile_visibility(self, block_q, block_k, q_len, kv_len):
    k_lo, k_hi = _ranges(block_k, kv_len)
    n = self.lengths[:, None, None, None]
    return k_lo < n, k_hi < n        # (B, 1, 1, nk): exact


@_pytree(data=("valid",))
class PaddingMask:
  """Keep ``valid[b, kv_idx]``; ``valid`` bool ``(B, Sk)`` (``B`` may be 1), True = a real token."""
  valid: jax.Array

  def __call__(self, b, h, q_idx, kv_idx):
    return jnp.asarray(take(self.valid, b, kv_idx), bool)

  def tile_visibility(self, block_q, block_k, q_len, kv_len):
    v = jnp.asarray(self.valid[:, :kv_len], bool)
    if v.shape[1] < kv_len:   # read as __call__ reads it (clamped); check_mod_shapes forbids this
      v = jnp.pad(v, ((0, 0), (0, kv_len - v.shape[1])), mode="edge")
    any_, all_ = _tiles_along(v, 1, block_k, kv_len)
    return any_[:, None, None, :], all_[:, None, None, :]   # (B, 1, 1, nk): exact


@_pytree(meta=("left", "right", "offset"))
class LocalWindowMask:
  """Keep ``-right <= q_idx + offset - kv_idx <= left`` (a two-sided window around the diagonal)."""
  left: int
  right: int
  offset: int = 0

  def __call__(self, b, h, q_idx, kv_idx):
    return _in_band(q_idx, kv_idx, self.offset, -self.right, self.left)

  def tile_visibility(self, block_q, block_k, q_len, kv_len):
    return _band_tiles(block_q, block_k, q_len, kv_len, self.offset, -self.right, self.left)


@_pytree(data=("lengths",))
class QueryLengthMask:
  """Keep ``q_idx < lengths[b]``: queries past their row's length see no key (output 0).

  ``lengths`` int32 ``(B,)`` (``B`` may be 1); ``jax.nn.dot_product_attention``'s
  ``query_seq_lengths``.
  """
  lengths: jax.Array

  def __call__(self, b, h, q_idx, kv_idx):
    return q_idx < take(self.lengths, b)

  def tile_visibility(self, block_q, block_k, q_len, kv_len):
    q_lo, q_hi = _ranges(block_q, q_len)
    n = self.lengths[:, None, None, None]
    return q_lo[:, None] < n, q_hi[:, None] < n        # (B, 1, nq, 1): exact


def _tiles_along(m: jax.Array, axis: int, block: int, length: int) -> tuple[jax.Array, jax.Array]:
  """Per-block (any, all) of boolean ``m`` along ``axis`` over its first ``length`` positions.

  A size-1 (broadcast) axis stays size 1. Positions past ``length`` (a ragged last block) count
  neither for ``any`` nor against ``all`` (the tile is ragged anyway).
  """
  if m.shape[axis] == 1:
    return m, m
  m = jax.lax.slice_in_dim(m, 0, length, axis=axis)
  n = -(-length // block)
  pad = [(0, 0)] * m.ndim
  pad[axis] = (0, n * block - length)
  shape = m.shape[:axis] + (n, block) + m.shape[axis + 1:]
  any_ = jnp.pad(m, pad, constant_values=False).reshape(shape).any(axis + 1)
  all_ = jnp.pad(m, pad, constant_values=True).reshape(shape).all(axis + 1)
  return any_, all_


@_pytree(data=("mask",))
class ArrayMask:
  """Keep where ``mask[b, h, q_idx, kv_idx]``: a boolean array of rank 4 (size-1 axes broadcast).

  Tiles are classified from the array itself (exact), so block kernels skip the tiles it masks
  entirely and run the tiles it keeps entirely without the elementwise mask.
  """
  mask: jax.Array

  def __call__(self, b, h, q_idx, kv_idx):
    return jnp.asarray(take(self.mask, b, h, q_idx, kv_idx), bool)

  def tile_visibility(self, block_q, block_k, q_len, kv_len):
    m = jnp.asarray(self.mask, bool)
    any_q, all_q = _tiles_along(m, 2, block_q, q_len)
    any_, _ = _tiles_along(any_q, 3, block_k, kv_len)
    _, all_ = _tiles_along(all_q, 3, block_k, kv_len)
    return any_, all_       # (B', H', nq or 1, nk or 1)


@_pytree(data=("masks",))
class AndMask:
  """Keep where every mask keeps."""
  masks: tuple

  def __call__(self, b, h, q_idx, kv_idx):
    out = jnp.asarray(self.masks[0](b, h, q_idx, kv_idx), bool)
    for m in self.masks[1:]:
      out = out & jnp.asarray(m(b, h, q_idx, kv_idx), bool)
    return out


@_pytree(data=("masks",))
class OrMask:
  """Keep where any mask keeps.

  Tiles (in :func:`~attnax.kernels.create_block_mask`): a tile is empty when every part's is,
  full when some part's is.
  """
  masks: tuple

  def __call__(self, b, h, q_idx, kv_idx):
    out = jnp.asarray(self.masks[0](b, h, q_idx, kv_idx), bool)
    for m in self.masks[1:]:
      out = out | jnp.asarray(m(b, h, q_idx, kv_idx), bool)
    return out


def _flat_masks(masks, cls, fn):
  flat = []
  for m in masks:
    if m is None:
      continue
    check_mod(m, 4, f"{fn}: every mask")
    flat.extend(m.masks if isinstance(m, cls) else (m,))
  if not flat:
    return None
  return flat[0] if len(flat) == 1 else cls(tuple(flat))


def and_masks(*masks: Any) -> Any:
  """The conjunction of mask mods: keep where every one keeps.

  Nested conjunctions are flattened and ``None`` entries dropped; returns ``None`` when nothing is
  left and the mask itself when one is. Arguments are mask mods ``(b, h, q_idx, kv_idx)``, not score
  mods (``causal_mod().mask_mod`` is the mask of ``causal_mod()``).
  """
  return _flat_masks(masks, AndMask, "and_masks")


def or_masks(*masks: Any) -> Any:
  """The disjunction of mask mods: keep where any one keeps.

  Nested disjunctions are flattened and ``None`` entries dropped; returns ``None`` when nothing is
  left and the mask itself when one is. Block sparsity is kept: a tile is skipped when every mask
  skips it and runs without the elementwise mask when one mask sees all of it. Example: causal
  attention plus a few global keys,
  ``mask_mod_to_score_mod(or_masks(causal_mod().mask_mod, lambda b, h, i, j: j < 4))``.
  """
  return _flat_masks(masks, OrMask, "or_masks")


# ----------------------------------------------------------------------------- score mods


@_pytree(data=("mask_mod",))
class MaskScoreMod:
  """A score mod that sends masked scores to ``MASK_VALUE`` and carries its mask mod."""
  mask_mod: Any

  def __call__(self, score, b, h, q_idx, kv_idx):
    return jnp.where(self.mask_mod(b, h, q_idx, kv_idx), score, MASK_VALUE)


@_pytree(data=("slopes",))
class AlibiMod:
  """``score + slopes[h] * (kv_idx - q_idx)``."""
  slopes: jax.Array

  def __call__(self, score, b, h, q_idx, kv_idx):
    return score + take(self.slopes, h) * (kv_idx - q_idx).astype(jnp.float32)


@_pytree(data=("bias",))
class AdditiveBiasMod:
  """``score + bias[b, h, q_idx, kv_idx]`` with ``bias`` of rank 4 (size-1 axes broadcast)."""
  bias: jax.Array

  def __call__(self, score, b, h, q_idx, kv_idx):
    return score + take(self.bias, b, h, q_idx, kv_idx).astype(jnp.float32)


@_pytree(meta=("cap",))
class SoftcapMod:
  """Logit soft-capping: ``cap * tanh(score / cap)`` (Gemma 2, Grok); ``cap`` a static float."""
  cap: float

  def __call__(self, score, b, h, q_idx, kv_idx):
    return self.cap * jnp.tanh(score / self.cap)


@_pytree(data=("mods",))
class ComposedScoreMod:
  """Applies ``mods`` in order."""
  mods: tuple

  def __call__(self, score, b, h, q_idx, kv_idx):
    for m in self.mods:
      score = m(score, b, h, q_idx, kv_idx)
    return score


# ----------------------------------------------------------------------------- factories


# Offsets and windows are added to int32 positions: beyond +-2**30 they mean "everything" or
# "nothing" for any sequence a kernel can hold, so they are clipped there and never overflow.
_MAX_OFFSET = 2 ** 30


def _offset(offset: Any, name: str = "causal_mod") -> int:
  value = _checks.static_int(f"{name}: offset", offset)
  return max(-_MAX_OFFSET, min(_MAX_OFFSET, value))


def causal_mod(offset: int = 0) -> MaskScoreMod:
  """Causal mask: keep ``kv_idx <= q_idx + offset``.

  ``offset = Sk - Sq`` aligns the diagonal to the bottom right (xFormers' ``FromBottomRight``),
  as decoding with a cache needs.
  """
  return MaskScoreMod(CausalMask(_offset(offset)))


def sliding_window_mod(window_size: int, offset: int = 0) -> MaskScoreMod:
  """Causal local attention: keep ``0 <= q_idx + offset - kv_idx < window_size``.

  Each query sees ``window_size`` keys, its own position included.
  """
  window_size = _checks.static_int("sliding_window_mod: window_size", window_size)
  if window_size < 1:
    raise ValueError(f"window_size must be >= 1, got {window_size}")
  return MaskScoreMod(SlidingWindowMask(min(window_size, _MAX_OFFSET),
                                        _offset(offset, "sliding_window_mod")))


def prefix_lm_mod(prefix_length: int | jax.Array) -> MaskScoreMod:
  """Prefix-LM: bidirectional over the first ``prefix_length`` keys, causal after.

  Args:
    prefix_length: a scalar, or one length per batch row, shape ``(B,)``.
  """
  p = jnp.asarray(prefix_length, jnp.int32)
  if p.ndim > 1:
    raise ValueError(f"prefix_length must be a scalar or shape (B,), got shape {p.shape}")
  return MaskScoreMod(PrefixLMMask(p.reshape(-1)))


def _doc_ids(ids, name):
  ids = jnp.asarray(ids)
  if ids.ndim not in (1, 2) or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"{name} must be integer ids of shape (B, S) or (S,), got {ids.dtype}{ids.shape}")
  return ids.astype(jnp.int32).reshape((-1, ids.shape[-1]))


def document_mask_mod(doc_ids: jax.Array, kv_doc_ids: jax.Array | None = None) -> MaskScoreMod:
  """Block-diagonal (packed documents) mask: keep ``doc_ids[b, q_idx] == kv_doc_ids[b, kv_idx]``.

  Args:
    doc_ids: integer document id of each query position, ``(B, Sq)`` or ``(Sq,)``.
    kv_doc_ids: the same for keys, ``(B, Sk)`` or ``(Sk,)``; defaults to ``doc_ids``.
  """
  q = _doc_ids(doc_ids, "doc_ids")
  kv = q if kv_doc_ids is None else _doc_ids(kv_doc_ids, "kv_doc_ids")
  if q.shape[0] != kv.shape[0] and 1 not in (q.shape[0], kv.shape[0]):
    raise ValueError(f"doc_ids {q.shape} and kv_doc_ids {kv.shape} disagree on the batch size")
  return MaskScoreMod(DocumentMask(q, kv))


def _is_tracer(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def padding_mask_mod(valid: Any) -> MaskScoreMod:
  """Padding mask: keys that are padding are masked, per batch row (BERT-style encoders).

  Block kernels skip the key tiles that are all padding and run the tiles that are all real tokens
  without the elementwise mask. A batch row with no real token gives output 0 (lse ``-inf``).

  Args:
    valid: either integer lengths ``(B,)`` (keys ``kv_idx < lengths[b]`` are real: right padding),
      or a boolean / 0-1 integer ``(B, Sk)`` array, True / 1 where a key is a real token (a Hugging
      Face ``attention_mask``; left or right padding, or any pattern). ``B`` may be 1. Queries are
      not masked: padded query positions attend as usual, and their outputs are the caller's to
      ignore.

  Raises:
    ValueError: ``valid`` is not of rank 1 or 2, a rank-1 array is not integer, a rank-2 array is
      neither boolean nor integer, or its values (when concrete) are negative lengths or not 0/1.
  """
  try:
    arr = jnp.asarray(valid)
  except (TypeError, ValueError):
    raise ValueError(f"padding_mask_mod: valid must be an array (lengths (B,) or a mask (B, Sk)), "
                     f"got {type(valid).__name__}") from None
  what = f"shape {tuple(arr.shape)} dtype {arr.dtype}"
  is_int = jnp.issubdtype(arr.dtype, jnp.integer)
  is_bool = arr.dtype == jnp.bool_
  if arr.ndim == 1:
    if not is_int:
      raise ValueError(f"padding_mask_mod: rank-1 valid must be integer lengths (B,), got {what}"
                       + ("; a boolean mask must be (B, Sk)" if is_bool else ""))
    if not _is_tracer(arr) and (np.asarray(arr) < 0).any():
      raise ValueError(f"padding_mask_mod: valid lengths must be >= 0, got {np.asarray(arr)}")
    return MaskScoreMod(PaddingLengthMask(arr.astype(jnp.int32)))
  if arr.ndim == 2:
    if not (is_int or is_bool):
      raise ValueError(f"padding_mask_mod: valid (B, Sk) must be boolean or 0/1 integer, "
                       f"got {what}")
    if is_int and not _is_tracer(arr) and not np.isin(np.asarray(arr), (0, 1)).all():
      raise ValueError(f"padding_mask_mod: integer valid ({what}) must hold only 0 and 1 "
                       "(1 = real token)")
    return MaskScoreMod(PaddingMask(arr != 0 if is_int else arr))
  raise ValueError(f"padding_mask_mod: valid must be lengths (B,) or a mask (B, Sk), got {what}")


def array_mask_mod(mask: Any) -> MaskScoreMod:
  """A boolean mask array as a mod: keep ``(b, h, q_idx, kv_idx)`` where ``mask`` is True.

  ``jax.nn.dot_product_attention``'s and Flax's ``mask=``. Block kernels classify tiles from the
  array, so the tiles it masks entirely are skipped (forward and backward) and the tiles it keeps
  entirely run without the elementwise mask.

  Args:
    mask: a boolean array broadcastable to ``(B, H, Sq, Sk)`` (``H`` counts query heads), of rank
      at most 4; missing leading axes are added, size-1 axes broadcast. Other axes must be the
      input's size (checked by every kernel against the inputs).

  Raises:
    ValueError: ``mask`` is not boolean or has rank above 4.
  """
  try:
    arr = jnp.asarray(mask)
  except (TypeError, ValueError):
    raise ValueError(f"array_mask_mod: mask must be a boolean array, got "
                     f"{type(mask).__name__}") from None
  if arr.dtype != jnp.bool_:
    raise ValueError(f"array_mask_mod: mask must be boolean (True = attend), got dtype "
                     f"{arr.dtype} shape {tuple(arr.shape)}; for 0/1 values pass mask != 0, for "
                     "an additive mask use additive_bias_mod")
  if arr.ndim > 4:
    raise ValueError(f"array_mask_mod: mask must have rank <= 4 (B, H, Sq, Sk), got shape "
                     f"{tuple(arr.shape)}")
  return MaskScoreMod(ArrayMask(arr.reshape((1,) * (4 - arr.ndim) + arr.shape)))


def _window_side(value: Any, name: str) -> int:
  if value is None:
    return _MAX_OFFSET
  value = _checks.static_int(f"local_window_mod: {name}", value)
  if value < 0:
    raise ValueError(f"local_window_mod: {name} must be >= 0 or None (unbounded), got {value}")
  return min(value, _MAX_OFFSET)


def local_window_mod(left: int | None, right: int | None, offset: int = 0) -> MaskScoreMod:
  """Two-sided local attention: keep ``-right <= q_idx + offset - kv_idx <= left``.

  Query ``i`` sees keys ``i + offset - left`` through ``i + offset + right``: ``left + right + 1``
  keys, its own position included. This is ``jax.nn.dot_product_attention``'s
  ``local_window_size=(left, right)``; ``local_window_mod(w - 1, 0)`` is
  ``sliding_window_mod(w)`` and ``local_window_mod(None, 0)`` is ``causal_mod()``. Block kernels
  visit only the tiles that meet the band.

  Args:
    left: keys visible before the query (static int >= 0), or None for no bound.
    right: keys visible after the query (static int >= 0), or None for no bound.
    offset: shifts the query positions (``Sk - Sq`` centres the band on the bottom-right
      diagonal).
  """
  return MaskScoreMod(LocalWindowMask(_window_side(left, "left"), _window_side(right, "right"),
                                      _offset(offset, "local_window_mod")))


def softcap_mod(cap: float) -> SoftcapMod:
  """Logit soft-capping: ``score -> cap * tanh(score / cap)`` (Gemma 2's attention soft-cap).

  Compose it with other mods (:func:`compose_score_mods`); kernels apply the masks a composition
  carries after its score part, so where mask mods sit in the composition does not matter.

  Args:
    cap: a positive, finite Python number (static: a new value retraces).

  Raises:
    ValueError: ``cap`` is not a real number (a bool, a string, an array) or is not finite and > 0.
  """
  if isinstance(cap, bool) or not isinstance(cap, numbers.Real):
    raise ValueError(f"softcap_mod: cap must be a positive Python float, got {cap!r} "
                     f"({type(cap).__name__})")
  cap = float(cap)
  if not (math.isfinite(cap) and cap > 0):
    raise ValueError(f"softcap_mod: cap must be finite and > 0, got {cap}")
  return SoftcapMod(cap)


def alibi_slopes(num_heads: int) -> jax.Array:
  """The ALiBi paper's geometric head slopes, f32 ``(num_heads,)``.

  For ``n`` a power of two the slopes are ``2 ** (-8 i / n)``, ``i = 1..n``; otherwise the slopes of
  the largest power of two below ``n`` followed by every other slope of twice that power.
  """
  if int(num_heads) < 1:
    raise ValueError(f"num_heads must be >= 1, got {num_heads}")

  def pow2(n):
    start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
    return [start ** (i + 1) for i in range(n)]

  def slopes(n):
    if math.log2(n).is_integer():
      return pow2(n)
    closest = 2 ** math.floor(math.log2(n))
    return pow2(closest) + slopes(2 * closest)[0::2][: n - closest]

  return jnp.asarray(slopes(int(num_heads)), jnp.float32)


def alibi_mod(num_heads: int | None = None, slopes: jax.Array | None = None) -> AlibiMod:
  """ALiBi: ``score + slopes[h] * (kv_idx - q_idx)``.

  Give ``num_heads`` for the paper's slopes (:func:`alibi_slopes`) or ``slopes`` ``(H,)``.
  """
  if (num_heads is None) == (slopes is None):
    raise ValueError("alibi_mod takes exactly one of num_heads= or slopes=")
  s = alibi_slopes(num_heads) if slopes is None else jnp.asarray(slopes, jnp.float32)
  if s.ndim != 1:
    raise ValueError(f"slopes must have shape (H,), got {s.shape}")
  return AlibiMod(s)


def additive_bias_mod(bias: jax.Array) -> AdditiveBiasMod:
  """``score + bias[b, h, q_idx, kv_idx]``; ``bias`` broadcastable to ``(B, H, Sq, Sk)``."""
  bias = jnp.asarray(bias)
  if bias.ndim > 4:
    raise ValueError(f"bias must have rank <= 4 (B, H, Sq, Sk), got shape {bias.shape}")
  return AdditiveBiasMod(bias.reshape((1,) * (4 - bias.ndim) + bias.shape))


def compose_score_mods(*mods: Any) -> Any:
  """Compose score mods; they apply in the order given. ``None`` entries are skipped."""
  flat = []
  for m in mods:
    if m is None:
      continue
    check_mod(m, 5, "score_mod")
    flat.extend(m.mods if isinstance(m, ComposedScoreMod) else (m,))
  if not flat:
    return None
  return flat[0] if len(flat) == 1 else ComposedScoreMod(tuple(flat))


def mask_mod_to_score_mod(mask_mod: Any) -> MaskScoreMod:
  """A score mod that maps the scores ``mask_mod`` rejects to the mask value (it carries the mask)."""
  check_mod(mask_mod, 4, "mask_mod")
  return MaskScoreMod(mask_mod)


def mask_mod_to_boolean_mask(mask_mod: Any, batch: int, heads: int, q_len: int,
                             kv_len: int) -> jax.Array:
  """Materialise ``mask_mod`` as booleans ``(batch, heads, q_len, kv_len)`` (small inputs only).

  A mask returning ints or floats is read as non-zero = visible, as every kernel reads it.
  """
  check_mod(mask_mod, 4, "mask_mod")
  b, h, i, j = index_grid(batch, heads, q_len, kv_len)
  return jnp.broadcast_to(jnp.asarray(mask_mod(b, h, i, j), bool), (batch, heads, q_len, kv_len))


# ----------------------------------------------------------------------------- kernel plumbing


# ----------------------------------------------------------------------------- shifted positions
#
# A kernel that computes one block of a larger attention (a ring step: local queries against the
# K/V shard a device holds) sees local indices; the mods must see the block's absolute ones. The
# shift is a traced int32 vector ``offsets = (batch row, query position, key position)`` carried as
# a mod array, so one compiled kernel serves every step.


@_pytree(data=("score_mod", "offsets"))
class ShiftedScoreMod:
  """``score_mod`` evaluated at ``(b + offsets[0], h, q_idx + offsets[1], kv_idx + offsets[2])``."""
  score_mod: Any
  offsets: jax.Array

  def __call__(self, s, b, h, q_idx, kv_idx):
    o = self.offsets
    return self.score_mod(s, b + o[0], h, q_idx + o[1], kv_idx + o[2])


def _rows(arr: jax.Array, start: Any, size: int) -> jax.Array:
  """Rows ``start .. start + size`` of a ``(B', ...)`` array whose batch axis may broadcast."""
  return arr if arr.shape[0] == 1 else jax.lax.dynamic_slice_in_dim(arr, start, size, 0)


@_pytree(data=("mask_mod", "offsets"), meta=("batch", "heads"))
class ShiftedMask:
  """``mask_mod`` at shifted indices, as :class:`ShiftedScoreMod`; one leaf mask (not And/Or).

  Its tiles come from the leaf's own rule moved by the offsets (band masks: a new diagonal
  offset; document ids and lengths: the local slice), exact and cheap; any other mask is
  evaluated elementwise (``batch``/``heads``: the local block's sizes, for that evaluation).
  """
  mask_mod: Any
  offsets: jax.Array
  batch: int = 1
  heads: int = 1

  def __call__(self, b, h, q_idx, kv_idx):
    o = self.offsets
    return self.mask_mod(b + o[0], h, q_idx + o[1], kv_idx + o[2])

  def local_mask(self, q_len: int, kv_len: int) -> Any:
    """The same mask on local indices where its rule shifts in closed form, else None."""
    m, (b0, q0, k0) = self.mask_mod, (self.offsets[0], self.offsets[1], self.offsets[2])
    if isinstance(m, (CausalMask, SlidingWindowMask, LocalWindowMask)):
      return dataclasses.replace(m, offset=m.offset + q0 - k0)
    if isinstance(m, DocumentMask):
      cut = lambda ids, start, n: jax.lax.dynamic_slice_in_dim(_rows(ids, b0, self.batch),
                                                               start, n, 1)
      return DocumentMask(cut(m.q_doc_ids, q0, q_len), cut(m.kv_doc_ids, k0, kv_len))
    if isinstance(m, PaddingLengthMask):
      return PaddingLengthMask(_rows(m.lengths, b0, self.batch) - k0)
    if isinstance(m, QueryLengthMask):
      return QueryLengthMask(_rows(m.lengths, b0, self.batch) - q0)
    return None

  def tile_visibility(self, block_q, block_k, q_len, kv_len):
    local = self.local_mask(q_len, kv_len)
    if local is not None:
      return local.tile_visibility(block_q, block_k, q_len, kv_len)
    from attnax.kernels import block_mask   # noqa: PLC0415 (block_mask imports this module)
    return block_mask.evaluate_tiles(self, self.batch, self.heads, block_q, block_k, q_len,
                                     kv_len)


def shift_mods(score_mod: Any, mask_mod: Any, offsets: jax.Array, *, batch: int,
               heads: int) -> tuple[Any, Any]:
  """``(score_mod, mask_mod)`` seen at positions moved by ``offsets`` (int32 ``(3,)``: batch row,
  query position, key position); conjunctions and disjunctions are shifted part by part, so each
  part keeps its tile rule. ``batch``/``heads``: the local block's sizes."""
  def mask(m):
    if m is None:
      return None
    if isinstance(m, (AndMask, OrMask)):
      return type(m)(tuple(mask(x) for x in m.masks))
    return ShiftedMask(m, offsets, batch, heads)
  return (None if score_mod is None else ShiftedScoreMod(score_mod, offsets)), mask(mask_mod)


def index_grid(batch: int, heads: int, q_len: int, kv_len: int, q_offset=0, kv_offset=0):
  """int32 index arrays ``(B,1,1,1)``, ``(1,H,1,1)``, ``(1,1,Sq,1)``, ``(1,1,1,Sk)``."""
  i32 = jnp.int32
  return (jnp.arange(batch, dtype=i32).reshape(-1, 1, 1, 1),
          jnp.arange(heads, dtype=i32).reshape(1, -1, 1, 1),
          (q_offset + jnp.arange(q_len, dtype=i32)).reshape(1, 1, -1, 1),
          (kv_offset + jnp.arange(kv_len, dtype=i32)).reshape(1, 1, 1, -1))


def check_mod(mod: Any, nargs: int, name: str) -> None:
  """ValueError unless ``mod`` is callable with ``nargs`` positional arguments."""
  if mod is None:
    return
  if not callable(mod):
    raise ValueError(f"{name} must be callable, got {type(mod).__name__}")
  try:
    inspect.signature(mod).bind(*range(nargs))
  except TypeError as e:
    expected = ("(score, b, h, q_idx, kv_idx)" if nargs == 5 else "(b, h, q_idx, kv_idx)")
    raise ValueError(f"{name} must have the signature {expected}: {e}") from None
  except ValueError:  # builtins without a signature
    pass


def check_mod_shapes(mod: Any, *, batch: int | None, heads: int | None, q_len: int, kv_len: int,
                     name: str = "score_mod") -> None:
  """ValueError unless the arrays a mod carries can be indexed for these input sizes.

  Indexing inside a mod clamps out-of-range positions silently (a traced gather cannot raise), so
  document ids shorter than the sequence, ALiBi slopes for fewer heads, or a bias for another batch
  would otherwise be misread. Batch/head axes must be 1 or the input's size; position axes must
  cover the input (longer is fine: positions past it are never read). ``batch``/``heads`` ``None``
  skip those axes. A mod with a ``check_shapes(batch=, heads=, q_len=, kv_len=, name=)`` method
  checks itself; mods of other types (a user's function, a wrapper) are not inspected.
  """
  def fail(what, shape, want):
    raise ValueError(f"{name}: {what} has shape {tuple(shape)}, which does not fit inputs with "
                     f"batch={batch}, heads={heads}, q_len={q_len}, kv_len={kv_len} ({want})")

  def lead(what, shape, axis, size, label):
    if size is not None and shape[axis] not in (1, size):
      fail(what, shape, f"axis {axis} must be 1 or {label}={size}")

  def positions(what, shape, axis, size, label):
    if shape[axis] != 1 and shape[axis] < size:
      fail(what, shape, f"axis {axis} must be 1 or at least {label}={size}")

  if isinstance(mod, MaskScoreMod):
    check_mod_shapes(mod.mask_mod, batch=batch, heads=heads, q_len=q_len, kv_len=kv_len,
                     name=name)
  elif isinstance(mod, (ComposedScoreMod, AndMask, OrMask)):
    for m in (mod.mods if isinstance(mod, ComposedScoreMod) else mod.masks):
      check_mod_shapes(m, batch=batch, heads=heads, q_len=q_len, kv_len=kv_len, name=name)
  elif isinstance(mod, DocumentMask):
    for what, ids, size, label in (("doc_ids", mod.q_doc_ids, q_len, "q_len"),
                                   ("kv_doc_ids", mod.kv_doc_ids, kv_len, "kv_len")):
      lead(what, ids.shape, 0, batch, "batch")
      if ids.shape[1] < size:
        fail(what, ids.shape, f"one id per position: at least {label}={size}")
  elif isinstance(mod, PrefixLMMask):
    lead("prefix_length", mod.prefix_length.shape, 0, batch, "batch")
  elif isinstance(mod, PaddingLengthMask):
    lead("padding lengths (valid)", mod.lengths.shape, 0, batch, "batch")
  elif isinstance(mod, PaddingMask):
    lead("padding mask (valid)", mod.valid.shape, 0, batch, "batch")
    if mod.valid.shape[1] < kv_len:
      fail("padding mask (valid)", mod.valid.shape, f"one entry per key: at least kv_len={kv_len}")
  elif isinstance(mod, QueryLengthMask):
    lead("query lengths", mod.lengths.shape, 0, batch, "batch")
  elif isinstance(mod, ArrayMask):
    shape = mod.mask.shape
    lead("mask", shape, 0, batch, "batch")
    lead("mask", shape, 1, heads, "heads")
    positions("mask", shape, 2, q_len, "q_len")
    positions("mask", shape, 3, kv_len, "kv_len")
  elif isinstance(mod, AlibiMod):
    lead("ALiBi slopes", mod.slopes.shape, 0, heads, "heads")
  elif isinstance(mod, AdditiveBiasMod):
    shape = mod.bias.shape
    lead("bias", shape, 0, batch, "batch")
    lead("bias", shape, 1, heads, "heads")
    positions("bias", shape, 2, q_len, "q_len")
    positions("bias", shape, 3, kv_len, "kv_len")
  elif callable(getattr(mod, "check_shapes", None)):
    # A mod that knows its own arrays' shapes (attnax.kernels.gated): it raises the ValueError.
    mod.check_shapes(batch=batch, heads=heads, q_len=q_len, kv_len=kv_len, name=name)


def split_score_mod(score_mod: Any) -> tuple[Any, Any]:
  """Split a score mod into ``(score part, mask part)``.

  The mask part is the conjunction of the mask mods the mod carries (block sparsity comes from it);
  the score part is what remains (``None`` when nothing remains). A user's own function is all
  score part: it is treated as dense.
  """
  if score_mod is None:
    return None, None
  if isinstance(score_mod, MaskScoreMod):
    return None, score_mod.mask_mod
  if isinstance(score_mod, ComposedScoreMod):
    scores, masks = [], []
    for m in score_mod.mods:
      s, k = split_score_mod(m)
      if s is not None:
        scores.append(s)
      masks.append(k)
    return compose_score_mods(*scores), and_masks(*masks)
  return score_mod, None


def resolve_mods(score_mod: Any, mask_mod: Any, *, batch: int | None = None,
                 heads: int | None = None, q_len: int | None = None,
                 kv_len: int | None = None) -> tuple[Any, Any]:
  """Check the mods and return ``(score part, combined mask mod)`` for a kernel.

  With ``q_len``/``kv_len`` (and optionally ``batch``/``heads``) the arrays the mods carry are also
  checked against the input sizes (:func:`check_mod_shapes`).
  """
  check_mod(score_mod, 5, "score_mod")
  check_mod(mask_mod, 4, "mask_mod")
  if q_len is not None and kv_len is not None:
    for name, mod in (("score_mod", score_mod), ("mask_mod", mask_mod)):
      check_mod_shapes(mod, batch=batch, heads=heads, q_len=q_len, kv_len=kv_len, name=name)
  score_part, carried = split_score_mod(score_mod)
  return score_part, and_masks(carried, mask_mod)
