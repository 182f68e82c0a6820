"""AETHER's planner: certified block-skipping decisions -> a :class:`BlockMask` and certificates.

Notation (DESIGN.md section 6). Scores are ``s = scale * q.k + bias`` where ``bias`` is the additive
part of the score mod. For a query row ``r`` (one query position of one query head) and key block
``b`` with centroid ``mu_b``, radius ``r_b`` and ``n_b`` valid keys, with ``q' = scale * q``:

- ``U(r, b) = q'.mu_b + ||q'|| r_b + max_bias(r, b)`` bounds every score of the block from above
  (Cauchy-Schwarz);
- ``c(r, b) = q'.mu_b + min_bias(r, b)`` is at most the mean score of the block, so by Jensen the
  block's softmax numerator is at least ``n_b exp(c)``;
- ``L(r) = max c(r, b)`` over the blocks *fully visible* to the row, attained by the witness block.

Both bounds are computed in f32 at ``Precision.HIGHEST`` and widened by
``eta * ||q'|| (||mu_b|| + r_b)`` (``eta = 2**-10``), which covers the rounding of the centroid, of
this matmul and of the attention kernel's own (tf32) score matmul.

Decisions are per kernel tile (``block_q`` rows of every query head that reads one kv head: GQA
decides at kv-head granularity, over all packed heads). A tile may skip block ``b`` only if the
mask makes ``b`` fully visible to the whole tile (partial tiles always run), ``b`` is not the
witness of any row of the tile, and every valid row of the tile has a witness. Then:

- margin rule: skip ``b`` if ``U(r, b) <= L(r) - delta`` for every row, ``delta = log(Sk / eps)``;
- budget rule (default, tighter): with ``a_b = max_r U(r, b) - L(r)`` and
  ``D = min_r sum_{visible b} n_b exp(c(r, b) - L(r))``, skip candidates in increasing order of
  ``a_b`` while ``(1 + eps) sum_skipped n_b exp(a_b) <= eps D``.

Either way every row's skipped softmax numerator is at most ``eps`` times its kept numerator, so the
skipped probability mass is at most ``eps / (1 + eps)``, the LSE is low by at most ``eps`` and
``|out - dense| <= 2 eps max|v|``. The per-row certified bound (``rho / (1 + rho)`` with
``rho = sum_skipped n_b exp(U - L) / sum_kept_full n_b exp(c - L)``) is reported in the stats.

``threshold=`` is the AETHER pull request's absolute rule (skip ``b`` when ``max_r U(r, b) <
threshold``), kept for comparison: it certifies nothing, but it never skips a witness or a partial
tile, so no row is ever empty and nothing is NaN; its per-row bounds are still reported honestly.

Score mods: masks become tiles (their partial tiles always run); ``alibi_mod`` and
``additive_bias_mod`` (and compositions of them) add their exact per-(row, block) extremes to the
bounds; any other score mod disables pruning (the plan is the mask's BlockMask, nothing skipped).

Memory: the pre-pass runs over chunks of q tiles (``lax.map``); a chunk holds
``B * Hq * rows * nb`` f32 values, at most about ``2**24`` (all q tiles in one chunk when small).
What it keeps is ``(B, Hkv, nq, nb)`` booleans and, with stats, ``(B, Hq, Sq)`` bounds: never
``O(Sq * nb)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnax.kernels import block_mask as bm_lib
from attnax.kernels import score_mods as sm
from attnax.kernels.block_mask import EMPTY, BlockMask, create_block_mask
from attnax.kernels.aether.geometry import block_sizes, compute_block_geometry

__all__ = ["AetherStats", "AetherPlan", "plan_aether", "prepare", "screen", "decide",
           "unpruned_plan", "TileMapMask", "tile_mask_mod",
           "margin_delta", "score_mod_bounds", "ETA", "RULES"]

f32 = jnp.float32
ETA = 2.0 ** -10           # relative widening of the bounds (rounding of geometry and matmuls)
RULES = ("budget", "margin")
_CHUNK_ELEMS = 2 ** 24     # f32 values of one (rows x kv blocks) slab of the pre-pass
_SUM_SAFETY = 1.0 - 2.0 ** -9   # covers the rounding of the f32 sums of the budget rule
_MIN_LOG_TERM = -80.0      # exp(a) is taken as exp(max(a, -80)): no underflow (conservative)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AetherStats:
  """What AETHER skipped and what it certifies.

  Attributes:
    skipped_fraction: f32 ``(B, Hq)``: tiles skipped / tiles the mask leaves to compute.
    mass_bound: f32 ``(B, Hq, Sq)``: each row's certified upper bound on the softmax probability
      mass of its skipped keys (the LSE is low by at most ``-log(1 - mass_bound)``, the output off
      by at most ``2 mass_bound max|v|``).
    block_mask: the :class:`BlockMask` the kernel ran (pruned tiles are ``EMPTY``); its head axis
      is ``Hkv`` (decisions per kv head) or ``Hq`` for head-dependent masks.
  """
  skipped_fraction: jax.Array
  mass_bound: jax.Array
  block_mask: BlockMask


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AetherPlan:
  """The planner's output: the kernel's schedule and the certificates.

  Attributes:
    block_mask: BlockMask ``(B, H', nq, nb)`` for the attention kernel.
    skipped: bool ``(B, Hkv, nq, nb)``: tiles pruned by AETHER (all kv heads' packed query heads).
    mass_bound: f32 ``(B, Hq, Sq)`` per-row certified mass bounds, or ``None`` when not requested.
    base_tiles: int8 ``(B', H'', nq, nb)``: the mask's own tile map (before pruning).
  """
  block_mask: BlockMask
  skipped: jax.Array
  mass_bound: Any
  base_tiles: jax.Array

  def stats(self, batch: int, q_heads: int) -> AetherStats:
    """The :class:`AetherStats` record (needs ``mass_bound``)."""
    b, hkv, nq, nb = self.skipped.shape
    g = q_heads // hkv
    h_base = q_heads if self.base_tiles.shape[1] > 1 else 1
    base = jnp.broadcast_to(self.base_tiles != EMPTY, (batch, h_base, nq, nb))
    base = jnp.broadcast_to(base, (batch, q_heads, nq, nb))
    skipped = jnp.repeat(self.skipped, g, axis=1) & base
    total = base.sum((-2, -1)).astype(f32)
    frac = jnp.where(total > 0, skipped.sum((-2, -1)).astype(f32) / jnp.maximum(total, 1.0), 0.0)
    return AetherStats(frac, self.mass_bound, self.block_mask)


# ----------------------------------------------------------------------------- tile-map mask


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TileMapMask:
  """Mask mod: keep ``(b, h, i, j)`` iff ``tiles[b, h // groups, i // bq, j // bk] != EMPTY``.

  Turns a tile map into an elementwise mask (for the materialised reference path and for tests:
  dense attention restricted to the tiles a plan keeps).
  """
  tiles: jax.Array
  block_q: int = dataclasses.field(metadata=dict(static=True), default=128)
  block_k: int = dataclasses.field(metadata=dict(static=True), default=128)
  groups: int = dataclasses.field(metadata=dict(static=True), default=1)

  def __call__(self, b, h, q_idx, kv_idx):
    hh = h // self.groups if self.tiles.shape[1] > 1 else h
    return sm.take(self.tiles, b, hh, q_idx // self.block_q, kv_idx // self.block_k) != EMPTY


def tile_mask_mod(block_mask: BlockMask, q_heads: int) -> TileMapMask:
  """A mask mod keeping exactly the non-empty tiles of ``block_mask`` (heads 1, Hkv or Hq)."""
  h = block_mask.tiles.shape[1]
  if q_heads % h:
    raise ValueError(f"block mask head axis {h} does not divide the {q_heads} query heads")
  return TileMapMask(block_mask.tiles, block_mask.block_q, block_mask.block_k,
                     q_heads // h if h > 1 else 1)


# ----------------------------------------------------------------------------- score-mod bounds


def margin_delta(kv_len: int, epsilon: float) -> float:
  """The margin rule's gap ``delta = log(Sk / epsilon)`` (``inf`` for ``epsilon = 0``)."""
  return math.inf if epsilon == 0 else math.log(kv_len / epsilon)


class _Bounds:
  """Per-(row, kv block) upper and lower bounds of an additive score mod over the block's keys."""

  def __init__(self, parts):
    self.parts = parts   # list of callables rows -> (ub, lb), each (B'|1, Hkv|1, G|1, R, nb)

  def __call__(self, rows):
    ub = lb = 0.0
    for p in self.parts:
      u, l = p(rows)
      ub, lb = ub + u, lb + l
    return ub, lb


def _split_heads(x: jax.Array, q_heads: int, kv_heads: int, name: str) -> jax.Array:
  """``(B', H', R, nb)`` with ``H'`` in ``{1, Hq}`` -> ``(B', Hkv|1, G|1, R, nb)``."""
  if x.shape[1] == 1:
    return x[:, :, None]
  if x.shape[1] != q_heads:
    raise ValueError(f"{name}: head axis {x.shape[1]} must be 1 or the {q_heads} query heads")
  return x.reshape(x.shape[0], kv_heads, q_heads // kv_heads, *x.shape[2:])


def score_mod_bounds(score_fn: Any, *, batch: int, q_heads: int, kv_heads: int, q_len: int,
                     kv_len: int, block_k: int) -> _Bounds | None:
  """Bounds of the score part of the mods, or ``None`` when it is not a known additive mod.

  Known: ``AlibiMod`` (``slopes[h] * (j - i)``, exact per row over the block's key range),
  ``AdditiveBiasMod`` (per-row max/min of the bias over the block's valid keys) and compositions
  of them. Returns a callable ``rows (R,) -> (ub, lb)`` broadcastable to ``(B, Hkv, G, R, nb)``.
  """
  if score_fn is None:
    return _Bounds([])
  mods = score_fn.mods if isinstance(score_fn, sm.ComposedScoreMod) else (score_fn,)
  nb = -(-kv_len // block_k)
  k_lo = jnp.arange(nb, dtype=jnp.int32) * block_k
  k_hi = jnp.minimum(k_lo + block_k, kv_len) - 1
  parts = []
  for m in mods:
    if isinstance(m, sm.AlibiMod):
      slopes = jnp.asarray(m.slopes, f32).reshape(1, -1, 1, 1)
      slopes = _split_heads(slopes, q_heads, kv_heads, "alibi slopes")

      def alibi(rows, slopes=slopes):
        lo = (k_lo[None, :] - rows[:, None]).astype(f32)
        hi = (k_hi[None, :] - rows[:, None]).astype(f32)
        return jnp.maximum(slopes * lo, slopes * hi), jnp.minimum(slopes * lo, slopes * hi)
      parts.append(alibi)
    elif isinstance(m, sm.AdditiveBiasMod):
      bias = m.bias
      if bias.ndim != 4 or bias.shape[0] not in (1, batch) or bias.shape[2] not in (1, q_len) \
          or bias.shape[3] not in (1, kv_len):
        raise ValueError(f"additive_bias_mod: bias {tuple(bias.shape)} does not broadcast to "
                         f"(B, Hq, Sq, Sk) = {(batch, q_heads, q_len, kv_len)}")
      x = bias.astype(f32)
      if x.shape[3] == kv_len and kv_len > 1:
        pad = ((0, 0), (0, 0), (0, 0), (0, nb * block_k - kv_len))
        hi = jnp.pad(x, pad, constant_values=-jnp.inf).reshape(*x.shape[:3], nb, block_k).max(-1)
        lo = jnp.pad(x, pad, constant_values=jnp.inf).reshape(*x.shape[:3], nb, block_k).min(-1)
      else:
        hi = lo = x
      hi = _split_heads(hi, q_heads, kv_heads, "additive_bias_mod bias")
      lo = _split_heads(lo, q_heads, kv_heads, "additive_bias_mod bias")

      def additive(rows, hi=hi, lo=lo):
        if hi.shape[3] == 1:
          return hi, lo
        return (jnp.take(hi, rows, axis=3, mode="clip"), jnp.take(lo, rows, axis=3, mode="clip"))
      parts.append(additive)
    else:
      return None
  return _Bounds(parts)


# ----------------------------------------------------------------------------- the pre-pass


def _eligible(mask_fn, batch, q_heads, block_q, block_k, q_len, kv_len) -> jax.Array:
  """bool ``(B', H'', nq, nb)``: tiles whose valid positions are all visible (witness/skippable).

  Unlike ``BlockMask.tiles == FULL`` this counts a ragged tail tile as fully visible when the mask
  keeps all of its valid positions (the geometry of a tail block covers its valid keys only).
  """
  nq, nb = -(-q_len // block_q), -(-kv_len // block_k)
  if mask_fn is None:
    return jnp.ones((1, 1, nq, nb), bool)
  any_, all_ = bm_lib.visibility(mask_fn, batch, q_heads, block_q, block_k, q_len, kv_len)
  all_ = jnp.asarray(all_, bool) & jnp.asarray(any_, bool)
  lead = tuple(jnp.shape(all_)[:2])
  return jnp.broadcast_to(all_, lead + (nq, nb))


def _decide_chunk(qc, rows, elig, geo, bounds, *, kv_heads, block_q, epsilon, threshold, rule,
                  q_len, kv_len, want_rows, screen=False):
  """Decisions for ``T`` consecutive q tiles.

  With ``screen=True`` the "tile" is one representative row per q tile (``block_q = 1``) and the
  result is ``possible`` bool ``(B, Hkv, T)``: False only where the full rule provably skips
  nothing in that tile (a skip needs, for every row and so for the representative one,
  ``U - L`` small enough; the screen is looser than the rule by a rounding margin).

  Args:
    qc: scaled queries f32 ``(B, Hq, T * block_q, D)``.
    rows: int32 ``(T * block_q,)`` absolute query positions (``>= Sq`` for padding rows).
    elig: bool ``(B', H'', T, nb)`` fully visible tiles.
    geo: ``(mu (B, Hkv, nb, D), radius (B, Hkv, nb), |mu| (B, Hkv, nb), n_b (nb,))``.
    bounds: score-mod bounds (``rows -> (ub, lb)``).

  Returns:
    ``skip`` bool ``(B, Hkv, T, nb)`` and, when ``want_rows``, f32 ``(B, Hq, T * block_q)`` row
    bounds on the skipped mass.
  """
  mu, rad, mun, nbk = geo
  b, hq, rr, d = qc.shape
  g = hq // kv_heads
  t = rr // block_q
  nb = mu.shape[2]
  q6 = qc.reshape(b, kv_heads, g, t, block_q, d)
  c = jnp.einsum("bhgtqd,bhnd->bhgtqn", q6, mu, precision=jax.lax.Precision.HIGHEST,
                 preferred_element_type=f32)
  qn = jnp.sqrt(jnp.sum(q6 * q6, axis=-1)) * (1.0 + ETA)          # (B, Hkv, G, T, bq)
  geom = lambda x: x[:, :, None, None, None, :]                   # (B, Hkv, nb) -> 6-d
  slack = ETA * qn[..., None] * geom(mun + rad)
  ub, lb = bounds(rows)
  if not isinstance(ub, float):
    # Per-row bounds (R rows) split into (T, bq); a bound shared by every row (a bias with a
    # query axis of 1) broadcasts over both.
    rows6 = lambda x: (x[:, :, :, :, None, :] if x.shape[3] == 1 else
                       x.reshape(*x.shape[:3], t, block_q, x.shape[-1]))
    ub, lb = rows6(ub), rows6(lb)
    ub = ub + ETA * jnp.where(jnp.isfinite(ub), jnp.abs(ub), 0.0)
    lb = lb - ETA * jnp.where(jnp.isfinite(lb), jnp.abs(lb), 0.0)
  upper = c + qn[..., None] * geom(rad) + slack + ub                # U(r, b)
  lower = c - slack + lb                                           # c(r, b)

  # Eligibility per row's head: (B', H'', T, nb) -> (B'|B, Hkv|1, G|1, T, 1, nb)
  if elig.shape[1] > 1:
    el = elig.reshape(elig.shape[0], kv_heads, g, t, 1, nb)
  else:
    el = elig[:, :, None, :, None, :]
  valid = (rows < q_len).reshape(1, 1, 1, t, block_q)
  lw = jnp.max(jnp.where(el, lower, -jnp.inf), axis=-1)            # L(r): (B, Hkv, G, T, bq)
  has_w = jnp.isfinite(lw)
  lf = jnp.where(has_w, lw, 0.0)
  tile_ok = jnp.all(has_w | ~valid, axis=(2, 4))                   # (B, Hkv, T)
  rv = valid[..., None]
  witness = jnp.any(el & (lower == lw[..., None]) & has_w[..., None] & rv, axis=(2, 4))
  cand = jnp.all(jnp.broadcast_to(el, (el.shape[0], el.shape[1], el.shape[2], t, 1, nb)),
                 axis=(2, 4))
  cand = jnp.broadcast_to(cand, (b, kv_heads, t, nb)) & ~witness   # (B, Hkv, T, nb)
  nbf = nbk.astype(f32)

  if screen:
    if threshold is not None:
      umax = jnp.max(upper, axis=(2, 4))
      ok = umax < threshold + 1e-3 * (1.0 + abs(threshold))
    else:
      cand = cand & tile_ok[..., None]
      a = jnp.max(upper - lf[..., None], axis=(2, 4))
      if rule == "margin":
        ok = a <= -margin_delta(kv_len, epsilon) + 1e-2
      else:
        dsum = jnp.sum(jnp.where(el, nbf * jnp.exp(lower - lf[..., None]), 0.0), axis=-1)
        dmin = jnp.min(dsum, axis=(2, 4))
        ok = nbf * jnp.exp(a) * (1.0 + epsilon) <= 1.01 * epsilon * dmin[..., None]
    return jnp.any(cand & ok, axis=-1), None

  if threshold is not None:
    umax = jnp.max(jnp.where(rv, upper, -jnp.inf), axis=(2, 4))
    skip = cand & (umax < threshold)
  elif epsilon == 0:
    skip = jnp.zeros_like(cand)
  else:
    cand = cand & tile_ok[..., None]
    a = jnp.max(jnp.where(rv, upper - lf[..., None], -jnp.inf), axis=(2, 4))  # (B, Hkv, T, nb)
    if rule == "margin":
      skip = cand & (a <= -margin_delta(kv_len, epsilon))
    else:
      dsum = jnp.sum(jnp.where(el, nbf * jnp.exp(lower - lf[..., None]), 0.0), axis=-1)
      dmin = jnp.min(jnp.where(valid, dsum, jnp.inf), axis=(2, 4))  # (B, Hkv, T)
      key = jnp.where(cand, a, jnp.inf)
      order = jnp.argsort(key, axis=-1)
      a_s = jnp.take_along_axis(a, order, axis=-1)
      c_s = jnp.take_along_axis(cand, order, axis=-1)
      n_s = nbf[order]
      cum = jnp.cumsum(jnp.where(c_s, n_s * jnp.exp(jnp.maximum(a_s, _MIN_LOG_TERM)), jnp.inf),
                       axis=-1)
      ok = c_s & (cum * (1.0 + epsilon) <= epsilon * _SUM_SAFETY * dmin[..., None])
      m = jnp.sum(ok, axis=-1)                                     # the largest safe prefix
      rank = jnp.argsort(order, axis=-1)
      skip = cand & (rank < m[..., None])

  if not want_rows:
    return skip, None
  s6 = skip[:, :, None, :, None, :]
  num = jnp.sum(jnp.where(s6, nbf * jnp.exp(jnp.minimum(upper - lf[..., None], 80.0)), 0.0), -1)
  kept = jnp.sum(jnp.where(el & ~s6, nbf * jnp.exp(lower - lf[..., None]), 0.0), -1)
  rho = num / jnp.where(kept > 0, kept, 1.0)
  mass = jnp.where(num > 0, jnp.where(has_w & (kept > 0), rho / (1.0 + rho), 1.0), 0.0)
  mass = jnp.minimum(mass, 1.0)
  return skip, mass.reshape(b, hq, rr)


@dataclasses.dataclass(frozen=True)
class _Prep:
  """What the screen and the decisions share: shapes, settings, the mask's tiles, geometry."""
  q: Any
  base: BlockMask
  elig: Any
  geo: Any
  bounds: Any
  settings: dict
  dims: tuple   # (B, Hq, Hkv, Sq, Sk, nq, nb)

  @property
  def prunes(self) -> bool:
    return self.bounds is not None


def prepare(q, k, *, scale, score_fn, mask_fn, block_q, block_k, epsilon=1e-3, threshold=None,
            rule="budget", geometry=None) -> _Prep:
  """The mask's BlockMask and, when pruning is possible, the key geometry and mod bounds."""
  if rule not in RULES:
    raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
  b, hq, sq, d = q.shape
  _, hkv, sk, _ = k.shape
  nq, nb = -(-sq // block_q), -(-sk // block_k)
  base = create_block_mask(mask_fn, q_len=sq, kv_len=sk, block_q=block_q, block_k=block_k,
                           batch=b, heads=hq)
  settings = dict(scale=scale, block_q=block_q, block_k=block_k, epsilon=float(epsilon),
                  threshold=threshold, rule=rule)
  dims = (b, hq, hkv, sq, sk, nq, nb)
  bounds = None
  if threshold is not None or epsilon > 0:
    bounds = score_mod_bounds(score_fn, batch=b, q_heads=hq, kv_heads=hkv, q_len=sq, kv_len=sk,
                              block_k=block_k)
  if bounds is None:   # unknown score mod, or epsilon = 0: nothing is pruned
    return _Prep(None, base, None, None, None, settings, dims)
  q = jax.lax.stop_gradient(q)
  k = jax.lax.stop_gradient(k)
  mu, rad = geometry if geometry is not None else compute_block_geometry(k, block_k)
  geo = (mu, rad, jnp.linalg.norm(mu, axis=-1), block_sizes(sk, block_k))
  elig = _eligible(mask_fn, b, hq, block_q, block_k, sq, sk)
  return _Prep(q, base, elig, geo, bounds, settings, dims)


def _chunk_kwargs(prep: _Prep, want_rows: bool, screen: bool = False) -> dict:
  st = prep.settings
  b, hq, hkv, sq, sk, nq, nb = prep.dims
  return dict(kv_heads=hkv, block_q=1 if screen else st["block_q"], epsilon=st["epsilon"],
              threshold=st["threshold"], rule=st["rule"], q_len=sq, kv_len=sk,
              want_rows=want_rows, screen=screen)


def screen(prep: _Prep) -> jax.Array:
  """bool ``(B, Hkv, nq)``: q tiles in which the rule might skip something.

  Evaluates the bounds on the first row of every q tile only (``1 / block_q`` of the decision
  work): a tile whose representative row already rules out every skip is left alone.
  """
  b, hq, hkv, sq, sk, nq, nb = prep.dims
  bq, scale = prep.settings["block_q"], prep.settings["scale"]
  t_chunk = max(1, min(nq, _CHUNK_ELEMS // max(1, b * hq * nb)))
  kw = _chunk_kwargs(prep, False, screen=True)

  def chunk(t0, t, el):
    rows = (t0 + jnp.arange(t, dtype=jnp.int32)) * bq      # the first row of each q tile
    qc = jnp.take(prep.q, rows, axis=2).astype(f32) * scale
    return _decide_chunk(qc, rows, el, prep.geo, prep.bounds, **kw)[0]

  n_full = nq // t_chunk
  parts = []
  if n_full:
    p = jax.lax.map(lambda i: chunk(i * t_chunk, t_chunk, jax.lax.dynamic_slice_in_dim(
        prep.elig, i * t_chunk, t_chunk, axis=2)), jnp.arange(n_full, dtype=jnp.int32))
    parts.append(jnp.moveaxis(p, 0, 2).reshape(b, hkv, n_full * t_chunk))
  if n_full * t_chunk < nq:
    t0 = n_full * t_chunk
    parts.append(chunk(t0, nq - t0, prep.elig[:, :, t0:]))
  return jnp.concatenate(parts, axis=2) if len(parts) > 1 else parts[0]


def _output_heads(prep: _Prep) -> int:
  b, hq, hkv, sq, sk, nq, nb = prep.dims
  return hq if prep.base.tiles.shape[1] > 1 else hkv


def unpruned_plan(prep: _Prep, with_stats: bool) -> AetherPlan:
  """The plan that skips nothing, shaped like :func:`decide`'s (the two branches of a cond)."""
  b, hq, hkv, sq, sk, nq, nb = prep.dims
  st = prep.settings
  h_out = _output_heads(prep)
  tiles = jnp.broadcast_to(prep.base.tiles, (b, h_out, nq, nb))
  bmask = BlockMask.from_tiles(tiles, block_q=st["block_q"], block_k=st["block_k"], q_len=sq,
                               kv_len=sk)
  mass = jnp.zeros((b, hq, sq), f32) if with_stats else None
  return AetherPlan(bmask, jnp.zeros((b, hkv, nq, nb), bool), mass, prep.base.tiles)


def decide(prep: _Prep, possible: jax.Array | None = None, with_stats: bool = False) -> AetherPlan:
  """The certified plan; q tiles where ``possible`` (:func:`screen`) is False are not examined."""
  if not prep.prunes:
    return unpruned_plan(prep, with_stats)
  b, hq, hkv, sq, sk, nq, nb = prep.dims
  st = prep.settings
  bq, scale = st["block_q"], st["scale"]
  g = hq // hkv
  t_chunk = max(1, min(nq, _CHUNK_ELEMS // max(1, b * hq * bq * nb)))
  n_full = sq // (t_chunk * bq)
  kw = _chunk_kwargs(prep, with_stats)

  def examine(qc, rows, el, poss):
    t = el.shape[2]
    none = (jnp.zeros((b, hkv, t, nb), bool),
            jnp.zeros((b, hq, t * bq), f32) if with_stats else None)
    run = lambda: _decide_chunk(qc, rows, el, prep.geo, prep.bounds, **kw)
    if poss is None:
      return run()
    return jax.lax.cond(jnp.any(poss), run, lambda: none)

  def chunk(i):
    r0 = i * (t_chunk * bq)
    qc = jax.lax.dynamic_slice_in_dim(prep.q, r0, t_chunk * bq, axis=2).astype(f32) * scale
    rows = r0 + jnp.arange(t_chunk * bq, dtype=jnp.int32)
    el = jax.lax.dynamic_slice_in_dim(prep.elig, i * t_chunk, t_chunk, axis=2)
    poss = None if possible is None else jax.lax.dynamic_slice_in_dim(possible, i * t_chunk,
                                                                      t_chunk, axis=2)
    return examine(qc, rows, el, poss)

  skips, masses = [], []
  if n_full:
    s, m = jax.lax.map(chunk, jnp.arange(n_full, dtype=jnp.int32))
    # (n, B, Hkv, T, nb) -> (B, Hkv, n * T, nb)
    skips.append(jnp.moveaxis(s, 0, 2).reshape(b, hkv, n_full * t_chunk, nb))
    if with_stats:
      masses.append(jnp.moveaxis(m, 0, 2).reshape(b, hq, n_full * t_chunk * bq))
  r0 = n_full * t_chunk * bq
  if r0 < sq:   # the tail: fewer than t_chunk q tiles, the last one possibly ragged
    t0 = n_full * t_chunk
    rows_n = (nq - t0) * bq
    qc = prep.q[:, :, r0:].astype(f32) * scale
    qc = jnp.pad(qc, ((0, 0), (0, 0), (0, rows_n - (sq - r0)), (0, 0)))
    rows = r0 + jnp.arange(rows_n, dtype=jnp.int32)
    poss = None if possible is None else possible[:, :, t0:]
    s, m = examine(qc, rows, prep.elig[:, :, t0:], poss)
    skips.append(s)
    if with_stats:
      masses.append(m)
  skipped = jnp.concatenate(skips, axis=2) if len(skips) > 1 else skips[0]
  mass = None
  if with_stats:
    mass = (jnp.concatenate(masses, axis=2) if len(masses) > 1 else masses[0])[:, :, :sq]

  h_out = _output_heads(prep)
  sk_out = jnp.repeat(skipped, g, axis=1) if h_out != hkv else skipped
  tiles = jnp.where(sk_out, EMPTY, jnp.broadcast_to(prep.base.tiles, (b, h_out, nq, nb)))
  bmask = BlockMask.from_tiles(tiles, block_q=bq, block_k=st["block_k"], q_len=sq, kv_len=sk)
  return AetherPlan(bmask, skipped, mass, prep.base.tiles)


def plan_aether(q: jax.Array, k: jax.Array, *, scale: float, score_fn: Any, mask_fn: Any,
                block_q: int, block_k: int, epsilon: float = 1e-3, threshold: float | None = None,
                rule: str = "budget", with_stats: bool = False,
                geometry: tuple[jax.Array, jax.Array] | None = None,
                use_screen: bool = True) -> AetherPlan:
  """Certified block-skipping plan for ``softmax(mods(scale q k^T))``.

  Args:
    q: ``(B, Hq, Sq, D)``; k: ``(B, Hkv, Sk, D)`` (decisions are taken on their values, under
      ``stop_gradient``).
    scale: the score scale; score_fn / mask_fn: the score part and the mask part of the mods
      (:func:`attnax.kernels.score_mods.resolve_mods`).
    block_q, block_k: the attention kernel's tile.
    epsilon: certified bound on the ratio of skipped to kept softmax numerator per row.
    threshold: the pull request's absolute rule instead (see module doc).
    rule: ``"budget"`` (default) or ``"margin"``.
    with_stats: also compute the per-row mass bounds ``(B, Hq, Sq)``.
    geometry: precomputed ``compute_block_geometry(k, block_k)``.
    use_screen: examine only the q tiles the cheap :func:`screen` cannot rule out (same result).

  Returns:
    :class:`AetherPlan`.
  """
  prep = prepare(q, k, scale=scale, score_fn=score_fn, mask_fn=mask_fn, block_q=block_q,
                 block_k=block_k, epsilon=epsilon, threshold=threshold, rule=rule,
                 geometry=geometry)
  if not prep.prunes:
    return unpruned_plan(prep, with_stats)
  return decide(prep, screen(prep) if use_screen else None, with_stats)
