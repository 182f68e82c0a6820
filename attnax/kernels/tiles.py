"""The tile-level maths every kernel shares: modded, masked scores and the online softmax.

One implementation of "scores of a tile" so that the reference, the pure-JAX kernels and the Pallas
kernels cannot drift apart. Everything here is rank-agnostic elementwise ``jnp`` code: it runs on the
whole ``(B, H, Sq, Sk)`` matrix in the reference and on one ``(block_q, block_k)`` tile inside a
Pallas kernel, where ``b`` and ``h`` are scalars.

Invariants: the running max starts at ``MASK_VALUE`` (finite), so ``exp(m_old - m_new)`` is never
``exp(-inf + inf)``; masked probabilities are zeroed explicitly, so a row that sees no key ends with
``l = 0``, output 0 and lse ``-inf``. Only that exact zero means "empty": NaN or inf in the inputs
makes ``l`` NaN, which propagates to the output, the lse and the gradients.

Precision follows the inputs: statistics and accumulators are f32 for f32/bf16/f16 inputs and
f64 for f64 inputs (:func:`acc_dtype`), so the pure-JAX kernels run float64 end to end.

Attention dropout is defined here once as well (:func:`dropout_keep`): a counter-based hash of
``(seed, b, h, q_idx, kv_idx)``, so the reference materialises exactly the mask that a fused
kernel regenerates tile by tile in its forward and its backward (FlashAttention's scheme).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from attnax.kernels.merge import safe_lse
from attnax.kernels.score_mods import MASK_VALUE

f32 = jnp.float32


def acc_dtype(dtype) -> jnp.dtype:
  """Accumulation dtype: f32, or f64 for the float64 reference."""
  return jnp.promote_types(dtype, f32)


def qk_dot(q: jax.Array, k: jax.Array, precision=None) -> jax.Array:
  """``q @ k^T`` over the last axis, accumulated in :func:`acc_dtype` (f32, or f64)."""
  return jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=acc_dtype(q.dtype),
                    precision=precision)


def pv_dot(p: jax.Array, v: jax.Array, precision=None) -> jax.Array:
  """``p @ v`` accumulated in :func:`acc_dtype` (f32, or f64)."""
  return jnp.einsum("...qk,...kd->...qd", p, v, preferred_element_type=acc_dtype(v.dtype),
                    precision=precision)


def tile_scores(s: jax.Array, *, score_fn: Any, mask_fn: Any, b, h, q_idx, kv_idx,
                q_len: int | None = None, kv_len: int | None = None,
                apply_mask: bool = True,
                mask_value: float = MASK_VALUE) -> tuple[jax.Array, jax.Array | None]:
  """Apply the score mod and the mask to scaled f32 scores ``s``.

  Args:
    s: scaled scores, f32.
    score_fn / mask_fn: the score part and the mask part of the mods (either may be None).
    b, h, q_idx, kv_idx: int32 indices broadcasting against ``s`` (absolute positions).
    q_len / kv_len: when given, positions at or past them are masked (ragged tails).
    apply_mask: False for tiles the BlockMask marks full: the mask mod is skipped.
    mask_value: what hidden scores become (``-inf`` where the running max is kept finite by other
      means, so that hidden probabilities are exactly 0 without a second select).

  Returns:
    ``(s, visible)``: masked scores (``mask_value`` where not visible) and the boolean visibility,
    or ``None`` when every entry is visible.
  """
  if score_fn is not None:
    s = _mod_result(score_fn(s, b, h, q_idx, kv_idx), s.shape, "score_mod").astype(s.dtype)
  visible = None
  if q_len is not None:
    visible = q_idx < q_len
  if kv_len is not None:
    ok = kv_idx < kv_len
    visible = ok if visible is None else visible & ok
  if mask_fn is not None and apply_mask:
    m = _mod_result(mask_fn(b, h, q_idx, kv_idx), s.shape, "mask_mod")
    visible = m if visible is None else visible & m
  if visible is not None:
    s = jnp.where(visible, s, mask_value)
  return s, visible


def _mod_result(x: Any, shape: tuple, name: str) -> jax.Array:
  """A mod's result checked against the scores it applies to (a ValueError at trace time).

  It must broadcast to the scores without adding axes. A mask mod's result is read as booleans
  (non-zero = visible), so an int or float mask means what it says under ``&``.
  """
  x = jnp.asarray(x)
  try:
    ok = jnp.broadcast_shapes(x.shape, shape) == tuple(shape)
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(f"{name} returned shape {x.shape}, which does not broadcast to the scores "
                     f"{tuple(shape)} it applies to (a mod must be elementwise)")
  if name == "mask_mod":
    return x if x.dtype == jnp.bool_ else x != 0
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    raise ValueError(f"score_mod returned {x.dtype}; it must return floating-point scores")
  return jnp.broadcast_to(x, shape)


def init_stats(shape: tuple[int, ...], dtype=f32) -> tuple[jax.Array, jax.Array]:
  """Running max (``MASK_VALUE``) and running sum (0) for rows of ``shape``."""
  return jnp.full(shape, MASK_VALUE, dtype), jnp.zeros(shape, dtype)


def online_softmax_step(s: jax.Array, visible: jax.Array | None, m_prev: jax.Array,
                        l_prev: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """One FlashAttention step over a tile of scores ``s`` ``(..., q, k)``.

  Returns ``(p, alpha, m_new, l_new)``: unnormalised probabilities of the tile, the factor that
  rescales the previous accumulator, and the new running max and sum.
  """
  m_new = jnp.maximum(m_prev, s.max(axis=-1))
  alpha = jnp.exp(m_prev - m_new)
  p = jnp.exp(s - m_new[..., None])
  if visible is not None:
    p = jnp.where(visible, p, 0.0)
  l_new = alpha * l_prev + p.sum(axis=-1)
  return p, alpha, m_new, l_new


def finalize(acc: jax.Array, m: jax.Array, l: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Normalise the accumulator: ``(out f32, lse)``; rows with ``l = 0`` give 0 and ``-inf``.

  Only ``l == 0`` means "no visible key": a NaN ``l`` (NaN or inf in q, k or the mods) propagates
  into out and lse, as ``jax.nn.dot_product_attention`` does.
  """
  empty = (l == 0)[..., None]
  out = acc / jnp.where(empty, 1.0, l[..., None])
  return jnp.where(empty, 0.0, out), safe_lse(m, l)


def probabilities(s: jax.Array, visible: jax.Array | None, lse: jax.Array) -> jax.Array:
  """Softmax probabilities recomputed from scores and the saved LSE (backward passes)."""
  empty = (lse == -jnp.inf)[..., None]   # a NaN lse is not empty: its gradients are NaN
  p = jnp.exp(s - jnp.where(empty, 0.0, lse[..., None]))
  if visible is not None:
    p = jnp.where(visible, p, 0.0)
  return jnp.where(empty, 0.0, p)


def low_precision(x: jax.Array, dtype) -> jax.Array:
  """f32 tile values (probabilities, dS) cast to a 16-bit input dtype before a matmul.

  Every kernel and the reference do this, so low-precision results agree between them.
  """
  return x.astype(dtype) if jnp.dtype(dtype).itemsize < 4 else x


def residual_out_dtype(dtype, operands_differentiated: bool) -> jnp.dtype:
  """The dtype a custom_vjp forward keeps ``out`` in for the backward's ``delta``.

  The backward's ``dS = P (dP - delta)`` has rows that sum to zero only if ``delta = rowsum(dO *
  O)`` is ``rowsum(P * dP)``, i.e. O is ``P V`` with the f32 P. From O rounded to bf16/f16, and
  from P rounded to bf16 for the P V matmul, it is off by those roundings. q/k/v gradients barely
  notice; a mod array's cotangent weighted by position (ALiBi slopes: ``sum dS (j - i)``)
  multiplies the error by the distances: 16% at Sq=296, Sk=360 in bf16 from the rounded output,
  4% from P's rounding, 0.1% without either. So when mod arrays are differentiated the forward
  keeps an f32 output, its P V from :func:`p_terms`, as the residual.
  """
  return acc_dtype(dtype) if operands_differentiated else jnp.dtype(dtype)


def p_terms(p: jax.Array, dtype, out_dtype=None) -> tuple[jax.Array, ...]:
  """The P V matmul's left operands: P rounded to a 16-bit ``dtype`` (as :func:`low_precision`)
  and, when the forward writes a wider ``out_dtype`` (the f32 residual of
  :func:`residual_out_dtype`), P's rounding residual rounded again, whose product is added (a
  second matmul; P then carries about 16 bits)."""
  hi = low_precision(p, dtype)
  if out_dtype is None or jnp.dtype(out_dtype).itemsize <= jnp.dtype(dtype).itemsize:
    return (hi,)
  return hi, low_precision(p - hi.astype(p.dtype), dtype)


def backward_delta(out: jax.Array, dout: jax.Array, lse: jax.Array | None = None,
                   dlse: jax.Array | None = None) -> jax.Array:
  """FlashAttention's ``delta = rowsum(dO * O) - dlse``, f32 (f64 for f64 inputs) ``(..., Sq)``.

  The LSE cotangent enters here: ``d lse / d s = p``, so it shifts ``dP`` like ``delta`` does.
  Rows with ``lse = -inf`` (no visible key) ignore ``dlse``. Dropout leaves it unchanged:
  ``rowsum(P * Z * dP') = rowsum(dO * O)`` when ``O = (P * Z) V`` (``Z`` the scaled keep mask).
  """
  acc = acc_dtype(jnp.promote_types(out.dtype, dout.dtype))
  delta = jnp.sum(dout.astype(acc) * out.astype(acc), axis=-1)
  if dlse is not None:
    dlse = dlse.astype(acc)
    if lse is not None:
      dlse = jnp.where(lse == -jnp.inf, 0.0, dlse)
    delta = delta - dlse
  return delta


# ----------------------------------------------------------------------------- dropout
#
# The keep mask of attention dropout is a pure function of (seed, b, h, q_idx, kv_idx): a chain of
# a bijective 32-bit mixer (Wellons' "lowbias32") over the four indices. Only uint32 multiply, xor
# and logical shifts: they lower in Pallas (Triton: muli, xori, shrui, an unsigned compare) as in
# plain XLA, so every kernel computes the same bits. The (b, h, q) part is per row of a tile; per
# element it costs one xor, one mixer and a compare.

_U32 = jnp.uint32
_GOLDEN = 0x9E3779B9     # odd: kv_idx * _GOLDEN is a bijection of uint32, spread to the high bits


def _u32(x) -> jax.Array:
  """Indices (int32, possibly negative) as uint32 bits (two's complement)."""
  return jnp.asarray(x).astype(_U32)


def _mix32(x: jax.Array) -> jax.Array:
  """A bijective uint32 mixer with full avalanche (lowbias32, C. Wellons)."""
  x = x ^ (x >> 16)
  x = x * _U32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * _U32(0x846CA68B)
  return x ^ (x >> 16)


def dropout_threshold(rate: float) -> int:
  """The uint32 threshold: a weight is kept when its bits are ``>= threshold``."""
  return min(int(round(float(rate) * 2.0 ** 32)), 2 ** 32 - 1)


def dropout_bits(seed: Any, b, h, q_idx, kv_idx) -> jax.Array:
  """Uniform uint32 bits of attention weight ``(b, h, q_idx, kv_idx)`` under ``seed``.

  Args:
    seed: two uint32 words ``(s0, s1)`` (an array of shape ``(2,)`` or a pair of scalars), as
      :func:`attnax.kernels._checks.check_dropout` makes them from a PRNG key.
    b, h, q_idx, kv_idx: absolute int32 indices broadcasting against the scores (``b``, ``h``
      scalars inside a Pallas kernel).
  """
  s0, s1 = seed[0], seed[1]
  x = _mix32(s0 ^ _u32(b))
  x = _mix32((x + s1) ^ _u32(h))
  x = _mix32(x ^ _u32(q_idx))
  return _mix32(x ^ (_u32(kv_idx) * _U32(_GOLDEN)))


def dropout_keep(seed: Any, rate: float, b, h, q_idx, kv_idx) -> jax.Array:
  """Which attention weights dropout keeps: bool, broadcast of the index shapes.

  Weight ``(b, h, q_idx, kv_idx)`` is kept when its :func:`dropout_bits` are at least
  ``round(rate * 2**32)``, so with probability ``1 - rate``, independently of every other weight
  (a bijective mixer chained over the indices). Every kernel, and the materialised reference,
  evaluates this same function: on the whole ``(B, H, Sq, Sk)`` grid or on one tile.

  Args:
    seed: two uint32 words (``attnax.kernels._checks.check_dropout`` draws them from the key).
    rate: the static dropout rate in ``[0, 1)``.
    b, h, q_idx, kv_idx: absolute int32 batch row, query head, query and key positions.
  """
  return dropout_bits(seed, b, h, q_idx, kv_idx) >= _U32(dropout_threshold(rate))


def apply_dropout(p: jax.Array, keep: jax.Array, rate: float) -> jax.Array:
  """Inverted dropout of probabilities (or of their cotangents): ``p / (1 - rate)`` where kept.

  A dropped weight is exactly 0; NaN rows stay NaN through the normaliser ``l``, which dropout
  does not touch.
  """
  return jnp.where(keep, p * (1.0 / (1.0 - rate)), 0.0)


# ----------------------------------------------------------------------------- threshold skipping
#
# flash-sparse-attention's ``softmax_threshold`` (its ``online_sparse_softmax``), decided once per
# visited (q tile, kv tile) of one query head, in the order the kernel walks the kv tiles. Every
# kernel that skips calls this one function, so their decisions agree; the decisions are recorded
# (int8 codes below) and the backward replays them instead of deciding again.

TILE_UNVISITED, TILE_KEPT, TILE_SKIPPED = 0, 1, 2   # the recorded code of each tile
THRESHOLD_RULES = ("tile", "row")


def log_threshold(threshold: float) -> float:
  """``log(threshold)`` as a static float; ``-inf`` for 0 (nothing is ever skipped)."""
  return math.log(threshold) if threshold > 0 else -math.inf


def threshold_skip(s: jax.Array, q_valid: jax.Array, m_prev: jax.Array, tile_m: jax.Array,
                   log_t: float, rule: str) -> tuple[jax.Array, jax.Array]:
  """Whether to skip a tile of masked scores ``s`` ``(..., q, k)``, and the tile's max.

  Args:
    s: the tile's scaled, modded, masked scores.
    q_valid: bool, broadcasting against ``s.max(-1)``: rows inside the true ``Sq`` (padded rows
      take no part in the decision).
    m_prev: the running row max ``(..., q)`` before this tile (the ``"row"`` rule).
    tile_m: the running max over the kept tiles and valid rows ``(...)`` (the ``"tile"`` rule;
      starts at ``MASK_VALUE``, so the first tile is never skipped).
    log_t: :func:`log_threshold` of the threshold.
    rule: ``"tile"`` (flash-sparse-attention's): skip when ``exp(max(s) - tile_m) < threshold``,
      one max over the whole tile against one running max; ``"row"``: skip when
      ``exp(rowmax(s) - m_prev) < threshold`` for every valid row.

  Returns:
    ``(skip, tile_max)``: bool ``(...)`` and the tile's max over valid rows ``(...)`` (what a kept
    tile folds into ``tile_m``). A NaN score compares False: NaN tiles are kept (and propagate).
  """
  row_max = s.max(axis=-1)
  tile_max = jnp.where(q_valid, row_max, MASK_VALUE).max(axis=-1)
  if rule == "tile":
    return tile_max - tile_m < log_t, tile_max
  gap = jnp.where(q_valid, row_max - m_prev, -jnp.inf).max(axis=-1)
  return gap < log_t, tile_max
