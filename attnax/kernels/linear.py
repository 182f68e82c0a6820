"""linear_attention: kernelised attention in linear time and memory.

Softmax attention weighs key ``j`` for query ``i`` by ``exp(s_ij)``; kernelised attention replaces
that by ``phi(q_i) . phi(k_j)`` for a positive feature map ``phi``, so that::

    out_i = sum_j (phi(q_i) . phi(k_j)) v_j / sum_j phi(q_i) . phi(k_j)
          = phi(q_i) S / phi(q_i) z,      S = sum_j phi(k_j) v_j^T,  z = sum_j phi(k_j)

costs ``O(S * F * Dv)`` instead of ``O(Sq * Sk)``. The denominator rides along as an extra value
column of ones, so ``S`` is one ``(F, Dv + 1)`` f32 state per kv head (f64 for float64 inputs:
the computation follows the inputs' precision, never below f32).

Causal form (the chunk algorithm of flash-linear-attention): the sequence is cut into chunks of
``chunk_size``; within a chunk the quadratic form runs with a causal mask, and the contribution of
earlier chunks is ``phi(q) S`` with ``S`` the state carried across chunks by ``lax.scan``
(f32). Chunks of ``C`` tokens cost ``O(S * C * F)`` in the intra-chunk part and ``O(S * F * Dv)`` in
the state part.

Feature maps (``feature_map=``):

- ``"elu+1"``: ``elu(x) + 1`` (Katharopoulos et al., 2020).
- ``"relu"``: ``max(x, 0)``; a query whose features see nothing gets output 0.
- ``"softmax"``: Performer's FAVOR+ positive orthogonal random features,
  ``phi(x) = exp(w x - |x|^2 / 2) / sqrt(F)``, an unbiased estimator of ``exp(q . k)``.
- a callable ``phi(x) -> (..., F)``, applied to the last axis.

``scale`` (default ``D ** -0.5``) multiplies the queries before ``phi`` (flash-linear-attention's
convention); for ``"softmax"`` the map estimates ``exp(scale * q . k)``, so ``sqrt(scale)``
multiplies both queries and keys.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnax.kernels import _checks
from attnax.kernels import score_mods as sm
from attnax.kernels.gqa import pack_gqa, unpack_gqa

__all__ = ["linear_attention", "favor_projection", "compute_features", "FEATURE_MAPS"]

FEATURE_MAPS = ("elu+1", "relu", "softmax")
f32 = jnp.float32


def favor_projection(key: jax.Array, num_features: int, head_dim: int, *,
                     orthogonal: bool = True) -> jax.Array:
  """Performer's random projection for the ``"softmax"`` feature map, f32 ``(num_features, head_dim)``.

  With ``orthogonal=True`` the rows come in blocks of ``head_dim`` mutually orthogonal directions
  (QR of a Gaussian matrix), each row rescaled to the norm of an independent Gaussian vector, so
  every row is marginally ``N(0, I)`` (the estimator stays unbiased, its variance drops).
  """
  if int(num_features) < 1 or int(head_dim) < 1:
    raise ValueError(f"favor_projection: num_features ({num_features}) and head_dim ({head_dim}) "
                     "must be >= 1")
  if not orthogonal:
    return jax.random.normal(key, (num_features, head_dim), f32)
  n_blocks = -(-num_features // head_dim)
  k_blocks, k_norms = jax.random.split(key)
  g = jax.random.normal(k_blocks, (n_blocks, head_dim, head_dim), f32)
  qmat, _ = jnp.linalg.qr(g)                                   # columns orthonormal
  rows = jnp.swapaxes(qmat, -1, -2).reshape(n_blocks * head_dim, head_dim)[:num_features]
  norms = jnp.linalg.norm(jax.random.normal(k_norms, (num_features, head_dim), f32), axis=-1)
  return rows * norms[:, None]


def compute_features(x: jax.Array, kind: str | Callable, *, projection: jax.Array | None = None,
                is_query: bool = True, stabilize_axes: tuple[int, ...] | None = None) -> jax.Array:
  """The features ``phi(x)`` (f32, f64 for f64 ``x``) of already-scaled inputs ``x`` ``(..., D)``
  -> ``(..., F)``.

  For ``"softmax"``, ``projection`` is ``(F, D)``. A constant factor per query row (``is_query``)
  or per key set (the max over ``stabilize_axes``, default the last two axes) is divided out of the
  exponentials for range; it cancels in the normalised output.
  """
  ft = jnp.promote_types(x.dtype, f32)
  x = x.astype(ft)
  if callable(kind):
    return jnp.asarray(kind(x)).astype(ft)
  if kind == "elu+1":
    return jax.nn.elu(x) + 1.0
  if kind == "relu":
    return jax.nn.relu(x)
  if kind == "softmax":
    proj = projection.astype(ft)
    z = jnp.einsum("...d,fd->...f", x, proj) - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
    axes = (-1,) if is_query else (stabilize_axes or (-2, -1))
    z = z - lax.stop_gradient(jnp.max(z, axis=axes, keepdims=True))
    return jnp.exp(z) / math.sqrt(proj.shape[0])
  raise ValueError(f"feature_map must be one of {FEATURE_MAPS} or a callable, got {kind!r}")


def _causal_offset(score_mod: Any, mask_mod: Any) -> int | None:
  """The only mods kernelised attention can honour are causal masks ``kv_idx <= q_idx + offset``.

  Returns the offset (the smallest, for several causal masks), or ``None`` when there is no mask.
  """
  score_fn, mask_fn = sm.resolve_mods(score_mod, mask_mod)
  if score_fn is not None:
    raise ValueError(
        f"linear_attention: cannot apply the score_mod {score_fn!r}: kernelised attention never "
        "forms the score matrix, so score-changing mods (ALiBi, biases, soft-caps, user "
        "functions) cannot be honoured; only causal_mod(offset) is accepted")
  if mask_fn is None:
    return None
  masks = mask_fn.masks if isinstance(mask_fn, sm.AndMask) else (mask_fn,)
  if all(isinstance(m, sm.CausalMask) for m in masks):
    return min(int(m.offset) for m in masks)
  raise ValueError(
      f"linear_attention: cannot honour the mask {mask_fn!r}: only causal masks (causal=True, "
      "causal_mod(offset)) are expressible by the running-state form; sliding windows, document, "
      "prefix-LM and arbitrary masks are not")


def _align_keys(phk, v_aug, offset: int, q_len: int, precision):
  """Turn ``kv_idx <= q_idx + offset`` into plain causal alignment with the queries.

  Keys before ``offset`` are seen by every query: they form the initial state. A negative offset
  shifts the keys right (zero-feature padding, which adds nothing). Keys are then cut or padded to
  ``q_len``. Returns ``(phk, v_aug, state0)`` with key ``i`` aligned to query ``i``.
  """
  state0 = jnp.zeros(phk.shape[:2] + (phk.shape[-1], v_aug.shape[-1]), phk.dtype)
  if offset > 0:
    pre = min(offset, phk.shape[2])
    state0 = jnp.einsum("bhkf,bhkd->bhfd", phk[:, :, :pre], v_aug[:, :, :pre], precision=precision)
    phk, v_aug = phk[:, :, pre:], v_aug[:, :, pre:]
  elif offset < 0:
    front = ((0, 0), (0, 0), (-offset, 0), (0, 0))
    phk, v_aug = jnp.pad(phk, front), jnp.pad(v_aug, front)
  length = phk.shape[2]
  if length >= q_len:
    return phk[:, :, :q_len], v_aug[:, :, :q_len], state0
  back = ((0, 0), (0, 0), (0, q_len - length), (0, 0))
  return jnp.pad(phk, back), jnp.pad(v_aug, back), state0


def _normalise(num_aug: jax.Array) -> jax.Array:
  """``num[..., :Dv] / num[..., Dv]``; rows whose denominator is exactly 0 (relu) give 0.

  A NaN denominator (NaN in the inputs) is not "0": it propagates.
  """
  num, den = num_aug[..., :-1], num_aug[..., -1:]
  zero = den == 0
  return jnp.where(zero, 0.0, num / jnp.where(zero, 1.0, den))


def _noncausal(phq, phk, v_aug, precision):
  """phq ``(B, Hkv, G, Sq, F)``, phk ``(B, Hkv, Sk, F)``, v_aug ``(B, Hkv, Sk, Dv + 1)``."""
  state = jnp.einsum("bhkf,bhkd->bhfd", phk, v_aug, precision=precision)
  return jnp.einsum("bhgqf,bhfd->bhgqd", phq, state, precision=precision)


def _causal_chunked(phq, phk, v_aug, chunk, precision, state0):
  """The chunk algorithm: intra-chunk masked quadratic + inter-chunk f32 state via ``lax.scan``.

  phq ``(B, Hkv, G, S, F)``, phk ``(B, Hkv, S, F)``, v_aug ``(B, Hkv, S, Dv + 1)``, initial state
  ``(B, Hkv, F, Dv + 1)`` -> ``(B, Hkv, G, S, Dv + 1)``.
  """
  b, hkv, g, s, f = phq.shape
  c = min(chunk, s)
  n = -(-s // c)
  pad = n * c - s
  # Padded keys have zero features (they add nothing); padded queries are dropped at the end.
  phq = jnp.pad(phq, ((0, 0),) * 3 + ((0, pad), (0, 0)))
  phk = jnp.pad(phk, ((0, 0),) * 2 + ((0, pad), (0, 0)))
  v_aug = jnp.pad(v_aug, ((0, 0),) * 2 + ((0, pad), (0, 0)))
  qs = jnp.moveaxis(phq.reshape(b, hkv, g, n, c, f), 3, 0)
  ks = jnp.moveaxis(phk.reshape(b, hkv, n, c, f), 2, 0)
  vs = jnp.moveaxis(v_aug.reshape(b, hkv, n, c, -1), 2, 0)
  tril = jnp.tril(jnp.ones((c, c), bool))

  @jax.checkpoint
  def body(state, xs):
    qc, kc, vc = xs
    inter = jnp.einsum("bhgcf,bhfd->bhgcd", qc, state, precision=precision)
    a = jnp.where(tril, jnp.einsum("bhgcf,bhef->bhgce", qc, kc, precision=precision), 0.0)
    intra = jnp.einsum("bhgce,bhed->bhgcd", a, vc, precision=precision)
    state = state + jnp.einsum("bhef,bhed->bhfd", kc, vc, precision=precision)
    return state, inter + intra

  _, out = lax.scan(body, state0, (qs, ks, vs))
  out = jnp.moveaxis(out, 0, 3).reshape(b, hkv, g, n * c, -1)
  return out[:, :, :, :s]


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                     feature_map: str | Callable = "elu+1", chunk_size: int = 64,
                     scale: float | None = None, score_mod: Any = None, mask_mod: Any = None,
                     return_lse: bool = False, num_features: int | None = None,
                     key: jax.Array | None = None, projection: jax.Array | None = None,
                     precision: Any = None) -> jax.Array:
  """Kernelised (linear) attention: ``phi(q) (phi(k)^T v) / phi(q) (phi(k)^T 1)``.

  Non-causal: one ``(F, Dv + 1)`` state per kv head. Causal: flash-linear-attention's chunk
  algorithm (a masked quadratic inside each chunk, an f32 running state across chunks carried by
  ``lax.scan``). Grouped-query heads share their kv head's state. Differentiable (autodiff through
  the scan, chunks rematerialised).

  Args:
    q: ``(B, Hq, Sq, D)``; k: ``(B, Hkv, Sk, D)``; v: ``(B, Hkv, Sk, Dv)``; ``Hq % Hkv == 0``.
    causal: query ``i`` sees keys ``j <= i`` (top-left aligned, as ``causal_mod()``).
    feature_map: ``"elu+1"``, ``"relu"``, ``"softmax"`` (FAVOR+ random features) or a callable
      ``phi(x) -> (..., F)``.
    chunk_size: tokens per chunk in the causal form (any ``S``: the tail chunk is padded).
    scale: multiplies ``q`` before ``phi`` (default ``D ** -0.5``); with ``"softmax"`` the map
      estimates ``exp(scale * q . k)`` and ``sqrt(scale)`` multiplies both ``q`` and ``k``.
    score_mod, mask_mod: only causal masks can be honoured: ``causal_mod(offset)`` keeps
      ``j <= i + offset`` (``offset = Sk - Sq`` aligns the queries to the end of the keys, as when
      decoding; keys before ``offset`` enter as an initial state). Any other mod raises
      ``ValueError`` naming it.
    return_lse: must be False: kernelised attention has no log-sum-exp (``ValueError``).
    num_features: random features ``F`` for ``"softmax"`` (default ``int(D * log(D))``, as the
      Performer); ignored when ``projection`` is given.
    key: PRNG key that draws the FAVOR+ projection (:func:`favor_projection`).
    projection: a fixed ``(F, D)`` projection for ``"softmax"`` (instead of ``key``).
    precision: ``jax.lax.Precision`` of the matmuls.

  Returns:
    ``out`` ``(B, Hq, Sq, Dv)`` in q's dtype (f32, bf16, f16 or float64).
  """
  b, hq, hkv, sq, sk, d, dv = _checks.check_qkv(q, k, v, kernel="linear_attention",
                                                allow_f64=True)
  if return_lse:
    raise ValueError("linear_attention: return_lse=True is not meaningful: kernelised attention "
                     "has no softmax normaliser, so there is no log-sum-exp to return")
  offset = _causal_offset(score_mod, mask_mod)
  if causal:
    offset = 0 if offset is None else min(offset, 0)
  _checks.check_block("chunk_size", chunk_size)
  scale = _checks.default_scale(scale, d)
  if not callable(feature_map) and feature_map not in FEATURE_MAPS:
    raise ValueError(f"linear_attention: feature_map must be one of {FEATURE_MAPS} or a callable, "
                     f"got {feature_map!r}")

  ft = jnp.promote_types(q.dtype, f32)   # f32, or f64 for float64 inputs
  qs, ks = q.astype(ft) * scale, k.astype(ft)
  proj = None
  if feature_map == "softmax":
    if projection is not None:
      proj = jnp.asarray(projection)
      if proj.ndim != 2 or proj.shape[1] != d:
        raise ValueError(f"linear_attention: projection must have shape (num_features, {d}), got "
                         f"{proj.shape}")
    elif key is not None:
      if num_features is None:
        num_features = max(1, int(d * math.log(d)))
      _checks.check_block("num_features", num_features)
      proj = favor_projection(key, num_features, d)
    else:
      raise ValueError("linear_attention: feature_map='softmax' needs key= (to draw the FAVOR+ "
                       "random features) or projection= (a fixed (num_features, D) matrix)")
    if scale < 0:
      raise ValueError(f"linear_attention: feature_map='softmax' estimates exp(scale * q.k) with "
                       f"features of sqrt(scale) q and sqrt(scale) k, so scale must be >= 0, got "
                       f"{scale}")
    root = math.sqrt(scale)
    qs, ks = q.astype(ft) * root, k.astype(ft) * root
  elif projection is not None or key is not None:
    raise ValueError(f"linear_attention: key=/projection= apply only to feature_map='softmax', "
                     f"not {feature_map!r}")

  phq = compute_features(pack_gqa(qs, hkv), feature_map, projection=proj, is_query=True)
  phk = compute_features(ks, feature_map, projection=proj, is_query=False)
  v_aug = jnp.concatenate([v.astype(ft), jnp.ones(v.shape[:-1] + (1,), ft)], axis=-1)
  if offset is not None:
    phk, v_aug, state0 = _align_keys(phk, v_aug, offset, sq, precision)
    num = _causal_chunked(phq, phk, v_aug, chunk_size, precision, state0)
  else:
    num = _noncausal(phq, phk, v_aug, precision)
  return unpack_gqa(_normalise(num)).astype(q.dtype)

