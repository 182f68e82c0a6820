"""pallas_flash_attention: checks -> backend-neutral plan -> a registered lowering -> one custom_vjp.

One call flows: :func:`~attnax.kernels.pallas.plan.build_plan` (checks, mods split into score and
mask parts with their operands, the BlockMask schedule in both directions, padding) -> the backend
registry (:data:`LOWERINGS`; ``backend="auto"`` falls through :data:`AUTO_ORDER` and says why each
lowering was passed over) -> the lowering's forward and backward of the plan, under one
``jax.custom_vjp``.

GQA (Triton lowering): forward and dQ programs are per query head and read kv head ``h // G``
through their BlockSpec index map (no repeated copy of K/V). The dK/dV program of a kv head loops
over the G query heads of its group and accumulates dK/dV in registers. A caller's BlockMask with
``H' = Hq`` is used exactly, ``H' = Hkv`` is shared by the group, ``H' = 1`` by all heads.

Dropout: the rate is static (a plan flag, ``FlashPlan.dropout_rate``; a lowering whose
``supports_dropout`` is False refuses such plans, and ``backend="auto"`` passes it over), the seed
is a traced plan array (``PlanArrays.dropout_seed``) that forward and backward kernels regenerate the
mask from.

Gradients: q, k, v (and ``lse`` as an output) from the lowering's backward kernels; the mods'
floating-point operands (bias tables, ALiBi slopes, gates), when they are differentiated, from the
backward kernels too: the Triton lowering's differentiate the mods through their recorded loads
(:class:`attnax.kernels.operands.LoadTape`) and add each load's cotangent into an f32 accumulator;
the Mosaic backward's kernels replay their loads under a vjp and add each load's cotangent
(summed along the tile's rows, or a table's tile itself) by TMA reductions; integer operands
(ids) get none.

Threshold skipping (:func:`threshold_attention`, behind
:func:`attnax.kernels.threshold_sparse_attention`): a plan flag like dropout's
(``FlashPlan.softmax_threshold``; a lowering whose ``supports_threshold`` is False refuses it).
The forward also returns its tile decisions; the custom_vjp keeps them as a residual
(``PlanArrays.decisions``) and every backward pass replays them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from attnax.kernels import _checks, tiles
from attnax.kernels import operands as ops_lib
from attnax.kernels.pallas import mosaic_gpu as mg
from attnax.kernels.pallas import triton as tk
from attnax.kernels.pallas.plan import FlashPlan, PlanArrays, build_plan, pad_to, pow2
from attnax.kernels.pallas.triton import TritonConfig

__all__ = [
    "pallas_flash_attention", "pallas_flash_attention_fwd", "pallas_flash_attention_bwd",
    "not_supported_reasons", "BACKENDS", "LOWERINGS", "AUTO_ORDER", "Lowering",
]


# ----------------------------------------------------------------------------- lowerings


@dataclasses.dataclass(frozen=True)
class Lowering:
  """A registered lowering of the plan: its config type, defaults, limits, forward and backward.

  This base is the Triton lowering (compiled, or run by the Pallas interpreter); other lowerings
  subclass it and override what differs.
  """
  name: str
  interpret: bool = False
  config_type: type = TritonConfig
  supports_dropout: bool = True   # its kernels regenerate the dropout mask (plan.dropout_rate)
  supports_threshold: bool = True   # its forward skips and records tiles (plan.softmax_threshold)

  def not_supported_reasons(self, q, k, v) -> list[str]:
    """Why these inputs cannot run here (dtype, head dims, device)."""
    return tk.not_supported_reasons(q, k, v, interpret=self.interpret)

  def option_reasons(self, config, num_warps, num_stages) -> list[str]:
    """Why the caller's knobs do not apply to this lowering."""
    if config is not None and not isinstance(config, self.config_type):
      return [f"config must be a {self.config_type.__name__}, got {type(config).__name__}"]
    return []

  def plan_reasons(self, plan: FlashPlan, cfg) -> list[str]:
    """Why this plan (its tiling, its mods) cannot run here."""
    return []

  def default_config(self, head_pad: int, dtype, masked: bool):
    return tk.default_config(head_pad, interpret=self.interpret, dtype=dtype)

  def kernel_spec(self, plan: FlashPlan, config, num_warps, num_stages):
    return tk.KernelSpec.resolve(plan, config, interpret=self.interpret, num_warps=num_warps,
                                 num_stages=num_stages)

  def forward(self, spec, q, k, v, arrays: PlanArrays, out_dtype=None):
    return tk.forward(spec, q, k, v, arrays.lists, _flat(arrays.operands),
                      seed=arrays.dropout_seed, out_dtype=out_dtype)

  def backward(self, spec, q, k, v, do, lse, delta, arrays: PlanArrays, diff=()):
    """``(dq, dk, dv, d_ops)``: ``d_ops`` the f32 flat cotangents of the operands in ``diff``."""
    return tk.backward(spec, q, k, v, do, lse, delta, arrays.lists, arrays.tlists,
                       _flat(arrays.operands), seed=arrays.dropout_seed,
                       decisions=arrays.decisions, diff=diff)


@dataclasses.dataclass(frozen=True)
class MosaicLowering(Lowering):
  """The Mosaic GPU (sm90) forward and backward; plans the Mosaic backward cannot run take the
  Triton lowering's backward on the same plan (``mg.backward_reasons``)."""
  config_type: type = mg.MosaicConfig
  supports_dropout: bool = False   # its forward has no dropout mask yet
  supports_threshold: bool = False   # its forward does not skip tiles by threshold

  def not_supported_reasons(self, q, k, v) -> list[str]:
    return mg.not_supported_reasons(q, k, v)

  def option_reasons(self, config, num_warps, num_stages) -> list[str]:
    reasons = super().option_reasons(config, num_warps, num_stages)
    if num_warps is not None:
      reasons.append("num_warps is a Triton launch knob (the Mosaic kernel runs 3 warpgroups)")
    return reasons

  def plan_reasons(self, plan: FlashPlan, cfg) -> list[str]:
    return mg.plan_reasons(plan, cfg)

  def default_config(self, head_pad: int, dtype, masked: bool):
    return mg.default_config(head_pad, dtype, masked=masked)

  def kernel_spec(self, plan: FlashPlan, config, num_warps, num_stages):
    return mg.kernel_spec(plan, config, num_stages)

  def forward(self, spec, q, k, v, arrays: PlanArrays, out_dtype=None):
    return mg.forward(spec, q, k, v, arrays, out_dtype)

  def backward(self, spec, q, k, v, do, lse, delta, arrays: PlanArrays, diff=()):
    # (What the differentiated mod operands need is known only here; with bwd="mosaic" a call
    # the Mosaic backward cannot run raises there.)
    if spec.mosaic_backward and (spec.bwd_required or not mg.cotangent_reasons(spec, diff)):
      return mg.backward(spec, q, k, v, do, lse, delta, arrays, diff)
    return LOWERINGS["triton"].backward(spec.backward, q, k, v, do, lse, delta, arrays, diff)


def _flat(operands):
  return ops_lib.ModOperands.kernel_operands(operands)


LOWERINGS = {"mosaic": MosaicLowering("mosaic"),
             "triton": Lowering("triton"),
             "interpret": Lowering("interpret", interpret=True)}
AUTO_ORDER = ("mosaic", "triton", "interpret")
BACKENDS = ("auto",) + tuple(LOWERINGS)


def not_supported_reasons(backend: str, q: Any, k: Any, v: Any) -> list[str]:
  """Why ``backend`` cannot run these inputs (empty when it can); xFormers' not_supported_reasons.

  These are the reasons that the inputs alone decide (dtype, head dims, device). A lowering may
  also refuse a plan (its tiling or its mods): the call's ValueError then lists those reasons.
  """
  if backend not in LOWERINGS:
    return [f"unknown backend {backend!r}; choose one of {BACKENDS}"]
  return LOWERINGS[backend].not_supported_reasons(q, k, v)


def _dropout_reasons(lowering: Lowering, plan: FlashPlan) -> list[str]:
  if plan.dropout_rate and not getattr(lowering, "supports_dropout", False):
    return [f"attention dropout (dropout_rate={plan.dropout_rate}) is not implemented in the "
            f"{lowering.name!r} lowering"]
  return []


def _threshold_reasons(lowering: Lowering, plan: FlashPlan) -> list[str]:
  if plan.softmax_threshold is not None and not getattr(lowering, "supports_threshold", False):
    return [f"threshold skipping (softmax_threshold={plan.softmax_threshold}) is not implemented "
            f"in the {lowering.name!r} lowering"]
  return []


def _plan(q, k, v, *, score_mod, mask_mod, scale, block_q, block_k, block_mask, softcap,
          cu_seqlens_q, cu_seqlens_k, backend, num_warps, num_stages, config,
          dropout_rate=0.0, dropout_seed=None, softmax_threshold=None, threshold_rule="tile"):
  """``(lowering, kernel spec, plan arrays, padded q, k, v)`` for one call.

  ``backend="auto"`` tries the lowerings of :data:`AUTO_ORDER` in turn: the first whose inputs,
  knobs and plan it supports runs; the error lists why each was passed over.
  """
  _checks.check_qkv(q, k, v, kernel="pallas_flash_attention")
  if backend != "auto" and backend not in LOWERINGS:
    raise ValueError(f"pallas_flash_attention: unknown backend {backend!r}; choose one of "
                     f"{BACKENDS}")
  head_pad = max(16, pow2(max(q.shape[-1], v.shape[-1])))
  # Whether the plan will have partial tiles (a lowering may tune for it); a score mod may carry a
  # mask, so it counts. (softcap= is a score mod without one.)
  masked = any(x is not None for x in (score_mod, mask_mod, block_mask, cu_seqlens_q,
                                       cu_seqlens_k))
  passed = []
  for name in (AUTO_ORDER if backend == "auto" else (backend,)):
    lowering = LOWERINGS[name]
    reasons = (lowering.not_supported_reasons(q, k, v)
               + lowering.option_reasons(config, num_warps, num_stages))
    if not reasons:
      cfg = config if config is not None else lowering.default_config(head_pad, q.dtype, masked)
      plan, arrays, qp, kp, vp = build_plan(
          q, k, v, score_mod=score_mod, mask_mod=mask_mod, scale=scale, block_q=block_q,
          block_k=block_k, block_mask=block_mask, softcap=softcap, cu_seqlens_q=cu_seqlens_q,
          cu_seqlens_k=cu_seqlens_k, default_block_q=cfg.block_q, default_block_k=cfg.block_k,
          dropout_rate=dropout_rate, dropout_seed=dropout_seed,
          softmax_threshold=softmax_threshold, threshold_rule=threshold_rule)
      reasons = (lowering.plan_reasons(plan, cfg) + _dropout_reasons(lowering, plan)
                 + _threshold_reasons(lowering, plan))
      if not reasons:
        return lowering, lowering.kernel_spec(plan, cfg, num_warps, num_stages), arrays, qp, kp, vp
    passed.append((name, "; ".join(reasons)))
  if backend == "auto":
    raise ValueError("pallas_flash_attention: no backend can run these inputs:\n  - "
                     + "\n  - ".join(f"{name}: {why}" for name, why in passed))
  raise ValueError(f"pallas_flash_attention: backend {backend!r} cannot run these inputs:\n  - "
                   + passed[0][1])


# ----------------------------------------------------------------------------- custom_vjp


def _backward(lowering, spec, diff, q, k, v, out, lse, dout, dlse, arrays):
  """``(dq, dk, dv, operand cotangents for diff)`` on padded inputs."""
  plan = spec.plan
  delta = tiles.backward_delta(out, dout, lse, dlse)
  dq, dk, dv, d_flat = lowering.backward(spec, q, k, v, dout.astype(q.dtype), lse, delta, arrays,
                                         diff)
  d_ops = tuple(d.reshape(jnp.shape(arrays.operands[i])) for i, d in zip(diff, d_flat))
  return dq, dk, dv, d_ops


def _attention_vjp(lowering: Lowering, spec: tk.KernelSpec):
  """The custom_vjp of one (lowering, spec): ``f(q, k, v, operands, schedule) -> (out, lse)``.

  ``symbolic_zeros=True`` tells the forward rule which float operands are differentiated; only
  those get cotangents in the backward kernels. A threshold plan's ``f`` returns
  ``(out, lse, decisions)``; the decisions (no gradient) go to the backward in the schedule.
  """
  float_mask = spec.plan.mods.float_mask

  def forward(q, k, v, operands, schedule, out_dtype=None):
    return lowering.forward(spec, q, k, v, dataclasses.replace(schedule, operands=operands),
                            out_dtype)

  @jax.custom_vjp
  def attn(q, k, v, operands, schedule):
    return forward(q, k, v, operands, schedule)

  def fwd(q, k, v, operands, schedule):
    q, k, v, schedule = ops_lib.primal_values((q, k, v, schedule))
    operands, marks = ops_lib.differentiated(operands, float_mask)
    res = forward(q, k, v, operands, schedule,
                  tiles.residual_out_dtype(q.dtype, bool(ops_lib.marked(marks))))
    out, lse = res[:2]
    if len(res) > 2:   # threshold decisions: replayed by the backward
      schedule = dataclasses.replace(schedule, decisions=res[2])
    return (out.astype(q.dtype),) + res[1:], (q, k, v, operands, schedule, out, lse, marks)

  def bwd(res, cts):
    q, k, v, operands, schedule, out, lse, marks = res
    diff = ops_lib.marked(marks)
    dout, dlse = map(ops_lib.cotangent_or_none, cts[:2])
    dout = jnp.zeros(out.shape, q.dtype) if dout is None else dout
    arrays = dataclasses.replace(schedule, operands=operands)
    dq, dk, dv, d_ops = _backward(lowering, spec, diff, q, k, v, out, lse, dout, dlse, arrays)
    return dq, dk, dv, ops_lib.operand_cotangents(operands, diff, d_ops), None

  attn.defvjp(fwd, bwd, symbolic_zeros=True)
  return attn


# ----------------------------------------------------------------------------- public API

_DOC_ARGS = """
  Args:
    q: ``(B, Hq, Sq, D)``; k: ``(B, Hkv, Sk, D)``; v: ``(B, Hkv, Sk, Dv)``; ``Hq % Hkv == 0``
      (GQA: query head ``h`` reads kv head ``h // (Hq // Hkv)``; K/V are never repeated). Any
      ``Sq``, ``Sk`` (ragged tails are masked); head dims up to 256 (zero-padded to a power of two);
      f32, bf16 or f16.
    score_mod: a ScoreMod, evaluated in-kernel on every visited tile. Mods that carry arrays
      (document ids, ALiBi slopes, bias tables) must be pytrees (every attnax mod is): their arrays
      enter the kernels as operands. The mask part of a composed mod drives block skipping.
      Closures over arrays (``lambda b, h, i, j: ids[i] == ids[j]``) work too: the arrays they
      capture become operands the same way. Floating-point arrays (bias tables, slopes, gates)
      get their true gradient, computed only when they are differentiated.
    mask_mod: a MaskMod (True = may attend), combined with the score mod's mask part.
    scale: ``None`` = ``D ** -0.5``.
    block_q, block_k: the BlockMask tiling (powers of two >= 16); default per head dim.
    block_mask: a precomputed :class:`~attnax.kernels.BlockMask` (e.g. from the AETHER planner);
      leading axes ``(B' in {1, B}, H' in {1, Hkv, Hq})``. Tiles it marks EMPTY are skipped, FULL
      tiles skip the elementwise mask; forward and backward run this same schedule.
    softcap: shorthand for ``compose_score_mods(softcap_mod(softcap), score_mod)``: the logit
      soft-cap ``softcap * tanh(s / softcap)`` on the scaled scores, before the other mods.
    cu_seqlens_q, cu_seqlens_k: packed variable-length sequences (``(n + 1,)`` offsets along the
      sequence axis): each query attends within its own sequence (a document mask with block
      skipping); ``cu_seqlens_k`` defaults to ``cu_seqlens_q``.
    backend: ``"auto"`` (the first lowering of :data:`AUTO_ORDER` that supports the inputs: the
      Triton lowering on a GPU, the Pallas interpreter elsewhere), ``"triton"`` or
      ``"interpret"``; a backend that cannot run the inputs raises ValueError listing the reasons.
    num_warps, num_stages: override the Triton launch knobs of every pass.
    config: the lowering's config (:class:`~attnax.kernels.pallas.triton.TritonConfig` for
      ``"triton"`` and ``"interpret"``): default tiling and launch knobs of each pass.
    dropout_rate: attention-weight dropout (static float in ``[0, 1)``): probabilities are dropped
      in-kernel and the kept ones scaled by ``1 / (1 - dropout_rate)``; the LSE is that of the
      undropped softmax. The backward kernels regenerate the mask (nothing is stored). Lowerings
      without dropout (Mosaic, for now) are passed over by ``"auto"``.
    dropout_rng: a PRNG key or an integer seed (may be traced: no recompile per step); the same
      key drops exactly the weights ``standard_attention`` and ``flash_attention`` drop with it.

  float64 inputs raise ValueError (the Pallas kernels run f32 at most; the pure-JAX kernels run
  float64).
"""


def _attention(q, k, v, tree, options):
  score_mod, mask_mod, block_mask, cu_q, cu_k, seed = tree
  lowering, spec, arrays, qp, kp, vp = _plan(
      q, k, v, score_mod=score_mod, mask_mod=mask_mod, block_mask=block_mask, cu_seqlens_q=cu_q,
      cu_seqlens_k=cu_k, dropout_seed=seed, **dict(options))
  schedule = dataclasses.replace(arrays, operands=())
  out, lse, *decisions = _attention_vjp(lowering, spec)(qp, kp, vp, arrays.operands, schedule)
  plan = spec.plan
  return (out[:, :, :plan.q_len, :plan.v_dim], lse[:, :, :plan.q_len]) + tuple(decisions)


def _attention_static(key, options, q, k, v, arrays):
  return _attention(q, k, v, ops_lib.join_static(key, arrays), options)


_attention_jit = jax.jit(_attention_static, static_argnums=(0, 1))


def pallas_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, score_mod: Any = None,
                           mask_mod: Any = None, scale: float | None = None,
                           return_lse: bool = False, block_q: int | None = None,
                           block_k: int | None = None, block_mask: Any = None,
                           softcap: float | None = None, cu_seqlens_q: Any = None,
                           cu_seqlens_k: Any = None, backend: str = "auto",
                           num_warps: int | None = None, num_stages: int | None = None,
                           config: Any = None, dropout_rate: float = 0.0,
                           dropout_rng: Any = None) -> Any:
  # Checked before the internal jit, so a list or a float64 numpy array gets attnax's ValueError
  # (not a tracer error, and no silent cast).
  _checks.check_qkv(q, k, v, kernel="pallas_flash_attention")
  rate, seed = _checks.check_dropout(dropout_rate, dropout_rng, kernel="pallas_flash_attention")
  options = (("scale", scale), ("block_q", block_q), ("block_k", block_k), ("softcap", softcap),
             ("backend", backend), ("num_warps", num_warps), ("num_stages", num_stages),
             ("config", config), ("dropout_rate", rate))
  tree = (score_mod, mask_mod, block_mask, cu_seqlens_q, cu_seqlens_k, seed)
  out, lse = _call(q, k, v, tree, options)
  return (out, lse) if return_lse else out


def _call(q, k, v, tree, options):
  """:func:`_attention`, compiled once per static key when the mods and options are hashable."""
  key, arrays = ops_lib.split_static(tree)
  try:
    hash(options)
  except TypeError:
    key = None
  if key is None:   # unhashable static parts: trace every call
    return _attention(q, k, v, tree, options)
  return _attention_jit(key, options, q, k, v, arrays)


def threshold_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, softmax_threshold: float,
                        threshold_rule: str = "tile", score_mod: Any = None, mask_mod: Any = None,
                        scale: float | None = None, block_q: int | None = None,
                        block_k: int | None = None, backend: str = "auto",
                        num_warps: int | None = None, num_stages: int | None = None,
                        config: Any = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Threshold-sparse forward and backward on the Pallas lowerings: ``(out, lse, decisions)``.

  The kernel behind :func:`attnax.kernels.threshold_sparse_attention` (which checks the threshold
  and documents the rule); ``decisions`` are int8 ``(B, Hq, nq, nk)`` codes
  (:data:`attnax.kernels.tiles.TILE_SKIPPED` etc.) on the plan's ``(block_q, block_k)`` tiling.
  Other arguments as :func:`pallas_flash_attention`; ``"auto"`` passes over the lowerings that do
  not skip (Mosaic GPU, for now).
  """
  _checks.check_qkv(q, k, v, kernel="pallas_flash_attention")
  options = (("scale", scale), ("block_q", block_q), ("block_k", block_k), ("softcap", None),
             ("backend", backend), ("num_warps", num_warps), ("num_stages", num_stages),
             ("config", config), ("softmax_threshold", float(softmax_threshold)),
             ("threshold_rule", threshold_rule))
  return _call(q, k, v, (score_mod, mask_mod, None, None, None, None), options)


pallas_flash_attention.__doc__ = (
    """FlashAttention forward and backward as Pallas kernels, with mods fused and block sparsity.

  Forward: online softmax over the visited kv tiles, f32 statistics, LSE out. Backward (via
  ``jax.custom_vjp``): a dQ kernel over the same kv lists and a dK/dV kernel over the transposed
  lists (one program per kv tile and kv head loops over the query heads of its group).
""" + _DOC_ARGS + """
  Returns:
    ``out`` ``(B, Hq, Sq, Dv)`` in q's dtype, or ``(out, lse)`` with lse f32 ``(B, Hq, Sq)``
    (``-inf`` for a query that sees no key; its output and gradients are 0).
""")


def pallas_flash_attention_fwd(q, k, v, **kwargs) -> tuple[jax.Array, jax.Array]:
  """Forward entry point: ``(out, lse)`` (the residuals :func:`pallas_flash_attention_bwd` takes).

  Same arguments as :func:`pallas_flash_attention` (``return_lse`` is implied).
  """
  kwargs.pop("return_lse", None)
  return pallas_flash_attention(q, k, v, return_lse=True, **kwargs)


def pallas_flash_attention_bwd(q, k, v, out, lse, dout, *, dlse=None, score_mod=None,
                               mask_mod=None, scale=None, block_q=None, block_k=None,
                               block_mask=None, softcap=None, cu_seqlens_q=None,
                               cu_seqlens_k=None, backend="auto", num_warps=None,
                               num_stages=None, config=None, dropout_rate=0.0, dropout_rng=None):
  """Backward entry point: ``(dq, dk, dv)`` from the forward's ``out`` and ``lse``.

  ``dout`` is the cotangent of ``out``; ``dlse`` (optional) that of ``lse``. The mods, tiling and
  dropout (rate and key) must be the ones the forward ran with; the backward then visits exactly
  the forward's tiles and regenerates its dropout mask. (Gradients of arrays the mods carry come
  from differentiating :func:`pallas_flash_attention`.)
  """
  rate, seed = _checks.check_dropout(dropout_rate, dropout_rng, kernel="pallas_flash_attention")
  return backward_entry(
      q, k, v, out, lse, dout, dlse, score_mod=score_mod, mask_mod=mask_mod,
      scale=scale, block_q=block_q, block_k=block_k, block_mask=block_mask, softcap=softcap,
      cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, backend=backend,
      num_warps=num_warps, num_stages=num_stages, config=config, dropout_rate=rate,
      dropout_seed=seed)[:3]


# _plan's options at their pallas_flash_attention defaults (what backward_entry's caller omits).
_PLAN_DEFAULTS = dict(score_mod=None, mask_mod=None, scale=None, block_q=None, block_k=None,
                      block_mask=None, softcap=None, cu_seqlens_q=None, cu_seqlens_k=None,
                      backend="auto", num_warps=None, num_stages=None, config=None)


def forward_entry(q, k, v, *, out_dtype=None, **plan_kwargs):
  """``(out, lse)`` of the plan's forward, ``out`` in ``out_dtype`` (default q's; f32 from 16-bit
  inputs: the precise residual of :func:`attnax.kernels.tiles.residual_out_dtype`). Not
  differentiable: a ring step's forward, under the ring's own custom_vjp."""
  lowering, spec, arrays, qp, kp, vp = _plan(q, k, v, **{**_PLAN_DEFAULTS, **plan_kwargs})
  out, lse = _forward_jit(lowering, spec, out_dtype, qp, kp, vp, arrays)[:2]
  plan = spec.plan
  return out[:, :, :plan.q_len, :plan.v_dim], lse[:, :, :plan.q_len]


_forward_jit = jax.jit(lambda lowering, spec, out_dtype, *args: lowering.forward(
    spec, *args, out_dtype=out_dtype), static_argnums=(0, 1, 2))


def backward_entry(q, k, v, out, lse, dout, dlse, *, diff_operands: tuple[int, ...] = (),
                   **plan_kwargs):
  """``(dq, dk, dv, d_operands)`` of the forward that gave ``out``/``lse``, on its plan.

  ``d_operands`` is aligned with the plan's mod operands (the array leaves of ``(score part,
  mask part)`` in pytree order): the f32 cotangent of each floating-point operand whose index is
  in ``diff_operands``, None for the others. A ring step calls it with the final ``out`` and
  ``lse`` to get its share of every gradient.
  """
  lowering, spec, arrays, qp, kp, vp = _plan(q, k, v, **{**_PLAN_DEFAULTS, **plan_kwargs})
  _checks.check_lse(lse, q)
  want = tuple(q.shape[:3]) + (v.shape[-1],)
  for name, x in (("out", out), ("dout", dout)):
    if tuple(x.shape) != want:
      raise ValueError(f"{name} must have shape {want} (B, Hq, Sq, Dv), got {tuple(x.shape)}")
  if dlse is not None:
    _checks.check_lse(dlse, q)
  plan = spec.plan
  shape = (plan.batch, plan.q_heads, plan.q_pad, plan.v_pad)
  outp = pad_to(out.astype(jnp.promote_types(out.dtype, q.dtype)), shape)   # an f32 residual stays
  doutp = pad_to(dout.astype(q.dtype), shape)
  lsep = jnp.pad(lse.astype(jnp.float32), ((0, 0), (0, 0), (0, plan.q_pad - plan.q_len)),
                 constant_values=-jnp.inf)
  dlsep = None if dlse is None else pad_to(dlse.astype(jnp.float32), lsep.shape)
  diff = tuple(sorted(set(diff_operands)))
  bad = [i for i in diff if not (0 <= i < len(arrays.operands)) or not plan.mods.float_mask[i]]
  if bad:
    raise ValueError(f"backward_entry: diff_operands {bad} are not floating-point mod operands "
                     f"(the plan has {len(arrays.operands)})")
  dq, dk, dv, d_ops = _backward_jit(lowering, spec, diff, qp, kp, vp, outp, lsep, doutp, dlsep,
                                    arrays)
  by_index = dict(zip(diff, d_ops))
  d_operands = tuple(by_index.get(i) for i in range(len(arrays.operands)))
  sk = k.shape[2]
  return (dq[:, :, :plan.q_len, :plan.head_dim], dk[:, :, :sk, :plan.head_dim],
          dv[:, :, :sk, :plan.v_dim], d_operands)


_backward_jit = jax.jit(_backward, static_argnums=(0, 1, 2))
