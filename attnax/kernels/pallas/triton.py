"""Triton-lowered Pallas kernels: the flash forward, the dQ pass and the dK/dV pass.

All three kernels walk the same schedule: the BlockMask's lists (full tiles first, without the
elementwise mask; then partial tiles, with it). Empty tiles are in no list, so they are never
loaded. The tile maths is :mod:`attnax.kernels.tiles` (shared with every other kernel); this module
only adds the Pallas plumbing: refs, grids, the index lists and the mod operands.

Tiling. The BlockMask has one tiling, ``(block_q, block_k)`` (the *coarse* tiles). Each kernel may
run finer: a program owns ``rows`` rows of a coarse tile (the grid splits the coarse tile) and
walks the other axis in ``cols``-wide chunks (a static loop inside each coarse tile). The schedule
is therefore the same in the forward and both backward passes, whatever their tile sizes.

Dropout: with ``plan.dropout_rate > 0`` the seed (uint32 ``(2,)``) is one more whole-array operand
after the index lists, and every pass regenerates the keep mask of each tile it visits from the
seed and the absolute indices (:func:`attnax.kernels.tiles.dropout_keep`, uint32 multiply, xor and
logical shifts): the forward drops probabilities after the running sum has counted them, the dQ
pass and the dK/dV pass apply the same mask to ``dP`` and to the ``P`` of ``dV = P^T dO``.

Threshold skipping (``plan.softmax_threshold``, :mod:`attnax.kernels.threshold`): the forward
decides per visited coarse tile with :func:`attnax.kernels.tiles.threshold_skip` (so its programs
are forced to the coarse tile: ``fwd_rows = block_q``, ``fwd_cols = block_k``) and runs the softmax
update and ``P V`` under a ``lax.cond``; it writes the decisions as one more output (int32, the kv
axis padded to a power of two, returned as int8 ``(B, Hq, nq, nk)``). Both backward passes take
them as a whole-array operand after the seed and skip the recorded tiles (``lax.cond``).

Mods that carry arrays: the plan's operands (:mod:`attnax.kernels.operands`: pytree leaves and
closed-over arrays) enter as whole-array 1-D kernel operands and the mods are rebuilt inside the
kernel around :class:`~attnax.kernels.operands.RefArray` views of them (a gather becomes a load at
flat indices).

What this module implements is the forward and backward of a
:class:`~attnax.kernels.pallas.plan.FlashPlan` (sizes, scale, mods, BlockMask schedule); its own
part is the launch knobs (:class:`TritonConfig`). The arrays reaching it are already padded:
``q_pad``/``kv_pad`` are multiples of the coarse blocks and the head dims are powers of two (zero
padding); the true lengths are in the plan.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attnax.kernels import _checks, tiles
from attnax.kernels import operands as ops_lib
from attnax.kernels.pallas.plan import NUM_LISTS, FlashPlan, pow2

f32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))   # a @ b.T
_TN = (((0,), (0,)), ((), ()))   # a.T @ b


# ----------------------------------------------------------------------------- config


MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class TritonConfig:
  """The Triton lowering's knobs (static, hashable).

  ``block_q``/``block_k`` is the default BlockMask tiling (the unit of block skipping) for plans
  that do not fix one. Each pass may run finer: a program owns ``*_rows`` rows of a tile and walks
  the other axis in ``*_cols`` chunks; every fine size divides its coarse block (``None``: the
  coarse block). For dK/dV the rows are keys and the chunks are queries. ``*_num_warps`` /
  ``*_num_stages`` are Triton's launch knobs. A threshold plan runs its forward on whole coarse
  tiles (the unit of its decisions): ``fwd_rows``/``fwd_cols`` are then ignored.
  """
  block_q: int = 128
  block_k: int = 128
  fwd_rows: int | None = None
  fwd_cols: int | None = None
  fwd_num_warps: int = 8
  fwd_num_stages: int = 3
  dq_rows: int | None = None
  dq_cols: int | None = None
  dq_num_warps: int = 4
  dq_num_stages: int = 2
  dkv_rows: int | None = None
  dkv_cols: int | None = None
  dkv_num_warps: int = 4
  dkv_num_stages: int = 2
  dkv_transposed: bool = True   # dK/dV pass on the transposed (keys x queries) tile
  # How kernels read the mods' arrays: "masked" (a masked load, no index clamp, so Triton sees the
  # index's contiguity and coalesces; H200 2026-12-02: bias fwd+bwd 1.46x, +dbias 2.01x faster) or
  # "clamp" (indices clamped into the array, the older form).
  mod_loads: str = "masked"


def _cfg(fwd, dq, dkv, block=128):
  return TritonConfig(block, block, *fwd, *dq, *dkv)


# Defaults on H100/H200, by (padded head dim, bytes per element): forward (rows, cols, warps,
# stages), dQ (rows, cols, warps, stages), dK/dV (rows, cols, warps, stages). Measured with
# benchmarks/tune_pallas.py (bf16, D=128); the others are sized to fit shared memory.
_GPU_DEFAULTS = {
    (32, 2): _cfg((64, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 2)),
    (64, 2): _cfg((64, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 2)),
    (128, 2): _cfg((128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2)),
    (256, 2): _cfg((32, 32, 4, 1), (32, 32, 4, 1), (32, 32, 4, 1)),
    (32, 4): _cfg((128, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 2)),
    (64, 4): _cfg((128, 64, 4, 2), (64, 32, 4, 2), (64, 32, 4, 2)),
    (128, 4): _cfg((64, 64, 4, 2), (32, 32, 4, 1), (32, 32, 4, 1)),
    (256, 4): _cfg((32, 32, 4, 1), (32, 32, 4, 1), (32, 32, 4, 1)),
}
# The interpreter's cost is per grid step and per loop iteration: small coarse tiles, no split.
INTERPRET_CONFIG = TritonConfig(block_q=32, block_k=32)


def default_config(head_dim: int, *, interpret: bool, dtype: Any = jnp.bfloat16) -> TritonConfig:
  """The default :class:`TritonConfig` for a (padded) head dim, dtype and mode."""
  if interpret:
    return INTERPRET_CONFIG
  d = min(k for k in (32, 64, 128, 256) if k >= min(head_dim, 256))
  size = 4 if jnp.dtype(dtype).itemsize >= 4 else 2
  return _GPU_DEFAULTS[(d, size)]


@dataclasses.dataclass(frozen=True)
class KernelSpec:
  """A plan with the lowering's launch knobs resolved against its tiling."""
  plan: FlashPlan
  fwd_rows: int
  fwd_cols: int
  fwd_warps: int
  fwd_stages: int
  dq_rows: int
  dq_cols: int
  dq_warps: int
  dq_stages: int
  dkv_rows: int         # kv rows per dK/dV program
  dkv_cols: int         # q chunk
  dkv_warps: int
  dkv_stages: int
  dkv_transposed: bool
  interpret: bool
  masked_loads: bool = False   # TritonConfig.mod_loads == "masked"

  @staticmethod
  def resolve(plan: FlashPlan, cfg: TritonConfig, *, interpret: bool, num_warps=None,
              num_stages=None) -> "KernelSpec":
    def fine(val, coarse, name):
      val = coarse if val is None else min(val, coarse)
      if coarse % val or val < 16:
        raise ValueError(f"config.{name}={val} must be >= 16 and divide its block ({coarse})")
      return val

    for name, val in (("num_warps", num_warps), ("num_stages", num_stages)):
      if val is not None:
        _checks.check_positive_int(name, val)
    if cfg.mod_loads not in ("clamp", "masked"):
      raise ValueError(f"config.mod_loads must be 'clamp' or 'masked', got {cfg.mod_loads!r}")
    warps = lambda w: num_warps if num_warps is not None else w
    # A mod reading a table by (q, kv) position (a bias) gathers one tile of it per step, which the
    # software pipeliner stages in shared memory like K and V: cap the stages so that it fits
    # (measured on the H200 at D=128, bf16 inputs: an f32 table needs 2 stages forward, 1
    # backward; a bf16 table 2 and 2).
    table = _table_itemsize(plan)
    cap_fwd = 2 if table else None
    cap_bwd = (1 if table > 2 else 2) if table else None

    def stages(st, cap=None):
      if num_stages is not None:
        return num_stages
      return st if cap is None else min(st, cap)

    bq, bk = plan.block_q, plan.block_k
    # Threshold decisions are per coarse tile: the forward program owns one whole.
    thresholded = plan.softmax_threshold is not None
    return KernelSpec(
        plan=plan,
        fwd_rows=bq if thresholded else fine(cfg.fwd_rows, bq, "fwd_rows"),
        fwd_cols=bk if thresholded else fine(cfg.fwd_cols, bk, "fwd_cols"),
        fwd_warps=warps(cfg.fwd_num_warps), fwd_stages=stages(cfg.fwd_num_stages, cap_fwd),
        dq_rows=fine(cfg.dq_rows, bq, "dq_rows"), dq_cols=fine(cfg.dq_cols, bk, "dq_cols"),
        dq_warps=warps(cfg.dq_num_warps), dq_stages=stages(cfg.dq_num_stages, cap_bwd),
        dkv_rows=fine(cfg.dkv_rows, bk, "dkv_rows"), dkv_cols=fine(cfg.dkv_cols, bq, "dkv_cols"),
        dkv_warps=warps(cfg.dkv_num_warps), dkv_stages=stages(cfg.dkv_num_stages, cap_bwd),
        dkv_transposed=cfg.dkv_transposed, interpret=interpret,
        masked_loads=cfg.mod_loads == "masked")


def _table_itemsize(plan: FlashPlan) -> int:
  """Bytes per element of the widest mod operand indexed by both positions (0 when none)."""
  sizes = [jnp.dtype(dtype).itemsize for shape, dtype in plan.mods.meta
           if len(shape) >= 2 and shape[-1] > 1 and shape[-2] > 1]
  return max(sizes, default=0)


def not_supported_reasons(q: Any, k: Any, v: Any, *, interpret: bool) -> list[str]:
  """Why the Triton lowering (or its interpreter) cannot run these inputs (empty when it can)."""
  reasons = []
  d, dv = q.shape[-1], v.shape[-1]
  if max(d, dv) > MAX_HEAD_DIM:
    reasons.append(f"head_dim {d} / value dim {dv} exceeds {MAX_HEAD_DIM}")
  if interpret:
    return reasons
  return reasons + _checks.gpu_reasons("the Triton lowering",
                                       hint=" (use backend='interpret' or 'auto')")



# ----------------------------------------------------------------------------- shared tile maths


def _masked_load(ref, flat, in_range):
  return plgpu.load(ref.at[flat], mask=in_range, other=0)


def _mod_load(spec: KernelSpec, backward: bool = False):
  """The mods' array reads: clamped indices (None) or masked loads (``mod_loads="masked"``).

  A backward kernel whose score mod has a non-unit derivative evaluates the mods under jax.jvp,
  where Pallas's masked-load rule fails (jax 0.11.2: it flattens the absent ref tangent to no
  leaf): those read clamped.
  """
  if backward and not spec.plan.unit_grad:
    return None
  return _masked_load if spec.masked_loads else None


def _scores(q, k, spec: KernelSpec, score_fn, mask_fn, b, h, q_idx, kv_idx, masked: bool,
            need_grad: bool):
  """Scaled, modded, masked scores of one tile; and d(modded)/d(raw) if needed.

  ``q @ k.T``; called with the operands swapped (``k``, ``q``) and the index vectors swapped in
  orientation it gives the transposed tile (mods are elementwise and broadcast either way).
  """
  plan = spec.plan
  s_raw = lax.dot_general(q, k, _NT, preferred_element_type=f32) * plan.scale
  kv_len = plan.kv_len if (masked and plan.kv_len != plan.kv_pad) else None

  def modded(x):
    return tiles.tile_scores(x, score_fn=score_fn, mask_fn=mask_fn, b=b, h=h, q_idx=q_idx,
                             kv_idx=kv_idx, kv_len=kv_len, apply_mask=masked)

  if not need_grad or plan.unit_grad:
    s, visible = modded(s_raw)
    return s, visible, None
  # Mods are elementwise: a jvp with tangent 1 is the derivative (a soft-cap's 1 - tanh^2 included).
  s, ds, visible = jax.jvp(modded, (s_raw,), (jnp.ones_like(s_raw),), has_aux=True)
  return s, visible, ds


# Where a mod's load of a differentiated operand varies (its flat index's shape on a tile): its
# cotangent is summed where that costs least. SCALAR (slopes[h]) and Q_ROWS (alpha[b, h, q]) in the
# dQ kernel's registers, written once per program; KV_COLS (delta[b, h, k]) in the dK/dV kernel's
# the same way; TILE (bias[b, h, q, k]) added atomically per tile by the dQ kernel.
SCALAR, Q_ROWS, KV_COLS, TILE = "scalar", "q", "kv", "tile"


def _load_kind(shape, q_axis: int) -> str:
  shape = tuple(shape)
  if all(n == 1 for n in shape):
    return SCALAR
  if len(shape) == 2:
    if shape[1 - q_axis] == 1:
      return Q_ROWS
    if shape[q_axis] == 1:
      return KV_COLS
  return TILE


def score_loads(plan: FlashPlan, leaves, diff, rows: int, cols: int) -> tuple:
  """``(operand, kind, flat shape)`` of each load that the score mod makes of an operand in
  ``diff`` on a ``(rows, cols)`` tile, in order: a trace on ``leaves`` (no kernel runs)."""
  seen = []

  def probe(leaves):
    tape = ops_lib.LoadTape()
    score_fn, _ = plan.mods.rebuild_from_refs(leaves, tape)
    if score_fn is not None:
      tiles.tile_scores(jnp.zeros((rows, cols), f32), score_fn=score_fn, mask_fn=None,
                        b=jnp.int32(0), h=jnp.int32(0),
                        q_idx=lax.broadcasted_iota(jnp.int32, (rows, 1), 0),
                        kv_idx=lax.broadcasted_iota(jnp.int32, (1, cols), 1), apply_mask=False)
    seen.extend(index for index, _, _ in tape.loads)
    return [flat for _, flat, _ in tape.loads]

  shapes = jax.eval_shape(probe, list(leaves))
  return tuple((index, _load_kind(flat.shape, 0), tuple(flat.shape))
               for index, flat in zip(seen, shapes) if index in diff)


def _scores_with_pullback(q, k, spec: KernelSpec, score_fn, mask_fn, tape, b, h, q_idx, kv_idx,
                          masked: bool, loads: tuple):
  """As :func:`_scores`, with ``pullback(ds) -> (d raw scores, [d load for each of loads])``.

  The mods were rebuilt on ``tape`` (:class:`attnax.kernels.operands.LoadTape`): the score mod's
  loads are recorded here, then replayed as the inputs of a vjp, which gives the cotangent of
  each load of a differentiated operand (``loads``: :func:`score_loads`, in the same order) along
  with that of the raw scores. The mask mod's loads are not differentiated (booleans).
  """
  plan = spec.plan
  s_raw = lax.dot_general(q, k, _NT, preferred_element_type=f32) * plan.scale
  kv_len = plan.kv_len if (masked and plan.kv_len != plan.kv_pad) else None
  ids = dict(b=b, h=h, q_idx=q_idx, kv_idx=kv_idx)

  def score_part(x):
    return tiles.tile_scores(x, score_fn=score_fn, mask_fn=None, apply_mask=False, **ids)[0]

  tape.record()
  score_part(s_raw)   # only its loads are used (the arithmetic is dead code; the vjp redoes it)
  recorded = list(tape.loads)
  wanted = {index for index, _, _ in loads}
  picked = [n for n, (index, _, _) in enumerate(recorded) if index in wanted]
  if len(picked) != len(loads):
    raise AssertionError("the score mod's loads differ from those score_loads traced")

  def replayed(x, values):
    every = [value for _, _, value in recorded]
    for n, value in zip(picked, values):
      every[n] = value
    tape.replay(every)
    out = score_part(x)
    tape.record()
    return out

  s_mod, pull = jax.vjp(replayed, s_raw, [recorded[n][2] for n in picked])
  s, visible = tiles.tile_scores(s_mod, score_fn=None, mask_fn=mask_fn, kv_len=kv_len,
                                 apply_mask=masked, **ids)

  def pullback(ds):
    d_raw, d_loads = pull(ds)
    return d_raw, [(recorded[n][1], d) for n, d in zip(picked, d_loads)]

  return s, visible, pullback


def _walk(spec: KernelSpec, refs, row, n_other, n_dense, dense_masked_last, dense_masked_all,
          visit, carry):
  """Visit full tiles (unmasked) then partial tiles (masked) of one BlockMask row.

  ``refs`` = (partial counts, partial indices, full counts, full indices, full-list first index,
  length of the full list's contiguous prefix). The contiguous prefix (all full tiles of causal,
  window and document masks) is walked as a range: no index load feeds the tile loads, so Triton
  can pipeline them; the rest of the full list and the partial list are read from the lists.
  """
  plan = spec.plan
  if plan.dense:
    body = lambda t, c: visit(t, c, dense_masked_all)
    n_full = n_dense - (1 if dense_masked_last else 0)
    carry = lax.fori_loop(0, n_full, body, carry)
    if dense_masked_last:
      carry = visit(n_dense - 1, carry, True)
    return carry
  cnt_ref, idx_ref, fcnt_ref, fidx_ref, first_ref, ncontig_ref = refs
  base = row * n_other
  n, n1, first = fcnt_ref[row], ncontig_ref[row], first_ref[row]
  carry = lax.fori_loop(0, n1, lambda t, c: visit(first + t, c, False), carry)
  carry = lax.fori_loop(n1, n, lambda t, c: visit(fidx_ref[base + t], c, False), carry)
  n = cnt_ref[row]
  return lax.fori_loop(0, n, lambda t, c: visit(idx_ref[base + t], c, True), carry)




def _take_seed(plan: FlashPlan, refs):
  """``(seed words or None, remaining refs)``: the dropout seed operand follows the lists."""
  if not plan.dropout_rate:
    return None, refs
  seed_ref = refs[0]
  return (seed_ref[0], seed_ref[1]), refs[1:]


def _seed_operands(plan: FlashPlan, seed) -> tuple:
  """The dropout seed as a kernel operand (none without dropout)."""
  if not plan.dropout_rate:
    return ()
  if seed is None:
    raise ValueError("pallas_flash_attention: the plan drops attention weights but no dropout "
                     "seed was passed to the kernel")
  return (jnp.asarray(seed, jnp.uint32).reshape(2),)


def _dropped(x, seed, plan: FlashPlan, b, h, q_idx, kv_idx):
  """``x`` (probabilities or dP of one tile) through the tile's dropout mask; as is without."""
  if seed is None:
    return x
  keep = tiles.dropout_keep(seed, plan.dropout_rate, b, h, q_idx, kv_idx)
  return tiles.apply_dropout(x, keep, plan.dropout_rate)


def _take_decisions(plan: FlashPlan, refs):
  """``(decisions ref or None, remaining refs)``: a threshold plan's decisions follow the seed."""
  if plan.softmax_threshold is None:
    return None, refs
  return refs[0], refs[1:]


def _decision_operands(plan: FlashPlan, decisions) -> tuple:
  """The forward's decisions as a flat int32 kernel operand (none without threshold skipping)."""
  if plan.softmax_threshold is None:
    return ()
  if decisions is None:
    raise ValueError("pallas_flash_attention: the plan skips tiles by threshold but the "
                     "backward got no recorded decisions")
  return (jnp.asarray(decisions, jnp.int32).reshape(-1),)


def _unless_skipped(dec_ref, plan: FlashPlan, b, h, q_block, kv_block, work, carry):
  """``work(carry)``, or ``carry`` when the forward skipped coarse tile ``(q_block, kv_block)``
  of query head ``h`` (no decisions: always ``work``)."""
  if dec_ref is None:
    return work(carry)
  code = dec_ref[((b * plan.q_heads + h) * plan.nq + q_block) * plan.nk + kv_block]
  return lax.cond(code == tiles.TILE_SKIPPED, lambda c: c, work, carry)


# ----------------------------------------------------------------------------- forward


class _FwdProgram(NamedTuple):
  """What both forward kernels start from, for one program (a ``rows``-row q tile of ``(b, h)``)."""
  b: Any
  h: Any
  q_start: Any
  q: Any            # the q tile
  q_idx: Any        # int32 (rows, 1): its absolute query positions
  score_fn: Any
  mask_fn: Any
  row: Any          # the BlockMask row this q tile walks
  carry: tuple      # (acc, m, l): the empty accumulator and softmax statistics


def _fwd_program(q_ref, leaf_refs, spec: KernelSpec, rows: int) -> _FwdProgram:
  """The forward kernels' shared prologue: program ids, mods, the q tile, initial state."""
  plan = spec.plan
  i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  score_fn, mask_fn = plan.mods.rebuild_from_refs(leaf_refs, None, _mod_load(spec))
  q_start = i * rows
  q = q_ref[...]
  q_idx = q_start + lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
  row = plan.bm_index(b, h) * plan.nq + q_start // plan.block_q
  m, l = tiles.init_stats((rows,))
  acc = jnp.zeros((rows, plan.v_pad), f32)
  return _FwdProgram(b, h, q_start, q, q_idx, score_fn, mask_fn, row, (acc, m, l))


def _fwd_finish(spec: KernelSpec, list_refs, prog: _FwdProgram, visit, carry, o_ref, lse_ref):
  """Walk the q tile's BlockMask row with ``visit`` from ``carry`` (whose first three entries
  are ``(acc, m, l)``), write the output and the LSE; returns the final carry."""
  plan = spec.plan
  ragged_k = plan.kv_len != plan.kv_pad
  carry = _walk(spec, list_refs, prog.row, plan.nk, plan.nk, ragged_k, False, visit, carry)
  out, lse = tiles.finalize(*carry[:3])
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse
  return carry


def _fwd_kernel(q_ref, k_ref, v_ref, *rest, spec):
  plan = spec.plan
  list_refs, rest = rest[:NUM_LISTS], rest[NUM_LISTS:]
  seed, rest = _take_seed(plan, rest)
  if plan.softmax_threshold is not None:
    return _fwd_threshold_kernel(q_ref, k_ref, v_ref, list_refs, *rest, spec=spec)
  leaf_refs, (o_ref, lse_ref) = rest[:-2], rest[-2:]
  cols = spec.fwd_cols
  prog = _fwd_program(q_ref, leaf_refs, spec, spec.fwd_rows)
  b, h, q, q_idx, score_fn, mask_fn = (prog.b, prog.h, prog.q, prog.q_idx, prog.score_fn,
                                        prog.mask_fn)

  def visit(kv_block, carry, masked):
    acc, m, l = carry
    for c in range(plan.block_k // cols):
      k_start = kv_block * plan.block_k + c * cols
      k = k_ref[pl.ds(k_start, cols), :]
      v = v_ref[pl.ds(k_start, cols), :]
      kv_idx = k_start + lax.broadcasted_iota(jnp.int32, (1, cols), 1)
      s, visible, _ = _scores(q, k, spec, score_fn, mask_fn, b, h, q_idx, kv_idx, masked, False)
      p, alpha, m, l = tiles.online_softmax_step(s, visible, m, l)
      p = _dropped(p, seed, plan, b, h, q_idx, kv_idx)   # after l counted p: LSE undropped
      pv = sum(lax.dot(x, v, preferred_element_type=f32)
               for x in tiles.p_terms(p, v.dtype, o_ref.dtype))
      acc = acc * alpha[:, None] + pv
    return acc, m, l

  _fwd_finish(spec, list_refs, prog, visit, prog.carry, o_ref, lse_ref)


def _fwd_threshold_kernel(q_ref, k_ref, v_ref, list_refs, *rest, spec):
  """The forward of a threshold plan: one program per (coarse q tile, batch row, query head).

  Each visited kv tile: scores, the decision (:func:`attnax.kernels.tiles.threshold_skip`), then
  under ``lax.cond`` the V load, the softmax update and ``P V`` of a kept tile. The decisions
  (``tiles.TILE_*`` codes per kv tile) are collected in a vector and written once.
  """
  plan = spec.plan
  leaf_refs, (o_ref, lse_ref, dec_ref) = rest[:-3], rest[-3:]
  rows, bk = plan.block_q, plan.block_k
  prog = _fwd_program(q_ref, leaf_refs, spec, rows)
  b, h, q, q_idx, score_fn, mask_fn = (prog.b, prog.h, prog.q, prog.q_idx, prog.score_fn,
                                        prog.mask_fn)
  q_valid = prog.q_start + lax.broadcasted_iota(jnp.int32, (rows,), 0) < plan.q_len
  kv_tiles = lax.broadcasted_iota(jnp.int32, (dec_ref.shape[-1],), 0)
  log_t = tiles.log_threshold(plan.softmax_threshold)
  carry = prog.carry + (jnp.full((), tiles.MASK_VALUE, f32), jnp.zeros(kv_tiles.shape, jnp.int32))

  def visit(kv_block, carry, masked):
    acc, m, l, tile_m, codes = carry
    k_start = kv_block * bk
    k = k_ref[pl.ds(k_start, bk), :]
    kv_idx = k_start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    s, visible, _ = _scores(q, k, spec, score_fn, mask_fn, b, h, q_idx, kv_idx, masked, False)
    skip, tile_max = tiles.threshold_skip(s, q_valid, m, tile_m, log_t, plan.threshold_rule)

    def kept(c):
      acc, m, l, tile_m = c
      v = v_ref[pl.ds(k_start, bk), :]
      p, alpha, m, l = tiles.online_softmax_step(s, visible, m, l)
      p = tiles.low_precision(p, v.dtype)
      acc = acc * alpha[:, None] + lax.dot(p, v, preferred_element_type=f32)
      return acc, m, l, jnp.maximum(tile_m, tile_max)

    acc, m, l, tile_m = lax.cond(skip, lambda c: c, kept, (acc, m, l, tile_m))
    # The code as an int32 vector: Triton's select of a scalar-int branch came out i1 (invalid IR).
    code = (jnp.full(kv_tiles.shape, tiles.TILE_KEPT, jnp.int32)
            + skip.astype(jnp.int32) * (tiles.TILE_SKIPPED - tiles.TILE_KEPT))
    return acc, m, l, tile_m, jnp.where(kv_tiles == kv_block, code, codes)

  *_, codes = _fwd_finish(spec, list_refs, prog, visit, carry, o_ref, lse_ref)
  dec_ref[...] = codes


def _launch(spec: KernelSpec, warps: int, stages: int):
  return dict(
      interpret=spec.interpret,
      compiler_params=None if spec.interpret else plgpu.CompilerParams(num_warps=warps,
                                                                        num_stages=stages))


def _whole(x):
  """BlockSpec for a whole 1-D operand (index lists, mod arrays)."""
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def forward(spec: KernelSpec, q, k, v, lists, leaves, seed=None, out_dtype=None):
  """``(out, lse)`` on padded inputs: out ``(B, Hq, q_pad, v_dim)`` (``out_dtype``, default
  q's), lse f32 ``(B, Hq, q_pad)``.

  ``seed``: dropout's uint32 ``(2,)`` seed when ``plan.dropout_rate > 0``. A threshold plan
  returns ``(out, lse, decisions)``, decisions int8 ``(B, Hq, nq, nk)``.
  """
  plan = spec.plan
  seeds = _seed_operands(plan, seed)
  g = plan.groups
  rows = spec.fwd_rows
  grid = (plan.q_pad // rows, plan.batch, plan.q_heads)
  in_specs = [
      pl.BlockSpec((None, None, rows, plan.head_pad), lambda i, b, h: (b, h, i, 0)),
      pl.BlockSpec((None, None, plan.kv_pad, plan.head_pad), lambda i, b, h: (b, h // g, 0, 0)),
      pl.BlockSpec((None, None, plan.kv_pad, plan.v_pad), lambda i, b, h: (b, h // g, 0, 0)),
  ] + [_whole(x) for x in lists + seeds] + [_whole(x) for x in leaves]
  out_specs = [
      pl.BlockSpec((None, None, rows, plan.v_pad), lambda i, b, h: (b, h, i, 0)),
      pl.BlockSpec((None, None, rows), lambda i, b, h: (b, h, i)),
  ]
  out_shape = [
      jax.ShapeDtypeStruct((plan.batch, plan.q_heads, plan.q_pad, plan.v_pad),
                           out_dtype or q.dtype),
      jax.ShapeDtypeStruct((plan.batch, plan.q_heads, plan.q_pad), f32),
  ]
  thresholded = plan.softmax_threshold is not None
  if thresholded and plan.dropout_rate:
    raise ValueError("pallas_flash_attention: threshold skipping and attention dropout cannot be "
                     "combined in one call")
  if thresholded:   # one row of decisions per program (Triton blocks are powers of two)
    nk_pad = pow2(plan.nk)
    out_specs.append(pl.BlockSpec((None, None, None, nk_pad), lambda i, b, h: (b, h, i, 0)))
    out_shape.append(jax.ShapeDtypeStruct((plan.batch, plan.q_heads, plan.nq, nk_pad),
                                          jnp.int32))
  res = pl.pallas_call(
      lambda *refs: _fwd_kernel(*refs, spec=spec), grid=grid, in_specs=in_specs,
      out_specs=out_specs, out_shape=out_shape, name="attnax_flash_fwd",
      **_launch(spec, spec.fwd_warps, spec.fwd_stages))(q, k, v, *lists, *seeds, *leaves)
  if thresholded:
    return res[0], res[1], res[2][..., :plan.nk].astype(jnp.int8)
  return tuple(res)


# ----------------------------------------------------------------------------- backward: dQ


def _scatter_add(ref, flat, value, interpret: bool):
  """``ref[flat] += value`` with repeated indices summed: an atomic add on the GPU (programs run
  at once); in interpret mode (programs run in turn) a scatter-add, as Pallas' interpreted
  ``atomic_add`` sets ``ref[flat]`` and so keeps one of the repeated indices' values."""
  if interpret:
    ref[...] = ref[...].at[flat].add(value)
  else:
    plgpu.atomic_add(ref, flat, value)


def _operands_of(loads: tuple, kinds) -> tuple:
  """The operands (in order, once each) that have a load of one of ``kinds``."""
  return tuple(dict.fromkeys(index for index, kind, _ in loads if kind in kinds))


def _summed(loads: tuple, kinds, shape_of) -> tuple:
  """Positions in ``loads`` of the kinds summed in registers, and their zero accumulators
  ``(cotangent sum, flat indices)`` (the indices are loop-invariant; the last chunk's are used)."""
  picked = tuple(n for n, (_, kind, _) in enumerate(loads) if kind in kinds)
  zeros = tuple((jnp.zeros(shape_of(loads[n][2]), f32), jnp.zeros(shape_of(loads[n][2]),
                                                                  jnp.int32)) for n in picked)
  return picked, zeros


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, spec, loads=()):
  """dQ of one q tile; with ``loads`` (:func:`score_loads`) also the cotangents of the loads of
  differentiated operands that are not KV_COLS, into f32 accumulators (the outputs after dQ,
  which alias zeros): TILE loads atomically per chunk, SCALAR and Q_ROWS loads summed over the
  walk and added once."""
  plan = spec.plan
  list_refs, rest = rest[:NUM_LISTS], rest[NUM_LISTS:]
  seed, rest = _take_seed(plan, rest)
  dec_ref, rest = _take_decisions(plan, rest)
  ops_here = _operands_of(loads, (SCALAR, Q_ROWS, TILE))
  n_leaves = len(plan.mods.meta)
  leaf_refs, dq_ref = rest[:n_leaves], rest[-1 - len(ops_here)]
  dop_refs = rest[len(rest) - len(ops_here):]
  i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows, cols = spec.dq_rows, spec.dq_cols
  tape = ops_lib.LoadTape() if ops_here else None
  score_fn, mask_fn = plan.mods.rebuild_from_refs(leaf_refs, tape, _mod_load(spec, True))
  q_start = i * rows
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_idx = q_start + lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
  summed, sums = _summed(loads, (SCALAR, Q_ROWS), lambda shape: shape)
  add = lambda index, flat, d: _scatter_add(dop_refs[ops_here.index(index)], flat, d,
                                            spec.interpret)

  def visit(kv_block, carry, masked):
    def work(carry):
      dq, sums = carry
      sums = list(sums)
      for c in range(plan.block_k // cols):
        k_start = kv_block * plan.block_k + c * cols
        k = k_ref[pl.ds(k_start, cols), :]
        v = v_ref[pl.ds(k_start, cols), :]
        kv_idx = k_start + lax.broadcasted_iota(jnp.int32, (1, cols), 1)
        if ops_here:
          s, visible, pullback = _scores_with_pullback(q, k, spec, score_fn, mask_fn, tape, b, h,
                                                       q_idx, kv_idx, masked, loads)
        else:
          s, visible, dmod = _scores(q, k, spec, score_fn, mask_fn, b, h, q_idx, kv_idx, masked,
                                     True)
        p = tiles.probabilities(s, visible, lse)
        dp = lax.dot_general(do, v, _NT, preferred_element_type=f32)
        dp = _dropped(dp, seed, plan, b, h, q_idx, kv_idx)   # out = (P Z) V: dP = Z dP'
        ds = p * (dp - delta[:, None])
        if ops_here:
          ds, d_loads = pullback(ds)
          for n, (flat, d) in enumerate(d_loads):
            index, kind, _ = loads[n]
            if kind == TILE:
              add(index, flat, d.astype(f32))
            elif n in summed:
              acc, _ = sums[summed.index(n)]
              sums[summed.index(n)] = (acc + d.astype(f32), flat)
        elif dmod is not None:
          ds = ds * dmod
        dq = dq + lax.dot(ds.astype(k.dtype), k, preferred_element_type=f32)
      return dq, tuple(sums)
    return _unless_skipped(dec_ref, plan, b, h, q_start // plan.block_q, kv_block, work, carry)

  row = plan.bm_index(b, h) * plan.nq + q_start // plan.block_q
  ragged_k = plan.kv_len != plan.kv_pad
  dq, sums = _walk(spec, list_refs, row, plan.nk, plan.nk, ragged_k, False, visit,
                   (jnp.zeros((rows, plan.head_pad), f32), sums))
  for n, (acc, flat) in zip(summed, sums):
    add(loads[n][0], flat, acc)
  dq_ref[...] = (dq * plan.scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- backward: dK, dV


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, spec, loads=()):
  """dK, dV of one kv tile (looping over the group's query heads); with ``loads`` also the
  KV_COLS loads' cotangents, summed over each head's walk in registers and added once."""
  plan = spec.plan
  list_refs, rest = rest[:NUM_LISTS], rest[NUM_LISTS:]
  seed, rest = _take_seed(plan, rest)
  dec_ref, rest = _take_decisions(plan, rest)
  ops_here = _operands_of(loads, (KV_COLS,))
  n_leaves = len(plan.mods.meta)
  leaf_refs, (dk_ref, dv_ref) = rest[:n_leaves], rest[n_leaves + len(ops_here):][:2]
  dop_refs = rest[len(rest) - len(ops_here):]
  j, b, hk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows, cols = spec.dkv_rows, spec.dkv_cols
  tape = ops_lib.LoadTape() if ops_here else None
  score_fn, mask_fn = plan.mods.rebuild_from_refs(leaf_refs, tape, _mod_load(spec, True))
  # A KV_COLS load's indices lie along the tile's key axis: rows of the transposed tile.
  summed, zero_sums = _summed(loads, (KV_COLS,), lambda shape: (
      (rows, 1) if spec.dkv_transposed else (1, rows)))
  k_start = j * rows
  k, v = k_ref[...], v_ref[...]
  kv_idx = k_start + lax.broadcasted_iota(jnp.int32, (1, rows), 1)
  kv_col = k_start + lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
  ragged_k = plan.kv_len != plan.kv_pad

  def one_head(g, carry):
    h = hk * plan.groups + g

    def mod_scores(x, y, q_ids, kv_ids, masked, sums):
      """Scores of the tile ``x y^T`` and ``finish(ds)``: ds times the mods' derivative, the
      KV_COLS loads' cotangents summed into ``sums`` (a list) on the way."""
      if not ops_here:
        s, visible, dmod = _scores(x, y, spec, score_fn, mask_fn, b, h, q_ids, kv_ids, masked,
                                   True)
        return s, visible, (lambda ds: ds if dmod is None else ds * dmod)
      s, visible, pullback = _scores_with_pullback(x, y, spec, score_fn, mask_fn, tape, b, h,
                                                   q_ids, kv_ids, masked, loads)

      def finish(ds):
        ds, d_loads = pullback(ds)
        for n, (flat, d) in enumerate(d_loads):
          if n in summed:
            acc, _ = sums[summed.index(n)]
            sums[summed.index(n)] = (acc + d.astype(f32), flat)
        return ds

      return s, visible, finish

    def visit(q_block, carry, masked):
      def work(carry):
        dk, dv, sums = carry
        sums = list(sums)
        for c in range(plan.block_q // cols):
          q_start = q_block * plan.block_q + c * cols
          q = q_ref[g, pl.ds(q_start, cols), :]
          do = do_ref[g, pl.ds(q_start, cols), :]
          lse = lse_ref[g, pl.ds(q_start, cols)]
          delta = delta_ref[g, pl.ds(q_start, cols)]
          low = jnp.dtype(do.dtype).itemsize < 4
          if spec.dkv_transposed:
            # Work on the transposed tile (keys x queries), as the Triton tutorial does: every
            # matmul then takes its operands as loaded (no transposes of computed tiles).
            q_idx = q_start + lax.broadcasted_iota(jnp.int32, (1, cols), 1)
            st, visible, finish = mod_scores(k, q, q_idx, kv_col, masked, sums)
            # tiles.probabilities, transposed: exp(s - lse) with lse = -inf rows giving 0.
            lse_safe = jnp.where(lse == -jnp.inf, jnp.inf, lse)
            pt = jnp.exp(st - lse_safe[None, :])
            if visible is not None:
              pt = jnp.where(visible, pt, 0.0)
            pz = _dropped(pt, seed, plan, b, h, q_idx, kv_col)   # dV = (P Z)^T dO
            dv = dv + lax.dot(pz.astype(do.dtype) if low else pz, do,
                              preferred_element_type=f32)
            dpt = lax.dot_general(v, do, _NT, preferred_element_type=f32)
            dpt = _dropped(dpt, seed, plan, b, h, q_idx, kv_col)
            dst = finish(pt * (dpt - delta[None, :]))
            dk = dk + lax.dot(dst.astype(q.dtype), q, preferred_element_type=f32)
          else:
            q_idx = q_start + lax.broadcasted_iota(jnp.int32, (cols, 1), 0)
            s, visible, finish = mod_scores(q, k, q_idx, kv_idx, masked, sums)
            p = tiles.probabilities(s, visible, lse)
            pz = _dropped(p, seed, plan, b, h, q_idx, kv_idx)
            pc = pz.astype(do.dtype) if low else pz
            dv = dv + lax.dot_general(pc, do, _TN, preferred_element_type=f32)
            dp = lax.dot_general(do, v, _NT, preferred_element_type=f32)
            dp = _dropped(dp, seed, plan, b, h, q_idx, kv_idx)
            ds = finish(p * (dp - delta[:, None]))
            dk = dk + lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=f32)
        return dk, dv, tuple(sums)
      return _unless_skipped(dec_ref, plan, b, h, q_block, k_start // plan.block_k, work,
                             carry)

    row = plan.bm_index(b, h) * plan.nk + k_start // plan.block_k
    dk, dv, sums = _walk(spec, list_refs, row, plan.nq, plan.nq, False, ragged_k, visit,
                         carry + (zero_sums,))
    for n, (acc, flat) in zip(summed, sums):
      _scatter_add(dop_refs[ops_here.index(loads[n][0])], flat, acc, spec.interpret)
    return dk, dv

  carry = (jnp.zeros((rows, plan.head_pad), f32), jnp.zeros((rows, plan.v_pad), f32))
  if plan.groups == 1:
    dk, dv = one_head(0, carry)
  else:
    dk, dv = lax.fori_loop(0, plan.groups, one_head, carry)
  dk_ref[...] = (dk * plan.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _accumulated(call_args: dict, out_specs: list, out_shape: list, n_inputs: int, leaves,
                 ops: tuple) -> dict:
  """``call_args`` with f32 accumulators for ``leaves[i]``, ``i`` in ``ops``: zero inputs after
  the ``n_inputs`` others, aliased to outputs after ``out_specs`` (kernels add into them)."""
  zeros = [jnp.zeros(leaves[i].shape, f32) for i in ops]
  return dict(call_args, out_specs=out_specs + [_whole(x) for x in zeros],
              out_shape=out_shape + [jax.ShapeDtypeStruct(x.shape, f32) for x in zeros],
              input_output_aliases={n_inputs + n: len(out_specs) + n for n in range(len(zeros))},
              in_specs=call_args["in_specs"] + [_whole(x) for x in zeros]), zeros


def backward_dq(spec: KernelSpec, q, k, v, do, lse, delta, lists, leaves, seed=None,
                decisions=None, loads=()):
  """``(dQ, cotangents)`` on padded inputs (one program per q tile and query head): the f32
  flat cotangents of the operands with non-KV_COLS ``loads`` (:func:`score_loads`), in order."""
  plan = spec.plan
  seeds = _seed_operands(plan, seed) + _decision_operands(plan, decisions)
  g = plan.groups
  rows = spec.dq_rows
  inputs = (q, k, v, do, lse, delta, *lists, *seeds, *leaves)
  call, zeros = _accumulated(dict(
      grid=(plan.q_pad // rows, plan.batch, plan.q_heads),
      in_specs=[
          pl.BlockSpec((None, None, rows, plan.head_pad), lambda i, b, h: (b, h, i, 0)),
          pl.BlockSpec((None, None, plan.kv_pad, plan.head_pad),
                       lambda i, b, h: (b, h // g, 0, 0)),
          pl.BlockSpec((None, None, plan.kv_pad, plan.v_pad), lambda i, b, h: (b, h // g, 0, 0)),
          pl.BlockSpec((None, None, rows, plan.v_pad), lambda i, b, h: (b, h, i, 0)),
          pl.BlockSpec((None, None, rows), lambda i, b, h: (b, h, i)),
          pl.BlockSpec((None, None, rows), lambda i, b, h: (b, h, i)),
      ] + [_whole(x) for x in lists + seeds] + [_whole(x) for x in leaves]),
      [pl.BlockSpec((None, None, rows, plan.head_pad), lambda i, b, h: (b, h, i, 0))],
      [jax.ShapeDtypeStruct(q.shape, q.dtype)], len(inputs), leaves,
      _operands_of(loads, (SCALAR, Q_ROWS, TILE)))
  dq, *d_ops = pl.pallas_call(
      lambda *refs: _dq_kernel(*refs, spec=spec, loads=loads), name="attnax_flash_dq",
      **call, **_launch(spec, spec.dq_warps, spec.dq_stages))(*inputs, *zeros)
  return dq, tuple(d_ops)


def backward_dkv(spec: KernelSpec, q, k, v, do, lse, delta, tlists, leaves, seed=None,
                 decisions=None, loads=()):
  """``(dK, dV, cotangents)`` on padded inputs: one program per kv tile and kv head, looping
  over its group; the cotangents those of the operands with KV_COLS ``loads``, in order."""
  plan = spec.plan
  seeds = _seed_operands(plan, seed) + _decision_operands(plan, decisions)
  g = plan.groups
  rows = spec.dkv_rows
  inputs = (q, k, v, do, lse, delta, *tlists, *seeds, *leaves)
  call, zeros = _accumulated(dict(
      grid=(plan.kv_pad // rows, plan.batch, plan.kv_heads),
      in_specs=[
          pl.BlockSpec((None, g, plan.q_pad, plan.head_pad), lambda j, b, h: (b, h, 0, 0)),
          pl.BlockSpec((None, None, rows, plan.head_pad), lambda j, b, h: (b, h, j, 0)),
          pl.BlockSpec((None, None, rows, plan.v_pad), lambda j, b, h: (b, h, j, 0)),
          pl.BlockSpec((None, g, plan.q_pad, plan.v_pad), lambda j, b, h: (b, h, 0, 0)),
          pl.BlockSpec((None, g, plan.q_pad), lambda j, b, h: (b, h, 0)),
          pl.BlockSpec((None, g, plan.q_pad), lambda j, b, h: (b, h, 0)),
      ] + [_whole(x) for x in tlists + seeds] + [_whole(x) for x in leaves]),
      [pl.BlockSpec((None, None, rows, plan.head_pad), lambda j, b, h: (b, h, j, 0)),
       pl.BlockSpec((None, None, rows, plan.v_pad), lambda j, b, h: (b, h, j, 0))],
      [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      len(inputs), leaves, _operands_of(loads, (KV_COLS,)))
  dk, dv, *d_ops = pl.pallas_call(
      lambda *refs: _dkv_kernel(*refs, spec=spec, loads=loads), name="attnax_flash_dkv",
      **call, **_launch(spec, spec.dkv_warps, spec.dkv_stages))(*inputs, *zeros)
  return dk, dv, tuple(d_ops)


def backward(spec: KernelSpec, q, k, v, do, lse, delta, lists, tlists, leaves, seed=None,
             decisions=None, diff=()):
  """``(dq, dk, dv, d_ops)`` on padded inputs. ``delta`` is ``rowsum(out * dout) - dlse`` (f32);
  ``seed`` the forward's dropout seed when the plan drops; ``decisions`` a threshold forward's
  recorded tiles (int8 ``(B, Hq, nq, nk)``), which both passes skip. ``d_ops``: f32 flat
  cotangents of ``leaves[i]`` for ``i`` in ``diff`` (zeros where the score mod never reads one),
  summed from the dQ pass and the dK/dV pass (each takes the loads it owns: ``_load_kind``)."""
  loads = score_loads(spec.plan, leaves, diff, spec.dq_rows, spec.dq_cols) if diff else ()
  dq, dq_ops = backward_dq(spec, q, k, v, do, lse, delta, lists, leaves, seed, decisions, loads)
  dk, dv, dkv_ops = backward_dkv(spec, q, k, v, do, lse, delta, tlists, leaves, seed, decisions,
                                 loads)
  got = dict(zip(_operands_of(loads, (SCALAR, Q_ROWS, TILE)), dq_ops))
  for i, d in zip(_operands_of(loads, (KV_COLS,)), dkv_ops):
    got[i] = got[i] + d if i in got else d
  d_ops = tuple(got.get(i, jnp.zeros(leaves[i].shape, f32)) for i in diff)
  return dq, dk, dv, d_ops
