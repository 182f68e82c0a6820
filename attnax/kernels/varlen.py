"""Variable-length (packed) sequences: lengths / ``cu_seqlens`` <-> document ids; pack and split.

Packed layout (flash-attention's varlen functions, xFormers' ``BlockDiagonalMask.from_seqlens``):
the sequences of a batch are concatenated along the sequence axis, and ``cu_seqlens`` (int, length
``n + 1``, ``cu_seqlens[0] == 0``) gives where each starts. attnax turns that into a document mask
(:func:`~attnax.kernels.score_mods.document_mask_mod`), whose BlockMask skips every tile that lies
between two documents, so packed attention costs the sum of the per-document costs.

Positions past ``cu_seqlens[-1]`` (padding of the packed buffer) belong to no document: query
padding gets id ``n`` and key padding id ``n + 1``, so padding rows see nothing (output 0) and no
real query sees padding keys.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attnax.kernels import score_mods as sm

__all__ = [
    "seqlens_to_cu_seqlens", "seqlens_to_doc_ids", "cu_seqlens_to_doc_ids", "varlen_mask_mod",
    "pack_sequences", "unpack_sequences",
]


def _as_cu(cu_seqlens: Any, name: str = "cu_seqlens", *, length: int | None = None,
           length_name: str = "total_len") -> jax.Array:
  """``cu_seqlens`` as int32, checked: 1-D, integer and, where concrete (not traced), starting at 0,
  non-decreasing, non-negative and (with ``length``) ending at or before ``length``."""
  cu = jnp.asarray(cu_seqlens)
  if cu.ndim != 1 or cu.shape[0] < 2 or not jnp.issubdtype(cu.dtype, jnp.integer):
    raise ValueError(f"{name} must be a 1-D integer array of length n + 1 >= 2, got "
                     f"{cu.dtype}{tuple(cu.shape)}")
  if not isinstance(cu, jax.core.Tracer):
    c = np.asarray(cu).astype(np.int64)
    shown = f"{name} {tuple(cu.shape)} = {c.tolist()}"
    if np.any(c < 0):
      raise ValueError(f"{name} must have no negative entries, got {shown}")
    if c[0] != 0:
      raise ValueError(f"{name} must start at 0, got {shown}")
    if np.any(np.diff(c) < 0):
      i = int(np.flatnonzero(np.diff(c) < 0)[0])
      raise ValueError(f"{name} must be non-decreasing, got {shown} ({name}[{i + 1}] = "
                       f"{c[i + 1]} < {name}[{i}] = {c[i]})")
    if length is not None and c[-1] > length:
      raise ValueError(f"{name} ends at {c[-1]}, past the sequence length {length_name}={length}; "
                       f"got {shown}")
  return cu.astype(jnp.int32)


def _total(cu: jax.Array, total_len: int | None, name: str) -> int:
  if total_len is not None:
    return int(total_len)
  try:
    return int(np.asarray(cu)[-1])
  except jax.errors.TracerArrayConversionError:
    raise ValueError(f"{name} is traced: pass total_len= (the packed length) explicitly") from None


def seqlens_to_cu_seqlens(seqlens: Any) -> jax.Array:
  """Lengths ``(n,)`` -> cumulative offsets ``(n + 1,)`` starting at 0 (int32)."""
  s = jnp.asarray(seqlens)
  if s.ndim != 1 or not jnp.issubdtype(s.dtype, jnp.integer):
    raise ValueError(f"seqlens must be a 1-D integer array, got {s.dtype}{tuple(s.shape)}")
  if not isinstance(s, jax.core.Tracer) and np.any(np.asarray(s) < 0):
    raise ValueError(f"seqlens must be non-negative, got seqlens {tuple(s.shape)} = "
                     f"{np.asarray(s).tolist()}")
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(s.astype(jnp.int32))])


def cu_seqlens_to_doc_ids(cu_seqlens: Any, total_len: int | None = None, *,
                          pad_id: int | None = None) -> jax.Array:
  """Document id of every packed position, int32 ``(total_len,)``.

  Args:
    cu_seqlens: ``(n + 1,)`` offsets, ``cu_seqlens[0] == 0``, non-decreasing,
      ``cu_seqlens[-1] <= total_len``.
    total_len: length of the packed axis (static); defaults to ``cu_seqlens[-1]`` (needs a
      concrete array).
    pad_id: id of positions at or past ``cu_seqlens[-1]``; defaults to ``n``.

  Raises:
    ValueError: where ``cu_seqlens`` is concrete and breaks the rules above (under ``jit`` it is
      not checked).
  """
  cu = _as_cu(cu_seqlens, length=None if total_len is None else int(total_len))
  n = cu.shape[0] - 1
  total = _total(cu, total_len, "cu_seqlens")
  pos = jnp.arange(total, dtype=jnp.int32)
  ids = jnp.searchsorted(cu[1:], pos, side="right").astype(jnp.int32)
  if pad_id is not None:
    ids = jnp.where(pos >= cu[-1], jnp.int32(pad_id), ids)
  return ids


def seqlens_to_doc_ids(seqlens: Any, total_len: int | None = None, *,
                       pad_id: int | None = None) -> jax.Array:
  """Document id of every packed position from per-sequence lengths ``(n,)``."""
  cu = seqlens_to_cu_seqlens(seqlens)
  if total_len is None:
    try:
      total_len = int(np.asarray(seqlens).sum())
    except jax.errors.TracerArrayConversionError:
      raise ValueError("seqlens is traced: pass total_len= explicitly") from None
  return cu_seqlens_to_doc_ids(cu, total_len, pad_id=pad_id)


def varlen_mask_mod(cu_seqlens_q: Any, cu_seqlens_k: Any = None, *, q_len: int,
                    kv_len: int | None = None, batch: int | None = None) -> sm.DocumentMask:
  """The document :class:`~attnax.kernels.score_mods.DocumentMask` of packed sequences.

  Query ``i`` of sequence ``d`` sees key ``j`` of the same sequence ``d`` (``cu_seqlens_k`` gives
  the key offsets; it defaults to ``cu_seqlens_q``). Padding past the last offset sees nothing.

  Args:
    cu_seqlens_q, cu_seqlens_k: ``(n + 1,)`` offsets (see :func:`cu_seqlens_to_doc_ids`), ending
      at or before ``q_len`` / ``kv_len``.
    q_len, kv_len: lengths of the packed query / key axes (``kv_len`` defaults to ``q_len``).
    batch: the batch size of the inputs the mask is for, if known. Packed sequences are one
      segmentation of a single row, so ``batch`` must be 1 (``None`` skips the check): the mask
      would otherwise apply the same segmentation to every row.

  Raises:
    ValueError: ``batch`` not 1, offsets that disagree in count, and (where concrete) offsets that
      do not start at 0, decrease, are negative, or end past ``q_len`` / ``kv_len``.
  """
  if batch is not None and batch != 1:
    raise ValueError(f"cu_seqlens_q {tuple(jnp.shape(cu_seqlens_q))} describes the packed "
                     f"sequences of one batch row, but the inputs have batch={batch}: pack every "
                     "sequence into one row (batch 1, see pack_sequences) or use a per-row "
                     "document_mask_mod")
  kv_len = q_len if kv_len is None else kv_len
  cu_q = _as_cu(cu_seqlens_q, "cu_seqlens_q", length=q_len, length_name="q_len")
  cu_k = (_as_cu(cu_seqlens_q, "cu_seqlens_q", length=kv_len, length_name="kv_len")
          if cu_seqlens_k is None else
          _as_cu(cu_seqlens_k, "cu_seqlens_k", length=kv_len, length_name="kv_len"))
  if cu_q.shape != cu_k.shape:
    raise ValueError(f"cu_seqlens_q {tuple(cu_q.shape)} and cu_seqlens_k {tuple(cu_k.shape)} "
                     "must describe the same number of sequences")
  n = cu_q.shape[0] - 1
  q_ids = cu_seqlens_to_doc_ids(cu_q, q_len, pad_id=n)
  kv_ids = cu_seqlens_to_doc_ids(cu_k, kv_len, pad_id=n + 1)
  return sm.DocumentMask(q_ids[None], kv_ids[None])


def pack_sequences(seqs: Sequence[Any], axis: int = -2) -> tuple[jax.Array, jax.Array]:
  """Concatenate sequences along ``axis`` (the sequence axis of ``(..., S_i, D)``).

  Returns ``(packed, cu_seqlens)``: e.g. ``(H, S_i, D)`` sequences -> ``(H, sum S_i, D)``; add a
  batch axis (``packed[None]``) for the kernels' ``(1, H, S, D)`` layout.
  """
  seqs = [jnp.asarray(s) for s in seqs]
  if not seqs:
    raise ValueError("pack_sequences needs at least one sequence")
  ref = seqs[0]
  for i, s in enumerate(seqs):
    if s.ndim != ref.ndim or s.dtype != ref.dtype:
      raise ValueError(f"sequence {i} has {s.dtype}{tuple(s.shape)}, sequence 0 "
                       f"{ref.dtype}{tuple(ref.shape)}")
    a = axis % s.ndim
    if s.shape[:a] + s.shape[a + 1:] != ref.shape[:a] + ref.shape[a + 1:]:
      raise ValueError(f"sequence {i} shape {tuple(s.shape)} differs from sequence 0 "
                       f"{tuple(ref.shape)} outside axis {axis}")
  lengths = np.array([s.shape[axis] for s in seqs], np.int32)
  cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
  return jnp.concatenate(seqs, axis=axis), jnp.asarray(cu)


def unpack_sequences(packed: Any, cu_seqlens: Any, axis: int = -2) -> list[jax.Array]:
  """Split a packed array back into its sequences (``cu_seqlens`` must be concrete)."""
  try:
    cu = np.asarray(cu_seqlens).astype(np.int64)
  except jax.errors.TracerArrayConversionError:
    raise ValueError("unpack_sequences needs concrete cu_seqlens (the output shapes depend on "
                     "them)") from None
  if cu.ndim != 1 or cu.shape[0] < 2 or cu[0] != 0 or np.any(np.diff(cu) < 0):
    raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu.tolist()}")
  if cu[-1] > packed.shape[axis]:
    raise ValueError(f"cu_seqlens ends at {cu[-1]} but the packed axis has {packed.shape[axis]}")
  return [jax.lax.slice_in_dim(packed, int(a), int(b), axis=axis % packed.ndim)
          for a, b in zip(cu[:-1], cu[1:])]
