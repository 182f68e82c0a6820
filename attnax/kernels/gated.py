"""Gated attention (flash-sparse-attention's ``alpha``/``delta`` gates) as a score mod.

Query row ``i`` of head ``h`` carries a gate ``alpha[b, h, i]`` and key ``j`` of its kv head a gate
``delta[b, h // G, j]`` (``G = Hq // Hkv``). Their product ``x = alpha * delta`` (the *raw gate*)
enters the scores as flash-sparse-attention's reference implementation adds it::

    score = scale * q.k + gate_scale * (logsigmoid(x) if is_logsigmoid_gate else x)

(flash-sparse-attention multiplies the gate by the softmax scale: ``gate_scale = softmax_scale``,
which is what :mod:`attnax.flash_sparse` passes). :func:`gated_mod` returns that as a pytree score
mod carrying ``alpha`` and ``delta``, so it runs in every kernel and both arrays get their true
gradient through the one operand channel (:mod:`attnax.kernels.operands`).

``gate_threshold`` adds a mask with an exact, tile-independent meaning (see :func:`gated_mod`):
a key whose gate alone scales its weight below ``gate_threshold`` times the weight the row's
strongest visible gate gives is masked. The decision is a comparison of the raw gate with a
per-row limit (``x < limit[b, h, i]``, no transcendental in the kernel), so every kernel takes
exactly the same decisions, and tiles whose interval bounds on ``x`` prove every entry masked are
EMPTY in the BlockMask: they are never loaded, in the forward or the backward.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnax.kernels import _checks
from attnax.kernels import score_mods as sm
from attnax.kernels.score_mods import _pytree, _ranges, take

__all__ = ["gated_mod", "GatedScoreMod", "GateThresholdMask", "KeyRangeMask", "log_sigmoid",
           "gate_limits", "band_key_ranges"]

f32 = jnp.float32


def log_sigmoid(x: Any) -> Any:
  """``log(sigmoid(x)) = min(x, 0) - log(1 + exp(-|x|))``: finite everywhere, elementwise.

  Written with ``exp`` and ``log`` only so that it lowers in every Pallas backend; its autodiff
  derivative is ``sigmoid(-x)``.
  """
  return jnp.minimum(x, 0.0) - jnp.log(1.0 + jnp.exp(-jnp.abs(x)))


def _compute_dtype(alpha: Any, delta: Any) -> Any:
  """The dtype the raw gate is formed in: f32, or f64 for float64 gates."""
  return jnp.promote_types(jnp.promote_types(alpha.dtype, delta.dtype), f32)


def _raw_gate(alpha, delta, group, b, h, q_idx, kv_idx):
  """``alpha[b, h, i] * delta[b, h // G, j]`` in the compute dtype (query-row and key-column reads,
  the index patterns every lowering accepts)."""
  ct = _compute_dtype(alpha, delta)
  kv_h = h if group == 1 else h // group
  return take(alpha, b, h, q_idx).astype(ct) * take(delta, b, kv_h, kv_idx).astype(ct)


def _check_gate_shapes(alpha_shape, delta_shape, *, batch, heads, q_len, kv_len, name):
  """ValueError unless ``alpha (B, Hq, Sq)`` and ``delta (B, Hkv, Sk)`` fit the kernel's inputs."""
  want = (f"alpha must be (B, Hq, Sq) = ({batch}, {heads}, {q_len}) and delta (B, Hkv, Sk) = "
          f"({batch}, Hkv, {kv_len}) with Hq % Hkv == 0")
  ok = alpha_shape[2] == q_len and delta_shape[2] == kv_len
  if batch is not None:
    ok = ok and alpha_shape[0] == batch and delta_shape[0] == batch
  if heads is not None:
    ok = ok and alpha_shape[1] == heads and heads % delta_shape[1] == 0
  if not ok:
    raise ValueError(f"{name}: gated_mod's alpha has shape {tuple(alpha_shape)} and delta "
                     f"{tuple(delta_shape)}, which do not fit inputs with batch={batch}, "
                     f"heads={heads}, q_len={q_len}, kv_len={kv_len} ({want})")


@_pytree(data=("alpha", "delta"), meta=("logsigmoid", "gate_scale"))
class GatedScoreMod:
  """``score + gate_scale * G(alpha[b, h, i] * delta[b, h // G, j])``, ``G`` log-sigmoid or the
  identity. ``alpha`` ``(B, Hq, Sq)``, ``delta`` ``(B, Hkv, Sk)``."""
  alpha: jax.Array
  delta: jax.Array
  logsigmoid: bool = True
  gate_scale: float = 1.0
  # The gate only adds to the scores: d(modded score) / d(score) = 1 (backward passes skip a jvp).
  unit_grad = True

  @property
  def group(self) -> int:
    return self.alpha.shape[1] // self.delta.shape[1]

  def __call__(self, score, b, h, q_idx, kv_idx):
    x = _raw_gate(self.alpha, self.delta, self.group, b, h, q_idx, kv_idx)
    g = log_sigmoid(x) if self.logsigmoid else x
    return score + (self.gate_scale * g).astype(score.dtype)

  def check_shapes(self, *, batch, heads, q_len, kv_len, name):
    _check_gate_shapes(self.alpha.shape, self.delta.shape, batch=batch, heads=heads,
                       q_len=q_len, kv_len=kv_len, name=name)


def _block_extrema(x: jax.Array, block: int, length: int) -> tuple[jax.Array, jax.Array]:
  """Per-block min and max along the last axis over its first ``length`` entries (tail padded by
  its edge, so a ragged last block counts its valid entries only). NaN propagates."""
  x = x[..., :length]
  n = -(-length // block)
  pad = [(0, 0)] * (x.ndim - 1) + [(0, n * block - length)]
  x = jnp.pad(x, pad, mode="edge").reshape(x.shape[:-1] + (n, block))
  return x.min(-1), x.max(-1)


@_pytree(data=("alpha", "delta", "limit"))
class GateThresholdMask:
  """Keep ``not (alpha[b, h, i] * delta[b, h // G, j] < limit[b, h, i])``.

  ``limit`` ``(B, Hq, Sq)`` comes from :func:`gate_limits`; the arrays are the gates under
  ``stop_gradient`` (a mask has no gradient). Written as ``not <`` so that a NaN gate keeps its
  entry (and propagates NaN) rather than hiding it. Tiles are classified from interval bounds of
  the raw gate: the extreme products of the q block's alpha range and the kv block's delta range.
  """
  alpha: jax.Array
  delta: jax.Array
  limit: jax.Array

  @property
  def group(self) -> int:
    return self.alpha.shape[1] // self.delta.shape[1]

  def __call__(self, b, h, q_idx, kv_idx):
    x = _raw_gate(self.alpha, self.delta, self.group, b, h, q_idx, kv_idx)
    return jnp.logical_not(x < take(self.limit, b, h, q_idx))

  def tile_visibility(self, block_q, block_k, q_len, kv_len):
    ct = _compute_dtype(self.alpha, self.delta)
    a_lo, a_hi = _block_extrema(self.alpha.astype(ct), block_q, q_len)       # (B, Hq, nq)
    x_lo, x_hi = _block_extrema(self.limit.astype(ct), block_q, q_len)
    d_lo, d_hi = _block_extrema(self.delta.astype(ct), block_k, kv_len)      # (B, Hkv, nk)
    d_lo, d_hi = (jnp.repeat(d, self.group, axis=1)[:, :, None, :] for d in (d_lo, d_hi))
    a_lo, a_hi = a_lo[..., None], a_hi[..., None]
    corners = (a_lo * d_lo, a_lo * d_hi, a_hi * d_lo, a_hi * d_hi)
    # Rounding is monotone, so every entry's product lies within the rounded corners.
    upper = jnp.maximum(jnp.maximum(corners[0], corners[1]), jnp.maximum(corners[2], corners[3]))
    lower = jnp.minimum(jnp.minimum(corners[0], corners[1]), jnp.minimum(corners[2], corners[3]))
    any_ = jnp.logical_not(upper < x_lo[..., None])    # NaN bounds: not provably empty
    all_ = lower >= x_hi[..., None]
    return any_, all_                                   # (B, Hq, nq, nk)

  def check_shapes(self, *, batch, heads, q_len, kv_len, name):
    _check_gate_shapes(self.alpha.shape, self.delta.shape, batch=batch, heads=heads,
                       q_len=q_len, kv_len=kv_len, name=name)


@_pytree(data=("lo", "hi"), meta=("kv_len",))
class KeyRangeMask:
  """Keep ``lo[b, i] <= kv_idx <= hi[b, i]``: every query row sees one contiguous key range.

  ``lo``/``hi`` int32 ``(B, Sq)`` (``B`` may be 1), built for ``kv_len`` keys. Causal and window
  masks of packed variable-length sequences (each row's range inside its own sequence) are of this
  form; :mod:`attnax.flash_sparse` builds them. A row with ``lo > hi`` sees no key. Tiles are
  classified from the ranges' per-block extremes: EMPTY when no row's range can meet the kv block,
  FULL when every row's range covers it.
  """
  lo: jax.Array
  hi: jax.Array
  kv_len: int

  def __call__(self, b, h, q_idx, kv_idx):
    return (take(self.lo, b, q_idx) <= kv_idx) & (kv_idx <= take(self.hi, b, q_idx))

  def tile_visibility(self, block_q, block_k, q_len, kv_len):
    lo_min, lo_max = _block_extrema(self.lo, block_q, q_len)      # (B, nq)
    hi_min, hi_max = _block_extrema(self.hi, block_q, q_len)
    k_lo, k_hi = _ranges(block_k, kv_len)
    any_ = (lo_min[..., None] <= k_hi) & (hi_max[..., None] >= k_lo)
    all_ = (lo_max[..., None] <= k_lo) & (hi_min[..., None] >= k_hi)
    return any_[:, None], all_[:, None]                            # (B, 1, nq, nk)

  def check_shapes(self, *, batch, heads, q_len, kv_len, name):
    if (self.lo.shape != self.hi.shape or self.lo.shape[1] != q_len or self.kv_len != kv_len
        or (batch is not None and self.lo.shape[0] not in (1, batch))):
      raise ValueError(f"{name}: a key-range mask with lo {tuple(self.lo.shape)}, hi "
                       f"{tuple(self.hi.shape)} built for kv_len={self.kv_len} does not fit inputs "
                       f"with batch={batch}, q_len={q_len}, kv_len={kv_len} (lo and hi must be "
                       f"(1 or B, Sq) and built for kv_len={kv_len})")


# ----------------------------------------------------------------------------- thresholds


def band_key_ranges(mask: Any, q_len: int, kv_len: int):
  """Each row's visible key range ``[lo_i, hi_i]`` (numpy int64 ``(Sq,)``) under a band mask, and
  whether the mask is causal (its band ends at the diagonal: flash-sparse-attention's
  ``is_causal``), with the diagonal offset.

  Returns ``(lo, hi, causal_offset or None)``, or None for a mask that is not one of
  :class:`~attnax.kernels.score_mods.CausalMask`, ``SlidingWindowMask``, ``LocalWindowMask``
  (``mask=None``: every key, not causal).
  """
  i = np.arange(q_len, dtype=np.int64)
  if mask is None:
    return np.zeros(q_len, np.int64), np.full(q_len, kv_len - 1, np.int64), None
  if isinstance(mask, sm.CausalMask):
    lo_d, hi_d, off, causal = 0, None, mask.offset, True
  elif isinstance(mask, sm.SlidingWindowMask):
    lo_d, hi_d, off, causal = 0, mask.window_size - 1, mask.offset, True
  elif isinstance(mask, sm.LocalWindowMask):
    lo_d, hi_d, off, causal = -mask.right, mask.left, mask.offset, mask.right == 0
  else:
    return None
  # Keep lo_d <= i + off - j <= hi_d, i.e. j in [i + off - hi_d, i + off - lo_d].
  lo = np.zeros(q_len, np.int64) if hi_d is None else np.maximum(i + off - hi_d, 0)
  hi = np.minimum(i + off - lo_d, kv_len - 1)
  return lo, hi, (off if causal else None)


def _range_extrema(x: jax.Array, lo: jax.Array, hi: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Min and max of ``x`` ``(B, H, Sk)`` over ``[lo_i, hi_i]`` for every row, ``(B, H, Sq)``.

  A sparse table (``log2 Sk`` levels of window extremes; memory ``O(Sk log Sk)`` per head) answers
  each range with two reads; ``lo``/``hi`` ``(B' or 1, Sq)`` may be traced. Empty ranges read
  ``x[lo]`` (the caller discards them).
  """
  bsz, heads, sk = x.shape
  levels_min, levels_max = [x], [x]
  span = 1
  while 2 * span <= sk:
    nxt = jnp.minimum(jnp.arange(sk) + span, sk - 1)
    levels_min.append(jnp.minimum(levels_min[-1], levels_min[-1][..., nxt]))
    levels_max.append(jnp.maximum(levels_max[-1], levels_max[-1][..., nxt]))
    span *= 2
  table_min = jnp.stack(levels_min, 2).reshape(bsz, heads, -1)
  table_max = jnp.stack(levels_max, 2).reshape(bsz, heads, -1)
  lo = jnp.clip(jnp.asarray(lo, jnp.int32), 0, sk - 1)
  hi = jnp.clip(jnp.asarray(hi, jnp.int32), lo, sk - 1)
  level = 31 - jax.lax.clz(hi - lo + 1)                 # floor(log2(length))
  first = level * sk + lo
  second = level * sk + hi - (jnp.left_shift(1, level) - 1)
  shape = (bsz, heads, lo.shape[-1])
  read = lambda t, idx: jnp.take_along_axis(t, jnp.broadcast_to(idx[:, None, :], shape), axis=-1)
  return (jnp.minimum(read(table_min, first), read(table_min, second)),
          jnp.maximum(read(table_max, first), read(table_max, second)))


def gate_limits(alpha: jax.Array, delta: jax.Array, *, gate_threshold: float, gate_scale: float,
                logsigmoid: bool, lo: Any = None, hi: Any = None,
                adapt: Any = None) -> jax.Array:
  """The per-row limit of :class:`GateThresholdMask`: key ``j`` is masked iff ``x_ij < limit_i``.

  With ``T(x) = gate_scale * G(x)`` the term the gate adds to a score, ``x*_i`` the largest raw
  gate among row ``i``'s visible keys ``[lo_i, hi_i]`` and ``tau_i = min(1, gate_threshold *
  adapt_i)``, the key is masked iff ``T(x_ij) < T(x*_i) + log(tau_i)``; ``limit_i`` is that
  condition solved for ``x`` (``T`` is increasing), clipped to ``x*_i`` so that the row's strongest
  key is always kept. Rows with an empty range get ``+inf``.

  Args:
    alpha, delta: the gates (``stop_gradient`` applied here).
    gate_threshold: ``> 0``; values above 1 act as 1.
    gate_scale: ``> 0``.
    logsigmoid: ``G`` is log-sigmoid (else the identity).
    lo, hi: int ``(B' or 1, Sq)`` visible key ranges (None: every key).
    adapt: per-row factor ``(B' or 1, Sq)`` of the threshold (None: 1).

  Returns:
    ``(B, Hq, Sq)`` in the gates' compute dtype (f32, or f64).
  """
  # Ranges that all start at key 0 (causal masks) need only prefix extremes: O(Sk) memory.
  prefix = isinstance(lo, np.ndarray) and not lo.any()
  # One compiled computation (called eagerly, the sparse table's many small ops would each
  # compile); under an enclosing jit it is inlined.
  return _gate_limits(alpha, delta, lo, hi, adapt, gate_threshold=float(gate_threshold),
                      gate_scale=float(gate_scale), logsigmoid=bool(logsigmoid), prefix=prefix)


def _prefix_extrema(x: jax.Array, hi: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Min and max of ``x`` ``(B, H, Sk)`` over ``[0, hi_i]``, ``(B, H, Sq)`` (empty: ``x[0]``)."""
  idx = jnp.clip(jnp.asarray(hi, jnp.int32), 0, x.shape[-1] - 1)
  idx = jnp.broadcast_to(idx[:, None, :], x.shape[:2] + idx.shape[-1:])
  read = lambda t: jnp.take_along_axis(t, idx, axis=-1)
  return (read(jax.lax.cummin(x, axis=x.ndim - 1)), read(jax.lax.cummax(x, axis=x.ndim - 1)))


@functools.partial(jax.jit, static_argnames=("gate_threshold", "gate_scale", "logsigmoid",
                                             "prefix"))
def _gate_limits(alpha, delta, lo, hi, adapt, *, gate_threshold, gate_scale, logsigmoid,
                 prefix=False):
  ct = _compute_dtype(alpha, delta)
  a = jax.lax.stop_gradient(alpha).astype(ct)
  d = jax.lax.stop_gradient(delta).astype(ct)
  group = alpha.shape[1] // delta.shape[1]
  if lo is None:
    d_min, d_max = d.min(-1, keepdims=True), d.max(-1, keepdims=True)
    empty = None
  else:
    d_min, d_max = _prefix_extrema(d, hi) if prefix else _range_extrema(d, lo, hi)
    empty = (jnp.asarray(lo) > jnp.asarray(hi))[:, None, :]
  d_min, d_max = (jnp.repeat(x, group, axis=1) for x in (d_min, d_max))
  best = jnp.where(a >= 0, a * d_max, a * d_min)      # x*: the exact product of the argmax key
  tau = jnp.asarray(gate_threshold, ct)
  if adapt is not None:
    tau = tau * jnp.asarray(adapt, ct)[:, None, :]
  shift = jnp.log(jnp.minimum(tau, 1.0)) / gate_scale   # <= 0; -inf where tau = 0
  if logsigmoid:
    y = jnp.minimum(log_sigmoid(best) + shift, 0.0)
    limit = y - jnp.log(-jnp.expm1(y))                # logsigmoid^-1 (y = 0 gives +inf: clipped)
  else:
    limit = best + shift
  limit = jnp.minimum(limit, best)
  if empty is not None:
    limit = jnp.where(empty, jnp.inf, limit)
  return limit


def _causal_adapt(q_len: int, kv_len: int, offset: int) -> np.ndarray:
  """flash-sparse-attention's adaptive factor: the causally visible fraction of the keys."""
  return np.clip(np.arange(q_len) + offset + 1, 0, kv_len) / kv_len


# ----------------------------------------------------------------------------- the factory


def _gate_array(x: Any, name: str, *, fn: str = "gated_mod", shape: tuple | None = None,
                layout: str | None = None) -> jax.Array:
  """``x`` as a floating-point array of rank 3 (or, given ``shape``, of exactly that shape).

  A ValueError naming ``fn`` and ``name`` otherwise; ``layout`` names the axes in it (default
  ``(B, Hq, Sq)`` for alpha, ``(B, Hkv, Sk)`` for delta).
  """
  try:
    arr = jnp.asarray(x)
  except (TypeError, ValueError):
    raise ValueError(f"{fn}: {name} must be an array, got {type(x).__name__}") from None
  if layout is None:
    layout = "(B, Hq, Sq)" if name == "alpha" else "(B, Hkv, Sk)"
  fits = arr.ndim == 3 if shape is None else tuple(arr.shape) == tuple(shape)
  if not fits or not jnp.issubdtype(arr.dtype, jnp.floating):
    want = f"of rank 3 ({layout})" if shape is None else f"of shape {layout} = {tuple(shape)}"
    raise ValueError(f"{fn}: {name} must be a floating-point array {want}, got "
                     f"{arr.dtype}{tuple(arr.shape)}")
  return arr


def _unwrap_mask(mask_mod: Any) -> Any:
  if isinstance(mask_mod, sm.MaskScoreMod):
    return mask_mod.mask_mod
  sm.check_mod(mask_mod, 4, "gated_mod: mask_mod")
  return mask_mod


def _build(alpha, delta, *, logsigmoid, gate_scale, gate_threshold, mask, lo=None, hi=None,
           adapt=None):
  """The composed mod: the gate's score part, then (with a threshold) its mask and ``mask``."""
  score = GatedScoreMod(alpha, delta, bool(logsigmoid), gate_scale)
  masks = [mask]
  if gate_threshold is not None:
    limit = gate_limits(alpha, delta, gate_threshold=gate_threshold, gate_scale=gate_scale,
                        logsigmoid=logsigmoid, lo=lo, hi=hi, adapt=adapt)
    sg = jax.lax.stop_gradient
    masks.append(GateThresholdMask(sg(alpha), sg(delta), limit))
  mask_part = sm.and_masks(*masks)
  return sm.compose_score_mods(score, None if mask_part is None else sm.MaskScoreMod(mask_part))


def gated_mod(alpha: Any, delta: Any, *, is_logsigmoid_gate: bool = True,
              is_adapt_gate: bool = False, gate_threshold: float | None = None,
              gate_scale: float = 1.0, mask_mod: Any = None) -> Any:
  """Gated attention as a score mod: flash-sparse-attention's ``alpha``/``delta`` gates.

  Adds ``gate_scale * G(alpha[b, h, i] * delta[b, h // G, j])`` to each scaled score, with ``G``
  the log-sigmoid (``is_logsigmoid_gate``, the default) or the identity, as
  flash-sparse-attention's reference implementation does (it scales the gate by the softmax
  scale: pass ``gate_scale=scale``, as :mod:`attnax.flash_sparse` does, to reproduce it). The mod
  is a pytree carrying both arrays, so it runs in every kernel (``standard``,
  ``memory_efficient``, ``flash``, Pallas in every backend, ``aether``) and ``alpha`` and
  ``delta`` get their true gradients.

  ``gate_threshold`` masks the keys a row's gate all but closes. With ``T(x) = gate_scale * G(x)``
  the gate's term, ``x*_i`` the largest raw gate ``alpha_i * delta_j`` among the keys row ``i``
  sees (under ``mask_mod``) and ``tau_i = min(1, gate_threshold)`` (times the row's causally
  visible fraction of the keys, ``(i + offset + 1) / Sk``, with ``is_adapt_gate`` and a causal
  ``mask_mod``, as flash-sparse-attention adapts it), key ``j`` is masked for row ``i`` iff
  ``T(x_ij) < T(x*_i) + log(tau_i)``: the gate alone gives it less than ``tau_i`` times the weight
  the row's strongest gate gives. The strongest key is always kept, so the gate never empties a
  row. This is an exact rule: the reference kernel computes it elementwise, and the block kernels
  skip the tiles whose gate bounds (the extreme products of a q block's alpha range and a kv
  block's delta range) prove every entry masked, in the forward and the backward, with the same
  result. flash-sparse-attention's kernel instead skips whole tiles by comparing the tile's raw
  bound with a running maximum in its own visiting order (and, for the log-sigmoid gate, in raw
  units), so its results depend on its tiling; like its softmax threshold, neither rule bounds
  the error of the output.

  Args:
    alpha: the query gates, float ``(B, Hq, Sq)``.
    delta: the key gates, float ``(B, Hkv, Sk)`` (one per kv head: query head ``h`` reads
      ``delta[:, h // (Hq // Hkv)]``). The mod sees only its own arrays, so any head count
      ``Hd`` that divides ``Hq`` is accepted, with query head ``h`` reading ``delta[:, h // (Hq //
      Hd)]``: ``Hd = Hq`` gives every query head its own key gates.
    is_logsigmoid_gate: add ``log(sigmoid(x))`` (True) or ``x`` (False).
    is_adapt_gate: scale the threshold of row ``i`` by ``(i + offset + 1) / Sk`` when ``mask_mod``
      is causal (``causal_mod``, ``sliding_window_mod``, ``local_window_mod(left, 0)``); no effect
      otherwise, as in flash-sparse-attention.
    gate_threshold: None (no masking) or a positive Python float (values above 1 act as 1).
    gate_scale: the gate's multiplier (positive Python float).
    mask_mod: a mask the gate is combined with (it is applied too): ``causal_mod(...)``,
      ``sliding_window_mod(...)``, ``local_window_mod(...)`` (or their ``.mask_mod``), with
      ``gate_threshold`` each row's strongest gate is taken among the keys this mask shows it.
      Without ``gate_threshold`` any mask mod is accepted. None: every key.

  Returns:
    A score mod (a composition of :class:`GatedScoreMod` and, with a threshold or a mask, the mask
    part) for any kernel's ``score_mod=``.

  Raises:
    ValueError: ``alpha``/``delta`` not floating arrays of rank 3, disagreeing batch sizes, query
      heads not a multiple of the key heads, a non-positive ``gate_threshold`` or ``gate_scale``,
      or with ``gate_threshold`` a ``mask_mod`` whose visible keys are not a band. Kernels raise a
      ValueError naming ``alpha``/``delta`` when they do not fit ``q``/``k``.
  """
  alpha = _gate_array(alpha, "alpha")
  delta = _gate_array(delta, "delta")
  shapes = f"alpha {tuple(alpha.shape)}, delta {tuple(delta.shape)}"
  if alpha.shape[0] != delta.shape[0]:
    raise ValueError(f"gated_mod: alpha and delta batch sizes differ: {shapes}")
  if delta.shape[1] == 0 or alpha.shape[1] % delta.shape[1]:
    raise ValueError(f"gated_mod: alpha's heads (Hq={alpha.shape[1]}) must be a multiple of "
                     f"delta's (Hkv={delta.shape[1]}): {shapes}")
  if 0 in alpha.shape + delta.shape:
    raise ValueError(f"gated_mod: empty dimension: {shapes}")
  gate_scale = _checks.static_float(gate_scale, "gate_scale", fn="gated_mod", low=0.0,
                                   low_inclusive=False)
  mask = None if mask_mod is None else _unwrap_mask(mask_mod)
  if gate_threshold is None:
    return _build(alpha, delta, logsigmoid=is_logsigmoid_gate, gate_scale=gate_scale,
                  gate_threshold=None, mask=mask)
  gate_threshold = _checks.static_float(gate_threshold, "gate_threshold", fn="gated_mod",
                                       low=0.0, low_inclusive=False)
  q_len, kv_len = alpha.shape[2], delta.shape[2]
  if isinstance(mask, KeyRangeMask):
    lo, hi, offset = mask.lo, mask.hi, None
  else:
    band = band_key_ranges(mask, q_len, kv_len)
    if band is None:
      raise ValueError(f"gated_mod: with gate_threshold, mask_mod must be None, causal_mod, "
                       f"sliding_window_mod or local_window_mod (each row's visible keys one "
                       f"band), got {type(mask).__name__}")
    lo, hi, offset = band
    lo, hi = (None, None) if mask is None else (lo[None], hi[None])
  adapt = None
  if is_adapt_gate and offset is not None:
    adapt = _causal_adapt(q_len, kv_len, offset)[None]
  return _build(alpha, delta, logsigmoid=is_logsigmoid_gate, gate_scale=gate_scale,
                gate_threshold=gate_threshold, mask=mask, lo=lo, hi=hi, adapt=adapt)
