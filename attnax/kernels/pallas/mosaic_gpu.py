"""Mosaic GPU lowering of the flash plan for Hopper (sm90): TMA, wgmma, warp-specialised warpgroups.

The forward of a :class:`~attnax.kernels.pallas.plan.FlashPlan`, written for the H100/H200:

* One program per (query head, BlockMask row of ``block_q`` queries, batch row). Three warpgroups:
  two consumers own ``block_q / 2`` query rows each and share one K/V stream; the third (the
  producer, with few registers) streams the row's kv tiles by TMA into a ``num_stages``-deep ring
  of shared-memory slots. A slot is refilled once both consumers have released it.
* The consumers alternate through a schedule barrier so that one's softmax overlaps the other's
  matmuls (FlashAttention-3's ping-pong): ``S = Q K^T`` and ``O += P V`` are wgmma instructions
  with the accumulators in registers.
* The online softmax runs in base 2: ``log2(e)`` is folded into the scale when no score mod needs
  natural-unit scores. Statistics and the LSE follow :mod:`attnax.kernels.tiles` (the running max
  starts at the finite ``MASK_VALUE``, masked scores are ``-inf`` so their probabilities are exactly
  0, a row that sees no key gives output 0 and lse ``-inf``, NaN propagates).
* The schedule is the plan's: per BlockMask row, its FULL kv tiles (no elementwise mask), then its
  PARTIAL ones (mods and mask evaluated on index arrays in the wgmma register layout); EMPTY tiles
  are never loaded. Producer and consumers read the same lists, so they agree on every step.
* GQA: query head ``h`` streams kv head ``h // G``; K/V are never repeated.

Mods that carry arrays: each array a mod indexes by scalars (batch, head), by query position, by
key position, or by both (in that order) is read per tile straight from global memory into the
layout of the scores (:class:`TileArray`). A mod that gathers at computed positions
(``table[ids[q]]``) or reads a whole array cannot be lowered this way: :func:`plan_reasons` says
so and ``backend="auto"`` runs the Triton lowering instead.

The backward (:func:`backward`) is two Mosaic kernels on the same plan: dQ per q tile over the
plan's lists, dK/dV per kv tile over the transposed lists (GQA summed in registers), with the
mods' tile maths and their derivatives, and the cotangents of differentiated mod arrays (a vjp
of each tile's replayed loads, summed in-warp and added by TMA reductions); the dK/dV kernel
reads (query, key) tables from a transposed copy. Above D=128 (one 64 x D f32 accumulator is half
a consumer's registers) the dK/dV kernel's two warpgroups share one 64-key chunk and split the work
by gradient (dV in one, dK in the other, each computing ``S^T``), on 128 x 64 tiles. Plans it
cannot run (other tiles, dropout) take the Triton lowering's backward
(:func:`backward_reasons` says why; ``MosaicConfig.bwd`` forces either).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from attnax.kernels import _checks
from attnax.kernels import jaxprs
from attnax.kernels import operands as ops_lib
from attnax.kernels import tiles
from attnax.kernels.pallas import lines as lines_lib
from attnax.kernels.pallas import triton as tk
from attnax.kernels.pallas.plan import NUM_LISTS, FlashPlan, PlanArrays, pad_to
from attnax.kernels.score_mods import MASK_VALUE

__all__ = ["MosaicConfig", "MosaicSpec", "TileArray", "default_config", "not_supported_reasons",
           "plan_reasons", "backward_reasons", "cotangent_reasons", "prefetches_q", "forward",
           "backward", "MIN_HEAD_DIM", "MAX_HEAD_DIM", "MAX_STAGES"]

f32 = jnp.float32
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
COMPUTE_WGS = 2          # consumer warpgroups per program; the producer is warpgroup 2
MIN_HEAD_DIM = 64        # one 128-byte swizzled row of 16-bit elements
MAX_HEAD_DIM = 256
_WGMMA = plgpu.Layout.WGMMA
_ROW = _WGMMA.reduce(1)  # one value per row of a wgmma tile
_COL = _WGMMA.reduce(0)  # one value per column
WG_THREADS = 128
# The forward's named (hardware) CTA barriers, as in tokamax's sm90 kernel: 0 is __syncthreads and
# 1-3 are Mosaic GPU's own warpgroup barriers. Two turn barriers (one per consumer), then one
# "free" barrier per K slot and per V slot of the ring.
_TURN_BARRIER = 4
_FREE_BARRIER = _TURN_BARRIER + COMPUTE_WGS
MAX_STAGES = (16 - _FREE_BARRIER) // 2
FREE_THREADS = (COMPUTE_WGS + 1) * WG_THREADS   # both consumers arrive, the producer syncs
# The mods' index arithmetic on lines (one value per row / column) until it meets the scores
# (:mod:`attnax.kernels.pallas.lines`); False evaluates the mods on whole index tiles.
LINED_INDICES = True


def _free_barriers(stages: int):
  """The named barriers that release K slot ``i`` and V slot ``i`` to the producer."""
  return (lambda i: _FREE_BARRIER + i), (lambda i: _FREE_BARRIER + stages + i)


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """The Mosaic GPU lowering's knobs (static, hashable).

  ``block_q`` is the BlockMask tile height and the rows of one program: two consumer warpgroups
  of ``block_q // 2`` rows each (a multiple of 64). ``block_k`` is the BlockMask tile width and
  the kv tile each wgmma consumes (a multiple of 64). ``num_stages`` is the depth of the K/V
  ring in shared memory.

  The backward: ``bwd`` picks its lowering: ``"mosaic"`` (the dQ and dK/dV Mosaic kernels; an
  error if the plan cannot run there), ``"triton"``, or ``"auto"`` (Mosaic where it can run,
  else Triton). ``bwd_num_stages`` is the depth of the Mosaic backward's streamed rings;
  ``bwd_dq_block_k`` (64 or 128) the width of the K/V chunks the dQ kernel streams (its S and dP
  tiles); ``backward`` configures the Triton backward (``None``: its default for the head dim
  and dtype). ``deterministic`` (the default): dQ runs in a pass of its own over the plan's
  lists (7 matmuls per tile, bitwise reproducible). ``False``: FlashAttention-3's form, dQ
  computed in the dK/dV kernel (5 matmuls per tile) and each tile's f32 part added into a buffer
  by TMA reductions, whose order, and so dQ's last bits, vary from run to run. Measured on the
  H200 (BENCHMARKS.md), the fused form is 16-19% slower than the two-pass one, so it is opt-in.
  In both forms the cotangents of differentiated mod arrays are added by TMA reductions (their
  last bits vary); per-query-row arrays and (query, key) tables are summed in the dQ pass, so a
  plan that differentiates them runs the two-pass form. Head dims above 128 always run the
  two-pass form (with dQ's 64 x D f32 accumulator beside dK's and dV's, the fused kernel would
  not fit the registers).

  ``bwd_shared_probs``: above D=128, where the dK/dV kernel's warpgroups split the work by
  gradient, warpgroup 0 (dV) passes its ``P^T`` (f32, times the score mod's derivative) to
  warpgroup 1 (dK) through shared memory, so that ``S^T`` is computed once per tile (4 matmuls
  in that kernel, not 5). Not for plans that differentiate mod arrays read along key positions
  (their cotangents need the scores in the dK warpgroup); elsewhere it changes nothing. Opt-in
  until measured on the GPU.

  ``overlap``: the forward's intra-warpgroup overlap (FlashAttention-3): each kv step issues
  ``Q K_t^T`` and the previous step's ``P V`` together and computes step ``t``'s softmax while
  that ``P V`` runs (the warpgroups' ping-pong stays). Opt-in until measured on the GPU; not
  with the f32 residual output (differentiated mod arrays), which runs the plain loop.

  ``balanced_walk`` (with ``persistent=True``): a persistent forward of a masked plan deals its
  work items to the programs longest row first (q tiles slowest, in the plan's last-first
  order) in a snake order (round ``r`` gives item ``r * P + p`` to program ``p``, or to
  ``P - 1 - p`` in odd rounds), so that every program gets a like share of causal rows' uneven
  work. Dense plans keep the q-tile-fastest walk (their items cost the same, and it shares K/V
  in L2). Opt-in until measured on the GPU.

  ``persistent``: the forward runs one program per SM, each walking work items with its K/V
  ring running on from one into the next, so the next item's tiles stream in under this one's
  epilogue. ``None`` (the default): persistent for plans without partial tiles (dense), whose
  work items all cost the same; masked plans keep one program per item, scheduled by the
  hardware, which balances their uneven rows.
  """
  block_q: int = 128
  block_k: int = 128
  num_stages: int = 2
  backward: tk.TritonConfig | None = None
  bwd: str = "auto"
  bwd_num_stages: int = 3
  bwd_dq_block_k: int = 64
  deterministic: bool = True
  persistent: bool | None = None
  bwd_shared_probs: bool = False
  overlap: bool = False
  balanced_walk: bool = False


# Built-in defaults by padded head dim (block_q, block_k, num_stages), sized so that Q, the K/V ring
# and the output fit the 227 KiB of shared memory and the accumulators the registers. A tuned
# table per device kind (configs/mosaic_gpu.json, written by benchmarks/tune_mosaic.py) overrides
# them per (head dim, dtype, dense | masked).
_BUILTIN = {
    64: MosaicConfig(128, 128, 3),
    128: MosaicConfig(128, 128, 2),
    # D=256: the backward's rings are 2 deep (each step's Q and dO chunks, or K and V, take
    # 64 KiB), beside 64 (dK/dV) or 128 KiB (dQ) of chunks the warpgroups own.
    256: MosaicConfig(128, 64, 2, bwd_num_stages=2),
}
_TABLE_PATH = os.path.join(os.path.dirname(__file__), "configs", "mosaic_gpu.json")
# Hopper parts with one SM design (sm90a; they differ in SM count, clocks and memory). A kind the
# table lacks takes the tuning of another kind of this family: a config fixes tile shapes and
# ring depths, which the SM's shared memory, registers and wgmma shapes decide, and the grid is
# sized from the device's own SM count at run time.
_SM90_FAMILY = ("H100", "H200", "H800", "H20", "GH200")


def _table_entries(table: dict, device_kind: str) -> dict:
  """The table's entries for ``device_kind``, else those of a kind of its SM family, else {}."""
  if device_kind in table:
    return table[device_kind]
  family = lambda kind: any(part in kind.split() for part in _SM90_FAMILY)
  if family(device_kind):
    for kind in sorted(table):
      if family(kind):
        return table[kind]
  return {}


@functools.cache
def _tuned_table() -> dict:
  try:
    with open(_TABLE_PATH) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _device_kind() -> str | None:
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    return None
  return dev.device_kind if dev.platform == "gpu" else None


def default_config(head_dim: int, dtype: Any = jnp.bfloat16, *, masked: bool = False,
                   device_kind: str | None = None) -> MosaicConfig:
  """The :class:`MosaicConfig` for a (padded) head dim and dtype: tuned for this device kind if
  the table has it (``masked``: the call has a mask, so the plan has partial tiles), or for
  another Hopper part of the same SM design (an H100 takes the H200's), else built in. The
  table's keys are ``"{head dim}/{dtype}/{dense|causal}"`` where a dtype was tuned on its own,
  else ``"{head dim}/{dense|causal}"`` (bf16's entry, which f16 shares)."""
  d = min(k for k in _BUILTIN if k >= min(max(head_dim, MIN_HEAD_DIM), MAX_HEAD_DIM))
  entries = _table_entries(_tuned_table(), device_kind or _device_kind() or "")
  mask_kind = "causal" if masked else "dense"
  tuned = entries.get(f"{d}/{jnp.dtype(dtype).name}/{mask_kind}", entries.get(f"{d}/{mask_kind}"))
  if tuned:   # what the table leaves out is the built-in config's
    fields = {f.name for f in dataclasses.fields(MosaicConfig)} - {"backward"}
    return dataclasses.replace(_BUILTIN[d], **{k: v for k, v in tuned.items() if k in fields})
  return _BUILTIN[d]


def not_supported_reasons(q: Any, k: Any, v: Any) -> list[str]:
  """Why the Mosaic GPU lowering cannot run these inputs (empty when it can)."""
  reasons = []
  d, dv = q.shape[-1], v.shape[-1]
  dtype = jnp.dtype(q.dtype)
  if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    reasons.append(f"the Mosaic GPU kernel takes bf16 or f16 inputs, got {dtype.name}")
  pad = lambda n: max(MIN_HEAD_DIM, 1 << max(0, n - 1).bit_length())
  if max(d, dv) > MAX_HEAD_DIM:
    reasons.append(f"head_dim {d} / value dim {dv} exceeds {MAX_HEAD_DIM}")
  elif pad(d) != pad(dv):
    reasons.append(f"head_dim {d} and value dim {dv} pad to different sizes")
  elif d <= MIN_HEAD_DIM // 2:
    reasons.append(f"head_dim {d} <= {MIN_HEAD_DIM // 2} (padding it to {MIN_HEAD_DIM} would waste "
                   "the matmuls; the Triton lowering runs it)")
  return reasons + _checks.gpu_reasons("the Mosaic GPU kernel (sm90: H100/H200)", exact_cc="9.0")


# ----------------------------------------------------------------------------- mod arrays


class _Unsupported(Exception):
  """A mod reads one of its arrays in a way the tile loads cannot express."""


@dataclasses.dataclass
class _Tile:
  """The tile being visited: its index arrays (compared by identity) and where it starts.

  ``rows x cols`` is the register tile: queries x keys, or keys x queries when ``transposed``
  (the dK/dV kernel's ``S^T = K Q^T``).
  """
  q_idx: Any
  kv_idx: Any
  q_start: Any
  k_start: Any
  rows: int
  cols: int
  transposed: bool = False
  # ``lines(0)`` / ``lines(1)`` make q_idx / kv_idx as lines (:func:`_tile_at`), for the lined
  # evaluation of the mods (:func:`_log2_scores`); None evaluates them on the index tiles.
  lines: Any = None

  @property
  def q_len(self) -> int:
    return self.cols if self.transposed else self.rows

  @property
  def kv_len(self) -> int:
    return self.rows if self.transposed else self.cols


class TileArray(ops_lib.RefArray):
  """A mod's array inside the Mosaic kernel: reads at (scalar | query row | key column) positions.

  ``arr[b, h, q_idx, kv_idx]`` (any subset, in that axis order, size-1 axes broadcasting) becomes
  one load of the visited tile's rows/columns from global memory, in the scores' register layout.
  Without a ref (``record`` given) it only records how each axis is indexed: the plan's analysis.
  A transposed tile (keys x queries, the dK/dV kernel's) reads a ``(q, kv)`` table from its
  transposed copy (those two axes swapped, :func:`_transposed_tables`), whose rows are keys.
  """

  def __init__(self, ref, shape, dtype, tile: _Tile, record: set | None = None,
               cache: list | None = None, replay: bool = False,
               hoist: "tuple[frozenset, list, bool] | None" = None):
    super().__init__(ref, shape, dtype)
    self.tile, self.record = tile, record
    # ``cache``: each load's ``(value, roles, index)`` is appended to it, or (``replay``) values
    # are taken from it in order instead of loading: a jvp or vjp cannot trace Mosaic loads, so
    # the backward loads first and replays inside.
    self.cache, self.replay = cache, replay
    # ``hoist = (invariant roles, values, filling)`` (:class:`_InvariantLoads`): loads indexed
    # only by those roles append their unbroadcast value to ``values`` (``filling``, before the
    # loop) or take the next one from it (inside the loop) instead of loading.
    self.invariant, self.hoisted, self.filling = hoist if hoist else (frozenset(), None, False)

  def __getitem__(self, idx):
    if not isinstance(idx, tuple):
      idx = (idx,)
    if len(idx) != self.ndim:
      raise ValueError(f"indexing a mod array of shape {self.shape} with {len(idx)} indices")
    tile = self.tile
    index, roles = [], []
    for n, i in zip(self.shape, idx):
      if n == 1:
        index.append(0)
        roles.append("one")
      elif i is tile.q_idx:
        index.append(pl.ds(tile.q_start, tile.q_len))
        roles.append("q")
      elif i is tile.kv_idx:
        index.append(pl.ds(tile.k_start, tile.kv_len))
        roles.append("kv")
      elif jnp.ndim(i) == 0:
        index.append(jnp.asarray(i, jnp.int32))
        roles.append("scalar")
      else:
        raise _Unsupported(f"a mod reads its array of shape {self.shape} at computed positions "
                           "(only batch/head scalars and the query/key positions themselves can "
                           "be read per tile)")
    if "q" in roles and "kv" in roles:
      if roles.index("kv") < roles.index("q"):
        raise _Unsupported(f"a mod reads its array of shape {self.shape} as [.., key, query]")
      if tile.transposed:   # the transposed copy: its key axis where the query axis was
        qa, ka = roles.index("q"), roles.index("kv")
        index[qa], index[ka] = index[ka], index[qa]
    shape = (tile.rows, tile.cols)
    if self.record is not None:
      self.record.add(tuple(roles))
      out = jnp.zeros(shape if ("q" in roles or "kv" in roles) else (), self.dtype)
      return out
    if self.replay:
      return self.cache.pop(0)
    index = tuple(index)
    q_axis = 1 if tile.transposed else 0
    # A line (one value per query or per key) varies along one axis of the register tile.
    axis = (None if ("q" in roles) == ("kv" in roles) else q_axis if "q" in roles
            else 1 - q_axis)
    hoisted = self.hoisted is not None and set(roles) <= self.invariant
    if hoisted and not self.filling:
      raw = self.hoisted.pop(0)
    elif "q" in roles and "kv" in roles:
      raw = plgpu.load(self.ref, index, layout=_WGMMA, optimized=False)
    elif axis is not None:
      raw = plgpu.load(self.ref, index, layout=_COL if axis else _ROW, optimized=False)
    else:
      raw = self.ref[index]
    if hoisted and self.filling:
      self.hoisted.append(raw)
    val = raw if axis is None else lax.broadcast_in_dim(raw, shape, (axis,))
    val = val != 0 if self.dtype == jnp.bool_ else val
    if self.cache is not None:
      self.cache.append((val, tuple(roles), index))
    return val

  def flat_index(self, idx):
    raise _Unsupported("a mod function (closure) gathers from a captured array")

  def value(self):
    raise _Unsupported(f"a mod reads its whole array of shape {self.shape}")


def _mods_in_kernel(plan: FlashPlan, refs, tile: _Tile, records=None, caches=None,
                    replay=False, invariant: "_InvariantLoads | None" = None):
  """``(score_fn, mask_fn)`` reading the mods' arrays per tile (``records``: only record how;
  ``invariant``: the loop's invariant loads, made before it)."""
  meta = plan.mods.meta
  if records is not None:
    arrays = [TileArray(None, s, d, tile, rec) for rec, (s, d) in zip(records, meta)]
  else:
    caches = caches or [None] * len(meta)
    hoists = invariant.hoists() if invariant is not None else [None] * len(meta)
    arrays = [TileArray(r, s, d, tile, cache=c, replay=replay, hoist=x)
              for r, (s, d), c, x in zip(refs, meta, caches, hoists)]
  return plan.mods.rebuild(arrays)


class _InvariantLoads:
  """The mod-array loads that do not change along a kernel's loop, made once before it.

  Those are the loads indexed only by scalars (``slopes[h]``) and by the axis the loop does not
  walk: the query rows of a work item in the forward and dQ kernels (``axis="q"``), the key rows
  in the dK/dV kernel (``axis="kv"``). Inside the loop each would be a global load per step,
  whose latency falls between a step's ``S`` and its softmax (the compiler cannot move loads
  across the loop's barriers). Building one runs the mods once before the loop on a tile at the
  loop's fixed rows (its scores unused: dead code) and keeps each such load's value, per
  operand, in order; the loop's tile arrays take them in that order. A FULL step's mods make a prefix of a masked
  step's loads (the score mod runs before the mask), so one list serves both loops.
  """

  def __init__(self, plan: FlashPlan, refs, tile: _Tile, b, h, axis: str):
    """Loads them: ``tile`` is at the loop's fixed rows (``axis``), anywhere along the other."""
    self.invariant = frozenset({"one", "scalar", axis})
    self.values = [[] for _ in plan.mods.meta]
    self.filling = True
    score_fn, mask_fn = _mods_in_kernel(plan, refs, tile, invariant=self)
    s = plgpu.layout_cast(jnp.zeros((tile.rows, tile.cols), f32), _WGMMA)
    _log2_scores(s, plan, tile, score_fn, mask_fn, b, h, masked=True, lined=False)
    self.filling = False

  def hoists(self) -> list:
    """Per operand, the :class:`TileArray` ``hoist`` argument: filling the values (while
    loading) or taking them from a copy (each trace of the loop's body)."""
    return [(self.invariant, v if self.filling else list(v), self.filling) for v in self.values]


def _operand_roles(plan: FlashPlan, rows: int, cols: int,
                   transposed: bool = False) -> tuple[tuple, str | None]:
  """How each mod operand is read (per axis: "one", "scalar", "q", "kv"), or why it cannot be."""
  records = [set() for _ in plan.mods.meta]

  def probe(s, b, h, q_start, k_start):
    q_idx = q_start + lax.broadcasted_iota(jnp.int32, (rows, cols), int(transposed))
    kv_idx = k_start + lax.broadcasted_iota(jnp.int32, (rows, cols), 1 - int(transposed))
    tile = _Tile(q_idx, kv_idx, q_start, k_start, rows, cols, transposed)
    score_fn, mask_fn = _mods_in_kernel(plan, None, tile, records)
    return _log2_scores(s, plan, tile, score_fn, mask_fn, b, h, masked=True)

  i32 = jax.ShapeDtypeStruct((), jnp.int32)
  try:
    jax.eval_shape(probe, jax.ShapeDtypeStruct((rows, cols), f32), i32, i32, i32, i32)
  except _Unsupported as e:
    return (), str(e)
  return tuple(tuple(sorted(r)) for r in records), None


def _pad_operand(x: jax.Array, roles: tuple, plan: FlashPlan) -> jax.Array:
  """Operands read by query/key position, padded to the padded lengths (tiles never read past)."""
  shape = list(x.shape)
  for pattern in roles:
    for d, role in enumerate(pattern):
      if role == "q":
        shape[d] = max(shape[d], plan.q_pad)
      elif role == "kv":
        shape[d] = max(shape[d], plan.kv_pad)
  return pad_to(x, tuple(shape))


# ----------------------------------------------------------------------------- spec


@dataclasses.dataclass(frozen=True)
class MosaicSpec:
  """A plan with the Mosaic lowering's knobs resolved; the backward's Triton spec beside it."""
  plan: FlashPlan
  rows: int               # query rows per consumer warpgroup
  num_stages: int
  roles: tuple            # per mod operand: the ways its axes are indexed
  backward: tk.KernelSpec   # the Triton backward (runs when mosaic_backward is False)
  mosaic_backward: bool = False
  bwd_required: bool = False   # MosaicConfig.bwd == "mosaic": no fallback to the Triton backward
  bwd_stages: int = 3     # MosaicConfig.bwd_num_stages
  bwd_dq_cols: int = 64   # width of the dQ kernel's K/V chunks
  fused_dq: bool = False   # dQ by TMA reductions in the dK/dV kernel (else a dQ pass)
  shared_probs: bool = False   # the by-role dK/dV kernel: P^T passed from the dV warpgroup
  persistent: bool = False   # the forward: one program per SM walking work items
  overlap: bool = False   # the forward: Q K_t^T and P V_{t-1} issued together (FA3)
  balanced_walk: bool = False   # the persistent forward of a masked plan: the snake walk
  num_sms: int = 132

  @property
  def bwd_ring_stages(self) -> int:
    """The depth of the backward's streamed rings: ``bwd_stages``, or in the fused form as
    deep as its shared memory holds (a plan that falls back to the two-pass form gets the
    configured depth back)."""
    if self.fused_dq:
      return min(self.bwd_stages, _fused_bwd_stages(self.plan))
    return self.bwd_stages


def plan_reasons(plan: FlashPlan, cfg: MosaicConfig) -> list[str]:
  """Why this plan cannot run on the Mosaic kernel (its tiling, its mods); empty when it can."""
  reasons = []
  if plan.block_q != cfg.block_q or plan.block_q % (64 * COMPUTE_WGS):
    reasons.append(f"the plan's block_q={plan.block_q} is not the Mosaic tile {cfg.block_q} "
                   f"({COMPUTE_WGS} warpgroups x a multiple of 64 rows; sequences shorter than "
                   "the tile get a smaller one)")
  if plan.block_k != cfg.block_k or plan.block_k % 64:
    reasons.append(f"the plan's block_k={plan.block_k} is not the Mosaic tile {cfg.block_k} "
                   "(a multiple of 64)")
  if plan.head_pad != plan.v_pad:
    reasons.append(f"padded head dims differ ({plan.head_pad} vs {plan.v_pad})")
  if not reasons and plan.mods.meta:
    _, why = _operand_roles(plan, plan.block_q // COMPUTE_WGS, plan.block_k)
    if why:
      reasons.append(why)
  return reasons


def kernel_spec(plan: FlashPlan, cfg: MosaicConfig, num_stages: int | None = None) -> MosaicSpec:
  rows = plan.block_q // COMPUTE_WGS
  roles, why = _operand_roles(plan, rows, plan.block_k)
  if why:
    raise ValueError(f"pallas_flash_attention: backend 'mosaic': {why}")
  bwd_cfg = cfg.backward or tk.default_config(plan.head_pad, interpret=False, dtype=jnp.bfloat16)
  bwd = tk.KernelSpec.resolve(plan, bwd_cfg, interpret=False)
  stages = cfg.num_stages if num_stages is None else num_stages
  for name, n in (("num_stages", stages), ("bwd_num_stages", cfg.bwd_num_stages)):
    if not isinstance(n, int) or n < 2:   # one slot cannot overlap a load with a matmul
      raise ValueError(f"pallas_flash_attention: {name} must be an int >= 2 for the Mosaic "
                       f"lowering, got {n!r}")
  if stages > MAX_STAGES:   # each slot of the forward's ring takes two of 16 named barriers
    raise ValueError(f"pallas_flash_attention: num_stages must be at most {MAX_STAGES} for the "
                     f"Mosaic forward, got {stages}")
  if cfg.bwd_dq_block_k not in (64, 128) or plan.block_k % cfg.bwd_dq_block_k:
    raise ValueError(f"pallas_flash_attention: MosaicConfig.bwd_dq_block_k must be 64 or 128 "
                     f"and divide block_k={plan.block_k}, got {cfg.bwd_dq_block_k!r}")
  if cfg.bwd not in ("auto", "mosaic", "triton"):
    raise ValueError(f"pallas_flash_attention: MosaicConfig.bwd must be 'auto', 'mosaic' or "
                     f"'triton', got {cfg.bwd!r}")
  why_not = backward_reasons(plan) if cfg.bwd != "triton" else ["bwd='triton'"]
  if cfg.bwd == "mosaic" and why_not:
    raise ValueError("pallas_flash_attention: the Mosaic backward (MosaicConfig.bwd='mosaic') "
                     "cannot run this plan:\n  - " + "\n  - ".join(why_not))
  fused = not cfg.deterministic and not _dkv_by_role(plan)
  shared_probs = (bool(cfg.bwd_shared_probs) and _dkv_by_role(plan)
                  and bool(_probs_buffers(plan, cfg.bwd_num_stages)))
  persistent = plan.dense if cfg.persistent is None else bool(cfg.persistent)
  return MosaicSpec(plan=plan, rows=rows, num_stages=stages, roles=roles, backward=bwd,
                    mosaic_backward=not why_not, bwd_required=cfg.bwd == "mosaic",
                    bwd_stages=cfg.bwd_num_stages,
                    bwd_dq_cols=cfg.bwd_dq_block_k, fused_dq=fused, shared_probs=shared_probs,
                    persistent=persistent, overlap=bool(cfg.overlap),
                    balanced_walk=bool(cfg.balanced_walk) and persistent and not plan.dense,
                    num_sms=_checks.num_sms())


_SMEM_BYTES = 227 * 1024 - 2048   # Hopper's opt-in shared memory, less barriers and alignment


def _dq_split(plan: FlashPlan) -> int | None:
  """The columns of dQ each warpgroup of the fused backward computes when they split the head
  dim (a whole number of 64-column shared-memory tiles of K), else ``None``."""
  cols = max(plan.head_pad, MIN_HEAD_DIM) // COMPUTE_WGS
  return cols if cols % 64 == 0 else None


def _q_ring_slot_bytes(d: int) -> int:
  """Shared memory per slot of the dK/dV kernel's ring: a 16-bit Q and dO chunk and the
  chunk's f32 LSE and delta rows."""
  return 2 * BWD_CHUNK * (d * 2 + 4)


def _fused_bwd_stages(plan: FlashPlan) -> int:
  """The deepest Q/dO ring the fused backward's shared memory holds beside its fixed buffers
  (each warpgroup's K and V chunks, its dS^T (DS_BUFFERS of them with the head-dim split) and
  its f32 dQ staging)."""
  c, d, wgs = BWD_CHUNK, max(plan.head_pad, MIN_HEAD_DIM), COMPUTE_WGS
  split = _dq_split(plan)
  fixed = wgs * c * (2 * d * 2 + (DS_BUFFERS if split else 1) * c * 2 + (split or d) * 4)
  return max(2, (_SMEM_BYTES - fixed) // _q_ring_slot_bytes(d))


# ----------------------------------------------------------------------------- tile maths


def _fold_scale(plan: FlashPlan, score_fn) -> float | None:
  """The base-2 scale ``scale * log2(e)`` when the forward can leave it to the softmax (no score
  mod, a positive scale): the max is taken on raw scores and scaled once per row, and
  ``exp2(s * c - m)`` is one fused multiply-add per score (FlashAttention-3's form)."""
  c = plan.scale * LOG2E
  return c if score_fn is None and c > 0 else None


def _tile_at(plan: FlashPlan, q_start, k_start, rows: int, cols: int,
             transposed: bool = False) -> _Tile:
  """The register tile at ``(q_start, k_start)``: queries x keys, or keys x queries
  (``transposed``, the dK/dV kernel's), its positions as index tiles and as lines."""
  q_axis = int(transposed)
  iota = lambda d: plgpu.broadcasted_iota(jnp.int32, (rows, cols), d, layout=_WGMMA)
  line = lambda d: plgpu.broadcasted_iota(jnp.int32, ((rows, cols)[d],), 0,
                                          layout=_COL if d else _ROW)
  # (Made on use: an unused iota leaves the layout inference without a solution.)
  lines = None if not LINED_INDICES else lambda which: (
      lines_lib.position(q_start, line(q_axis), q_axis, (rows, cols), plan.q_pad) if which == 0
      else lines_lib.position(k_start, line(1 - q_axis), 1 - q_axis, (rows, cols), plan.kv_pad))
  return _Tile(q_start + iota(q_axis), k_start + iota(1 - q_axis), q_start, k_start, rows, cols,
               transposed, lines)


def _log2_scores(s, plan: FlashPlan, tile: _Tile, score_fn, mask_fn, b, h, masked: bool,
                 raw: bool = False, lined: bool = True):
  """Scores of one tile in base-2 units: scaled, modded, and (masked tiles) ``-inf`` where hidden.

  Without a score mod ``log2(e)`` is folded into the scale (one multiply per score), or with
  ``raw`` (see :func:`_fold_scale`) the scores are left unscaled; a score mod sees natural-unit
  scaled scores, as in every other kernel.

  With ``lined`` and the tile's lines the mods run through :func:`lines_lib.lined`: their index
  arithmetic stays on lines until it meets the scores. (Not where mod-array loads are cached or
  hoisted for replay: those must be values of the kernel's own trace.)
  """
  if lined and tile.lines is not None and (score_fn is not None or masked):
    index_tiles = (tile.q_idx, tile.kv_idx)

    def on_index_tiles(s, q_idx, kv_idx):
      tile.q_idx, tile.kv_idx = q_idx, kv_idx   # the mods' arrays know positions by identity
      try:
        return _log2_scores(s, plan, tile, score_fn, mask_fn, b, h, masked, raw, lined=False)
      finally:
        tile.q_idx, tile.kv_idx = index_tiles

    return lines_lib.lined(on_index_tiles, (tile.rows, tile.cols),
                           {1: lambda: tile.lines(0), 2: lambda: tile.lines(1)})(s, *index_tiles)
  if raw:
    pass
  elif score_fn is None:
    s = s * (plan.scale * LOG2E)
  else:
    s, _ = tiles.tile_scores(s * plan.scale, score_fn=score_fn, mask_fn=None, b=b, h=h,
                             q_idx=tile.q_idx, kv_idx=tile.kv_idx, apply_mask=False)
    s = s * LOG2E
  if masked:
    kv_len = plan.kv_len if plan.kv_len != plan.kv_pad else None
    s, _ = tiles.tile_scores(s, score_fn=None, mask_fn=mask_fn, b=b, h=h, q_idx=tile.q_idx,
                             kv_idx=tile.kv_idx, kv_len=kv_len, mask_value=-jnp.inf)
  return s


def _schedule(plan: FlashPlan, list_refs, row, kv_tile=None):
  """``(number of full tiles, number of tiles, other block of step t)`` for one BlockMask row.

  Steps ``[0, n_full)`` are FULL tiles (the contiguous prefix ``first + t``, then listed ones),
  ``[n_full, n)`` PARTIAL tiles. Producer and consumers both call this, so they agree. With
  ``kv_tile`` (the dK/dV kernel) ``row`` is a row of the transposed lists: the q tiles of one kv
  tile.
  """
  n_other = plan.nk if kv_tile is None else plan.nq
  if plan.dense:
    ragged = plan.kv_len != plan.kv_pad   # the last kv tile is masked by the true length
    if kv_tile is None:
      return n_other - int(ragged), n_other, lambda t: t   # static: Python ints
    n_full = jnp.where(kv_tile == plan.nk - 1, 0, n_other) if ragged else n_other
    return n_full, n_other, lambda t: t
  cnt, idx, fcnt, fidx, first, ncontig = list_refs
  base = row * n_other
  n_full, n_contig, start = fcnt[row], ncontig[row], first[row]
  total = n_full + cnt[row]

  def block(t):
    listed_full = fidx[base + jnp.clip(t, 0, n_other - 1)]
    listed_partial = idx[base + jnp.clip(t - n_full, 0, n_other - 1)]
    return jnp.where(t < n_contig, start + t, jnp.where(t < n_full, listed_full, listed_partial))

  return n_full, total, block


# ----------------------------------------------------------------------------- forward


def _bar(op: str, barrier_id, threads: int):
  """``bar.arrive`` / ``bar.sync`` on a named CTA barrier (``barrier_id`` static or traced) that
  completes once ``threads`` threads have arrived: no phase to track and no shared-memory
  round trip, unlike an mbarrier's arrive and wait."""
  ptx = functools.partial(mgpu.utils.inline_ptx, has_side_effects=True, convergent=True)
  if isinstance(barrier_id, int):
    plgpu.inline_mgpu()(lambda _: ptx(f"bar.{op} {barrier_id}, {threads};"))()
    return

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WG_SPLAT,))
  def run(_, i):
    ptx(f"bar.{op} $0, {threads};", i.registers[()])

  run(jnp.asarray(barrier_id, jnp.int32))


def _when(cond, fn):
  """``pl.when`` that also takes a static (Python) condition."""
  if isinstance(cond, (bool, np.bool_)):
    if cond:
      fn()
  else:
    pl.when(cond)(fn)


def _walk_q(plan: FlashPlan, qi):
  """The q tile a program's ``qi``-th item runs. Masked plans walk their q tiles last-first: the
  longest causal rows start first and the short ones fill the tail (3-4% at S=4096 causal on
  the H200)."""
  return qi if plan.dense else plan.nq - 1 - qi


def _forward_tile(q_ref, k_ref, v_ref, refs, h, qi, b, done, *, spec: MosaicSpec, scoped,
                  consumer: bool, prefetch_q: bool = False, first=None, next_item=None):
  """One work item (query head ``h``, q tile ``qi``, batch row ``b``) of a consumer warpgroup
  (``consumer``) or of the producer.

  ``prefetch_q`` (a persistent program whose output has a buffer of its own): the consumers load
  the ``first`` item's Q, and after their last Q K^T the next item's (``next_item``: head, q
  tile, batch row, whether there is one), so that it lands under this item's last P V and
  epilogue.

  An f32 ``o_ref`` (the residual :func:`attnax.kernels.tiles.residual_out_dtype` asks for when mod
  arrays are differentiated) gets P V with P's rounding residual added by a second wgmma
  (:func:`attnax.kernels.tiles.p_terms`), stored from registers.

  ``done`` K/V tiles have passed through the ring before this one (a persistent program's earlier
  work items), so step ``t`` uses slot ``(done + t) % num_stages``; every barrier's phase follows
  from that count. Returns ``done`` plus this item's steps.
  """
  plan = spec.plan
  list_refs, op_refs = refs[:NUM_LISTS], refs[NUM_LISTS:-2]
  o_ref, lse_ref = refs[-2:]
  (q_smems, o_smems, k_smems, v_smems, lse_smems), barriers = scoped
  k_ready, v_ready, q_ready = barriers
  rows, bk, stages = spec.rows, plan.block_k, spec.num_stages
  qi = _walk_q(plan, qi)
  wg = lax.axis_index("wg")
  row = plan.bm_index(b, h) * plan.nq + qi
  n_full, total, kv_block = _schedule(plan, list_refs, row)
  slot_of = lambda t: lax.rem(done + t, stages)
  k_free, v_free = _free_barriers(stages)
  dtype = q_ref.dtype
  wide_out = o_ref.dtype != dtype
  overlap = spec.overlap and not wide_out   # (the f32 residual's second P V: the plain loop)

  # The ping-pong: a consumer issues its P V only on its turn, which the other passes as soon
  # as it has issued its Q K^T (FlashAttention-3's schedule, on named barriers).
  turn_threads = COMPUTE_WGS * WG_THREADS
  wait_turn = lambda: _bar("sync", _TURN_BARRIER + wg, turn_threads)
  pass_turn = lambda: _bar("arrive", _TURN_BARRIER + 1 - wg, turn_threads)

  def _consumer():
    q_smem, o_smem, lse_smem = q_smems.at[wg], o_smems.at[wg], lse_smems.at[wg]
    q_start = qi * plan.block_q + wg * rows

    def load_q(h, q_tile, b):
      q_rows = pl.ds(q_tile * plan.block_q + wg * rows, rows)
      plgpu.copy_gmem_to_smem(q_ref.at[b, h, q_rows], q_smem, q_ready.at[wg])

    if prefetch_q:
      _when(first, lambda: load_q(h, qi, b))
    else:
      load_q(h, qi, b)
    m = plgpu.layout_cast(jnp.full((rows,), MASK_VALUE, f32), _ROW)
    l = plgpu.layout_cast(jnp.zeros((rows,), f32), _ROW)
    acc = plgpu.layout_cast(jnp.zeros((rows, plan.v_pad), f32), _WGMMA)
    tile_at = lambda k_start: _tile_at(plan, q_start, k_start, rows, bk)
    # (Made while Q's copy is in flight.)
    invariant = (_InvariantLoads(plan, op_refs, tile_at(0), b, h, "q")
                 if plan.mods.meta else None)
    plgpu.barrier_wait(q_ready.at[wg])
    if not overlap:   # (the overlapped loop waits for each K tile and turn in its step)
      _when(total > 0, lambda: plgpu.barrier_wait(k_ready.at[slot_of(0)]))
      pl.when(wg == 1)(wait_turn)

    def probs(s, t, m, masked: bool):
      """``(p, alpha, m_new)`` of kv step ``t``'s raw scores ``s``: the mods, then the online
      softmax's unnormalised probabilities (base 2) against the running max ``m``."""
      tile = tile_at(kv_block(t) * bk)
      score_fn, mask_fn = _mods_in_kernel(plan, op_refs, tile, invariant=invariant)
      c = _fold_scale(plan, score_fn)
      s = _log2_scores(s, plan, tile, score_fn, mask_fn, b, h, masked, raw=c is not None)
      m_new = jnp.maximum(m, s.max(axis=1) if c is None else s.max(axis=1) * c)
      m_b = lax.broadcast_in_dim(m_new, s.shape, (0,))
      p = jnp.exp2(s - m_b if c is None else s * c - m_b)
      return p, jnp.exp2(m - m_new), m_new

    def step(t, carry, masked: bool):
      acc, m, l = carry
      slot = slot_of(t)

      def qk(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_smems.at[slot].transpose((1, 0)))
        pass_turn()
        return acc_ref[...]

      s = pl.run_scoped(qk, plgpu.ACC((rows, bk), f32))
      _bar("arrive", k_free(slot), FREE_THREADS)
      p, alpha, m_new = probs(s, t, m, masked)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, (0,))
      l = l * alpha
      p16 = p.astype(dtype)
      # The row sum before the barriers measured faster at head dims <= 128 (as in JAX's kernel).
      if plan.v_pad <= 128:
        l = l + p.sum(axis=1)
        acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
      plgpu.barrier_wait(v_ready.at[slot])
      wait_turn()
      if plan.v_pad > 128:
        l = l + p.sum(axis=1)

      def pv(acc_ref):
        plgpu.wgmma(acc_ref, p16, v_smems.at[slot])
        if wide_out:
          plgpu.wgmma(acc_ref, (p - p16.astype(f32)).astype(dtype), v_smems.at[slot])

        _when(t + 1 < total, lambda: plgpu.barrier_wait(k_ready.at[slot_of(t + 1)]))

      acc = pl.run_state(pv)(plgpu.ACC.init(acc))
      _bar("arrive", v_free(slot), FREE_THREADS)
      return acc, m_new, l

    def overlapped(acc_ref):
      """FlashAttention-3's intra-warpgroup overlap (``overlap``): step ``t`` issues Q K_t^T
      and the previous step's P V together, then computes step ``t``'s softmax while that P V
      runs. The turn passes once Q K_t^T is done (so the other warpgroup's matmuls queue behind
      this one's P V, and warpgroup 0 can tell when warpgroup 1 has read its last K tile).
      Step 0 is peeled off (no P V behind it), so no wgmma is issued under a condition while
      another is in flight."""

      def qk(t, m, masked: bool, pv=None):
        """Q K_t^T, with ``pv()`` (the previous step's P V) issued behind it, and step ``t``'s
        softmax once Q K_t^T is done: ``(p, alpha, m_new)``."""
        slot = slot_of(t)
        plgpu.barrier_wait(k_ready.at[slot])

        def body(s_ref):
          plgpu.wgmma(s_ref, q_smem, k_smems.at[slot].transpose((1, 0)))
          if pv is not None:
            pv()
          s = plgpu.wgmma_accumulator_load(s_ref, wait_n=0 if pv is None else 1)
          pass_turn()
          _bar("arrive", k_free(slot), FREE_THREADS)
          return probs(s, t, m, masked)

        return pl.run_scoped(body, plgpu.ACC((rows, bk), f32))

      def first():   # step 0; masking a FULL tile changes none of its scores
        pl.when(wg == 1)(wait_turn)   # warpgroup 0 starts
        p, alpha, m_new = qk(0, m, True)
        return m_new, l * alpha + p.sum(axis=1), p.astype(dtype)

      def ostep(t, carry, masked: bool):
        m, l, p16 = carry
        prev = slot_of(t - 1)
        wait_turn()

        def pv():
          plgpu.barrier_wait(v_ready.at[prev])
          plgpu.wgmma(acc_ref, p16, v_smems.at[prev])

        p, alpha, m_new = qk(t, m, masked, pv)
        acc = plgpu.wgmma_accumulator_load(acc_ref, wait_n=0)   # the previous P V is done
        _bar("arrive", v_free(prev), FREE_THREADS)
        acc_ref[...] = acc * lax.broadcast_in_dim(alpha, acc.shape, (0,))
        return m_new, l * alpha + p.sum(axis=1), p.astype(dtype)

      none = (m, l, plgpu.layout_cast(jnp.zeros((rows, bk), dtype), _WGMMA))
      if isinstance(total, int):   # dense plans: static
        carry = first() if total else none
      else:
        carry = lax.cond(total > 0, first, lambda: none)
      split = max(n_full, 1) if isinstance(n_full, int) else jnp.maximum(n_full, 1)
      carry = lax.fori_loop(1, split, lambda t, c: ostep(t, c, False), carry)
      m_last, l_last, p16 = lax.fori_loop(split, total, lambda t, c: ostep(t, c, True), carry)

      @pl.when(total > 0)
      def _():   # the last step's P V
        last = slot_of(total - 1)
        plgpu.barrier_wait(v_ready.at[last])
        plgpu.wgmma(acc_ref, p16, v_smems.at[last])
        plgpu.wgmma_wait(0)
        _bar("arrive", v_free(last), FREE_THREADS)

      return m_last, l_last

    if overlap:
      def run_overlapped(acc_ref):
        acc_ref[...] = acc
        m_l = overlapped(acc_ref)
        return m_l + (plgpu.wgmma_accumulator_load(acc_ref, wait_n=0),)

      m, l, acc = pl.run_scoped(run_overlapped, plgpu.ACC((rows, plan.v_pad), f32))
      # Warpgroup 1 passes one turn more than warpgroup 0 waits for (wg 0's first step does
      # not wait): warpgroup 0 takes it here, after warpgroup 1's last Q K^T has completed
      # (so an LSE buffer that aliases the K ring is free, and a persistent program's next item
      # starts with no turn outstanding).
      _when(total > 0, lambda: pl.when(wg == 0)(wait_turn))
    else:
      carry = lax.fori_loop(0, n_full, lambda t, c: step(t, c, False), (acc, m, l))
      acc, m, l = lax.fori_loop(n_full, total, lambda t, c: step(t, c, True), carry)
      # Warpgroup 1 waits for one more turn than warpgroup 0 passes. Without a persistent K
      # ring the LSE buffer aliases it: warpgroup 0 then also waits until warpgroup 1 has read
      # its last K tile (its last turn comes after its last Q K^T).
      if spec.persistent:
        pl.when(wg == 0)(pass_turn)
      else:
        pl.when(wg == 0)(lambda: _bar("sync", _TURN_BARRIER + 1, turn_threads))

    if prefetch_q:   # every Q K^T of this item has read Q (the copy waits for the warpgroup)
      next_h, next_qi, next_b, has_next = next_item
      _when(has_next, lambda: load_q(next_h, _walk_q(plan, next_qi), next_b))
      # The last item's output and LSE stores must have read their buffers.
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    # tiles.finalize's semantics: only l == 0 means "no visible key" (out 0, lse -inf).
    empty = l == 0.0
    acc = acc * lax.broadcast_in_dim(1.0 / jnp.where(empty, 1.0, l), acc.shape, (0,))
    if wide_out:
      o_ref.at[b, h, pl.ds(q_start, rows)][...] = acc
    else:
      o_smem[...] = acc.astype(dtype)
    lse_smem[...] = jnp.where(empty, -jnp.inf, m * LN2 + jnp.log(l))
    plgpu.commit_smem()
    if not wide_out:
      plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, h, pl.ds(q_start, rows)])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q_start, rows)])
    if not prefetch_q:
      # The next work item's Q lands in this buffer: its reads must be done (the writes finish
      # on their own; the kernel's end waits for them).
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  def _producer():
    kv_head = lax.div(h, jnp.int32(plan.groups))

    @pl.loop(0, total)
    def _(t):
      slot, cols = slot_of(t), pl.ds(kv_block(t) * bk, bk)
      _bar("sync", k_free(slot), FREE_THREADS)
      plgpu.copy_gmem_to_smem(k_ref.at[b, kv_head, cols], k_smems.at[slot], k_ready.at[slot])
      _bar("sync", v_free(slot), FREE_THREADS)
      plgpu.copy_gmem_to_smem(v_ref.at[b, kv_head, cols], v_smems.at[slot], v_ready.at[slot])

  if consumer:
    _consumer()
  else:
    _producer()
  return done + total


def snake_walk(n_items, num_sms, sm):
  """``(index, count)``: program ``sm``'s ``j``-th item is ``index(j)`` for ``j < count``, round
  ``j`` dealing items ``j * P .. (j + 1) * P - 1`` to programs ``0 .. P - 1``, then backwards."""
  index = lambda j: j * num_sms + jnp.where(lax.rem(j, 2) == 0, sm, num_sms - 1 - sm)
  full = lax.div(n_items, num_sms)   # complete rounds; the last one may be partial
  partial = lax.rem(index(full), num_sms) < lax.rem(n_items, num_sms)
  return index, full + partial.astype(jnp.int32)


def _forward_kernel(q_ref, k_ref, v_ref, *refs, spec: MosaicSpec, scoped, prefetch_q: bool):
  """The forward's program: one work item, or (``spec.persistent``) a grid of one program per
  SM, each walking work items ``sm, sm + num_sms, ...`` with its K/V ring running on from one
  item into the next (the producer streams the next item's tiles under this one's epilogue,
  and with ``prefetch_q`` the consumers the next item's Q)."""
  plan = spec.plan
  k_free, v_free = _free_barriers(spec.num_stages)
  wg = lax.axis_index("wg")

  def items(consumer: bool):
    tile = functools.partial(_forward_tile, q_ref, k_ref, v_ref, refs, spec=spec, scoped=scoped,
                             consumer=consumer, prefetch_q=prefetch_q)
    if not spec.persistent:
      tile(lax.axis_index("heads"), lax.axis_index("q_tiles"), lax.axis_index("batch"), 0)
      return
    n_items, sm, num_sms = plan.batch * plan.q_heads * plan.nq, lax.axis_index("sm"), \
        lax.axis_size("sm")
    if spec.balanced_walk:
      # Item i is (q tile, batch row, head) with q tiles slowest (_walk_q: longest rows first);
      # round j deals items j * P ... (j + 1) * P - 1 to the programs forwards, then backwards.
      rows = plan.batch * plan.q_heads
      coords = lambda i: (lax.rem(lax.rem(i, rows), plan.q_heads), lax.div(i, rows),
                          lax.div(lax.rem(i, rows), plan.q_heads))
      index, count = snake_walk(n_items, num_sms, sm)
    else:
      # Item i is (batch row, head, q tile) with q tiles fastest: SMs at work share K/V in L2.
      coords = lambda i: (lax.rem(lax.div(i, plan.nq), plan.q_heads), lax.rem(i, plan.nq),
                          lax.div(i, plan.nq * plan.q_heads))
      index = lambda j: sm + j * num_sms
      # The grid has at most one program per item: every program has one at least.
      count = lax.div(n_items - 1 - sm, num_sms) + 1

    def item(j, done):
      i, nxt = index(j), index(j + 1)
      return tile(*coords(i), done, first=j == 0, next_item=(*coords(nxt), nxt < n_items))

    lax.fori_loop(0, count, item, jnp.int32(0))

  @pl.when(wg < COMPUTE_WGS)
  def _():
    plgpu.set_max_registers(232, action="increase")
    # Every slot starts free: the producer waits on a slot's release before each fill.
    for slot in range(spec.num_stages):
      _bar("arrive", k_free(slot), FREE_THREADS)
      _bar("arrive", v_free(slot), FREE_THREADS)
    items(consumer=True)
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == COMPUTE_WGS)
  def _():
    plgpu.set_max_registers(40, action="decrease")
    items(consumer=False)


def _smem(shape, dtype):
  bits = jnp.dtype(dtype).itemsize * 8
  swizzle = plgpu.find_swizzle(shape[-1] * bits)
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 8 * swizzle // bits)),
                                              plgpu.SwizzleTransform(swizzle)))


def prefetches_q(spec: MosaicSpec, d: int, dtype, out_dtype) -> bool:
  """Whether the forward (padded head dim ``d``) loads the next work item's Q under this one's
  epilogue: a persistent program whose output (16-bit: staged in shared memory) has a buffer of
  its own beside Q, the K/V ring and the LSE."""
  rows, itemsize = spec.rows, jnp.dtype(dtype).itemsize
  q_bytes = COMPUTE_WGS * rows * d * itemsize
  wide_out = jnp.dtype(out_dtype) != jnp.dtype(dtype)
  used = (q_bytes * (1 if wide_out else 2) + COMPUTE_WGS * rows * 4
          + spec.num_stages * spec.plan.block_k * d * 2 * itemsize)
  return spec.persistent and used <= _SMEM_BYTES


def forward(spec: MosaicSpec, q, k, v, arrays: PlanArrays, out_dtype=None):
  """``(out, lse)`` on padded inputs: out ``(B, Hq, q_pad, v_pad)`` (``out_dtype``: q's or f32),
  lse f32 ``(B, Hq, q_pad)``."""
  out_dtype = jnp.dtype(out_dtype or q.dtype)
  if out_dtype not in (jnp.dtype(q.dtype), jnp.dtype(f32)):
    raise ValueError(f"mosaic forward: out_dtype must be q's dtype or float32, got {out_dtype}")
  plan = spec.plan
  rows, stages = spec.rows, spec.num_stages
  if plan.head_pad < MIN_HEAD_DIM:   # TMA rows of at least 128 bytes; zeros change nothing
    q, k, v = (pad_to(x, x.shape[:3] + (MIN_HEAD_DIM,)) for x in (q, k, v))
  d = q.shape[-1]
  ops = tuple(_pad_operand(x, r, plan) for x, r in zip(arrays.operands, spec.roles))

  wide_out = out_dtype != q.dtype
  prefetch_q = prefetches_q(spec, d, q.dtype, out_dtype)

  def entry(*refs):
    k_ring = _smem((stages, plan.block_k, d), k.dtype)
    lse_buf = plgpu.SMEM((COMPUTE_WGS, rows), f32)
    # The LSE buffer aliases the K ring when a program runs one work item: it is written after
    # the last step, when both consumers have read every K tile (warpgroup 0's final sync on
    # warpgroup 1's turn barrier completes only after warpgroup 1's last QK). A persistent
    # program's producer is by then filling the ring for its next item.
    k_and_lse = (k_ring, lse_buf) if spec.persistent else plgpu.RefUnion(k_ring, lse_buf)
    q_buf = _smem((COMPUTE_WGS, rows, d), q.dtype)
    own_o = prefetch_q and not wide_out
    scratch = ((q_buf, _smem((COMPUTE_WGS, rows, d), q.dtype)) if own_o else q_buf, k_and_lse,
               _smem((stages, plan.block_k, d), v.dtype))
    barriers = (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_barriers=COMPUTE_WGS))

    def body(q_o, k_lse, v_smems, *bars):
      q_smems, o_smems = q_o if own_o else (q_o, q_o)   # else the output is staged in Q's buffer
      (k_smems, lse_smems) = k_lse
      _forward_kernel(*refs, spec=spec, prefetch_q=prefetch_q,
                      scoped=((q_smems, o_smems, k_smems, v_smems, lse_smems), bars))

    pl.run_scoped(body, *scratch, *barriers, collective_axes="wg")

  if spec.persistent:
    grid, grid_names = (min(spec.num_sms, plan.batch * plan.q_heads * plan.nq),), ("sm",)
  else:
    grid, grid_names = (plan.q_heads, plan.nq, plan.batch), ("heads", "q_tiles", "batch")
  out, lse = plgpu.kernel(
      entry,
      out_type=(jax.ShapeDtypeStruct((plan.batch, plan.q_heads, plan.q_pad, d), out_dtype),
                jax.ShapeDtypeStruct((plan.batch, plan.q_heads, plan.q_pad), f32)),
      grid=grid, grid_names=grid_names,
      num_threads=COMPUTE_WGS + 1, thread_name="wg",
      # No cross-warp reductions (a row's scores live in one warp's quad): no reduction scratch.
      compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
  )(q, k, v, *arrays.lists, *ops)
  return out[..., :plan.v_pad], lse


# ----------------------------------------------------------------------------- backward
#
# Two kernels, as in FlashAttention-2's backward: dQ per (query head, q tile) walking the plan's
# lists, and dK/dV per (kv head, kv tile) walking the transposed lists over every query head of
# its group (GQA gradients are summed in registers; K/V are never repeated). Each program has two
# consumer warpgroups (64 rows of the tile each) and a producer streaming the other operand in
# chunks of 64 rows through a ring; every wgmma is 64 x 64 (scores) or 64 x D (accumulators).
# P is recomputed from the LSE in base 2; dS = P (dP - delta), times the score mod's derivative
# where it is not 1 (a jvp of the same tile maths the forward runs).

BWD_CHUNK = 64   # rows per consumer warpgroup, and rows of each streamed chunk
DS_BUFFERS = 3   # the fused backward's dS^T buffers with the head-dim split (dQ one step late)
PROBS_BUFFERS = 2   # steps of P^T in flight from the dV to the dK warpgroup (bwd_shared_probs)


def _dkv_by_role(plan: FlashPlan) -> bool:
  """Whether the dK/dV kernel's two warpgroups split the work by gradient on one shared
  ``BWD_CHUNK``-key chunk (warpgroup 0 accumulates dV, warpgroup 1 dK; each computes ``S^T``)
  instead of each owning a chunk with both accumulators: above D=128 one ``BWD_CHUNK x D`` f32
  accumulator is half a consumer's registers."""
  return max(plan.head_pad, plan.v_pad) > 128


def _probs_buffers(plan: FlashPlan, stages: int) -> int:
  """How many steps of the f32 ``P^T`` the by-role dK/dV kernel's shared memory holds beside
  its K and V chunk and its Q/dO ring of ``stages`` (``MosaicConfig.bwd_shared_probs``): 2 (the
  dV warpgroup one step ahead), 1, or 0 (the form does not fit)."""
  c, d = BWD_CHUNK, max(plan.head_pad, plan.v_pad, MIN_HEAD_DIM)
  left = _SMEM_BYTES - 2 * c * d * 2 - stages * _q_ring_slot_bytes(d)
  return max(0, min(PROBS_BUFFERS, left // (c * c * 4)))


def backward_reasons(plan: FlashPlan) -> list[str]:
  """Why the Mosaic backward cannot run this plan (the Triton backward then runs it)."""
  reasons = []
  tile_k = BWD_CHUNK * (1 if _dkv_by_role(plan) else COMPUTE_WGS)
  if plan.block_q != COMPUTE_WGS * BWD_CHUNK or plan.block_k != tile_k:
    reasons.append(f"the Mosaic backward takes {COMPUTE_WGS * BWD_CHUNK} x {tile_k} BlockMask "
                   f"tiles at head dim {max(plan.head_pad, plan.v_pad)} (two warpgroups of "
                   f"{BWD_CHUNK} rows), the plan has {plan.block_q} x {plan.block_k}")
  if plan.dropout_rate or plan.softmax_threshold is not None:
    reasons.append("dropout and threshold skipping run on the Triton lowering")
  if not reasons and plan.mods.meta:
    for transposed in (False, True):
      roles, why = _operand_roles(plan, BWD_CHUNK, BWD_CHUNK, transposed)
      if why:
        reasons.append(why)
        break
    else:
      if any(len(_table_axes(r)) > 1 for r in roles):
        reasons.append("a mod reads one array as (query, key) tables along different axes")
  return reasons


def _lowerable(fn):
  """``fn`` traced to a jaxpr and re-emitted with ``add_any`` (how autodiff sums a value's
  cotangents or tangents, which the Mosaic GPU lowering has no rule for) as ``lax.add``."""
  def rule(eqn, ins):
    if eqn.primitive.name == "add_any":   # add_any_p has no public name
      return [lax.add(*ins)]
    return jaxprs.bind(eqn, ins)

  def lowered(*args):
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    # (Dead code, a vjp's primal maths, is left to the Mosaic compiler: a DCE here measured no
    # smaller module.)
    flat = jaxprs.replay(closed.jaxpr, closed.consts, jax.tree.leaves(args), rule)
    return jax.tree.unflatten(jax.tree.structure(shape), flat)

  return lowered


def _bwd_scores(s, plan: FlashPlan, op_refs, tile: _Tile, b, h, masked: bool, bufs=(),
                derivative: bool = True, invariant: "_InvariantLoads | None" = None):
  """``(s2, dmod, loads_vjp)`` of a backward tile: its base-2 scores; ``d(modded score)/d(q.k)``
  where it is not constant and ``derivative`` (a warpgroup that only needs P skips it); and,
  for the loads whose ``(operand, kind)`` (:func:`_load_kind`) is one of this kernel's cotangent
  buffers ``bufs``, ``loads_vjp(ct) -> [(operand, kind, roles, index, f32 cotangent tile)]``,
  ``ct`` the cotangent of ``s2`` (``None`` without such loads).

  Without a derivative (``plan.unit_grad``: no score mod, or mods that only add) the caller
  multiplies its accumulated gradient by ``plan.scale``; with one, the derivative carries it.
  """
  if not bufs and (not derivative or plan.unit_grad):   # the scores alone: nothing replayed
    score_fn, mask_fn = _mods_in_kernel(plan, op_refs, tile, invariant=invariant)
    return _log2_scores(s, plan, tile, score_fn, mask_fn, b, h, masked), None, None
  sites = [[] for _ in plan.mods.meta]   # per operand: (value, roles, index) of each load

  def scores(x, values=None):
    caches = sites if values is None else [list(v) for v in values]
    score_fn, mask_fn = _mods_in_kernel(plan, op_refs, tile, caches=caches,
                                        replay=values is not None, invariant=invariant)
    return _log2_scores(x, plan, tile, score_fn, mask_fn, b, h, masked, lined=False)

  s2 = scores(s)
  values = [[val for val, _, _ in loads] for loads in sites]
  dmod = None
  if derivative and not plan.unit_grad:
    # Elementwise mods: a jvp with tangent 1 is the derivative (a soft-cap's 1 - tanh^2 included).
    ds2 = _lowerable(lambda x: jax.jvp(lambda y: scores(y, values), (x,),
                                       (jnp.ones_like(x),))[1])(s)
    dmod = ds2 * LN2
  taken = [(i, n) for i, loads in enumerate(sites) for n, (_, roles, _) in enumerate(loads)
           if (i, _load_kind(roles)) in bufs]
  if not taken:
    return s2, dmod, None
  shape = (tile.rows, tile.cols)

  def with_taken(vals):
    replayed = [list(v) for v in values]
    for (i, n), val in zip(taken, vals):
      replayed[i][n] = val
    return scores(s, replayed)

  def loads_vjp(ct):
    # Each taken load enters as a whole tile (scalars and lines broadcast), so its cotangent is
    # a tile too, which the caller sums along the axes the load did not vary over.
    tiles_in = [jnp.broadcast_to(values[i][n], shape) for i, n in taken]
    (cts,) = _lowerable(lambda vals, ct: jax.vjp(with_taken, vals)[1](ct))(tiles_in, ct)
    return [(i, _load_kind(sites[i][n][1]), sites[i][n][1], sites[i][n][2], g.astype(f32))
            for (i, n), g in zip(taken, cts)]

  return s2, dmod, loads_vjp


# Cotangents of differentiated mod arrays. Each load's cotangent tile is summed along the
# register tile's rows' own axis (a query row's in the dQ kernel, a key's in the dK/dV kernel):
# an in-warp reduction. (A sum over the rows would cross warps through the lowering's one
# reduction scratch, which the two consumer warpgroups would share.) So loads along query
# positions are differentiated in the dQ kernel, the rest in the dK/dV kernel.
Q_LINES, KV_LINES, LANES, TABLE = "q", "kv", "lanes", "table"
DQ_KINDS = (Q_LINES, TABLE)   # differentiated in the dQ kernel; the rest in the dK/dV kernel


def _load_kind(roles) -> str:
  """Where a load's cotangent goes: ``TABLE`` (a (query, key) table: the tile itself) and
  ``Q_LINES`` (per query position, summed along the row) in the dQ kernel; ``KV_LINES`` (per key
  position) and ``LANES`` (single entries, summed per key row into a trailing axis of
  ``BWD_CHUNK`` partial sums) in the dK/dV kernel."""
  if "q" in roles:
    return TABLE if "kv" in roles else Q_LINES
  return KV_LINES if "kv" in roles else LANES


def _cotangent_buffers(spec: MosaicSpec, diff) -> tuple[tuple[int, str], ...]:
  """``(operand, kind)`` of each f32 buffer the backward adds cotangents into: the padded
  operand's shape, or for ``LANES`` the operand's shape + ``(BWD_CHUNK,)``."""
  return tuple((i, kind) for i in diff for kind in (Q_LINES, TABLE, KV_LINES, LANES)
               if any(_load_kind(p) == kind for p in spec.roles[i]))


TABLE_CHUNK = 32   # columns of a table's cotangent tile staged at a time (shared memory is short)


def _add_cotangents(sites, stages, cot_refs):
  """Each load's cotangent tile (a table's as it is, the others summed along the rows) added
  into its buffer by TMA reductions, staged through this warpgroup's ``stages``: f32 ``(rows,)``
  and, for tables, ``(rows, TABLE_CHUNK)`` (the tile's columns a chunk at a time)."""
  def reduce(stage, value, dst):
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last reduction has read the stage
    stage[...] = value
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(stage, dst, reduction_op="add")

  for i, kind, roles, index, g in sites:
    ref = cot_refs[i, kind]
    if kind != TABLE:
      tail = (pl.ds(0, stages[0].shape[0]),) if kind == LANES else ()
      reduce(stages[0], g.sum(axis=1), ref.at[index + tail])
      continue
    ka = roles.index("kv")
    for j in range(0, g.shape[1], TABLE_CHUNK):
      cols = list(index)
      cols[ka] = pl.ds(index[ka].start + j, TABLE_CHUNK)
      reduce(stages[1], g[:, j:j + TABLE_CHUNK], ref.at[tuple(cols)])


def _cotangent_stages(bufs) -> tuple:
  """A kernel's shared-memory staging for the cotangents it adds (``bufs``): the rows' sums,
  and (the dQ kernel) a table's tiles."""
  if not bufs:
    return ()
  stages = (plgpu.SMEM((COMPUTE_WGS, BWD_CHUNK), f32),)
  if any(kind == TABLE for _, kind in bufs):
    stages += (_smem((COMPUTE_WGS, BWD_CHUNK, TABLE_CHUNK), f32),)
  return stages


def cotangent_reasons(spec: MosaicSpec, diff) -> list[str]:
  """Why the Mosaic backward cannot differentiate the mod operands ``diff`` of this plan (the
  Triton backward then runs the call): the dQ kernel's staging of their cotangents does not fit
  its shared memory beside one slot of V (a (query, key) table at D=256)."""
  d = max(spec.plan.head_pad, MIN_HEAD_DIM)
  dq_bufs = [buf for buf in _cotangent_buffers(spec, diff) if buf[1] in DQ_KINDS]
  if dq_bufs and not _dq_v_stages(spec, d, jnp.bfloat16, _cotangent_stages(dq_bufs)):
    return [f"the dQ kernel's staging of the cotangents of a differentiated (query, key) table "
            f"does not fit its shared memory at head dim {d}"]
  return []


def _table_axes(patterns) -> set[tuple[int, int]]:
  """The (query, key) axis pairs at which an operand is read as a (query, key) table."""
  return {(p.index("q"), p.index("kv")) for p in patterns if "q" in p and "kv" in p}


def _transposed_tables(ops, roles) -> tuple:
  """The dK/dV kernel's operands: (query, key) tables with those two axes swapped, so that a
  transposed tile (keys x queries) is one tile load of the copy; the rest as they are (one axis
  pair per table: :func:`backward_reasons`)."""
  return tuple(jnp.swapaxes(x, *next(iter(_table_axes(r)))) if _table_axes(r) else x
               for x, r in zip(ops, roles))


def _dq_v_stages(spec: MosaicSpec, d: int, dtype, cot_stages=()) -> int:
  """The depth of the dQ kernel's V ring: the K ring's, or as deep as shared memory holds
  beside the warpgroups' Q and dO, the K ring and the cotangents' staging (at D=256, one
  slot: V is read by the step's first matmuls, ``dP = dO V^T``, so the next step's V streams in
  under this step's softmax and ``dQ += dS K``); 0 when not even one fits
  (:func:`cotangent_reasons`)."""
  itemsize, stages, ck = jnp.dtype(dtype).itemsize, spec.bwd_ring_stages, spec.bwd_dq_cols
  nbytes = lambda x: math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
  fixed = (2 * COMPUTE_WGS * BWD_CHUNK * d + stages * ck * d) * itemsize
  fixed += sum(nbytes(x) for x in cot_stages)
  return max(0, min(stages, (_SMEM_BYTES - fixed) // (ck * d * itemsize)))


def _stream(total, stages, fetch, n0=0):
  """Producer loop: ``fetch(t, slot, refill)`` for steps ``t < total`` of a ring whose global
  step counter starts at ``n0``; ``refill``: the slot was used before (wait for its release)."""

  @pl.loop(0, total)
  def _(t):
    n = n0 + t
    fetch(t, lax.rem(n, stages), n >= stages)


def _row_line(ref, index, axis: int):
  """A vector of the LSE / delta rows in the layout of axis ``axis`` of a wgmma tile."""
  return plgpu.load(ref.at[index], layout=_COL if axis else _ROW, optimized=False)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, spec: MosaicSpec,
               scoped, bufs=()):
  plan = spec.plan
  n_ops = len(plan.mods.meta)
  list_refs, op_refs = refs[:NUM_LISTS], refs[NUM_LISTS:NUM_LISTS + n_ops]
  cot_refs = dict(zip(bufs, refs[NUM_LISTS + n_ops:-1]))   # f32, aliased in and out
  dq_ref = refs[-1]
  (q_smems, do_smems, k_smems, v_smems, *cot_stages), (q_ready, k_ready, v_ready, k_free,
                                                         v_free) = scoped
  c, ck, stages = BWD_CHUNK, spec.bwd_dq_cols, spec.bwd_ring_stages   # 64 q rows x ck keys a step
  v_stages = v_smems.shape[0]   # :func:`_dq_v_stages`
  chunks = jnp.int32(plan.block_k // ck)
  h, qi, b = lax.axis_index("heads"), lax.axis_index("q_tiles"), lax.axis_index("batch")
  if not plan.dense:
    qi = plan.nq - 1 - qi   # as the forward: the longest causal rows first (dK/dV's come first)
  wg = lax.axis_index("wg")
  row = plan.bm_index(b, h) * plan.nq + qi
  n_full, total, kv_block = _schedule(plan, list_refs, row)
  n_full, total = n_full * chunks, total * chunks
  k_start_of = lambda t: kv_block(lax.div(t, chunks)) * plan.block_k + lax.rem(t, chunks) * ck
  dtype = q_ref.dtype

  @pl.when(wg < COMPUTE_WGS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    q_smem, do_smem = q_smems.at[wg], do_smems.at[wg]
    q_start = qi * plan.block_q + wg * c
    q_rows = (b, h, pl.ds(q_start, c))
    plgpu.copy_gmem_to_smem(q_ref.at[q_rows], q_smem, q_ready.at[wg])
    plgpu.copy_gmem_to_smem(do_ref.at[q_rows], do_smem, q_ready.at[COMPUTE_WGS + wg])
    lse = _row_line(lse_ref, q_rows, 0)
    lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)   # rows that saw no key: p = 0
    delta = _row_line(delta_ref, q_rows, 0)
    dq = plgpu.layout_cast(jnp.zeros((c, q_smem.shape[-1]), f32), _WGMMA)
    tile_at = lambda k_start: _tile_at(plan, q_start, k_start, c, ck)
    invariant = (_InvariantLoads(plan, op_refs, tile_at(0), b, h, "q")
                 if plan.mods.meta else None)
    plgpu.barrier_wait(q_ready.at[wg])
    plgpu.barrier_wait(q_ready.at[COMPUTE_WGS + wg])

    def step(t, dq, masked: bool):
      slot, v_slot = lax.rem(t, stages), lax.rem(t, v_stages)
      k_start = k_start_of(t)
      plgpu.barrier_wait(k_ready.at[slot])

      def scores(s_ref, dp_ref):
        plgpu.wgmma(s_ref, q_smem, k_smems.at[slot].transpose((1, 0)))
        plgpu.barrier_wait(v_ready.at[v_slot])
        plgpu.wgmma(dp_ref, do_smem, v_smems.at[v_slot].transpose((1, 0)))
        return s_ref[...], dp_ref[...]

      s, dp = pl.run_scoped(scores, plgpu.ACC((c, ck), f32), plgpu.ACC((c, ck), f32))
      plgpu.barrier_arrive(v_free.at[v_slot])
      s2, dmod, loads_vjp = _bwd_scores(s, plan, op_refs, tile_at(k_start), b, h, masked, bufs,
                                        invariant=invariant)
      p = jnp.exp2(s2 - lax.broadcast_in_dim(lse2, s2.shape, (0,)))
      ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, (0,)))
      if loads_vjp is not None:
        _add_cotangents(loads_vjp(ds * LN2), [x.at[wg] for x in cot_stages], cot_refs)
      if dmod is not None:
        ds = ds * dmod

      def acc_dq(acc_ref):
        plgpu.wgmma(acc_ref, ds.astype(dtype), k_smems.at[slot])

      dq = pl.run_state(acc_dq)(plgpu.ACC.init(dq))
      plgpu.barrier_arrive(k_free.at[slot])
      return dq

    dq = lax.fori_loop(0, n_full, lambda t, a: step(t, a, False), dq)
    dq = lax.fori_loop(n_full, total, lambda t, a: step(t, a, True), dq)
    if plan.unit_grad:
      dq = dq * plan.scale
    q_smem[...] = dq.astype(dtype)   # every wgmma reading Q has completed
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[q_rows])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == COMPUTE_WGS)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")
    kv_head = lax.div(h, jnp.int32(plan.groups))

    def fetch(t, slot, refill):
      rows = (b, kv_head, pl.ds(k_start_of(t), ck))
      _when(refill, lambda: plgpu.barrier_wait(k_free.at[slot]))
      plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smems.at[slot], k_ready.at[slot])
      v_slot = lax.rem(t, v_stages) if v_stages < stages else slot
      _when(t >= v_stages if v_stages < stages else refill,
            lambda: plgpu.barrier_wait(v_free.at[v_slot]))
      plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smems.at[v_slot], v_ready.at[v_slot])

    _stream(total, stages, fetch)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, spec: MosaicSpec,
                scoped, bufs=()):
  plan = spec.plan
  fused = spec.fused_dq
  by_role = _dkv_by_role(plan)
  shared = spec.shared_probs   # by role, S^T computed once: P^T passed from warpgroup 0 to 1
  n_ops = len(plan.mods.meta)
  tlist_refs, op_refs = refs[:NUM_LISTS], refs[NUM_LISTS:NUM_LISTS + n_ops]
  accumulators = refs[NUM_LISTS + n_ops:-2]   # f32, aliased in and out: dQ (fused), cotangents
  dq_ref = accumulators[0] if fused else None
  cot_refs = dict(zip(bufs, accumulators[int(fused):]))
  dk_ref, dv_ref = refs[-2:]
  (k_smems, v_smems, q_smems, do_smems, lse_smems, delta_smems, *extra), (
      kv_ready, q_ready, do_ready, free, *more_barriers) = scoped
  dq_scratch = extra[:2] if fused else ()
  probs_smem = extra[0] if shared else None   # (buffers, BWD_CHUNK, BWD_CHUNK) f32
  cot_stage = extra[-1] if cot_refs else None   # (COMPUTE_WGS, BWD_CHUNK) f32
  dq_split = _dq_split(plan) if fused else None
  ds_ready = more_barriers[0] if dq_split else None
  probs_full, probs_free = more_barriers if shared else (None, None)
  c, stages, groups = BWD_CHUNK, spec.bwd_ring_stages, plan.groups
  chunks = jnp.int32(plan.block_q // c)
  hk, j, b = lax.axis_index("kv_heads"), lax.axis_index("kv_tiles"), lax.axis_index("batch")
  wg = lax.axis_index("wg")
  dtype = q_ref.dtype

  def schedule(g):
    h = hk * groups + g
    n_full, total, q_block = _schedule(plan, tlist_refs, plan.bm_index(b, h) * plan.nk + j,
                                       kv_tile=j)
    q_start_of = lambda t: q_block(lax.div(t, chunks)) * plan.block_q + lax.rem(t, chunks) * c
    return h, n_full * chunks, total * chunks, q_start_of

  def over_heads(body, init):
    """``body(g, carry)`` for each query head of the kv head's group."""
    return body(0, init) if groups == 1 else lax.fori_loop(0, groups, body, init)

  def consumer(want_dk: bool, want_dv: bool):
    """A consumer warpgroup accumulating dK and/or dV of its kv chunk over the q chunks."""
    plgpu.set_max_registers(232, action="increase")
    own = 0 if by_role else wg
    k_smem, v_smem = k_smems.at[own], v_smems.at[own]
    k_start = j * plan.block_k + (0 if by_role else wg * c)
    kv_rows = (b, hk, pl.ds(k_start, c))
    # Each warpgroup loads its own chunk's K and V; by role the chunk is shared: warpgroup 0
    # (dV) loads K, all it reads, and warpgroup 1 (dK) loads V and waits for both (for V alone
    # when it gets P^T from warpgroup 0 instead of computing S^T).
    if not by_role:
      loads = ((k_ref, k_smem, wg), (v_ref, v_smem, COMPUTE_WGS + wg))
      waits = (wg, COMPUTE_WGS + wg)
    elif want_dv:
      loads, waits = ((k_ref, k_smem, 0),), (0,)
    else:
      loads, waits = ((v_ref, v_smem, 1),), (1,) if shared else (0, 1)
    for src, dst, i in loads:
      plgpu.copy_gmem_to_smem(src.at[kv_rows], dst, kv_ready.at[i])
    zeros = plgpu.layout_cast(jnp.zeros((c, k_smem.shape[-1]), f32), _WGMMA)
    for i in waits:
      plgpu.barrier_wait(kv_ready.at[i])

    # The fused form with the head-dim split: step t writes its dS^T into buffer t % DS_BUFFERS
    # and computes the previous step's dQ (both warpgroups' dS^T of step t - 1), so the barrier
    # that says both are written is almost never waited on and the warpgroups keep drifting
    # apart (one's softmax under the other's matmuls). The dQ of the last step is flushed after
    # the loop; a pre-arrival stands for the "step -1" the first step waits for.
    ds_buf = dq_scratch[0] if fused else None
    dq_smem = dq_scratch[1].at[wg] if fused else None
    cols = pl.ds(wg * dq_split, dq_split) if dq_split else None
    dq_zeros = plgpu.layout_cast(jnp.zeros(dq_smem.shape, f32), _WGMMA) if fused else None
    if dq_split:
      plgpu.barrier_arrive(ds_ready.at[DS_BUFFERS - 1])

    def split_dq(dq_acc, buf):   # dQ[:, cols] of one step: both warpgroups' dS^T, their keys
      plgpu.barrier_wait(ds_ready.at[buf])
      for w in range(COMPUTE_WGS):
        plgpu.wgmma(dq_acc, ds_buf.at[buf, w].transpose((1, 0)), k_smems.at[w, :, cols])

    def reduce_dq(dq, rows):   # add one step's f32 dQ part into dq_ref by a TMA reduction
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last reduction has read dq_smem
      dq_smem[...] = dq
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[rows + ((cols,) if dq_split else ())],
                              reduction_op="add")

    tile_at = lambda q_start: _tile_at(plan, q_start, k_start, c, c, transposed=True)

    def probs_t(st, h, slot, q_start, masked: bool, invariant, cot_bufs=(),
                derivative: bool = True):
      """``(P^T, dmod, loads_vjp)`` of a step from its ``S^T`` (keys x queries): the mods at
      the tile's positions and the softmax by the rows' LSE (:func:`_bwd_scores`)."""
      lse = plgpu.load(lse_smems.at[slot], (), layout=_COL)
      lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)   # rows that saw no key: p = 0
      s2, dmod, loads_vjp = _bwd_scores(st, plan, op_refs, tile_at(q_start), b, h, masked,
                                        cot_bufs, derivative=derivative, invariant=invariant)
      return jnp.exp2(s2 - lax.broadcast_in_dim(lse2, s2.shape, (1,))), dmod, loads_vjp

    def one_head(g, carry):
      dk, dv, n, prev = carry
      h, n_full, total, q_start_of = schedule(g)
      invariant = (_InvariantLoads(plan, op_refs, tile_at(0), b, h, "kv")
                   if plan.mods.meta else None)

      def step(t, acc, masked: bool):
        dk, dv, prev = acc
        slot = lax.rem(n + t, stages)
        q_start = q_start_of(t)
        plgpu.barrier_wait(q_ready.at[slot])

        def scores(st_ref, dpt_ref=None):   # S^T = K Q^T and dP^T = V dO^T: keys x queries
          plgpu.wgmma(st_ref, k_smem, q_smems.at[slot].transpose((1, 0)))
          plgpu.barrier_wait(do_ready.at[slot])
          if dpt_ref is None:   # dV only: no dP^T
            return st_ref[...], None
          plgpu.wgmma(dpt_ref, v_smem, do_smems.at[slot].transpose((1, 0)))
          return st_ref[...], dpt_ref[...]

        st, dpt = pl.run_scoped(scores, *[plgpu.ACC((c, c), f32) for _ in range(1 + want_dk)])
        q_cols = (b, h, pl.ds(q_start, c))
        pt, dmod, loads_vjp = probs_t(st, h, slot, q_start, masked, invariant,
                                      bufs if want_dk else (), want_dk)
        dst = None
        if want_dk:
          delta = plgpu.load(delta_smems.at[slot], (), layout=_COL)
          dst = pt * (dpt - lax.broadcast_in_dim(delta, dpt.shape, (1,)))
          if loads_vjp is not None:   # dst is d/d(modded score); s2 is in base 2
            _add_cotangents(loads_vjp(dst * LN2), [cot_stage.at[wg]], cot_refs)
          if dmod is not None:
            dst = dst * dmod

        if not fused:
          def accumulate(refs):
            dv_ref, dk_ref = refs
            if want_dv:
              plgpu.wgmma(dv_ref, pt.astype(dtype), do_smems.at[slot])
            if want_dk:
              plgpu.wgmma(dk_ref, dst.astype(dtype), q_smems.at[slot])

          init = lambda acc: None if acc is None else plgpu.ACC.init(acc)
          dv, dk = pl.run_state(accumulate)((init(dv), init(dk)))
          plgpu.barrier_arrive(free.at[slot])
          return dk, dv, prev

        # FlashAttention-3's form: dQ = dS K by wgmma from dS^T in shared memory (read
        # transposed), its f32 result added into dq_ref by a TMA reduction.
        step_n = n + t
        buf = lax.rem(step_n, DS_BUFFERS)
        ds_smem = ds_buf.at[buf, wg] if dq_split else ds_buf.at[wg]
        ds_smem[...] = dst.astype(dtype)
        plgpu.commit_smem()
        if dq_split:
          plgpu.barrier_arrive(ds_ready.at[buf])

        def accumulate(refs):
          dv_ref, dk_ref, dq_acc = refs
          plgpu.wgmma(dv_ref, pt.astype(dtype), do_smems.at[slot])
          plgpu.wgmma(dk_ref, ds_smem, q_smems.at[slot])
          if dq_split:   # the previous step's dQ
            split_dq(dq_acc, lax.rem(step_n + DS_BUFFERS - 1, DS_BUFFERS))
          else:          # this step's, over this warpgroup's keys
            plgpu.wgmma(dq_acc, ds_smem.transpose((1, 0)), k_smem)

        dv, dk, dq = pl.run_state(accumulate)(
            (plgpu.ACC.init(dv), plgpu.ACC.init(dk), plgpu.ACC.init(dq_zeros)))
        plgpu.barrier_arrive(free.at[slot])
        if not dq_split:
          reduce_dq(dq, q_cols)
          return dk, dv, prev
        prev_h, prev_chunk = prev

        @pl.when(step_n > 0)
        def _():   # rows as chunk * c: TMA needs to see that the start is a multiple of c
          reduce_dq(dq, (b, prev_h, pl.ds(prev_chunk * c, c)))

        return dk, dv, (h, lax.div(q_start, c))

      def shared_step(t, acc, masked: bool):
        """A step of the by-role kernel with S^T computed once: warpgroup 0 computes P^T (times
        the mod's derivative) into probs buffer ``step % buffers``, then dV; warpgroup 1 computes
        dP^T, reads that P^T, then dK. Warpgroup 0 runs up to ``buffers`` steps ahead."""
        dk, dv, prev = acc
        step_n, slot, q_start = n + t, lax.rem(n + t, stages), q_start_of(t)
        buf = lax.rem(step_n, probs_smem.shape[0])
        if want_dv:
          plgpu.barrier_wait(q_ready.at[slot])

          def scores(st_ref):
            plgpu.wgmma(st_ref, k_smem, q_smems.at[slot].transpose((1, 0)))
            return st_ref[...]

          st = pl.run_scoped(scores, plgpu.ACC((c, c), f32))
          pt, dmod, _ = probs_t(st, h, slot, q_start, masked, invariant)
          _when(step_n >= probs_smem.shape[0],
                lambda: plgpu.barrier_wait(probs_free.at[buf]))   # warpgroup 1 has read it
          probs_smem.at[buf][...] = pt if dmod is None else pt * dmod
          plgpu.barrier_arrive(probs_full.at[buf])
          plgpu.barrier_wait(do_ready.at[slot])

          def accumulate(dv_ref):
            plgpu.wgmma(dv_ref, pt.astype(dtype), do_smems.at[slot])

          dv = pl.run_state(accumulate)(plgpu.ACC.init(dv))
        else:
          plgpu.barrier_wait(do_ready.at[slot])

          def dp_scores(dpt_ref):
            plgpu.wgmma(dpt_ref, v_smem, do_smems.at[slot].transpose((1, 0)))
            return dpt_ref[...]

          dpt = pl.run_scoped(dp_scores, plgpu.ACC((c, c), f32))
          delta = plgpu.load(delta_smems.at[slot], (), layout=_COL)
          plgpu.barrier_wait(probs_full.at[buf])
          pt = plgpu.load(probs_smem.at[buf], layout=_WGMMA)
          plgpu.barrier_arrive(probs_free.at[buf])
          dst = pt * (dpt - lax.broadcast_in_dim(delta, dpt.shape, (1,)))
          plgpu.barrier_wait(q_ready.at[slot])

          def accumulate(dk_ref):
            plgpu.wgmma(dk_ref, dst.astype(dtype), q_smems.at[slot])

          dk = pl.run_state(accumulate)(plgpu.ACC.init(dk))
        plgpu.barrier_arrive(free.at[slot])
        return dk, dv, prev

      body = shared_step if shared else step
      acc = lax.fori_loop(0, n_full, lambda t, a: body(t, a, False), (dk, dv, prev))
      dk, dv, prev = lax.fori_loop(n_full, total, lambda t, a: body(t, a, True), acc)
      return dk, dv, n + total, prev

    no_step = (jnp.int32(0), jnp.int32(0))
    dk, dv, steps, (last_h, last_chunk) = over_heads(
        one_head, (zeros if want_dk else None, zeros if want_dv else None, jnp.int32(0), no_step))
    if dq_split:
      @pl.when(steps > 0)
      def _():   # the last step's dQ
        dq = pl.run_state(lambda acc: split_dq(acc, lax.rem(steps - 1, DS_BUFFERS)))(
            plgpu.ACC.init(dq_zeros))
        reduce_dq(dq, (b, last_h, pl.ds(last_chunk * c, c)))

      # The other warpgroup reads this one's K for its dQ: both are done before dK overwrites it.
      plgpu.barrier_arrive(ds_ready.at[DS_BUFFERS])
      plgpu.barrier_wait(ds_ready.at[DS_BUFFERS])
    # The results go out through the chunk's own buffers, once every wgmma reading them has
    # completed. By role: dK through V's (only warpgroup 1 reads V), dV through K's, which
    # warpgroup 1 reads until its last step (unless it gets P^T instead of computing S^T):
    # warpgroup 0 waits for it at a named barrier.
    if by_role and not shared:
      _bar("sync" if want_dv else "arrive", _TURN_BARRIER, COMPUTE_WGS * WG_THREADS)
    outs = []
    if want_dk:
      outs.append((v_smem if by_role else k_smem, dk * plan.scale if plan.unit_grad else dk,
                   dk_ref))
    if want_dv:
      outs.append((k_smem if by_role else v_smem, dv, dv_ref))
    for buf, val, _ in outs:
      buf[...] = val.astype(dtype)
    plgpu.commit_smem()
    for buf, _, ref in outs:
      plgpu.copy_smem_to_gmem(buf, ref.at[kv_rows])
    plgpu.wait_smem_to_gmem(0)

  if by_role:
    pl.when(wg == 0)(lambda: consumer(want_dk=False, want_dv=True))
    pl.when(wg == 1)(lambda: consumer(want_dk=True, want_dv=False))
  else:
    pl.when(wg < COMPUTE_WGS)(lambda: consumer(want_dk=True, want_dv=True))

  @pl.when(wg == COMPUTE_WGS)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")

    def one_head(g, n):
      h, _, total, q_start_of = schedule(g)

      def fetch(t, slot, refill):
        rows = (b, h, pl.ds(q_start_of(t), c))
        _when(refill, lambda: plgpu.barrier_wait(free.at[slot]))
        # Each chunk's LSE and delta rows land with its Q and dO (two copies per barrier).
        plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smems.at[slot], q_ready.at[slot])
        plgpu.copy_gmem_to_smem(lse_ref.at[rows], lse_smems.at[slot], q_ready.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smems.at[slot], do_ready.at[slot])
        plgpu.copy_gmem_to_smem(delta_ref.at[rows], delta_smems.at[slot], do_ready.at[slot])

      _stream(total, stages, fetch, n)
      return n + total

    over_heads(one_head, jnp.int32(0))


def _bwd_call(kernel, spec: MosaicSpec, scratch, barriers, out_type, grid, grid_names):
  def entry(*refs):
    def body(*scoped):
      n = len(scratch)
      kernel(*refs, spec=spec, scoped=(scoped[:n], scoped[n:]))

    pl.run_scoped(body, *scratch, *barriers, collective_axes="wg")

  # No cross-warp reductions (they would share one scratch between the consumer warpgroups).
  return plgpu.kernel(entry, out_type=out_type, grid=grid, grid_names=grid_names,
                      num_threads=COMPUTE_WGS + 1, thread_name="wg",
                      compiler_params=plgpu.CompilerParams(approx_math=True,
                                                           reduction_scratch_bytes=0))


def _backward_form(spec: MosaicSpec, bufs) -> MosaicSpec:
  """The spec the backward runs with the cotangent buffers ``bufs``: per-query-row and table
  cotangents are summed in the dQ pass (so no fused form), key-side ones in the dK warpgroup
  from its own S^T (so no shared P^T)."""
  if spec.fused_dq and any(kind in DQ_KINDS for _, kind in bufs):
    spec = dataclasses.replace(spec, fused_dq=False)
  if spec.shared_probs and any(kind not in DQ_KINDS for _, kind in bufs):
    spec = dataclasses.replace(spec, shared_probs=False)
  return spec


def backward(spec: MosaicSpec, q, k, v, do, lse, delta, arrays: PlanArrays, diff=()):
  """``(dq, dk, dv, d_ops)`` on padded inputs (``delta = rowsum(out * dout) - dlse``, f32);
  ``d_ops`` the f32 cotangents of the mod arrays ``arrays.operands[i]`` for ``i`` in ``diff``,
  added by TMA reductions (their last bits vary from run to run). Loads along query positions
  and (query, key) tables are differentiated in the dQ pass: with such loads the fused form runs
  as the two-pass one."""
  bufs = _cotangent_buffers(spec, diff)
  spec = _backward_form(spec, bufs)
  plan = spec.plan
  if plan.head_pad < MIN_HEAD_DIM:
    q, k, v, do = (pad_to(x, x.shape[:3] + (MIN_HEAD_DIM,)) for x in (q, k, v, do))
  d = q.shape[-1]
  ops = tuple(_pad_operand(x, r, plan) for x, r in zip(arrays.operands, spec.roles))
  c, stages, wgs = BWD_CHUNK, spec.bwd_ring_stages, COMPUTE_WGS
  own = lambda dtype, n=wgs: _smem((n, c, d), dtype)    # one chunk per consumer warpgroup
  ring = lambda dtype, rows=c: _smem((stages, rows, d), dtype)   # the streamed chunks
  ready = lambda n: plgpu.Barrier(num_barriers=n)
  release = plgpu.Barrier(num_arrivals=wgs, num_barriers=stages)
  dq_bufs = tuple(buf for buf in bufs if buf[1] in DQ_KINDS)
  dkv_bufs = tuple(buf for buf in bufs if buf[1] not in DQ_KINDS)

  def zeros(mine):   # one kernel's f32 cotangent buffers, and its staging buffers
    shape = lambda i, kind: (arrays.operands[i].shape + (c,) if kind == LANES else ops[i].shape)
    return tuple(jnp.zeros(shape(i, kind), f32) for i, kind in mine), _cotangent_stages(mine)

  def with_accumulators(call, inputs, out_shapes, accumulators):
    """``call(*inputs, *accumulator refs) -> outputs``, the kernel adding into the f32
    accumulators in place (aliased operands): ``(*outputs, *accumulators)``."""
    n = len(out_shapes)

    def run(refs):
      outs = call(*inputs, *refs[n:])
      for ref, out in zip(refs[:n], outs if n > 1 else (outs,)):
        ref[...] = out

    return pl.run_state(run)(tuple(jnp.zeros(x.shape, x.dtype) for x in out_shapes)
                             + accumulators)

  dkv_cots, dkv_stage = zeros(dkv_bufs)
  kv_chunks = 1 if _dkv_by_role(plan) else wgs   # by role, both warpgroups read one chunk
  # The Q/dO ring carries each chunk's LSE and delta rows, loaded by TMA with them (FA3's
  # form): read per step from global memory they were a load's latency after each S^T.
  dkv_scratch = (own(k.dtype, kv_chunks), own(v.dtype, kv_chunks), ring(q.dtype), ring(do.dtype),
                 plgpu.SMEM((stages, c), f32), plgpu.SMEM((stages, c), f32))
  with_rows = plgpu.Barrier(num_arrivals=2, num_barriers=stages)   # a chunk and its rows
  dkv_barriers = (ready(2 * wgs), with_rows, with_rows, release)
  if spec.shared_probs:   # P^T steps in flight, each with a "written" and a "read" barrier
    n_probs = _probs_buffers(plan, stages)
    dkv_scratch += (_smem((n_probs, c, c), f32),)
    dkv_barriers += (ready(n_probs), ready(n_probs))
  dkv_outs = (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype))
  dkv = functools.partial(
      _bwd_call, functools.partial(_dkv_kernel, bufs=dkv_bufs), spec, out_type=dkv_outs,
      grid=(plan.kv_heads, plan.nk, plan.batch), grid_names=("kv_heads", "kv_tiles", "batch"))
  dkv_inputs = (q, k, v, do, lse, delta, *arrays.tlists, *_transposed_tables(ops, spec.roles))
  if spec.fused_dq:
    # dS^T per warpgroup (bf16; DS_BUFFERS steps of it with the head-dim split) and its f32
    # part of dQ, staged for the TMA reduction; with the split, a barrier per dS^T buffer and
    # one that says both warpgroups are done reading each other's K.
    split = _dq_split(plan)
    ds = _smem((DS_BUFFERS, wgs, c, c) if split else (wgs, c, c), q.dtype)
    call = dkv(scratch=dkv_scratch + (ds, _smem((wgs, c, split or d), f32)) + dkv_stage,
               barriers=dkv_barriers + ((plgpu.Barrier(num_arrivals=wgs,
                                                       num_barriers=DS_BUFFERS + 1),)
                                        if split else ()))
    dk, dv, dq, *cots = with_accumulators(call, dkv_inputs, dkv_outs,
                                          (jnp.zeros(q.shape, f32),) + dkv_cots)
    dq = (dq * plan.scale if plan.unit_grad else dq).astype(q.dtype)
  else:
    dq_cots, dq_stage = zeros(dq_bufs)
    v_stages = _dq_v_stages(spec, d, q.dtype, dq_stage)
    if not v_stages:
      raise ValueError("pallas_flash_attention: the Mosaic backward cannot run this call: "
                       + " ".join(cotangent_reasons(spec, diff)))
    dq_call = _bwd_call(
        functools.partial(_dq_kernel, bufs=dq_bufs), spec,
        (own(q.dtype), own(do.dtype), ring(k.dtype, spec.bwd_dq_cols),
         _smem((v_stages, spec.bwd_dq_cols, d), v.dtype)) + dq_stage,
        (ready(2 * wgs), ready(stages), ready(v_stages), release,
         plgpu.Barrier(num_arrivals=wgs, num_barriers=v_stages)),
        jax.ShapeDtypeStruct(q.shape, q.dtype), (plan.q_heads, plan.nq, plan.batch),
        ("heads", "q_tiles", "batch"))
    dq_inputs = (q, k, v, do, lse, delta, *arrays.lists, *ops)
    if dq_cots:
      dq, *q_cots = with_accumulators(dq_call, dq_inputs, (jax.ShapeDtypeStruct(q.shape, q.dtype),),
                                      dq_cots)
    else:
      dq, q_cots = dq_call(*dq_inputs), []
    dk, dv, *cots = with_accumulators(dkv(scratch=dkv_scratch + dkv_stage,
                                          barriers=dkv_barriers), dkv_inputs, dkv_outs, dkv_cots)
    cots = q_cots + cots
  d_ops = {}
  for (i, kind), cot in zip(dq_bufs + dkv_bufs, cots):
    x = arrays.operands[i]
    cot = cot.sum(-1) if kind == LANES else cot[tuple(slice(0, n) for n in x.shape)]
    d_ops[i] = d_ops[i] + cot if i in d_ops else cot
  d_ops = tuple(d_ops.get(i, jnp.zeros(jnp.shape(arrays.operands[i]), f32)) for i in diff)
  return dq[..., :plan.head_pad], dk[..., :plan.head_pad], dv[..., :plan.v_pad], d_ops
