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
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from attnax.kernels import _checks
from attnax.kernels import score_mods as sm
from attnax.kernels import tiles
from attnax.kernels.block_mask import EMPTY, FULL, PARTIAL, BlockMask, create_block_mask

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

  @property
  def ragged_q(self) -> bool:
    return self.q_len % self.block_q != 0

  @property
  def ragged_k(self) -> bool:
    return self.kv_len % self.block_k != 0


# ----------------------------------------------------------------------------- planning


def _plan(mask_fn: Any, block_mask: BlockMask | None, *, batch: int, hq: int, hkv: int, sq: int,
          sk: int, block_q: int, block_k: int) -> tuple[BlockMask, jax.Array | None]:
  """The BlockMask the loops walk and the per-query-head tile states (or None).

  The returned BlockMask has leading axes ``(nb, nh)`` with ``nb in (1, B)``, ``nh in (1, Hkv)``;
  the states, when the given tiles are per query head (``H' = Hq``, ``G > 1``), are int8
  ``(nb, Hkv, G, nq, nk)``.
  """
  g = hq // hkv
  given = block_mask is not None
  if block_mask is None:
    block_mask = create_block_mask(mask_fn, q_len=sq, kv_len=sk, block_q=block_q, block_k=block_k,
                                   batch=batch, heads=hq)
  elif not isinstance(block_mask, BlockMask):
    raise ValueError(f"flash_attention: block_mask must be a BlockMask, got "
                     f"{type(block_mask).__name__}")
  bm = block_mask
  nq, nk = -(-sq // bm.block_q), -(-sk // bm.block_k)
  bp, hp = bm.tiles.shape[:2]
  if bm.q_len != sq or bm.kv_len != sk or bm.tiles.shape[2:] != (nq, nk):
    raise ValueError(f"flash_attention: block_mask was built for q_len={bm.q_len}, "
                     f"kv_len={bm.kv_len} with tiles {tuple(bm.tiles.shape)}; the inputs have "
                     f"Sq={sq}, Sk={sk}, which need (B', H', {nq}, {nk}) tiles of "
                     f"({bm.block_q}, {bm.block_k})")
  if bp not in (1, batch) or hp not in (1, hkv, hq):
    raise ValueError(f"flash_attention: block_mask tiles {tuple(bm.tiles.shape)} must have "
                     f"B' in (1, {batch}) and H' in (1, Hkv={hkv}, Hq={hq})")
  t = bm.tiles
  if given:
    # A tile that reaches past Sq/Sk must mask its tail, so it is never treated as full.
    ragged = np.zeros((nq, nk), bool)
    if sq % bm.block_q:
      ragged[-1, :] = True
    if sk % bm.block_k:
      ragged[:, -1] = True
    t = jnp.where((t == FULL) & ragged, jnp.int8(PARTIAL), t.astype(jnp.int8))
  state = None
  if hp == hq and g > 1:
    # Per-query-head tiles: visit the union over each packed group, keep each head's own state.
    state = t.reshape(bp, hkv, g, nq, nk)
    union = jnp.where((state == EMPTY).all(2), EMPTY,
                      jnp.where((state == FULL).all(2), FULL, PARTIAL)).astype(jnp.int8)
    bm = BlockMask.from_tiles(union, block_q=bm.block_q, block_k=bm.block_k, q_len=sq, kv_len=sk)
  elif given:
    bm = BlockMask.from_tiles(t, block_q=bm.block_q, block_k=bm.block_k, q_len=sq, kv_len=sk)
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
  """
  cfg: _Config
  score_fn: Any
  mask_fn: Any
  lists: Any
  state: Any
  b_idx: jax.Array
  h_idx: jax.Array

  def scores(self, q_blk: jax.Array, k_blk: jax.Array, qb: jax.Array, kb: jax.Array,
             masked: bool, with_vjp: bool = False):
    """Modded, masked scores of tile ``(qb, kb)``.

    Args:
      q_blk: ``(Bv, Hv, G, bq, D)``; k_blk: ``(Bv, Hv, bk, D)``.
      masked: False for full tiles (no elementwise mask, no tail), True for partial tiles.
      with_vjp: also return the VJP of the score mod (for the backward).

    Returns:
      ``(s, visible)`` or ``(s, visible, vjp)``; ``s`` f32 ``(Bv, Hv, G, bq, bk)``.
    """
    cfg = self.cfg
    bv, hv, g, bq, d = q_blk.shape
    bk = k_blk.shape[2]
    s = tiles.qk_dot(q_blk.reshape(bv, hv, g * bq, d), k_blk).reshape(bv, hv, g, bq, bk)
    s = s * cfg.scale
    q_idx = (qb * bq + jnp.arange(bq, dtype=i32)).reshape(1, 1, 1, bq, 1)
    kv_idx = (kb * bk + jnp.arange(bk, dtype=i32)).reshape(1, 1, 1, 1, bk)
    mask_fn = self.mask_fn
    if masked and self.state is not None:
      st = self.state[:, qb, kb].reshape(1, 1, g, 1, 1)
      inner = mask_fn
      if inner is None:
        mask_fn = lambda b, h, i, j: st != EMPTY
      else:
        mask_fn = lambda b, h, i, j: (st == FULL) | ((st == PARTIAL) & inner(b, h, i, j))

    def mod(s):
      return tiles.tile_scores(
          s, score_fn=self.score_fn, mask_fn=mask_fn, b=self.b_idx, h=self.h_idx, q_idx=q_idx,
          kv_idx=kv_idx, q_len=cfg.q_len if masked and cfg.ragged_q else None,
          kv_len=cfg.kv_len if masked and cfg.ragged_k else None, apply_mask=masked)

    if not with_vjp:
      return mod(s)
    if self.score_fn is None:   # only masking: the VJP is the identity on visible entries
      s, visible = mod(s)
      return s, visible, lambda ds: ds
    s, vjp, visible = jax.vjp(mod, s, has_aux=True)
    return s, visible, lambda ds: vjp(ds)[0]


def _fold(x: jax.Array) -> jax.Array:
  """``(Bv, Hv, G, n, X) -> (Bv, Hv, G * n, X)``."""
  return x.reshape(x.shape[:2] + (x.shape[2] * x.shape[3],) + x.shape[4:])


def _lowp(x: jax.Array, dtype) -> jax.Array:
  """Cast f32 tile values to a low-precision input dtype for the matmul (as the reference does)."""
  return x.astype(dtype) if jnp.dtype(dtype).itemsize < 4 else x


def _loop(count, indices, row, body, carry):
  """``fori_loop`` over the first ``count`` entries of ``indices[row]`` (visits counted)."""
  def step(t, c):
    inner, n = c
    return body(indices[row, t], inner), n + 1
  return jax.lax.fori_loop(0, count, step, carry)


def _forward_group(grp: _Group, q, k, v):
  """Forward of one group: ``(out (Bv,Hv,G,Sq_pad,Dv) q.dtype, lse (Bv,Hv,G,Sq_pad), visits)``."""
  cfg, lists = grp.cfg, grp.lists
  bq, bk = cfg.block_q, cfg.block_k
  bv, hv, g, sqp, _ = q.shape
  dv = v.shape[-1]
  nq = sqp // bq

  def q_block(qb):
    q_blk = jax.lax.dynamic_slice_in_dim(q, qb * bq, bq, axis=3)

    def tile(masked):
      def body(kb, carry):
        acc, m, l = carry
        k_blk = jax.lax.dynamic_slice_in_dim(k, kb * bk, bk, axis=2)
        v_blk = jax.lax.dynamic_slice_in_dim(v, kb * bk, bk, axis=2)
        s, visible = grp.scores(q_blk, k_blk, qb, kb, masked)
        p, alpha, m, l = tiles.online_softmax_step(s, visible, m, l)
        pv = tiles.pv_dot(_fold(_lowp(p, v.dtype)), v_blk).reshape(bv, hv, g, bq, dv)
        return acc * alpha[..., None] + pv, m, l
      return body

    m, l = tiles.init_stats((bv, hv, g, bq))
    carry = ((jnp.zeros((bv, hv, g, bq, dv), f32), m, l), jnp.int32(0))
    carry = _loop(lists.full_kv_counts[qb], lists.full_kv_indices, qb, tile(False), carry)
    carry = _loop(lists.kv_counts[qb], lists.kv_indices, qb, tile(True), carry)
    (acc, m, l), visits = carry
    out, lse = tiles.finalize(acc, m, l)
    return out.astype(q.dtype), lse, visits

  out, lse, visits = jax.lax.map(q_block, jnp.arange(nq, dtype=i32))
  out = jnp.moveaxis(out, 0, 3).reshape(bv, hv, g, sqp, dv)
  lse = jnp.moveaxis(lse, 0, 3).reshape(bv, hv, g, sqp)
  return out, lse, visits.sum()


def _backward_group(grp: _Group, q, k, v, do, lse, delta):
  """dQ pass over the per-q-block lists and dK/dV pass over the per-kv-block lists.

  Args:
    q, do: ``(Bv, Hv, G, Sq_pad, D|Dv)``; k, v: ``(Bv, Hv, Sk_pad, D|Dv)``.
    lse, delta: f32 ``(Bv, Hv, G, Sq_pad)``; ``delta = rowsum(dO * O) - dlse``.

  Returns:
    ``(dq f32, dk f32, dv f32, dq_visits, dkv_visits)`` with the shapes of q, k, v.
  """
  cfg, lists = grp.cfg, grp.lists
  bq, bk, scale = cfg.block_q, cfg.block_k, cfg.scale
  bv, hv, g, sqp, d = q.shape
  skp, dvd = k.shape[2], v.shape[-1]
  nq, nk = sqp // bq, skp // bk

  def tile_grads(q_blk, do_blk, lse_blk, delta_blk, k_blk, v_blk, qb, kb, masked):
    """``(p, ds)`` of one tile, f32 ``(Bv, Hv, G, bq, bk)``; ``ds`` is d(loss)/d(scaled score)."""
    s, visible, vjp = grp.scores(q_blk, k_blk, qb, kb, masked, with_vjp=True)
    p = tiles.probabilities(s, visible, lse_blk)
    dp = tiles.qk_dot(_fold(do_blk), v_blk).reshape(p.shape)
    return p, vjp(p * (dp - delta_blk[..., None]))

  def q_slices(qb):
    sl = lambda x: jax.lax.dynamic_slice_in_dim(x, qb * bq, bq, axis=3)
    return sl(q), sl(do), sl(lse), sl(delta)

  def kv_slices(kb):
    sl = lambda x: jax.lax.dynamic_slice_in_dim(x, kb * bk, bk, axis=2)
    return sl(k), sl(v)

  def dq_block(qb):
    q_blk, do_blk, lse_blk, delta_blk = q_slices(qb)

    def tile(masked):
      def body(kb, dq):
        k_blk, v_blk = kv_slices(kb)
        _, ds = tile_grads(q_blk, do_blk, lse_blk, delta_blk, k_blk, v_blk, qb, kb, masked)
        ds = _fold(_lowp(ds, q.dtype))
        return dq + tiles.pv_dot(ds, k_blk).reshape(dq.shape)
      return body

    carry = (jnp.zeros((bv, hv, g, bq, d), f32), jnp.int32(0))
    carry = _loop(lists.full_kv_counts[qb], lists.full_kv_indices, qb, tile(False), carry)
    carry = _loop(lists.kv_counts[qb], lists.kv_indices, qb, tile(True), carry)
    dq, visits = carry
    return dq * scale, visits

  def dkv_block(kb):
    k_blk, v_blk = kv_slices(kb)

    def tile(masked):
      def body(qb, carry):
        dk, dv = carry
        q_blk, do_blk, lse_blk, delta_blk = q_slices(qb)
        p, ds = tile_grads(q_blk, do_blk, lse_blk, delta_blk, k_blk, v_blk, qb, kb, masked)
        # Contract over the packed group and the rows: (Bv,Hv,G*bq,bk)^T @ (Bv,Hv,G*bq,X).
        dv = dv + jnp.einsum("...qk,...qd->...kd", _fold(_lowp(p, do.dtype)), _fold(do_blk),
                             preferred_element_type=f32)
        dk = dk + jnp.einsum("...qk,...qd->...kd", _fold(_lowp(ds, q.dtype)), _fold(q_blk),
                             preferred_element_type=f32)
        return dk, dv
      return body

    carry = ((jnp.zeros((bv, hv, bk, d), f32), jnp.zeros((bv, hv, bk, dvd), f32)), jnp.int32(0))
    carry = _loop(lists.full_q_counts[kb], lists.full_q_indices, kb, tile(False), carry)
    carry = _loop(lists.q_counts[kb], lists.q_indices, kb, tile(True), carry)
    (dk, dv), visits = carry
    return dk * scale, dv, visits

  dq, dq_visits = jax.lax.map(dq_block, jnp.arange(nq, dtype=i32))
  dk, dv, dkv_visits = jax.lax.map(dkv_block, jnp.arange(nk, dtype=i32))
  dq = jnp.moveaxis(dq, 0, 3).reshape(bv, hv, g, sqp, d)
  dk = jnp.moveaxis(dk, 0, 2).reshape(bv, hv, skp, d)
  dv = jnp.moveaxis(dv, 0, 2).reshape(bv, hv, skp, dvd)
  return dq, dk, dv, dq_visits.sum(), dkv_visits.sum()


# ----------------------------------------------------------------------------- all groups


def _groups(cfg: _Config, score_fn, mask_fn, bm: BlockMask, state, *arrays):
  """Split the ``(B, Hkv, ...)`` arrays into sequential groups; yields the per-group xs for lax.map.

  Returns ``(xs, make_group)`` where ``make_group(n, lists, state)`` builds the :class:`_Group`.
  """
  bsz, hkv = arrays[0].shape[:2]
  nb, nh, g = cfg.nb, cfg.nh, cfg.groups
  bv, hv = bsz // nb, hkv // nh
  lists = jax.tree.map(lambda x: x.reshape((nb * nh,) + x.shape[2:]), bm)
  st = None if state is None else state.reshape((nb * nh,) + state.shape[2:])

  def make_group(n, lists_n, st_n):
    bn, hn = n // nh, n % nh
    b_idx = (bn * bv + jnp.arange(bv, dtype=i32)).reshape(bv, 1, 1, 1, 1)
    hk = hn * hv + jnp.arange(hv, dtype=i32)
    h_idx = (hk[:, None] * g + jnp.arange(g, dtype=i32)).reshape(1, hv, g, 1, 1)
    return _Group(cfg, score_fn, mask_fn, lists_n, st_n, b_idx, h_idx)

  xs = (jnp.arange(nb * nh, dtype=i32), lists, st) + tuple(_split_lead(a, nb, nh) for a in arrays)
  return xs, make_group


def _flash_forward(cfg: _Config, score_fn, mask_fn, bm, state, q, k, v):
  """Forward over all groups: ``(out (B,Hq,Sq,Dv) q.dtype, lse f32 (B,Hq,Sq), tiles visited)``."""
  bsz, hq, sq, d = q.shape
  hkv, g = k.shape[1], cfg.groups
  nq, nk = -(-sq // cfg.block_q), -(-cfg.kv_len // cfg.block_k)
  qp = _pad_axis(q, 2, nq * cfg.block_q).reshape(bsz, hkv, g, nq * cfg.block_q, d)
  kp = _pad_axis(k, 2, nk * cfg.block_k)
  vp = _pad_axis(v, 2, nk * cfg.block_k)
  xs, make_group = _groups(cfg, score_fn, mask_fn, bm, state, qp, kp, vp)

  def run(x):
    n, lists_n, st_n, q_n, k_n, v_n = x
    return _forward_group(make_group(n, lists_n, st_n), q_n, k_n, v_n)

  out, lse, visits = jax.lax.map(run, xs)
  out = _merge_lead(out, cfg.nb, cfg.nh)[:, :, :, :sq].reshape(bsz, hq, sq, v.shape[-1])
  lse = _merge_lead(lse, cfg.nb, cfg.nh)[:, :, :, :sq].reshape(bsz, hq, sq)
  return out, lse, visits.sum()


def _flash_backward(cfg: _Config, score_fn, mask_fn, bm, state, q, k, v, out, lse, dout, dlse):
  """Backward over all groups: ``(dq, dk, dv, dq tiles visited, dkv tiles visited)``."""
  bsz, hq, sq, d = q.shape
  hkv, sk, g = k.shape[1], k.shape[2], cfg.groups
  nq, nk = -(-sq // cfg.block_q), -(-sk // cfg.block_k)
  sqp = nq * cfg.block_q
  delta = jnp.sum(dout.astype(f32) * out.astype(f32), axis=-1) - dlse.astype(f32)
  grouped = lambda x, fill=0: _pad_axis(x, 2, sqp, fill).reshape((bsz, hkv, g, sqp) + x.shape[3:])
  qp, dop = grouped(q), grouped(dout.astype(q.dtype))
  lsep, deltap = grouped(lse, -jnp.inf), grouped(delta)
  kp = _pad_axis(k, 2, nk * cfg.block_k)
  vp = _pad_axis(v, 2, nk * cfg.block_k)
  xs, make_group = _groups(cfg, score_fn, mask_fn, bm, state, qp, kp, vp, dop, lsep, deltap)

  def run(x):
    n, lists_n, st_n, q_n, k_n, v_n, do_n, lse_n, delta_n = x
    return _backward_group(make_group(n, lists_n, st_n), q_n, k_n, v_n, do_n, lse_n, delta_n)

  dq, dk, dv, dq_visits, dkv_visits = jax.lax.map(run, xs)
  dq = _merge_lead(dq, cfg.nb, cfg.nh)[:, :, :, :sq].reshape(bsz, hq, sq, d)
  dk = _merge_lead(dk, cfg.nb, cfg.nh)[:, :, :sk]
  dv = _merge_lead(dv, cfg.nb, cfg.nh)[:, :, :sk]
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dq_visits.sum(),
          dkv_visits.sum())


# ----------------------------------------------------------------------------- custom_vjp


def _zero_cotangent(x):
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)


def _hoist_consts(fn, *avals):
  """``fn`` as ``(g, consts)`` with ``g(*args, *consts) == fn(*args)``: every constant hoisted.

  Unlike ``jax.closure_convert``, which hoists only constants that autodiff may perturb, this hoists
  integer tracers too (document ids under an enclosing ``jit``), which a custom_vjp inside a
  ``lax.cond`` under ``grad`` cannot otherwise close over.
  """
  closed = jax.make_jaxpr(fn)(*avals)
  n = len(avals)

  def g(*args):
    run = jax.extend.core.jaxpr_as_fun(jax.extend.core.ClosedJaxpr(closed.jaxpr, list(args[n:])))
    return run(*args[:n])[0]

  return g, list(closed.consts)


def _prepare(q, k, v, score_mod, mask_mod, scale, block_q, block_k, block_mask):
  """Checks and planning shared by the public function and the tile-visit counter.

  Returns ``(cfg, rebuild, consts)``. ``consts = (score consts, mask consts, BlockMask, per-head
  state)`` are the array operands of the custom_vjp (constants for autodiff) and
  ``rebuild(score_consts, mask_consts)`` returns ``(score_fn, mask_fn)``.

  The mods are closure-converted at the tile shapes the loops use: every traced array they hold
  (a pytree mod's leaves, or what a user's lambda closes over) becomes an explicit operand, so the
  custom_vjp never closes over a tracer of an enclosing ``jit``, ``vmap`` or ``grad``.
  """
  bsz, hq, hkv, sq, sk, d, _ = _checks.check_qkv(q, k, v, kernel="flash_attention")
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
  g = hq // hkv
  nb, nh = bm.tiles.shape[:2]
  cfg = _Config(scale=scale, block_q=bm.block_q, block_k=bm.block_k, q_len=sq, kv_len=sk,
                groups=g, nb=nb, nh=nh)
  bv, hv = bsz // nb, hkv // nh
  idx = lambda *shape: jax.ShapeDtypeStruct(shape, i32)
  index_args = (idx(bv, 1, 1, 1, 1), idx(1, hv, g, 1, 1), idx(1, 1, 1, cfg.block_q, 1),
                idx(1, 1, 1, 1, cfg.block_k))
  tile = jax.ShapeDtypeStruct((bv, hv, g, cfg.block_q, cfg.block_k), f32)
  score_c, score_consts = (None, []) if score_fn is None else _hoist_consts(
      score_fn, tile, *index_args)
  mask_c, mask_consts = (None, []) if mask_fn is None else _hoist_consts(mask_fn, *index_args)

  def rebuild(s_consts, m_consts):
    s_fn = None if score_c is None else lambda *a: score_c(*a, *s_consts)
    m_fn = None if mask_c is None else lambda *a: mask_c(*a, *m_consts)
    return s_fn, m_fn

  return cfg, rebuild, (tuple(score_consts), tuple(mask_consts), bm, state)


def _make_flash(cfg: _Config, rebuild):
  """The custom_vjp attention for one static configuration: ``f(q, k, v, consts) -> (out, lse)``."""

  def forward(q, k, v, consts):
    s_consts, m_consts, bm, state = consts
    score_fn, mask_fn = rebuild(s_consts, m_consts)
    out, lse, _ = _flash_forward(cfg, score_fn, mask_fn, bm, state, q, k, v)
    return out, lse

  @jax.custom_vjp
  def attn(q, k, v, consts):
    return forward(q, k, v, consts)

  def fwd(q, k, v, consts):
    out, lse = forward(q, k, v, consts)
    return (out, lse), (q, k, v, out, lse, consts)

  def bwd(res, cts):
    q, k, v, out, lse, consts = res
    dout, dlse = cts
    s_consts, m_consts, bm, state = consts
    score_fn, mask_fn = rebuild(s_consts, m_consts)
    dq, dk, dv, _, _ = _flash_backward(cfg, score_fn, mask_fn, bm, state, q, k, v, out, lse,
                                       dout, dlse)
    return dq, dk, dv, jax.tree.map(_zero_cotangent, consts)

  attn.defvjp(fwd, bwd)
  return attn


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, score_mod: Any = None,
                    mask_mod: Any = None, scale: float | None = None, return_lse: bool = False,
                    block_q: int = 128, block_k: int = 128,
                    block_mask: BlockMask | None = None) -> Any:
  """Blockwise attention with an online softmax and a recomputing backward (FlashAttention-2).

  Computes ``softmax(mod(scale * q k^T)) v`` one ``(block_q, block_k)`` tile at a time in pure
  JAX (any backend). Tiles come from a :class:`~attnax.kernels.BlockMask` built from the mask part
  of the mods: empty tiles are never visited, full tiles skip the elementwise mask, so causal,
  sliding-window, prefix-LM and document masks cost time in proportion to their visible area, in
  the forward and in the backward. The backward is a ``jax.custom_vjp`` that saves only
  ``(q, k, v, out, lse)`` and recomputes each visited tile. Mod arrays (document ids, slopes, a
  bias table) and the BlockMask are constants for autodiff (zero cotangent). Works under ``jit``,
  ``grad`` and ``vmap``.

  Args:
    q: ``(B, Hq, Sq, D)``.
    k: ``(B, Hkv, Sk, D)``, ``Hq % Hkv == 0`` (query head ``h`` reads kv head ``h // (Hq // Hkv)``).
    v: ``(B, Hkv, Sk, Dv)``.
    score_mod: :class:`~attnax.kernels.ScoreMod` applied to the scaled scores, with absolute
      ``q_idx``/``kv_idx``. Masks it carries (``causal_mod`` etc.) drive the block skipping.
    mask_mod: :class:`~attnax.kernels.MaskMod`; False entries get probability 0.
    scale: score scale, default ``D ** -0.5``.
    return_lse: also return the f32 log-sum-exp ``(B, Hq, Sq)``.
    block_q: rows per q block (static); clipped to ``Sq``. Ignored when ``block_mask`` is given.
    block_k: columns per kv block (static); clipped to ``Sk``. Ignored when ``block_mask`` is given.
    block_mask: a precomputed :class:`~attnax.kernels.BlockMask` over ``(Sq, Sk)`` (e.g. from the
      AETHER planner) that replaces the mask-derived one; its tiles have leading axes
      ``(B', H')`` with ``B'`` in ``(1, B)`` and ``H'`` in ``(1, Hkv, Hq)``, and its block sizes
      override ``block_q``/``block_k``. Its empty tiles are skipped even where the mods would see
      keys; on its partial tiles the mods' elementwise mask still applies.

  Returns:
    ``out`` ``(B, Hq, Sq, Dv)`` in q's dtype, or ``(out, lse)``. A query that sees no key gets
    output 0, lse ``-inf`` and zero gradients.
  """
  cfg, rebuild, consts = _prepare(q, k, v, score_mod, mask_mod, scale, block_q, block_k,
                                  block_mask)
  out, lse = _make_flash(cfg, rebuild)(q, k, v, consts)
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
  cfg, rebuild, (s_consts, m_consts, bm, state) = _prepare(q, k, v, score_mod, mask_mod, scale,
                                                           block_q, block_k, block_mask)
  score_fn, mask_fn = rebuild(s_consts, m_consts)
  out, lse, fwd = _flash_forward(cfg, score_fn, mask_fn, bm, state, q, k, v)
  dout = jnp.ones_like(out) if dout is None else dout
  *_, dq, dkv = _flash_backward(cfg, score_fn, mask_fn, bm, state, q, k, v, out, lse, dout,
                                jnp.zeros_like(lse))
  return {"forward": fwd, "dq": dq, "dkv": dkv,
          "nonempty": jnp.sum(bm.tiles != EMPTY, dtype=jnp.int32)}
