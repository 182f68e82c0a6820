"""flash_attention: pure-JAX FlashAttention-2 with BlockMask skipping and a recomputing backward.

The forward walks the q blocks (``lax.map``) and, for each, only the kv blocks its
:class:`~attnax.kernels.BlockMask` lists: a ``lax.fori_loop`` over the *full* blocks (no elementwise
mask work) and one over the *partial* blocks (mask applied), each trip count read from the
BlockMask's counts and each kv block fetched with ``dynamic_slice`` at the listed index. Empty tiles
are in no list, so they cost nothing. Statistics follow the online softmax of
:mod:`attnax.kernels.tiles`.

The backward (``jax.custom_vjp``) saves only ``(q, k, v, out, lse)`` and recomputes the
probabilities of every visited tile from the LSE: a dQ pass over the same per-q-block lists and a
dK/dV pass over the transposed per-kv-block lists (``q_counts``/``q_indices`` and
``full_q_counts``/``full_q_indices``), so the backward skips exactly what the forward skips.

Layout inside: q is ``(B, Hkv, G, S, D)`` with the ``G = Hq // Hkv`` query heads of one kv head
packed together and folded into the rows of each matmul; k and v are never repeated. Batch rows and
kv heads on which the BlockMask differs run one after the other (``lax.map``), so each gets its own
skipping; axes on which the mask is shared are vectorised. A BlockMask given per query head
(``H' = Hq``) is merged over each packed group (a tile is visited when any head of the group needs
it) and every head keeps its own tile state inside the tile (empty -> invisible, full -> visible,
partial -> elementwise mask).

Ragged lengths are padded internally to block multiples; the tail tiles are partial and mask the
positions past ``Sq``/``Sk`` via ``tiles.tile_scores``.

Dropout (FlashAttention's scheme): the keep mask of a tile is regenerated from the seed and the
absolute indices (:func:`attnax.kernels.tiles.dropout_keep`) wherever the tile is visited: in the
forward (on the probabilities entering ``P V``, after the running sum ``l`` has counted them) and
in both backward passes (``dV = (P Z)^T dO``, ``dS = P (Z dP' - delta)``); nothing is stored.

Threshold skipping (``_Config.softmax_threshold``, behind
:func:`attnax.kernels.threshold_sparse_attention`): each visited tile is decided per query head
with :func:`attnax.kernels.tiles.threshold_skip` before its softmax update; a skipped head keeps
its statistics, and the ``P V`` work runs (``lax.cond``) unless every head of the vectorised group
skips. The forward records the decisions (int8 ``(B, Hq, nq, nk)``), the custom_vjp keeps them as a
residual, and both backward passes give the skipped tiles no probability and skip their work.

Precision follows the inputs: f32 statistics and accumulators for f32/bf16/f16, f64 for f64.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from attnax.kernels import _checks
from attnax.kernels import operands as ops_lib
from attnax.kernels import score_mods as sm
from attnax.kernels import tiles
from attnax.kernels.block_mask import (EMPTY, FULL, PARTIAL, BlockMask, create_block_mask,
                                       fit_block_mask)
from attnax.kernels.gqa import fold_group as _fold
from attnax.kernels.gqa import head_index as gqa_head_index
from attnax.kernels.tiles import low_precision as _lowp

__all__ = ["flash_attention"]

i32, f32 = jnp.int32, jnp.float32


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static description of one call (shapes, tiling, how the mask's leading axes are walked)."""
  scale: float
  block_q: int
  block_k: int
  q_len: int
  kv_len: int
  groups: int        # G = Hq // Hkv
  nb: int            # batch rows walked sequentially (the BlockMask's B'); B // nb vectorised
  nh: int            # kv heads walked sequentially (1 or Hkv); Hkv // nh vectorised
  dropout_rate: float = 0.0
  # Threshold skipping (attnax.kernels.threshold): None = off; else the static threshold and rule.
  softmax_threshold: float | None = None
  threshold_rule: str = "tile"

  @property
  def ragged_q(self) -> bool:
    return self.q_len % self.block_q != 0

  @property
  def ragged_k(self) -> bool:
    return self.kv_len % self.block_k != 0

  @property
  def log_threshold(self) -> float:
    return tiles.log_threshold(self.softmax_threshold)


# ----------------------------------------------------------------------------- planning


def _plan(mask_fn: Any, block_mask: BlockMask | None, *, batch: int, hq: int, hkv: int, sq: int,
          sk: int, block_q: int, block_k: int) -> tuple[BlockMask, jax.Array | None]:
  """The BlockMask the loops walk and the per-query-head tile states (or None).

  The returned BlockMask has leading axes ``(nb, nh)`` with ``nb in (1, B)``, ``nh in (1, Hkv)``;
  the states, when the given tiles are per query head (``H' = Hq``, ``G > 1``), are int8
  ``(nb, Hkv, G, nq, nk)``.
  """
  g = hq // hkv
  if block_mask is None:
    block_mask = create_block_mask(mask_fn, q_len=sq, kv_len=sk, block_q=block_q, block_k=block_k,
                                   batch=batch, heads=hq)
  else:
    block_mask = fit_block_mask(block_mask, batch=batch, q_heads=hq, kv_heads=hkv, q_len=sq,
                                kv_len=sk, kernel="flash_attention")
  bm = block_mask
  nq, nk = -(-sq // bm.block_q), -(-sk // bm.block_k)
  bp, hp = bm.tiles.shape[:2]
  t = bm.tiles
  state = None
  if hp == hq and g > 1:
    # Per-query-head tiles: visit the union over each packed group, keep each head's own state.
    state = t.reshape(bp, hkv, g, nq, nk)
    union = jnp.where((state == EMPTY).all(2), EMPTY,
                      jnp.where((state == FULL).all(2), FULL, PARTIAL)).astype(jnp.int8)
    bm = BlockMask.from_tiles(union, block_q=bm.block_q, block_k=bm.block_k, q_len=sq, kv_len=sk)
  return bm, state


def _split_lead(x: jax.Array, nb: int, nh: int) -> jax.Array:
  """``(B, Hkv, ...) -> (nb * nh, B // nb, Hkv // nh, ...)``: one entry per sequential group."""
  bsz, hkv = x.shape[:2]
  x = x.reshape((nb, bsz // nb, nh, hkv // nh) + x.shape[2:])
  return jnp.swapaxes(x, 1, 2).reshape((nb * nh, bsz // nb, hkv // nh) + x.shape[4:])


def _merge_lead(x: jax.Array, nb: int, nh: int) -> jax.Array:
  """Inverse of :func:`_split_lead`."""
  bv, hv = x.shape[1:3]
  x = jnp.swapaxes(x.reshape((nb, nh, bv, hv) + x.shape[3:]), 1, 2)
  return x.reshape((nb * bv, nh * hv) + x.shape[4:])


def _pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


# ----------------------------------------------------------------------------- one group


@dataclasses.dataclass(frozen=True)
class _Group:
  """Everything the tile loops of one sequential group need (arrays already sliced to the group).

  Shapes: q ``(Bv, Hv, G, Sq_pad, D)``, k ``(Bv, Hv, Sk_pad, D)``, v ``(Bv, Hv, Sk_pad, Dv)``;
  ``lists`` the group's BlockMask lists (leading axes removed); ``state`` ``(G, nq, nk)`` or None;
  ``b_idx`` ``(Bv, 1, 1, 1, 1)`` and ``h_idx`` ``(1, Hv, G, 1, 1)`` absolute batch / query head.
  ``mods`` and ``values`` are the mods' static part and their operand arrays; ``diff`` lists the
  operands whose cotangents the backward accumulates; ``seed`` the dropout seed (uint32 ``(2,)``,
  None without dropout); ``skip`` the forward's threshold decisions, bool ``(Bv, Hv, G, nq, nk)``
  (None without threshold skipping): the backward gives skipped tiles no probability.
  """
  cfg: _Config
  mods: ops_lib.ModOperands
  values: tuple
  diff: tuple
  lists: Any
  state: Any
  b_idx: jax.Array
  h_idx: jax.Array
  seed: Any = None
  skip: Any = None

  def skipped(self, qb: jax.Array, kb: jax.Array) -> jax.Array | None:
    """The forward's decision for tile ``(qb, kb)`` of each head, bool ``(Bv, Hv, G)``."""
    return None if self.skip is None else self.skip[:, :, :, qb, kb]

  def keep(self, qb: jax.Array, kb: jax.Array) -> jax.Array | None:
    """Dropout's keep mask of tile ``(qb, kb)``, ``(Bv, Hv, G, bq, bk)``; None without dropout."""
    cfg = self.cfg
    if not cfg.dropout_rate:
      return None
    bq, bk = cfg.block_q, cfg.block_k
    q_idx = (qb * bq + jnp.arange(bq, dtype=i32)).reshape(1, 1, 1, bq, 1)
    kv_idx = (kb * bk + jnp.arange(bk, dtype=i32)).reshape(1, 1, 1, 1, bk)
    return tiles.dropout_keep(self.seed, cfg.dropout_rate, self.b_idx, self.h_idx, q_idx, kv_idx)

  def scores(self, q_blk: jax.Array, k_blk: jax.Array, qb: jax.Array, kb: jax.Array,
             masked: bool, with_vjp: bool = False):
    """Modded, masked scores of tile ``(qb, kb)``.

    Args:
      q_blk: ``(Bv, Hv, G, bq, D)``; k_blk: ``(Bv, Hv, bk, D)``.
      masked: False for full tiles (no elementwise mask, no tail), True for partial tiles.
      with_vjp: also return the VJP of the score mod (for the backward): a function of
        ``d(modded scores)`` returning ``(d(raw scores), cotangents of the diff operands)``.

    Returns:
      ``(s, visible)`` or ``(s, visible, vjp)``; ``s`` f32 (f64 for f64 inputs)
      ``(Bv, Hv, G, bq, bk)``.
    """
    cfg = self.cfg
    bv, hv, g, bq, d = q_blk.shape
    bk = k_blk.shape[2]
    s = tiles.qk_dot(q_blk.reshape(bv, hv, g * bq, d), k_blk).reshape(bv, hv, g, bq, bk)
    s = s * cfg.scale
    q_idx = (qb * bq + jnp.arange(bq, dtype=i32)).reshape(1, 1, 1, bq, 1)
    kv_idx = (kb * bk + jnp.arange(bk, dtype=i32)).reshape(1, 1, 1, 1, bk)
    st = self.state[:, qb, kb].reshape(1, 1, g, 1, 1) if masked and self.state is not None else None

    def mod(s, diff_values):
      values = list(self.values)
      for i, x in zip(self.diff, diff_values):
        values[i] = x
      score_fn, mask_fn = self.mods.rebuild(values)
      if st is not None:
        inner = mask_fn
        mask_fn = ((lambda b, h, i, j: st != EMPTY) if inner is None else
                   (lambda b, h, i, j: (st == FULL) | ((st == PARTIAL) & inner(b, h, i, j))))
      return tiles.tile_scores(
          s, score_fn=score_fn, mask_fn=mask_fn, b=self.b_idx, h=self.h_idx, q_idx=q_idx,
          kv_idx=kv_idx, q_len=cfg.q_len if masked and cfg.ragged_q else None,
          kv_len=cfg.kv_len if masked and cfg.ragged_k else None, apply_mask=masked)

    diff_values = tuple(self.values[i] for i in self.diff)
    if not with_vjp:
      return mod(s, diff_values)
    if not self.diff and self.mods.rebuild(self.values)[0] is None:
      # Only masking: the VJP is the identity on visible entries.
      s, visible = mod(s, ())
      return s, visible, lambda ds: (ds, ())
    s, vjp, visible = jax.vjp(mod, s, diff_values, has_aux=True)
    return s, visible, vjp


def _loop(count, indices, row, body, carry):
  """``fori_loop`` over the first ``count`` entries of ``indices[row]`` (visits counted)."""
  def step(t, c):
    inner, n = c
    return body(indices[row, t], inner), n + 1
  return jax.lax.fori_loop(0, count, step, carry)


def _unless_skipped(grp: "_Group", tile_of, body):
  """``body(i, carry)``, or the carry unchanged when the forward skipped tile ``tile_of(i)`` (a
  ``(qb, kb)`` pair) for every head of the vectorised group (threshold skipping only)."""
  if grp.skip is None:
    return body
  return lambda i, carry: jax.lax.cond(jnp.all(grp.skipped(*tile_of(i))), lambda c: c,
                                       lambda c: body(i, c), carry)


def _forward_group(grp: _Group, q, k, v, out_dtype):
  """Forward of one group: ``(out (Bv,Hv,G,Sq_pad,Dv) out_dtype, lse (Bv,Hv,G,Sq_pad), visits,
  decisions)``; ``decisions`` int8 ``(Bv,Hv,G,nq,nk)`` codes (``tiles.TILE_*``) with threshold
  skipping, else None."""
  cfg, lists = grp.cfg, grp.lists
  bq, bk = cfg.block_q, cfg.block_k
  bv, hv, g, sqp, _ = q.shape
  dv = v.shape[-1]
  nq, nk = sqp // bq, k.shape[2] // bk
  acc_t = tiles.acc_dtype(q.dtype)
  thresholded = cfg.softmax_threshold is not None

  def q_block(qb):
    q_blk = jax.lax.dynamic_slice_in_dim(q, qb * bq, bq, axis=3)
    q_valid = qb * bq + jnp.arange(bq, dtype=i32) < cfg.q_len

    def step(s, visible, kb, v_blk, acc, m, l):
      p, alpha, m, l = tiles.online_softmax_step(s, visible, m, l)
      keep = grp.keep(qb, kb)
      if keep is not None:   # after l has counted p: the LSE is that of the undropped softmax
        p = tiles.apply_dropout(p, keep, cfg.dropout_rate)
      pv = sum(tiles.pv_dot(_fold(x), v_blk) for x in tiles.p_terms(p, v.dtype, out_dtype))
      pv = pv.reshape(bv, hv, g, bq, dv)
      return acc * alpha[..., None] + pv, m, l

    def tile(masked):
      def body(kb, carry):
        acc, m, l, rec = carry
        k_blk = jax.lax.dynamic_slice_in_dim(k, kb * bk, bk, axis=2)
        v_blk = jax.lax.dynamic_slice_in_dim(v, kb * bk, bk, axis=2)
        s, visible = grp.scores(q_blk, k_blk, qb, kb, masked)
        if not thresholded:
          return step(s, visible, kb, v_blk, acc, m, l) + (rec,)
        tile_m, codes = rec
        skip, tile_max = tiles.threshold_skip(s, q_valid, m, tile_m, cfg.log_threshold,
                                              cfg.threshold_rule)

        def kept(c):
          acc, m, l, tile_m = c
          acc2, m2, l2 = step(s, visible, kb, v_blk, acc, m, l)
          # Heads of the vectorised group decide separately: a skipping head keeps its state.
          sk = skip[..., None]
          return (jnp.where(sk[..., None], acc, acc2), jnp.where(sk, m, m2),
                  jnp.where(sk, l, l2), jnp.where(skip, tile_m, jnp.maximum(tile_m, tile_max)))

        # The PV work runs unless every head of the group skips the tile.
        acc, m, l, tile_m = jax.lax.cond(jnp.all(skip), lambda c: c, kept, (acc, m, l, tile_m))
        code = jnp.where(skip, tiles.TILE_SKIPPED, tiles.TILE_KEPT).astype(jnp.int8)
        if grp.state is not None:   # EMPTY for this head, visited only for its group: unvisited
          code = jnp.where(grp.state[:, qb, kb].reshape(1, 1, g) != EMPTY, code, jnp.int8(0))
        return acc, m, l, (tile_m, codes.at[..., kb].set(code))
      return body

    m, l = tiles.init_stats((bv, hv, g, bq), acc_t)
    rec = ((jnp.full((bv, hv, g), sm.MASK_VALUE, acc_t), jnp.zeros((bv, hv, g, nk), jnp.int8))
           if thresholded else ())
    carry = ((jnp.zeros((bv, hv, g, bq, dv), acc_t), m, l, rec), jnp.int32(0))
    carry = _loop(lists.full_kv_counts[qb], lists.full_kv_indices, qb, tile(False), carry)
    carry = _loop(lists.kv_counts[qb], lists.kv_indices, qb, tile(True), carry)
    (acc, m, l, rec), visits = carry
    out, lse = tiles.finalize(acc, m, l)
    return out.astype(out_dtype), lse, visits, (rec[1] if thresholded else None)

  out, lse, visits, codes = jax.lax.map(q_block, jnp.arange(nq, dtype=i32))
  out = jnp.moveaxis(out, 0, 3).reshape(bv, hv, g, sqp, dv)
  lse = jnp.moveaxis(lse, 0, 3).reshape(bv, hv, g, sqp)
  codes = None if codes is None else jnp.moveaxis(codes, 0, 3)
  return out, lse, visits.sum(), codes


def _map_accumulate(fn, xs, acc):
  """``lax.map(fn, xs)`` where ``fn(x) -> (y, inc)`` also adds ``inc`` into ``acc``.

  With nothing to accumulate this is ``lax.map``; otherwise a ``lax.scan`` carrying ``acc``, so
  the increments are summed in place rather than stacked.
  """
  if not jax.tree.leaves(acc):
    ys, _ = jax.lax.map(fn, xs)
    return ys, acc

  def step(carry, x):
    y, inc = fn(x)
    return jax.tree.map(jnp.add, carry, inc), y

  acc, ys = jax.lax.scan(step, acc, xs)
  return ys, acc


def _zeros_like_diff(grp: _Group) -> tuple:
  return _diff_zeros(grp.values, grp.diff)


def _diff_zeros(values: tuple, diff: tuple) -> tuple:
  """Accumulators for the operand cotangents: f32, or f64 for f64 operands."""
  return tuple(jnp.zeros(values[i].shape, tiles.acc_dtype(values[i].dtype)) for i in diff)


def _backward_group(grp: _Group, q, k, v, do, lse, delta, with_qkv: bool = True):
  """dQ pass over the per-q-block lists and dK/dV pass over the per-kv-block lists.

  ``with_qkv=False`` runs only what the operand cotangents need: the dQ pass without its dQ
  matmul, and no dK/dV pass (dq, dk, dv come back None).

  Args:
    q, do: ``(Bv, Hv, G, Sq_pad, D|Dv)``; k, v: ``(Bv, Hv, Sk_pad, D|Dv)``.
    lse, delta: f32 ``(Bv, Hv, G, Sq_pad)``; ``delta = rowsum(dO * O) - dlse``.

  Returns:
    ``(dq, dk, dv, d_operands, dq_visits, dkv_visits)``, accumulated in f32 (f64 for f64 inputs):
    ``d_operands`` one per entry of ``grp.diff``, accumulated in the dQ pass (every visited tile
    once).
  """
  cfg, lists = grp.cfg, grp.lists
  bq, bk, scale = cfg.block_q, cfg.block_k, cfg.scale
  bv, hv, g, sqp, d = q.shape
  skp, dvd = k.shape[2], v.shape[-1]
  nq, nk = sqp // bq, skp // bk
  acc_t = tiles.acc_dtype(q.dtype)

  def tile_grads(q_blk, do_blk, lse_blk, delta_blk, k_blk, v_blk, qb, kb, masked):
    """``(pz, ds, d_operands)`` of one tile: ``pz`` the (dropped) probabilities that weighted V,
    ``ds`` d(loss)/d(scaled score)."""
    s, visible, vjp = grp.scores(q_blk, k_blk, qb, kb, masked, with_vjp=True)
    p = tiles.probabilities(s, visible, lse_blk)
    skipped = grp.skipped(qb, kb)
    if skipped is not None:   # the forward skipped it: no probability, so no gradient
      p = jnp.where(skipped[..., None, None], 0.0, p)
    dp = tiles.qk_dot(_fold(do_blk), v_blk).reshape(p.shape)
    pz, keep = p, grp.keep(qb, kb)
    if keep is not None:   # out = (P Z) V: dP = Z dP', dV = (P Z)^T dO; delta is unchanged
      dp = tiles.apply_dropout(dp, keep, cfg.dropout_rate)
      pz = tiles.apply_dropout(p, keep, cfg.dropout_rate)
    ds, d_ops = vjp(p * (dp - delta_blk[..., None]))
    return pz, ds, d_ops

  def q_slices(qb):
    sl = lambda x: jax.lax.dynamic_slice_in_dim(x, qb * bq, bq, axis=3)
    return sl(q), sl(do), sl(lse), sl(delta)

  def kv_slices(kb):
    sl = lambda x: jax.lax.dynamic_slice_in_dim(x, kb * bk, bk, axis=2)
    return sl(k), sl(v)

  def dq_block(qb):
    q_blk, do_blk, lse_blk, delta_blk = q_slices(qb)

    def tile(masked):
      def body(kb, carry):
        dq, d_ops = carry
        k_blk, v_blk = kv_slices(kb)
        _, ds, inc = tile_grads(q_blk, do_blk, lse_blk, delta_blk, k_blk, v_blk, qb, kb, masked)
        if with_qkv:
          dq = dq + tiles.pv_dot(_fold(_lowp(ds, q.dtype)), k_blk).reshape(dq.shape)
        return dq, tuple(a + b.astype(a.dtype) for a, b in zip(d_ops, inc))
      return _unless_skipped(grp, lambda kb: (qb, kb), body)

    dq0 = jnp.zeros((bv, hv, g, bq, d), acc_t) if with_qkv else None
    carry = ((dq0, _zeros_like_diff(grp)), jnp.int32(0))
    carry = _loop(lists.full_kv_counts[qb], lists.full_kv_indices, qb, tile(False), carry)
    carry = _loop(lists.kv_counts[qb], lists.kv_indices, qb, tile(True), carry)
    (dq, d_ops), visits = carry
    return (None if dq is None else dq * scale, visits), d_ops

  def dkv_block(kb):
    k_blk, v_blk = kv_slices(kb)

    def tile(masked):
      def body(qb, carry):
        dk, dv = carry
        q_blk, do_blk, lse_blk, delta_blk = q_slices(qb)
        p, ds, _ = tile_grads(q_blk, do_blk, lse_blk, delta_blk, k_blk, v_blk, qb, kb, masked)
        # Contract over the packed group and the rows: (Bv,Hv,G*bq,bk)^T @ (Bv,Hv,G*bq,X).
        dv = dv + jnp.einsum("...qk,...qd->...kd", _fold(_lowp(p, do.dtype)), _fold(do_blk),
                             preferred_element_type=acc_t)
        dk = dk + jnp.einsum("...qk,...qd->...kd", _fold(_lowp(ds, q.dtype)), _fold(q_blk),
                             preferred_element_type=acc_t)
        return dk, dv
      return _unless_skipped(grp, lambda qb: (qb, kb), body)

    carry = ((jnp.zeros((bv, hv, bk, d), acc_t), jnp.zeros((bv, hv, bk, dvd), acc_t)),
             jnp.int32(0))
    carry = _loop(lists.full_q_counts[kb], lists.full_q_indices, kb, tile(False), carry)
    carry = _loop(lists.q_counts[kb], lists.q_indices, kb, tile(True), carry)
    (dk, dv), visits = carry
    return dk * scale, dv, visits

  (dq, dq_visits), d_ops = _map_accumulate(dq_block, jnp.arange(nq, dtype=i32),
                                           _zeros_like_diff(grp))
  if not with_qkv:
    return None, None, None, d_ops, dq_visits.sum(), jnp.int32(0)
  dk, dv, dkv_visits = jax.lax.map(dkv_block, jnp.arange(nk, dtype=i32))
  dq = jnp.moveaxis(dq, 0, 3).reshape(bv, hv, g, sqp, d)
  dk = jnp.moveaxis(dk, 0, 2).reshape(bv, hv, skp, d)
  dv = jnp.moveaxis(dv, 0, 2).reshape(bv, hv, skp, dvd)
  return dq, dk, dv, d_ops, dq_visits.sum(), dkv_visits.sum()


# ----------------------------------------------------------------------------- all groups


def _groups(cfg: _Config, mods, values, diff, bm: BlockMask, state, seed, skip, *arrays):
  """Split the ``(B, Hkv, ...)`` arrays into sequential groups; the per-group xs for lax.map.

  ``skip``: the forward's threshold decisions, bool ``(B, Hq, nq, nk)``, or None.
  Returns ``(xs, make_group)`` where ``make_group(n, lists, state, skip)`` builds the
  :class:`_Group`; ``xs = (n, lists, state, skip, *arrays)`` per group.
  """
  bsz, hkv = arrays[0].shape[:2]
  nb, nh, g = cfg.nb, cfg.nh, cfg.groups
  bv, hv = bsz // nb, hkv // nh
  lists = jax.tree.map(lambda x: x.reshape((nb * nh,) + x.shape[2:]), bm)
  st = None if state is None else state.reshape((nb * nh,) + state.shape[2:])

  def make_group(n, lists_n, st_n, skip_n=None):
    bn, hn = n // nh, n % nh
    b_idx = (bn * bv + jnp.arange(bv, dtype=i32)).reshape(bv, 1, 1, 1, 1)
    h_idx = gqa_head_index(hv, g, hn * hv)
    return _Group(cfg, mods, values, diff, lists_n, st_n, b_idx, h_idx, seed, skip_n)

  if skip is not None:
    skip = _split_lead(skip.reshape((bsz, hkv, g) + skip.shape[2:]), nb, nh)
  xs = ((jnp.arange(nb * nh, dtype=i32), lists, st, skip)
        + tuple(_split_lead(a, nb, nh) for a in arrays))
  return xs, make_group


def _flash_forward(cfg: _Config, mods, values, bm, state, q, k, v, seed=None, out_dtype=None):
  """Forward over all groups: ``(out (B,Hq,Sq,Dv) out_dtype (default q.dtype), lse (B,Hq,Sq),
  tiles visited, decisions)``; ``decisions`` int8 ``(B, Hq, nq, nk)`` (``tiles.TILE_*`` codes)
  when ``cfg.softmax_threshold`` is set, else None."""
  bsz, hq, sq, d = q.shape
  hkv, g = k.shape[1], cfg.groups
  nq, nk = -(-sq // cfg.block_q), -(-cfg.kv_len // cfg.block_k)
  qp = _pad_axis(q, 2, nq * cfg.block_q).reshape(bsz, hkv, g, nq * cfg.block_q, d)
  kp = _pad_axis(k, 2, nk * cfg.block_k)
  vp = _pad_axis(v, 2, nk * cfg.block_k)
  xs, make_group = _groups(cfg, mods, values, (), bm, state, seed, None, qp, kp, vp)

  def run(x):
    n, lists_n, st_n, _, q_n, k_n, v_n = x
    return _forward_group(make_group(n, lists_n, st_n), q_n, k_n, v_n, out_dtype or q.dtype)

  out, lse, visits, codes = jax.lax.map(run, xs)
  out = _merge_lead(out, cfg.nb, cfg.nh)[:, :, :, :sq].reshape(bsz, hq, sq, v.shape[-1])
  lse = _merge_lead(lse, cfg.nb, cfg.nh)[:, :, :, :sq].reshape(bsz, hq, sq)
  if codes is not None:
    codes = _merge_lead(codes, cfg.nb, cfg.nh).reshape((bsz, hq) + codes.shape[-2:])
  return out, lse, visits.sum(), codes


def flash_backward(cfg: _Config, mods, values, diff, bm, state, q, k, v, out, lse, dout, dlse,
                   with_qkv: bool = True, seed=None, skip=None):
  """Backward over all groups (``seed``: the forward's dropout seed, when it dropped; ``skip``:
  the forward's threshold decisions, bool ``(B, Hq, nq, nk)``, replayed tile for tile).

  Returns ``(dq, dk, dv, d_operands, dq tiles visited, dkv tiles visited)``; ``d_operands`` are
  the cotangents of ``values[i]`` for ``i`` in ``diff`` (f32, f64 for f64 operands). Used by :func:`flash_attention` and, with
  ``with_qkv=False`` (dq, dk, dv None: only the operands' work is done), by the Pallas kernels'
  backward.
  """
  bsz, hq, sq, d = q.shape
  hkv, sk, g = k.shape[1], k.shape[2], cfg.groups
  nq, nk = -(-sq // cfg.block_q), -(-sk // cfg.block_k)
  sqp = nq * cfg.block_q
  delta = tiles.backward_delta(out, dout, lse, dlse)
  grouped = lambda x, fill=0: _pad_axis(x, 2, sqp, fill).reshape((bsz, hkv, g, sqp) + x.shape[3:])
  qp, dop = grouped(q), grouped(dout.astype(q.dtype))
  lsep, deltap = grouped(lse, -jnp.inf), grouped(delta)
  kp = _pad_axis(k, 2, nk * cfg.block_k)
  vp = _pad_axis(v, 2, nk * cfg.block_k)
  xs, make_group = _groups(cfg, mods, values, diff, bm, state, seed, skip, qp, kp, vp, dop, lsep,
                           deltap)

  def run(x):
    n, lists_n, st_n, skip_n, q_n, k_n, v_n, do_n, lse_n, delta_n = x
    grp = make_group(n, lists_n, st_n, skip_n)
    dq, dk, dv, d_ops, dq_visits, dkv_visits = _backward_group(grp, q_n, k_n, v_n, do_n, lse_n,
                                                               delta_n, with_qkv)
    return (dq, dk, dv, dq_visits, dkv_visits), d_ops

  (dq, dk, dv, dq_visits, dkv_visits), d_ops = _map_accumulate(run, xs, _diff_zeros(values, diff))
  if not with_qkv:
    return None, None, None, d_ops, dq_visits.sum(), dkv_visits.sum()
  dq = _merge_lead(dq, cfg.nb, cfg.nh)[:, :, :, :sq].reshape(bsz, hq, sq, d)
  dk = _merge_lead(dk, cfg.nb, cfg.nh)[:, :, :sk]
  dv = _merge_lead(dv, cfg.nb, cfg.nh)[:, :, :sk]
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_ops, dq_visits.sum(),
          dkv_visits.sum())


# ----------------------------------------------------------------------------- custom_vjp


def _prepare(q, k, v, score_mod, mask_mod, scale, block_q, block_k, block_mask,
             dropout_rate=0.0):
  """Checks and planning shared by the public function and the tile-visit counter.

  Returns ``(cfg, mods, values, bm, state)``: the static configuration, the mods' static part and
  operand arrays (:mod:`attnax.kernels.operands`: pytree leaves and closed-over arrays, tracers of
  an enclosing ``jit``/``vmap``/``grad`` included), the BlockMask the loops walk and the per-head
  tile states.
  """
  bsz, hq, hkv, sq, sk, d, _ = _checks.check_qkv(q, k, v, kernel="flash_attention",
                                                  allow_f64=True)
  scale = _checks.default_scale(scale, d)
  score_fn, mask_fn = sm.resolve_mods(score_mod, mask_mod, batch=bsz, heads=hq, q_len=sq,
                                      kv_len=sk)
  if block_mask is None:
    bq = min(_checks.check_block("block_q", block_q), sq)
    bk = min(_checks.check_block("block_k", block_k), sk)
  else:
    bq = getattr(block_mask, "block_q", block_q)
    bk = getattr(block_mask, "block_k", block_k)
  bm, state = _plan(mask_fn, block_mask, batch=bsz, hq=hq, hkv=hkv, sq=sq, sk=sk, block_q=bq,
                    block_k=bk)
  nb, nh = bm.tiles.shape[:2]
  cfg = _Config(scale=scale, block_q=bm.block_q, block_k=bm.block_k, q_len=sq, kv_len=sk,
                groups=hq // hkv, nb=nb, nh=nh, dropout_rate=dropout_rate)
  mods, values = ops_lib.collect(score_fn, mask_fn)
  return cfg, mods, values, bm, state


def _make_flash(cfg: _Config, mods: ops_lib.ModOperands):
  """The custom_vjp attention for one configuration: ``f(q, k, v, values, bm, state, seed)``.

  Built with ``symbolic_zeros=True``, so the forward rule learns which float operands are being
  differentiated: only those get a cotangent pass (the extra work is paid only when asked for).
  ``seed`` (dropout's uint32 words, or None) is a residual: the backward regenerates the mask.
  With ``cfg.softmax_threshold`` set, ``f`` returns ``(out, lse, decisions)`` (int8 codes
  ``(B, Hq, nq, nk)``, no gradient) and the decisions are a residual: the backward replays them.
  """
  thresholded = cfg.softmax_threshold is not None

  def forward(q, k, v, values, bm, state, seed, out_dtype=None):
    out, lse, _, codes = _flash_forward(cfg, mods, values, bm, state, q, k, v, seed, out_dtype)
    return (out, lse, codes) if thresholded else (out, lse)

  @jax.custom_vjp
  def attn(q, k, v, values, bm, state, seed):
    return forward(q, k, v, values, bm, state, seed)

  def fwd(q, k, v, values, bm, state, seed):
    q, k, v, bm, state, seed = ops_lib.primal_values((q, k, v, bm, state, seed))
    values, marks = ops_lib.differentiated(values, mods.float_mask)
    out_dtype = tiles.residual_out_dtype(q.dtype, bool(ops_lib.marked(marks)))
    res = forward(q, k, v, values, bm, state, seed, out_dtype)
    codes = res[2] if thresholded else None
    primal = (res[0].astype(q.dtype),) + res[1:]
    return primal, (q, k, v, res[0], res[1], values, bm, state, seed, marks, codes)

  def bwd(res, cts):
    q, k, v, out, lse, values, bm, state, seed, marks, codes = res
    diff = ops_lib.marked(marks)
    dout, dlse = map(ops_lib.cotangent_or_none, cts[:2])
    dout = jnp.zeros(out.shape, q.dtype) if dout is None else dout
    skip = None if codes is None else codes == tiles.TILE_SKIPPED
    dq, dk, dv, d_ops, _, _ = flash_backward(cfg, mods, values, diff, bm, state, q, k, v, out,
                                             lse, dout, dlse, seed=seed, skip=skip)
    return dq, dk, dv, ops_lib.operand_cotangents(values, diff, d_ops), None, None, None

  attn.defvjp(fwd, bwd, symbolic_zeros=True)
  return attn


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, score_mod: Any = None,
                    mask_mod: Any = None, scale: float | None = None, return_lse: bool = False,
                    block_q: int = 128, block_k: int = 128,
                    block_mask: BlockMask | None = None, dropout_rate: float = 0.0,
                    dropout_rng: Any = None) -> Any:
  """Blockwise attention with an online softmax and a recomputing backward (FlashAttention-2).

  Computes ``softmax(mod(scale * q k^T)) v`` one ``(block_q, block_k)`` tile at a time in pure
  JAX (any backend). Tiles come from a :class:`~attnax.kernels.BlockMask` built from the mask part
  of the mods: empty tiles are never visited, full tiles skip the elementwise mask, so causal,
  sliding-window, prefix-LM and document masks cost time in proportion to their visible area, in
  the forward and in the backward. The backward is a ``jax.custom_vjp`` that saves only
  ``(q, k, v, out, lse)`` and recomputes each visited tile. Floating-point arrays the mods carry
  (a bias table, ALiBi slopes, gates; as pytree leaves or closed over) get their true gradient,
  accumulated over the visited tiles of the dQ pass, only when they are differentiated; integer
  arrays (document ids) get none. Works under ``jit``, ``grad`` and ``vmap``. Runs f32, bf16,
  f16 (f32 statistics and accumulators) and float64 (f64 throughout).

  Args:
    q: ``(B, Hq, Sq, D)``.
    k: ``(B, Hkv, Sk, D)``, ``Hq % Hkv == 0`` (query head ``h`` reads kv head ``h // (Hq // Hkv)``).
    v: ``(B, Hkv, Sk, Dv)``.
    score_mod: :class:`~attnax.kernels.ScoreMod` applied to the scaled scores, with absolute
      ``q_idx``/``kv_idx``. Masks it carries (``causal_mod`` etc.) drive the block skipping.
    mask_mod: :class:`~attnax.kernels.MaskMod`; False entries get probability 0.
    scale: score scale, default ``D ** -0.5``.
    return_lse: also return the log-sum-exp ``(B, Hq, Sq)`` (f32; f64 for float64 inputs).
    block_q: rows per q block (static); clipped to ``Sq``. Ignored when ``block_mask`` is given.
    block_k: columns per kv block (static); clipped to ``Sk``. Ignored when ``block_mask`` is given.
    block_mask: a precomputed :class:`~attnax.kernels.BlockMask` over ``(Sq, Sk)`` (e.g. from the
      AETHER planner) that replaces the mask-derived one; its tiles have leading axes
      ``(B', H')`` with ``B'`` in ``(1, B)`` and ``H'`` in ``(1, Hkv, Hq)``, and its block sizes
      override ``block_q``/``block_k``. Its empty tiles are skipped even where the mods would see
      keys; on its partial tiles the mods' elementwise mask still applies.
    dropout_rate: attention-weight dropout (static float in ``[0, 1)``): each probability is
      dropped with this rate and the kept ones scaled by ``1 / (1 - dropout_rate)``; the LSE is
      that of the undropped softmax. The mask is regenerated in the backward, never stored.
    dropout_rng: a PRNG key or an integer seed (may be traced: no recompile per step). The same
      key drops exactly the weights ``standard_attention`` drops with it.

  Returns:
    ``out`` ``(B, Hq, Sq, Dv)`` in q's dtype, or ``(out, lse)``. A query that sees no key gets
    output 0, lse ``-inf`` and zero gradients.
  """
  rate, seed = _checks.check_dropout(dropout_rate, dropout_rng, kernel="flash_attention")
  cfg, mods, values, bm, state = _prepare(q, k, v, score_mod, mask_mod, scale, block_q, block_k,
                                          block_mask, rate)
  out, lse = _make_flash(cfg, mods)(q, k, v, values, bm, state, seed)
  return (out, lse) if return_lse else out


def tile_visits(q: jax.Array, k: jax.Array, v: jax.Array, *, score_mod: Any = None,
                mask_mod: Any = None, scale: float | None = None, block_q: int = 128,
                block_k: int = 128, block_mask: BlockMask | None = None,
                dout: jax.Array | None = None) -> dict[str, jax.Array]:
  """Debug helper: how many tiles the forward, dQ and dK/dV loops of :func:`flash_attention` visit.

  Runs the very loops ``flash_attention`` runs, whose bodies count their own trips, and returns
  ``{"forward", "dq", "dkv", "nonempty"}``: int32 trip counts summed over the sequential groups,
  and the number of nonempty tiles of the BlockMask the loops walk. Skipping works when all four
  agree (and are below the dense ``nq * nk`` per group).
  """
  cfg, mods, values, bm, state = _prepare(q, k, v, score_mod, mask_mod, scale, block_q, block_k,
                                          block_mask)
  out, lse, fwd, _ = _flash_forward(cfg, mods, values, bm, state, q, k, v)
  dout = jnp.ones_like(out) if dout is None else dout
  *_, dq, dkv = flash_backward(cfg, mods, values, (), bm, state, q, k, v, out, lse, dout,
                               jnp.zeros_like(lse))
  return {"forward": fwd, "dq": dq, "dkv": dkv,
          "nonempty": jnp.sum(bm.tiles != EMPTY, dtype=jnp.int32)}
