"""The backend-neutral plan of one ``pallas_flash_attention`` call.

Built once per call from the inputs and the mods, before any lowering is chosen to run it:

* true and padded sizes (sequence lengths padded to the tiling, head dims to a power of two);
* the scale and the mods, split into a score part and a mask part (``softcap=`` becomes
  :func:`~attnax.kernels.score_mods.softcap_mod`, ``cu_seqlens`` a document mask), with their
  operands (:mod:`attnax.kernels.operands`);
* the BlockMask schedule in both directions: per q block the kv blocks to visit (full ones first,
  then partial ones), per kv block the q blocks (the dK/dV pass), as flat int32 lists;
* attention dropout: the static rate (``FlashPlan.dropout_rate``; a lowering that cannot drop
  refuses plans with a rate above 0) and the traced uint32 seed (``PlanArrays.dropout_seed``), from
  which every pass regenerates the keep mask of :func:`attnax.kernels.tiles.dropout_keep`;
* threshold skipping (:mod:`attnax.kernels.threshold`): the static threshold and rule
  (``FlashPlan.softmax_threshold``, ``threshold_rule``; a lowering that cannot skip refuses such
  plans); the forward's recorded decisions travel to the backward in ``PlanArrays.decisions``.

A lowering (:mod:`attnax.kernels.pallas.triton`, or a Mosaic GPU one) reads the static
:class:`FlashPlan` and the arrays of :class:`PlanArrays` and implements the forward and the backward
of exactly this schedule; it adds only its own launch knobs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from attnax.kernels import _checks
from attnax.kernels import block_mask as bm_lib
from attnax.kernels import operands as ops_lib
from attnax.kernels import score_mods as sm
from attnax.kernels import varlen

__all__ = ["FlashPlan", "PlanArrays", "build_plan", "NUM_LISTS", "pow2", "pad_to"]

NUM_LISTS = 6   # per direction: partial counts, indices; full counts, indices, first, prefix length


def pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def pad_to(x: jax.Array, shape) -> jax.Array:
  pads = [(0, s - d) for d, s in zip(x.shape, shape)]
  return x if all(p == (0, 0) for p in pads) else jnp.pad(x, pads)


@dataclasses.dataclass(frozen=True)
class FlashPlan:
  """Everything static about one call, independent of the lowering that runs it.

  Attributes:
    batch, q_heads, kv_heads: sizes (``q_heads % kv_heads == 0``).
    q_len, kv_len: true sequence lengths; q_pad, kv_pad: padded to ``block_q``/``block_k``.
    head_dim, v_dim: true head dims; head_pad, v_pad: zero-padded to powers of two >= 16.
    scale: multiplies ``q @ k.T``.
    block_q, block_k: the BlockMask tiling (the unit of skipping).
    bm_batch, bm_heads: leading axes of the BlockMask (``B'``, ``H'`` in ``(1, Hkv, Hq)``).
    dense: nothing is masked: every kv block is walked without index lists.
    mods: the static part of ``(score part, mask part)``; their operands are in PlanArrays.
    unit_grad: ``d(modded score) / d(score) == 1`` wherever visible: the backward skips the jvp.
    dropout_rate: attention-weight dropout (0: none); the seed is ``PlanArrays.dropout_seed``.
    softmax_threshold, threshold_rule: threshold skipping (None: off); the forward then also
      returns its decisions, int8 ``(B, Hq, nq, nk)``, which the backward replays.
  """
  batch: int
  q_heads: int
  kv_heads: int
  q_len: int
  kv_len: int
  q_pad: int
  kv_pad: int
  head_dim: int
  v_dim: int
  head_pad: int
  v_pad: int
  scale: float
  block_q: int
  block_k: int
  bm_batch: int
  bm_heads: int
  dense: bool
  mods: ops_lib.ModOperands
  unit_grad: bool
  dropout_rate: float = 0.0
  softmax_threshold: float | None = None
  threshold_rule: str = "tile"

  @property
  def groups(self) -> int:
    return self.q_heads // self.kv_heads

  @property
  def nq(self) -> int:
    return self.q_pad // self.block_q

  @property
  def nk(self) -> int:
    return self.kv_pad // self.block_k

  def bm_index(self, b, h):
    """Row of the BlockMask's leading ``(B', H')`` axes for batch row ``b``, query head ``h``."""
    bb = b if self.bm_batch > 1 else 0
    if self.bm_heads == 1:
      hh = 0
    elif self.bm_heads == self.q_heads:
      hh = h
    else:
      hh = h // self.groups
    return bb * self.bm_heads + hh


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PlanArrays:
  """The plan's arrays: schedule lists (flat int32) and mod operands.

  ``dropout_seed`` is dropout's uint32 ``(2,)`` seed
  (None without dropout); kernels take it as one more whole-array operand. ``decisions`` are a
  threshold forward's recorded tile decisions (int8 ``(B, Hq, nq, nk)``), set for the backward.
  """
  lists: tuple
  tlists: tuple
  operands: tuple
  dropout_seed: Any = None
  decisions: Any = None


def _flat_i32(x):
  return jnp.asarray(x, jnp.int32).reshape(-1)


def _walk_lists(counts, indices, full_counts, full_indices):
  """The kernels' six schedule arrays for one direction (flattened): partial counts and indices,
  full counts and indices, and the full list's first index and contiguous-prefix length."""
  n = full_indices.shape[-1]
  pos = jnp.arange(n, dtype=jnp.int32)
  first = full_indices[..., 0]
  contig = (full_indices == first[..., None] + pos) & (pos < full_counts[..., None])
  ncontig = jnp.cumprod(contig.astype(jnp.int32), axis=-1).sum(-1)
  return tuple(map(_flat_i32, (counts, indices, full_counts, full_indices, first, ncontig)))


def _unit_grad(score_fn: Any) -> bool:
  """True when the score part only adds to scores (its derivative is 1): the backward skips jvp."""
  if score_fn is None:
    return True
  if isinstance(score_fn, sm.ComposedScoreMod):
    return all(_unit_grad(m) for m in score_fn.mods)
  return (isinstance(score_fn, (sm.AlibiMod, sm.AdditiveBiasMod, sm.MaskScoreMod))
          or getattr(score_fn, "unit_grad", False) is True)   # e.g. gated.GatedScoreMod


def _check_tile(name: str, value: int) -> int:
  value = _checks.check_block(name, value)
  if value < 16 or value & (value - 1):
    raise ValueError(f"pallas_flash_attention: {name} must be a power of two >= 16, got {value}")
  return value


def build_plan(q, k, v, *, score_mod, mask_mod, scale, block_q, block_k, block_mask, softcap,
               cu_seqlens_q, cu_seqlens_k, default_block_q: int, default_block_k: int,
               dropout_rate: float = 0.0, dropout_seed: Any = None,
               softmax_threshold: float | None = None, threshold_rule: str = "tile"):
  """Checks and the plan: ``(FlashPlan, PlanArrays, padded q, padded k, padded v)``.

  ``dropout_rate``/``dropout_seed`` come checked (:func:`attnax.kernels._checks.check_dropout`),
  and so do ``softmax_threshold``/``threshold_rule`` (:mod:`attnax.kernels.threshold`).
  """
  kernel = "pallas_flash_attention"
  b, hq, hkv, sq, sk, d, dv = _checks.check_qkv(q, k, v, kernel=kernel)
  scale = _checks.default_scale(scale, d)
  if softcap is not None:
    score_mod = sm.compose_score_mods(sm.softcap_mod(softcap), score_mod)
  score_fn, mask_fn = sm.resolve_mods(score_mod, mask_mod, batch=b, heads=hq, q_len=sq, kv_len=sk)
  if cu_seqlens_q is not None or cu_seqlens_k is not None:
    cu_q = cu_seqlens_q if cu_seqlens_q is not None else cu_seqlens_k
    mask_fn = sm.and_masks(mask_fn, varlen.varlen_mask_mod(cu_q, cu_seqlens_k, q_len=sq,
                                                           kv_len=sk, batch=b))

  if block_mask is not None:
    block_mask = bm_lib.fit_block_mask(block_mask, batch=b, q_heads=hq, kv_heads=hkv, q_len=sq,
                                       kv_len=sk, kernel=kernel)
    for name, given, have in (("block_q", block_q, block_mask.block_q),
                              ("block_k", block_k, block_mask.block_k)):
      if given is not None and given != have:
        raise ValueError(f"{kernel}: {name}={given} disagrees with block_mask.{name}={have}")
    bq = _check_tile("block_mask.block_q", block_mask.block_q)
    bk = _check_tile("block_mask.block_k", block_mask.block_k)
  else:
    bq = _check_tile("block_q", default_block_q if block_q is None else block_q)
    bk = _check_tile("block_k", default_block_k if block_k is None else block_k)
    # A sequence shorter than the tile gets the smallest power-of-two tile that covers it.
    bq, bk = max(16, min(bq, pow2(sq))), max(16, min(bk, pow2(sk)))

  dense = mask_fn is None and block_mask is None
  if dense:
    lists = tlists = tuple(jnp.zeros((1,), jnp.int32) for _ in range(NUM_LISTS))
    bm_batch = bm_heads = 1
  else:
    if block_mask is None:
      block_mask = bm_lib.create_block_mask(mask_fn, q_len=sq, kv_len=sk, block_q=bq,
                                            block_k=bk, batch=b, heads=hq)
    bm_batch, bm_heads = block_mask.tiles.shape[:2]
    lists = _walk_lists(block_mask.kv_counts, block_mask.kv_indices, block_mask.full_kv_counts,
                        block_mask.full_kv_indices)
    tlists = _walk_lists(block_mask.q_counts, block_mask.q_indices, block_mask.full_q_counts,
                         block_mask.full_q_indices)

  mods, operands = ops_lib.collect(score_fn, mask_fn)
  d_pad, dv_pad = max(16, pow2(d)), max(16, pow2(dv))
  q_pad, kv_pad = -(-sq // bq) * bq, -(-sk // bk) * bk
  plan = FlashPlan(
      batch=b, q_heads=hq, kv_heads=hkv, q_len=sq, kv_len=sk, q_pad=q_pad, kv_pad=kv_pad,
      head_dim=d, v_dim=dv, head_pad=d_pad, v_pad=dv_pad, scale=scale, block_q=bq, block_k=bk,
      bm_batch=int(bm_batch), bm_heads=int(bm_heads), dense=dense, mods=mods,
      unit_grad=_unit_grad(score_fn), dropout_rate=float(dropout_rate),
      softmax_threshold=None if softmax_threshold is None else float(softmax_threshold),
      threshold_rule=threshold_rule)
  arrays = PlanArrays(lists, tlists, operands, dropout_seed if dropout_rate else None)
  return (plan, arrays, pad_to(q, (b, hq, q_pad, d_pad)), pad_to(k, (b, hkv, kv_pad, d_pad)),
          pad_to(v, (b, hkv, kv_pad, dv_pad)))
