"""Ring attention: one sequence spread over the devices of a mesh axis.

Each device holds a contiguous shard (or, with ``zigzag=True``, two chunks) of the sequence of
``q``, ``k`` and ``v``. For ``n`` shards the forward runs ``n`` steps: at every step a device attends
its queries to the K/V shard it currently holds, producing a partial ``(out, lse)`` that is merged
into its running result by :func:`~attnax.kernels.merge.merge_two`, while K/V move one device along
the ring with ``lax.ppermute``. The backward is a second ring (``jax.custom_vjp``): K/V travel again
and the dK/dV accumulators travel with them, arriving home after ``n`` hops; dQ stays put. Memory
per device is that of one shard plus one ``(block_q, shard)`` tile of scores.

Mods see absolute positions: the q/kv indices handed to a ``score_mod``/``mask_mod`` are positions
in the whole (natural-order) sequence, whatever the layout, so ``document_mask_mod(doc_ids)`` with
``doc_ids`` of the full sequence, ALiBi, or a causal mask mean what they mean on one device.

Causal load balancing (``zigzag=True``): the sequence is cut into ``2n`` chunks and device ``i``
holds chunks ``i`` and ``2n-1-i``, so every device has the same visible area; a
``(q chunk, kv chunk)`` pair that the mask hides is skipped (``lax.cond`` on the mask of each
``(block_q, chunk)`` tile), which is what makes the balance pay. :func:`to_zigzag` and
:func:`from_zigzag` permute a natural-order sequence into and out of that layout.

This module also holds the shared tile maths for attention over *packed GQA* blocks on absolute
positions (:func:`attend_packed`, :func:`attend_packed_bwd`), which the paged kernel reuses: the
``G = Hq // Hkv`` query heads that read one kv head are packed into one matrix
(:mod:`attnax.kernels.gqa`), so K/V are never repeated.

Each (query chunk, key chunk) pair of a step is one segment kernel: :func:`_segment_fwd` /
:func:`_segment_bwd` (pure JAX, packed GQA) or, with ``step_kernel="pallas"``,
:func:`_pallas_segment_fwd` / :func:`_pallas_segment_bwd` (the Pallas flash kernels, with the
mods moved to the pair's absolute positions); the ring and the step loops are shared.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from attnax.kernels import _checks, merge, tiles
from attnax.kernels import block_mask as bm_lib
from attnax.kernels import operands as ops_lib
from attnax.kernels import score_mods as sm
from attnax.kernels.gqa import fold_group as _flat
from attnax.kernels.gqa import pack_gqa, unpack_gqa
from attnax.kernels.pallas import api as pallas_api
from attnax.kernels.pallas.api import backward_entry as pallas_backward_entry
from attnax.kernels.pallas.api import forward_entry as pallas_forward_entry
from attnax.kernels.tiles import low_precision as _low

__all__ = [
    "ring_attention", "ring_attention_reference", "zigzag_indices", "to_zigzag", "from_zigzag",
    "attend_packed", "attend_packed_bwd", "Positions",
]

f32 = jnp.float32


def _acc(x) -> jnp.dtype:
  """Accumulator dtype for ``x``'s values: f32, or f64 for float64 (tiles.acc_dtype)."""
  return tiles.acc_dtype(x.dtype)


# ----------------------------------------------------------------------------- packed GQA tiles


@dataclasses.dataclass(frozen=True)
class Positions:
  """Absolute indices for the mods, broadcasting against packed scores ``(B, Hkv, G, Lq, Lk)``.

  Attributes:
    b: batch row, ``(B, 1, 1, 1, 1)``.
    h: query head ``kv_head * G + g``, ``(1, Hkv, G, 1, 1)``.
    q: absolute query positions, ``(1 or B, 1, 1, Lq, 1)``.
    kv: absolute key positions, ``(1 or B, 1, 1, 1, Lk)``.
    q_len, kv_len: positions at or past these are masked (padding, cache lengths); scalars or
      arrays broadcasting like ``q`` / ``kv``; ``None`` for none.
  """
  b: Any
  h: Any
  q: Any
  kv: Any
  q_len: Any = None
  kv_len: Any = None

  @staticmethod
  def make(batch: int, num_kv_heads: int, groups: int, q_pos: jax.Array, kv_pos: jax.Array,
           q_len: Any = None, kv_len: Any = None, batch_offset: Any = 0) -> "Positions":
    """From 1-D (or ``(B, L)``) position vectors; batch rows are ``batch_offset + arange(B)``."""
    i32 = jnp.int32
    q_pos = jnp.asarray(q_pos, i32)
    kv_pos = jnp.asarray(kv_pos, i32)
    return Positions(
        b=(batch_offset + jnp.arange(batch, dtype=i32)).reshape(-1, 1, 1, 1, 1),
        h=jnp.arange(num_kv_heads * groups, dtype=i32).reshape(1, num_kv_heads, groups, 1, 1),
        q=q_pos.reshape(-1, 1, 1, q_pos.shape[-1], 1),
        kv=kv_pos.reshape(-1, 1, 1, 1, kv_pos.shape[-1]),
        q_len=q_len, kv_len=kv_len)

  def any_visible(self, mask_fn: Any) -> jax.Array:
    """Scalar bool: does any (query, key) pair of the tile survive ``mask_fn`` and the lengths?"""
    vis = jnp.asarray(True)
    if mask_fn is not None:
      vis = jnp.asarray(mask_fn(self.b, self.h, self.q, self.kv), bool)
    if self.q_len is not None:
      vis = vis & (self.q < self.q_len)
    if self.kv_len is not None:
      vis = vis & (self.kv < self.kv_len)
    return jnp.any(vis)


def _raw_scores(q5: jax.Array, k: jax.Array, scale: float) -> jax.Array:
  """Scaled f32 scores ``(B, Hkv, G, Lq, Lk)`` of packed ``q5`` ``(B, Hkv, G, Lq, D)`` and ``k``."""
  b, hkv, g, lq, d = q5.shape
  return tiles.qk_dot(q5.reshape(b, hkv, g * lq, d), k).reshape(b, hkv, g, lq, k.shape[2]) * scale


def _modded_scores(s: jax.Array, pos: Positions, score_fn: Any,
                   mask_fn: Any) -> tuple[jax.Array, jax.Array | None]:
  """The score mod, then the mask (and the length masks of ``pos``)."""
  return tiles.tile_scores(s, score_fn=score_fn, mask_fn=mask_fn, b=pos.b, h=pos.h, q_idx=pos.q,
                           kv_idx=pos.kv, q_len=pos.q_len, kv_len=pos.kv_len)


def attend_packed(q5: jax.Array, k: jax.Array, v: jax.Array, pos: Positions, *, scale: float,
                  score_fn: Any = None, mask_fn: Any = None,
                  out_dtype: Any = None) -> tuple[jax.Array, jax.Array]:
  """Attention of packed queries to one block of keys, on absolute positions.

  Args:
    q5: ``(B, Hkv, G, Lq, D)`` queries packed per kv head.
    k: ``(B, Hkv, Lk, D)``; v: ``(B, Hkv, Lk, Dv)``.
    pos: the absolute indices the mods see (and the length masks).
    scale, score_fn, mask_fn: the score pipeline (scale, score mod, mask).
    out_dtype: the dtype the ring's output is kept in (f32: P V with P's rounding residual
      added, :func:`attnax.kernels.tiles.p_terms`).

  Returns:
    ``(out, lse)``: f32 ``(B, Hkv, G, Lq, Dv)`` normalised over this block only, and f32
    ``(B, Hkv, G, Lq)`` (``-inf`` and output 0 for rows that see no key): ready for an LSE merge.
  """
  s, vis = _modded_scores(_raw_scores(q5, k, scale), pos, score_fn, mask_fn)
  m, l = tiles.init_stats(s.shape[:-1], s.dtype)
  p, _, m, l = tiles.online_softmax_step(s, vis, m, l)
  acc = sum(tiles.pv_dot(_flat(x), v) for x in tiles.p_terms(p, v.dtype, out_dtype))
  return tiles.finalize(acc.reshape(s.shape[:-1] + (v.shape[-1],)), m, l)


def attend_packed_bwd(q5: jax.Array, k: jax.Array, v: jax.Array, do5: jax.Array,
                      delta: jax.Array, lse: jax.Array, pos: Positions, mod_floats: tuple,
                      rebuild: Callable[[tuple], tuple[Any, Any]], *, scale: float):
  """Gradients of one (query block, key block) pair, FlashAttention-2 style.

  Args:
    q5, k, v, pos, scale: as :func:`attend_packed`.
    do5: output cotangent ``(B, Hkv, G, Lq, Dv)``.
    delta: ``rowsum(do * out) - dlse``, f32 ``(B, Hkv, G, Lq)``, of the *final* output.
    lse: the final f32 log-sum-exp ``(B, Hkv, G, Lq)`` (over every key, not just this block).
    mod_floats: the float arrays the mods carry; ``rebuild(mod_floats) -> (score_fn, mask_fn)``.

  Returns:
    ``(dq5, dk, dv, d_mod_floats)``, all f32: this block's contribution to each gradient. The score
    mod is differentiated with ``jax.vjp``, so any elementwise mod is exact.
  """
  s_raw = _raw_scores(q5, k, scale)

  def scores_of(s_raw, floats):
    score_fn, mask_fn = rebuild(floats)
    return _modded_scores(s_raw, pos, score_fn, mask_fn)

  s, vjp_fn, vis = jax.vjp(scores_of, s_raw, mod_floats, has_aux=True)
  p = tiles.probabilities(s, vis, lse)                       # (B, Hkv, G, Lq, Lk)
  do_f = _flat(do5)
  dv = tiles.pv_dot(jnp.swapaxes(_flat(_low(p, v.dtype)), -1, -2), do_f)
  dp = tiles.qk_dot(do_f, v).reshape(p.shape)
  ds = p * (dp - delta[..., None])
  ds_raw, d_floats = vjp_fn(ds)
  ds_f = _flat(_low(ds_raw * scale, q5.dtype))
  dq = tiles.pv_dot(ds_f, k).reshape(q5.shape[:-1] + (k.shape[-1],))
  dk = tiles.pv_dot(jnp.swapaxes(ds_f, -1, -2), _flat(q5))
  acc = _acc(q5)
  return dq.astype(acc), dk.astype(acc), dv.astype(acc), d_floats


# ----------------------------------------------------------------------------- mods as operands


@dataclasses.dataclass(frozen=True)
class _ModSpec:
  """The mods' static part (:class:`~attnax.kernels.operands.ModOperands`) split by operand kind.

  The float operands travel as differentiated inputs of the ring's custom_vjp (replicated into
  ``shard_map``), the others (ids) as plain inputs.
  """
  mods: ops_lib.ModOperands

  def rebuild(self, floats: tuple, others: tuple) -> tuple[Any, Any]:
    fl, ot = iter(floats), iter(others)
    return self.mods.rebuild([next(fl) if f else next(ot) for f in self.mods.float_mask])


def _split_mods(mods: tuple[Any, Any]) -> tuple[tuple, tuple, _ModSpec]:
  spec, values = ops_lib.collect(*mods)
  floats = tuple(x for x, f in zip(values, spec.float_mask) if f)
  others = tuple(x for x, f in zip(values, spec.float_mask) if not f)
  return floats, others, _ModSpec(spec)


# ----------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class _Ring:
  """Static settings of one ring_attention call."""
  num_shards: int
  zigzag: bool
  scale: float
  block_q: int
  spec: _ModSpec
  axis_name: Any = None
  batch_axis: Any = None
  kernel: str = "jax"          # each step: "jax" (attend_packed) or "pallas" (the flash kernels)
  pallas_backend: str = "auto"
  diff: tuple = ()             # in the backward: which float mod arrays are differentiated
  out_dtype: Any = None        # the forward's output dtype (None: q's; see residual_out_dtype)

  @property
  def mesh_axes(self) -> tuple:
    return (self.axis_name,) + ((self.batch_axis,) if self.batch_axis is not None else ())

  def segments(self, shard: Any, shard_len: int) -> list[tuple[int, int, Any]]:
    """``(local start, length, absolute start)`` of the contiguous pieces of shard ``shard``."""
    if not self.zigzag:
      return [(0, shard_len, shard * shard_len)]
    c = shard_len // 2
    return [(0, c, shard * c), (c, c, (2 * self.num_shards - 1 - shard) * c)]


def zigzag_indices(seq_len: int, num_shards: int) -> np.ndarray:
  """Gather indices that put a natural-order sequence into zig-zag order.

  The sequence is cut into ``2 * num_shards`` equal chunks; shard ``i`` (the ``i``-th contiguous
  ``seq_len / num_shards`` slice of the result) holds chunks ``i`` and ``2 * num_shards - 1 - i``.
  Returns int32 ``(seq_len,)`` with ``zigzag = natural[indices]``.
  """
  n2 = 2 * int(num_shards)
  if seq_len % n2:
    raise ValueError(f"zig-zag needs seq_len ({seq_len}) divisible by 2 * num_shards ({n2})")
  c = seq_len // n2
  order = [i for r in range(num_shards) for i in (r, n2 - 1 - r)]
  return np.concatenate([np.arange(i * c, (i + 1) * c) for i in order]).astype(np.int32)


def to_zigzag(x: jax.Array, num_shards: int, axis: int = 2) -> jax.Array:
  """Permute the sequence ``axis`` of ``x`` from natural into zig-zag order (see :func:`zigzag_indices`)."""
  return jnp.take(x, zigzag_indices(x.shape[axis], num_shards), axis=axis)


def from_zigzag(x: jax.Array, num_shards: int, axis: int = 2) -> jax.Array:
  """Inverse of :func:`to_zigzag`: zig-zag order back to natural order along ``axis``."""
  inv = np.argsort(zigzag_indices(x.shape[axis], num_shards)).astype(np.int32)
  return jnp.take(x, inv, axis=axis)


# ----------------------------------------------------------------------------- one ring step


def _no_keys(q: jax.Array, dv: int) -> tuple[jax.Array, jax.Array]:
  """The partial ``(out, lse)`` of queries ``q`` (``(..., L, D)``) that see no key: 0 and -inf, the
  identity of :func:`~attnax.kernels.merge.merge_two`."""
  return (jnp.zeros(q.shape[:-1] + (dv,), _acc(q)), jnp.full(q.shape[:-1], -jnp.inf, _acc(q)))


def _pad_axis3(x: jax.Array, total: int, value: float = 0.0) -> jax.Array:
  extra = total - x.shape[3]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[3] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _blocks(x: jax.Array, nb: int, bq: int) -> jax.Array:
  """``(B, Hkv, G, nb * bq, ...) -> (nb, B, Hkv, G, bq, ...)``."""
  s = x.shape
  return jnp.moveaxis(x.reshape(s[:3] + (nb, bq) + s[4:]), 3, 0)


def _unblocks(x: jax.Array, length: int) -> jax.Array:
  """Inverse of :func:`_blocks`, dropping the padding past ``length``."""
  x = jnp.moveaxis(x, 0, 3)
  s = x.shape
  return x.reshape(s[:3] + (s[3] * s[4],) + s[5:])[:, :, :, :length]


def _block_positions(q5_shape, lk: int, q_abs, kv_abs, i, bq: int, lq: int,
                     b_off) -> Positions:
  """Positions of query block ``i`` (``bq`` rows; rows past ``lq`` are padding) and of the keys."""
  b, hkv, g = q5_shape[:3]
  q_pos = q_abs + i * bq + jnp.arange(bq, dtype=jnp.int32)
  kv_pos = kv_abs + jnp.arange(lk, dtype=jnp.int32)
  q_len = (q_abs + lq) if lq % bq else None
  return Positions.make(b, hkv, g, q_pos, kv_pos, q_len=q_len, batch_offset=b_off)


def _segment_fwd(q5, k, v, q_abs, kv_abs, cfg: _Ring, floats, others, b_off=0):
  """Packed queries ``(B, Hkv, G, Lq, D)`` at absolute ``q_abs + i`` against keys at ``kv_abs + j``.

  Loops over query blocks of ``cfg.block_q`` (memory ``block_q * Lk`` scores); a block the mask
  hides entirely is skipped. Returns f32 ``(out (B, Hkv, G, Lq, Dv), lse (B, Hkv, G, Lq))``.
  """
  score_fn, mask_fn = cfg.spec.rebuild(floats, others)
  lq, lk, dv = q5.shape[3], k.shape[2], v.shape[-1]
  bq = min(cfg.block_q, lq)
  nb = -(-lq // bq)
  qb = _blocks(_pad_axis3(q5, nb * bq), nb, bq)

  def one(xs):
    qi, i = xs
    pos = _block_positions(q5.shape, lk, q_abs, kv_abs, i, bq, lq, b_off)
    compute = lambda: attend_packed(qi, k, v, pos, scale=cfg.scale, score_fn=score_fn,
                                    mask_fn=mask_fn, out_dtype=cfg.out_dtype)
    if mask_fn is None:
      return compute()
    return lax.cond(pos.any_visible(mask_fn), compute, lambda: _no_keys(qi, dv))

  out, lse = lax.map(one, (qb, jnp.arange(nb, dtype=jnp.int32)))
  return _unblocks(out, lq), _unblocks(lse, lq)


def _segment_bwd(q5, k, v, rows, q_abs, kv_abs, cfg: _Ring, floats, others, b_off=0):
  """Gradients of :func:`_segment_fwd` given the final ``lse`` and ``delta``.

  ``rows = (do5, delta5, lse5)``. A scan over query blocks carries the f32 dK, dV (and mod-array)
  accumulators of this key segment. Returns ``(dq5, dk, dv, d_floats)`` f32.
  """
  do5, delta5, lse5 = rows
  _, mask_fn = cfg.spec.rebuild(floats, others)
  rebuild = lambda fl: cfg.spec.rebuild(fl, others)
  lq, lk = q5.shape[3], k.shape[2]
  bq = min(cfg.block_q, lq)
  nb = -(-lq // bq)
  xs = (_blocks(_pad_axis3(q5, nb * bq), nb, bq), _blocks(_pad_axis3(do5, nb * bq), nb, bq),
        _blocks(_pad_axis3(delta5, nb * bq), nb, bq),
        _blocks(_pad_axis3(lse5, nb * bq, -jnp.inf), nb, bq), jnp.arange(nb, dtype=jnp.int32))

  def body(carry, x):
    qi, doi, dli, lsei, i = x
    pos = _block_positions(q5.shape, lk, q_abs, kv_abs, i, bq, lq, b_off)

    def compute():
      dq, dk, dv, dfl = attend_packed_bwd(qi, k, v, doi, dli, lsei, pos, floats, rebuild,
                                          scale=cfg.scale)
      return dq, jax.tree.map(jnp.add, carry, (dk, dv, dfl))

    if mask_fn is None:
      dq, carry = compute()
    else:
      skip = lambda: (jnp.zeros(qi.shape, _acc(qi)), carry)
      dq, carry = lax.cond(pos.any_visible(mask_fn), compute, skip)
    return carry, dq

  init = (jnp.zeros(k.shape, _acc(k)), jnp.zeros(v.shape, _acc(v)),
          tuple(jnp.zeros(f.shape, _acc(f)) for f in floats))
  (dk, dv, dfl), dq = lax.scan(body, init, xs)
  return _unblocks(dq, lq), dk, dv, dfl


def _step_fwd(q5, k, v, q_shard, kv_shard, cfg: _Ring, floats, others, b_off=0, *,
              segment=None, q_axis=3):
  """One ring step: local queries of shard ``q_shard`` against the K/V of shard ``kv_shard``.

  Zig-zag shards are two chunks each: the four (q chunk, kv chunk) pairs are separate segments
  (merged by LSE per q chunk), so a pair the mask hides costs nothing. ``segment`` is the
  per-pair kernel (:func:`_segment_fwd` on packed queries, sequence ``q_axis`` 3, by default).
  """
  segment = segment or _segment_fwd
  cut = lambda x, start, n, axis: lax.slice_in_dim(x, start, start + n, axis=axis)
  outs, lses = [], []
  for qs, ql, qa in cfg.segments(q_shard, q5.shape[q_axis]):
    acc = None
    for ks, kl, ka in cfg.segments(kv_shard, k.shape[2]):
      part = segment(cut(q5, qs, ql, q_axis), cut(k, ks, kl, 2), cut(v, ks, kl, 2), qa, ka, cfg,
                     floats, others, b_off)
      acc = part if acc is None else merge.merge_two(*acc, *part)
    outs.append(acc[0])
    lses.append(acc[1])
  return jnp.concatenate(outs, axis=q_axis), jnp.concatenate(lses, axis=q_axis)


def _step_bwd(q5, k, v, rows, q_shard, kv_shard, cfg: _Ring, floats, others, b_off=0, *,
              segment=None, q_axis=3):
  """Gradients of :func:`_step_fwd`: ``(dq5, dk, dv, d_floats)``, f32.

  ``rows``: the per-query arrays the segment kernel takes, cut like the queries (packed
  ``(do5, delta5, lse5)`` for :func:`_segment_bwd`, the default).
  """
  segment = segment or _segment_bwd
  cut = lambda x, start, n, axis: lax.slice_in_dim(x, start, start + n, axis=axis)
  q_segs = cfg.segments(q_shard, q5.shape[q_axis])
  kv_segs = cfg.segments(kv_shard, k.shape[2])
  dq = [0.0] * len(q_segs)
  dk = [0.0] * len(kv_segs)
  dv = [0.0] * len(kv_segs)
  dfl = tuple(jnp.zeros(f.shape, _acc(f)) for f in floats)
  for a, (qs, ql, qa) in enumerate(q_segs):
    for c, (ks, kl, ka) in enumerate(kv_segs):
      g = segment(cut(q5, qs, ql, q_axis), cut(k, ks, kl, 2), cut(v, ks, kl, 2),
                  tuple(cut(x, qs, ql, q_axis) for x in rows), qa, ka, cfg, floats, others,
                  b_off)
      dq[a] = dq[a] + g[0]
      dk[c] = dk[c] + g[1]
      dv[c] = dv[c] + g[2]
      dfl = jax.tree.map(jnp.add, dfl, g[3])
  return (jnp.concatenate(dq, axis=q_axis), jnp.concatenate(dk, axis=2),
          jnp.concatenate(dv, axis=2), dfl)


# ----------------------------------------------------------------------------- Pallas steps
#
# The same steps on the Pallas flash kernels (unpacked (B, H, L, D) layout: the kernels handle GQA
# themselves). The mods see absolute positions through a traced offset vector
# (score_mods.shift_mods), so one compiled kernel serves every step; the plan's BlockMask comes
# from the shifted mask (closed-form tile rules for band, document and length masks), so a step
# below a causal diagonal runs FULL tiles without the mask, and a pair the mask hides entirely is
# not launched (lax.cond, where the mask's tile rules decide it cheaply).


def _pallas_mods(cfg: _Ring, floats, others, b_off, q_abs, kv_abs, batch: int, heads: int):
  """The step's shifted ``(score, mask)``, the offset vector, and where the user's operands sit
  among the plan's operands (the offsets are operands too)."""
  offsets = jnp.stack([jnp.asarray(x, jnp.int32) for x in (b_off, q_abs, kv_abs)])
  score, mask = sm.shift_mods(*cfg.spec.rebuild(floats, others), offsets, batch=batch,
                              heads=heads)
  leaves = [x for x in jax.tree_util.tree_leaves((score, mask)) if ops_lib.is_array(x)]
  where = tuple(i for i, x in enumerate(leaves) if x is not offsets)
  if len(where) != len(floats) + len(others):
    raise AssertionError("ring_attention: the shifted mods' operands do not line up with the "
                         "mods' arrays")
  return score, mask, where


def _unless_hidden(mask, q_len: int, kv_len: int, compute, hidden):
  """``compute()``, or ``hidden()`` when the shifted mask shows no (query, key) pair of the
  segment; decided by ``lax.cond`` where the mask's tile rules say it in closed form, else
  ``compute()`` always (its BlockMask still skips the hidden tiles)."""
  def closed_form(m):
    if isinstance(m, (sm.AndMask, sm.OrMask)):
      return all(closed_form(x) for x in m.masks)
    return isinstance(m, sm.ShiftedMask) and m.local_mask(q_len, kv_len) is not None
  if mask is None or not closed_form(mask):
    return compute()
  any_, _ = bm_lib.visibility(mask, 1, 1, q_len, kv_len, q_len, kv_len)   # one tile: the segment
  return lax.cond(jnp.any(any_), compute, hidden)


def _pallas_segment_fwd(q, k, v, q_abs, kv_abs, cfg: _Ring, floats, others, b_off):
  """Local queries ``(B, Hq, Lq, D)`` at ``q_abs + i`` against keys at ``kv_abs + j``:
  f32 ``(out, lse)``."""
  score, mask, _ = _pallas_mods(cfg, floats, others, b_off, q_abs, kv_abs, *q.shape[:2])

  def compute():
    out, lse = pallas_forward_entry(q, k, v, score_mod=score, mask_mod=mask, scale=cfg.scale,
                                    backend=cfg.pallas_backend, out_dtype=cfg.out_dtype)
    return out.astype(_acc(q)), lse.astype(_acc(q))

  return _unless_hidden(mask, q.shape[2], k.shape[2], compute,
                        lambda: _no_keys(q, v.shape[-1]))


def _pallas_segment_bwd(q, k, v, rows, q_abs, kv_abs, cfg: _Ring, floats, others, b_off):
  """The segment's share of ``(dq, dk, dv, d_floats)`` given the final ``rows = (out, lse, dout,
  dlse)``."""
  out, lse, dout, dlse = rows
  score, mask, where = _pallas_mods(cfg, floats, others, b_off, q_abs, kv_abs, *q.shape[:2])
  float_where = [w for w, fl in zip(where, cfg.spec.mods.float_mask) if fl]   # plan index per float
  acc = _acc(q)

  def compute():
    dq, dk, dv, d_ops = pallas_backward_entry(
        q, k, v, out, lse, dout, dlse, diff_operands=tuple(float_where[i] for i in cfg.diff),
        score_mod=score, mask_mod=mask, scale=cfg.scale, backend=cfg.pallas_backend)
    d_floats = tuple(jnp.zeros(f.shape, _acc(f)) if d_ops[w] is None else d_ops[w].astype(_acc(f))
                     for w, f in zip(float_where, floats))
    return dq.astype(acc), dk.astype(acc), dv.astype(acc), d_floats

  zeros = lambda: (jnp.zeros(q.shape, acc), jnp.zeros(k.shape, acc), jnp.zeros(v.shape, acc),
                   tuple(jnp.zeros(f.shape, _acc(f)) for f in floats))
  return _unless_hidden(mask, q.shape[2], k.shape[2], compute, zeros)


# ----------------------------------------------------------------------------- the ring


def _batch_offset(cfg: _Ring, local_batch: int):
  """Global index of this device's first batch row (mods index their arrays by global rows)."""
  if cfg.batch_axis is None:
    return 0
  return lax.axis_index(cfg.batch_axis) * local_batch


def _ring_fwd_local(q, k, v, floats, others, *, cfg: _Ring):
  """Per-device forward inside ``shard_map``: local shards in, local ``(out, lse)`` out."""
  n, axis = cfg.num_shards, cfg.axis_name
  r = lax.axis_index(axis)
  perm = [(j, (j + 1) % n) for j in range(n)]
  b_off = _batch_offset(cfg, q.shape[0])
  if cfg.kernel == "pallas":
    qx, unpack = q, lambda x: x
    step = lambda k, v, t: _step_fwd(q, k, v, r, (r - t) % n, cfg, floats, others, b_off,
                                     segment=_pallas_segment_fwd, q_axis=2)
  else:
    qx, unpack = pack_gqa(q, k.shape[1]), unpack_gqa
    step = lambda k, v, t: _step_fwd(qx, k, v, r, (r - t) % n, cfg, floats, others, b_off)

  def body(t, carry):
    out, lse, k, v = carry
    k_next, v_next = lax.ppermute(k, axis, perm), lax.ppermute(v, axis, perm)  # overlaps the step
    out, lse = merge.merge_two(out, lse, *step(k, v, t))
    return out, lse, k_next, v_next

  out, lse, k, v = lax.fori_loop(0, n - 1, body, _no_keys(qx, v.shape[-1]) + (k, v))
  out, lse = merge.merge_two(out, lse, *step(k, v, n - 1))
  return unpack(out).astype(cfg.out_dtype or q.dtype), unpack(lse)


def _ring_bwd_local(q, k, v, out, lse, dout, dlse, floats, others, *, cfg: _Ring):
  """Per-device backward: K/V ride the ring again with their dK/dV accumulators."""
  n, axis = cfg.num_shards, cfg.axis_name
  r = lax.axis_index(axis)
  perm = [(j, (j + 1) % n) for j in range(n)]
  b_off = _batch_offset(cfg, q.shape[0])
  if cfg.kernel == "pallas":
    qx, unpack = q, lambda x: x
    step = lambda k, v, t: _step_bwd(q, k, v, (out, lse, dout, dlse), r, (r - t) % n, cfg,
                                     floats, others, b_off, segment=_pallas_segment_bwd, q_axis=2)
  else:
    hkv = k.shape[1]
    qx, unpack = pack_gqa(q, hkv), unpack_gqa
    do5 = pack_gqa(dout, hkv)
    delta5 = pack_gqa(tiles.backward_delta(out, dout, lse, dlse), hkv)
    lse5 = pack_gqa(lse, hkv)
    step = lambda k, v, t: _step_bwd(qx, k, v, (do5, delta5, lse5), r, (r - t) % n, cfg,
                                     floats, others, b_off)

  def body(t, carry):
    dq, k, v, dk, dv, dfl = carry
    k_next, v_next = lax.ppermute(k, axis, perm), lax.ppermute(v, axis, perm)
    g = step(k, v, t)
    dk = lax.ppermute(dk + g[1], axis, perm)
    dv = lax.ppermute(dv + g[2], axis, perm)
    return dq + g[0], k_next, v_next, dk, dv, jax.tree.map(jnp.add, dfl, g[3])

  init = (jnp.zeros(qx.shape, _acc(qx)), k, v, jnp.zeros(k.shape, _acc(k)),
          jnp.zeros(v.shape, _acc(v)), tuple(jnp.zeros(f.shape, _acc(f)) for f in floats))
  dq, k, v, dk, dv, dfl = lax.fori_loop(0, n - 1, body, init)
  g = step(k, v, n - 1)
  dq = dq + g[0]
  dk = lax.ppermute(dk + g[1], axis, perm)     # the n-th hop brings dK/dV home
  dv = lax.ppermute(dv + g[2], axis, perm)
  # The mods' arrays are replicated: their cotangent sums over every device that used them.
  dfl = lax.psum(jax.tree.map(jnp.add, dfl, g[3]), cfg.mesh_axes)
  dfl = tuple(d.astype(f.dtype) for d, f in zip(dfl, floats))
  return unpack(dq).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dfl


def _ring_call(q, k, v, floats, others, cfg: _Ring, mesh: Mesh):
  """``(out, lse)`` of the global arrays, with the ring forward and the ring backward."""
  seq = P(cfg.batch_axis, None, cfg.axis_name, None)
  seq_lse = P(cfg.batch_axis, None, cfg.axis_name)
  shard = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)
  fwd_of = lambda cfg: shard(functools.partial(_ring_fwd_local, cfg=cfg),
                             in_specs=(seq, seq, seq, P(), P()), out_specs=(seq, seq_lse))
  fwd = fwd_of(cfg)

  @jax.custom_vjp
  def ring(q, k, v, floats, others):
    return fwd(q, k, v, floats, others)

  def ring_fwd(q, k, v, floats, others):
    # symbolic_zeros: the forward rule sees which float mod arrays are differentiated; only those
    # get cotangents (an ALiBi table held constant costs the backward nothing).
    q, k, v, others = ops_lib.primal_values((q, k, v, others))
    floats, marks = ops_lib.differentiated(floats, [True] * len(floats))
    out_dtype = tiles.residual_out_dtype(q.dtype, bool(ops_lib.marked(marks)))
    out, lse = fwd_of(dataclasses.replace(cfg, out_dtype=out_dtype))(q, k, v, floats, others)
    return (out.astype(q.dtype), lse), (q, k, v, floats, others, out, lse, marks)

  def ring_bwd(res, cts):
    q, k, v, floats, others, out, lse, marks = res
    diff = ops_lib.marked(marks)
    dout, dlse = map(ops_lib.cotangent_or_none, cts)
    dout = jnp.zeros(out.shape, q.dtype) if dout is None else dout
    dlse = jnp.zeros_like(lse) if dlse is None else dlse
    bwd = shard(functools.partial(_ring_bwd_local, cfg=dataclasses.replace(cfg, diff=diff)),
                in_specs=(seq, seq, seq, seq, seq_lse, seq, seq_lse, P(), P()),
                out_specs=(seq, seq, seq, P()))
    dq, dk, dv, dfl = bwd(q, k, v, out, lse, dout, dlse, floats, others)
    return (dq, dk, dv, tuple(d if i in diff else None for i, d in enumerate(dfl)),
            tuple(None for _ in others))

  ring.defvjp(ring_fwd, ring_bwd, symbolic_zeros=True)
  return ring(q, k, v, floats, others)


STEP_KERNELS = ("auto", "jax", "pallas")


def _step_kernel(step_kernel: str, q, k, v, spec: _ModSpec, kernel: str) -> str:
  """``"pallas"`` or ``"jax"``: the kernel each ring step runs (``"auto"``: Pallas on a GPU when
  it can run these inputs, else the pure-JAX step)."""
  if step_kernel not in STEP_KERNELS:
    raise ValueError(f"{kernel}: step_kernel must be one of {STEP_KERNELS}, got {step_kernel!r}")
  if step_kernel == "jax":
    return "jax"
  reasons = pallas_api.not_supported_reasons(
      "triton" if step_kernel == "auto" else "interpret", q, k, v)
  if spec.mods.cells:
    reasons.append("the mods close over arrays (plain functions); the Pallas step moves the "
                   "positions of pytree mods (every attnax mod) only")
  if step_kernel == "pallas" and reasons:
    raise ValueError(f"{kernel}: step_kernel='pallas' cannot run these inputs: "
                     + "; ".join(reasons))
  return "jax" if reasons else "pallas"


def _prepare(q, k, v, *, kernel, num_shards, causal, zigzag, score_mod, mask_mod, scale, block_q,
             axis_name=None, batch_axis=None, step_kernel="jax"):
  b, hq, _, sq, sk, d, _ = _checks.check_qkv(q, k, v, kernel=kernel, allow_f64=True)
  _checks.check_block("block_q", block_q)
  unit = 2 * num_shards if zigzag else num_shards
  for name, length in (("q", sq), ("k/v", sk)):
    if length % unit:
      raise ValueError(f"{kernel}: the {name} sequence length ({length}) must be divisible by "
                       f"{'2 * ' if zigzag else ''}num_shards = {unit}"
                       f"{' (zig-zag chunks)' if zigzag else ''}; q {q.shape}, k {k.shape}")
  # Mods index their arrays by global batch row, query head and absolute (natural-order) position.
  score_fn, mask_fn = sm.resolve_mods(score_mod, mask_mod, batch=b, heads=hq, q_len=sq,
                                      kv_len=sk)
  if causal:
    mask_fn = sm.and_masks(sm.CausalMask(0), mask_fn)
  floats, others, spec = _split_mods((score_fn, mask_fn))
  cfg = _Ring(num_shards=num_shards, zigzag=bool(zigzag), scale=_checks.default_scale(scale, d),
              block_q=block_q, spec=spec, axis_name=axis_name, batch_axis=batch_axis,
              kernel=_step_kernel(step_kernel, q, k, v, spec, kernel))
  return cfg, floats, others


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: Mesh, axis_name: Any,
                   causal: bool = False, zigzag: bool = False, score_mod: Any = None,
                   mask_mod: Any = None, scale: float | None = None, return_lse: bool = False,
                   block_q: int = 512, batch_axis: Any = None,
                   step_kernel: str = "auto") -> Any:
  """Sequence-parallel (ring) attention over the mesh axis ``axis_name``.

  ``q``, ``k``, ``v`` are global arrays whose sequence axis is split evenly over the ``n`` devices
  of ``axis_name`` (``shard_map`` with ``PartitionSpec(batch_axis, None, axis_name, None)``; other
  mesh axes replicate). Each device keeps its query shard and passes K/V around the ring with
  ``lax.ppermute``; at every step it attends to the K/V it holds (mods on absolute positions) and
  merges the partial ``(out, lse)`` by log-sum-exp. The gradient is a second ring
  (``jax.custom_vjp``): dK/dV travel with their K/V, so memory stays per shard.

  Args:
    q: ``(B, Hq, Sq, D)``; k: ``(B, Hkv, Sk, D)``; v: ``(B, Hkv, Sk, Dv)``; ``Hq % Hkv == 0``.
      ``Sq`` and ``Sk`` divisible by ``n`` (by ``2n`` with ``zigzag``).
    mesh: the ``jax.sharding.Mesh``; axis_name: the axis that carries the sequence.
    causal: add a causal mask ``kv_idx <= q_idx`` on absolute positions.
    zigzag: the sequence axis of ``q``, ``k``, ``v`` (and of ``out``/``lse``) is in zig-zag order,
      as made by :func:`to_zigzag` with ``num_shards = n``: device ``i`` holds chunks ``i`` and
      ``2n-1-i`` of ``2n``, which balances causal work. Permute once at the model's input and
      back with :func:`from_zigzag` at its output. Mods still see natural-order positions.
    score_mod, mask_mod: mods evaluated on absolute (natural-order) positions; their arrays (e.g.
      document ids of the whole sequence) are replicated to every device, and float arrays (ALiBi
      slopes, a bias table) receive gradients. The arrays must fit the global ``B``, ``Hq``,
      ``Sq``, ``Sk`` (a ValueError names the mod, its array's shape and the sizes otherwise).
    scale: default ``D ** -0.5``.
    return_lse: also return the lse ``(B, Hq, Sq)`` (sharded like ``out``; differentiable; f32,
      f64 for float64 inputs, which run in float64 throughout).
    block_q: query block of the pure-JAX step's local attention (scores held:
      ``block_q * Sk / n``).
    batch_axis: optional second mesh axis that splits the batch (data parallel); mods still see
      global batch rows.
    step_kernel: what each ring step runs: ``"pallas"`` (:func:`pallas_flash_attention`'s forward
      with its LSE, and its backward kernels with ``dlse`` and the final LSE, the mods moved to the
      step's absolute positions and its BlockMask built from them: a causal step below the
      diagonal runs FULL tiles, one above it is not launched), ``"jax"`` (the pure-JAX step,
      :func:`attend_packed`), or ``"auto"`` (Pallas on a GPU when it supports the inputs and
      mods, else JAX). ``"pallas"`` on a CPU runs the Pallas interpreter (tests). Mods that are
      plain functions closing over arrays run on the JAX step.

  Returns:
    ``out`` ``(B, Hq, Sq, Dv)`` in q's dtype (sharded over ``axis_name``), or ``(out, lse)``.
  """
  if not isinstance(mesh, Mesh):
    raise ValueError(f"ring_attention: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  if axis_name not in mesh.axis_names:
    raise ValueError(f"ring_attention: axis_name {axis_name!r} is not an axis of the mesh "
                     f"{dict(mesh.shape)}")
  n = int(mesh.shape[axis_name])
  if batch_axis is not None:
    if batch_axis not in mesh.axis_names or batch_axis == axis_name:
      raise ValueError(f"ring_attention: batch_axis {batch_axis!r} must be another axis of the mesh "
                       f"{dict(mesh.shape)} (the sequence axis is {axis_name!r})")
    if getattr(q, "ndim", 0) == 4 and q.shape[0] % mesh.shape[batch_axis]:
      raise ValueError(f"ring_attention: batch ({q.shape[0]}) must be divisible by the size of "
                       f"batch_axis {batch_axis!r} ({mesh.shape[batch_axis]}); q {q.shape}")
  cfg, floats, others = _prepare(q, k, v, kernel="ring_attention", num_shards=n, causal=causal,
                                 zigzag=zigzag, score_mod=score_mod, mask_mod=mask_mod,
                                 scale=scale, block_q=block_q, axis_name=axis_name,
                                 batch_axis=batch_axis, step_kernel=step_kernel)
  out, lse = _ring_call(q, k, v, floats, others, cfg, mesh)
  return (out, lse) if return_lse else out


def ring_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, num_shards: int,
                             causal: bool = False, zigzag: bool = False, score_mod: Any = None,
                             mask_mod: Any = None, scale: float | None = None,
                             return_lse: bool = False, block_q: int = 512) -> Any:
  """:func:`ring_attention`'s maths on one device, for tests.

  The same shards, the same step order (device ``r`` at step ``t`` holds the K/V of shard
  ``(r - t) mod n``), the same per-step kernel and the same LSE merges, with the devices emulated
  side by side (``vmap`` over shards) and no communication. Differentiable by ordinary autodiff.

  Args:
    num_shards: ``n``, the ring size being emulated. Other arguments as :func:`ring_attention`
      (with ``zigzag=True`` the inputs and outputs are in zig-zag order).

  Returns:
    ``out`` ``(B, Hq, Sq, Dv)``, or ``(out, lse)``.
  """
  n = int(num_shards)
  if n < 1:
    raise ValueError(f"ring_attention_reference: num_shards must be >= 1, got {num_shards}")
  cfg, floats, others = _prepare(q, k, v, kernel="ring_attention_reference", num_shards=n,
                                 causal=causal, zigzag=zigzag, score_mod=score_mod,
                                 mask_mod=mask_mod, scale=scale, block_q=block_q)
  hkv = k.shape[1]
  lq, lk = q.shape[2] // n, k.shape[2] // n
  # Shard-major views: "device" r holds qs[r], and ks[r], vs[r] before the ring turns.
  q5 = pack_gqa(q, hkv)
  qs = jnp.moveaxis(q5.reshape(q5.shape[:3] + (n, lq, q5.shape[-1])), 3, 0)
  ks = jnp.moveaxis(k.reshape(k.shape[:2] + (n, lk, k.shape[-1])), 2, 0)
  vs = jnp.moveaxis(v.reshape(v.shape[:2] + (n, lk, v.shape[-1])), 2, 0)
  shards = jnp.arange(n, dtype=jnp.int32)

  def step(t, carry):
    # Every device r, side by side (vmap), at step t holds the K/V of shard (r - t) mod n.
    src = (shards - t) % n
    one = lambda qr, r, s: _step_fwd(qr, ks[s], vs[s], r, s, cfg, floats, others)
    return merge.merge_two(*carry, *jax.vmap(one)(qs, shards, src))

  out, lse = lax.fori_loop(0, n, step, _no_keys(qs, v.shape[-1]))
  out = unpack_gqa(jnp.concatenate(list(out), axis=3)).astype(q.dtype)
  lse = unpack_gqa(jnp.concatenate(list(lse), axis=3))
  return (out, lse) if return_lse else out
