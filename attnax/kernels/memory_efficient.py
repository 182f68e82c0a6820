"""memory_efficient_attention: Rabe & Staats chunked attention in pure JAX (arXiv 2112.05682).

Queries are cut into chunks of ``query_chunk_size`` rows and keys into chunks of ``key_chunk_size``
columns. For one query chunk, a ``lax.scan`` walks the key chunks and folds each into a running
max / sum / accumulator (the online softmax of :mod:`attnax.kernels.tiles`); the per-key-chunk
computation is wrapped in ``jax.checkpoint``, so ordinary autodiff saves only the small carries and
recomputes the ``(query_chunk, key_chunk)`` scores in the backward. Peak memory is therefore
``O(query_chunk_size * key_chunk_size)`` per (batch, head), never ``O(Sq * Sk)``.

Sequence lengths need not be multiples of the chunk sizes, and nothing is padded (no position past
the end ever exists): the last chunk is shifted back to end at ``Sq`` (resp. ``Sk``) and overlaps
its predecessor. The last query chunk recomputes rows already done and discards them; the last key
chunk masks the keys already counted (they are invisible to it). So every chunk has one static
shape and the chunk computation is compiled once. Mods see absolute ``q_idx``/``kv_idx`` (chunk offset + position).
Grouped-query attention reshapes q to ``(B, Hkv, G, Sq, D)`` and folds the group into the rows of
each matmul; k and v are never repeated. Statistics and accumulators are f32 (f64 for float64
inputs). Dropout uses the mask of :func:`attnax.kernels.tiles.dropout_keep` (the reference's), and
autodiff through the checkpointed chunks regenerates it in the backward.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from attnax.kernels import _checks
from attnax.kernels import score_mods as sm
from attnax.kernels import tiles
from attnax.kernels.gqa import pack_gqa

__all__ = ["memory_efficient_attention"]


def _chunk_attention(q_c: jax.Array, q_start: Any, k: jax.Array, v: jax.Array, *, scale: float,
                     key_chunk: int, score_fn: Any, mask_fn: Any, b_idx: jax.Array,
                     h_idx: jax.Array, dropout_rate: float = 0.0,
                     seed: Any = None) -> tuple[jax.Array, jax.Array]:
  """Attention of one query chunk over every key chunk.

  Args:
    q_c: ``(B, Hkv, G, c, D)`` queries of the chunk starting at absolute row ``q_start``.
    k: ``(B, Hkv, Sk, D)``; v: ``(B, Hkv, Sk, Dv)``.
    b_idx, h_idx: int32 ``(B, 1, 1, 1, 1)`` and ``(1, Hkv, G, 1, 1)`` absolute batch / query head.

  Returns:
    ``(out, lse)``: out ``(B, Hkv, G, c, Dv)``, lse ``(B, Hkv, G, c)``, f32 (f64 for f64 inputs).
  """
  bsz, hkv, g, c, d = q_c.shape
  sk, dv = k.shape[2], v.shape[-1]
  q_idx = (q_start + jnp.arange(c, dtype=jnp.int32)).reshape(1, 1, 1, c, 1)
  q_rows = q_c.reshape(bsz, hkv, g * c, d)   # the group folded into the rows of the matmuls

  n = -(-sk // key_chunk)
  # Every key chunk has the same static size: when Sk is not a multiple of it, the last chunk
  # starts at Sk - key_chunk and masks the keys its predecessor already covered.
  overlap = sk % key_chunk != 0

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def step(carry, chunk):
    acc, m, l = carry
    k_start = jnp.minimum(chunk * key_chunk, sk - key_chunk)
    k_c = jax.lax.dynamic_slice_in_dim(k, k_start, key_chunk, axis=2)
    v_c = jax.lax.dynamic_slice_in_dim(v, k_start, key_chunk, axis=2)
    s = tiles.qk_dot(q_rows, k_c).reshape(bsz, hkv, g, c, key_chunk) * scale
    kv_idx = (k_start + jnp.arange(key_chunk, dtype=jnp.int32)).reshape(1, 1, 1, 1, key_chunk)
    chunk_mask = mask_fn
    if overlap:
      new_key = lambda j: j >= chunk * key_chunk
      chunk_mask = ((lambda b, h, i, j: new_key(j)) if mask_fn is None else
                    (lambda b, h, i, j: new_key(j) & jnp.asarray(mask_fn(b, h, i, j), bool)))
    s, visible = tiles.tile_scores(s, score_fn=score_fn, mask_fn=chunk_mask, b=b_idx, h=h_idx,
                                   q_idx=q_idx, kv_idx=kv_idx)
    p, alpha, m, l = tiles.online_softmax_step(s, visible, m, l)
    if dropout_rate:
      keep = tiles.dropout_keep(seed, dropout_rate, b_idx, h_idx, q_idx, kv_idx)
      p = tiles.apply_dropout(p, keep, dropout_rate)
    p = tiles.low_precision(p, v.dtype)
    pv = tiles.pv_dot(p.reshape(bsz, hkv, g * c, key_chunk), v_c).reshape(bsz, hkv, g, c, dv)
    return (acc * alpha[..., None] + pv, m, l), None

  acc_t = tiles.acc_dtype(q_c.dtype)
  m, l = tiles.init_stats((bsz, hkv, g, c), acc_t)
  carry = (jnp.zeros((bsz, hkv, g, c, dv), acc_t), m, l)
  carry, _ = jax.lax.scan(step, carry, jnp.arange(n, dtype=jnp.int32))
  return tiles.finalize(*carry)


def memory_efficient_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, score_mod: Any = None,
                               mask_mod: Any = None, scale: float | None = None,
                               return_lse: bool = False, query_chunk_size: int = 1024,
                               key_chunk_size: int = 4096, dropout_rate: float = 0.0,
                               dropout_rng: Any = None) -> Any:
  """Chunked attention with O(chunk) memory (Rabe & Staats): ``softmax(mod(scale * q k^T)) v``.

  Same result as :func:`~attnax.kernels.standard_attention` without materialising the
  ``(Sq, Sk)`` scores: queries are processed ``query_chunk_size`` rows at a time, keys
  ``key_chunk_size`` columns at a time, and key chunks are combined by their running max and sum.
  Each key chunk is ``jax.checkpoint``-ed, so the gradient (ordinary autodiff) recomputes the
  chunk's scores instead of storing them. Works under ``jit``, ``grad`` and ``vmap``; f32, bf16,
  f16 and float64 inputs.

  Args:
    q: ``(B, Hq, Sq, D)``.
    k: ``(B, Hkv, Sk, D)``, ``Hq % Hkv == 0`` (query head ``h`` reads kv head ``h // (Hq // Hkv)``).
    v: ``(B, Hkv, Sk, Dv)``.
    score_mod: :class:`~attnax.kernels.ScoreMod` applied to the scaled scores, with absolute
      ``q_idx``/``kv_idx``.
    mask_mod: :class:`~attnax.kernels.MaskMod`; False entries get probability 0.
    scale: score scale, default ``D ** -0.5``.
    return_lse: also return the log-sum-exp ``(B, Hq, Sq)`` (f32; f64 for float64 inputs).
    query_chunk_size: rows per query chunk (static); clipped to ``Sq``.
    key_chunk_size: columns per key chunk (static); clipped to ``Sk``.
    dropout_rate, dropout_rng: attention-weight dropout as in
      :func:`~attnax.kernels.standard_attention` (the same key drops the same weights).

  Returns:
    ``out`` ``(B, Hq, Sq, Dv)`` in q's dtype, or ``(out, lse)``. A query that sees no key gets
    output 0, lse ``-inf`` and zero gradients.
  """
  bsz, hq, hkv, sq, sk, d, dv = _checks.check_qkv(q, k, v, kernel="memory_efficient_attention",
                                                  allow_f64=True)
  dropout_rate, seed = _checks.check_dropout(dropout_rate, dropout_rng,
                                             kernel="memory_efficient_attention")
  scale = _checks.default_scale(scale, d)
  score_fn, mask_fn = sm.resolve_mods(score_mod, mask_mod, batch=bsz, heads=hq, q_len=sq,
                                      kv_len=sk)
  cq = min(_checks.check_block("query_chunk_size", query_chunk_size), sq)
  ck = min(_checks.check_block("key_chunk_size", key_chunk_size), sk)
  g = hq // hkv

  qg = pack_gqa(q, hkv)
  i32 = jnp.int32
  b_idx = jnp.arange(bsz, dtype=i32).reshape(bsz, 1, 1, 1, 1)
  h_idx = (jnp.arange(hkv, dtype=i32)[:, None] * g + jnp.arange(g, dtype=i32)).reshape(1, hkv, g, 1, 1)
  attend = functools.partial(_chunk_attention, k=k, v=v, scale=scale, key_chunk=ck,
                             score_fn=score_fn, mask_fn=mask_fn, b_idx=b_idx, h_idx=h_idx,
                             dropout_rate=dropout_rate, seed=seed)

  # Every query chunk has the same static size: when Sq is not a multiple of it, the last chunk
  # starts at Sq - cq and overlaps its predecessor; only its new rows are kept.
  n = -(-sq // cq)
  starts = jnp.minimum(jnp.arange(n, dtype=i32) * cq, sq - cq)

  def one_chunk(start):
    q_c = jax.lax.dynamic_slice_in_dim(qg, start, cq, axis=3)
    out, lse = attend(q_c, start)
    return out.astype(q.dtype), lse

  out, lse = jax.lax.map(one_chunk, starts)   # (n, B, Hkv, G, cq, ...)
  keep = sq - (n - 1) * cq                    # rows of the last chunk not seen before
  out = jnp.concatenate([jnp.moveaxis(out[:-1], 0, 3).reshape(bsz, hkv, g, (n - 1) * cq, dv),
                         out[-1][:, :, :, cq - keep:]], axis=3)
  lse = jnp.concatenate([jnp.moveaxis(lse[:-1], 0, 3).reshape(bsz, hkv, g, (n - 1) * cq),
                         lse[-1][:, :, :, cq - keep:]], axis=3)
  out = out.reshape(bsz, hq, sq, dv)
  lse = lse.reshape(bsz, hq, sq)
  return (out, lse) if return_lse else out
