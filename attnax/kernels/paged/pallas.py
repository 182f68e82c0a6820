"""The Pallas backend of ``paged_attention`` (Triton lowering, and its CPU interpreter).

One program per ``(sequence b, kv head, block of packed query rows, split)``. The query block
holds the ``G * Sq`` rows of kv head ``hk`` (its ``G`` query heads times the ``Sq`` new tokens,
:mod:`attnax.kernels.gqa`), so every key and value is loaded once per kv head and serves all of
them. The program walks its split of the sequence's tokens in blocks of ``block_kv`` tokens:

* the block table is read inside the kernel: token ``t`` lives in slot ``t % page_size`` of page
  ``block_tables[b, t // page_size]``, so K/V are loaded straight from the pool (a gather of
  whole rows, ``D`` contiguous elements each): no contiguous copy of the cache is ever made;
* slots at or past ``lengths[b]`` are not loaded at all (masked loads), so whatever they hold
  (another sequence's tokens, NaN) contributes exactly 0;
* scores get the score mod, the causal mask and the mask mod at absolute positions (the shared
  tile maths of :mod:`attnax.kernels.tiles`); int8 pages are dequantised on the fly (the key scale
  multiplies the score column, the value scale the probability column);
* an online softmax accumulates the block into f32 ``(out, lse)`` partials.

Split-K: every row's blocks are divided evenly among ``num_splits`` programs *at run time*, from
its own length (a short row gets short splits; a split with no blocks writes ``out = 0``,
``lse = -inf``). The partials are merged by their LSE in :func:`attnax.kernels.merge_attentions`.

The arrays mods carry enter as whole 1-D operands and the mods are rebuilt around
:class:`~attnax.kernels.operands.RefArray` views (a gather becomes a load), as in
:mod:`attnax.kernels.pallas.triton`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attnax.kernels import _checks, tiles
from attnax.kernels import operands as ops_lib
from attnax.kernels.paged.plan import PagedPlan, row_positions

__all__ = ["PagedConfig", "KernelSpec", "default_config", "not_supported_reasons", "partials"]

f32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))   # a @ b.T


def _pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class PagedConfig:
  """Launch knobs of the Pallas paged kernel (static, hashable).

  Attributes:
    block_kv: tokens per inner step (a power of two >= 16); independent of the page size.
    block_rows: most packed query rows (``G * Sq``) per program, a power of two >= 16; a program
      holds ``max(16, min(block_rows, next_pow2(G * Sq)))`` rows.
    num_splits: split-K programs per (sequence, kv head, row block); None: chosen from the sizes
      so that about ``waves`` programs run per streaming multiprocessor, each with at least
      ``min_split_tokens`` tokens of capacity.
    waves, min_split_tokens: the ``num_splits`` heuristic.
    num_warps, num_stages: Triton's launch knobs (``num_stages``: the software pipeline's depth
      over the token blocks).
  """
  block_kv: int = 64
  block_rows: int = 64
  num_splits: int | None = None
  waves: int = 8
  min_split_tokens: int = 512
  num_warps: int = 4
  num_stages: int = 3


# The interpreter's cost is per grid step and per loop iteration: small blocks, few splits.
INTERPRET_CONFIG = PagedConfig(block_kv=16, block_rows=16, waves=1, min_split_tokens=16)
# int8 pages: the dequantisation between load and matmul wants more bytes in flight per program:
# 128-token blocks, 5 stages (H200, B=32, 16k, bench_paged.py --sweep, 2026-12-03: 2859 GB/s and
# 8.26e4 tokens/s, against 2000 GB/s and 5.78e4 at the previous 64 x 2 stages).
INT8_CONFIG = PagedConfig(block_kv=128, num_stages=5)


def default_config(*, interpret: bool, quantized: bool = False) -> PagedConfig:
  """The default :class:`PagedConfig` (GPU, or the interpreter; int8 pages or not)."""
  if interpret:
    return INTERPRET_CONFIG
  return INT8_CONFIG if quantized else PagedConfig()


@dataclasses.dataclass(frozen=True)
class KernelSpec:
  """A plan with the launch knobs resolved against its sizes."""
  plan: PagedPlan
  block_kv: int
  block_rows: int
  row_blocks: int
  num_splits: int
  num_warps: int
  num_stages: int
  interpret: bool

  @property
  def rows_padded(self) -> int:
    return self.block_rows * self.row_blocks

  @staticmethod
  def resolve(plan: PagedPlan, cfg: PagedConfig, *, interpret: bool,
              pages_per_split: int | None = None) -> "KernelSpec":
    for name in ("block_kv", "block_rows"):
      val = getattr(cfg, name)
      _checks.check_positive_int(f"config.{name}", val)
      if val < 16 or val & (val - 1):
        raise ValueError(f"paged_attention: config.{name} must be a power of two >= 16, got {val}")
    for name in ("waves", "min_split_tokens", "num_warps", "num_stages"):
      _checks.check_positive_int(f"config.{name}", getattr(cfg, name))
    rows = max(16, min(cfg.block_rows, _pow2(plan.rows)))
    row_blocks = -(-plan.rows // rows)
    n_blocks = -(-plan.capacity // cfg.block_kv)
    if pages_per_split is not None:
      splits = -(-plan.pages_per_sequence // pages_per_split)
    elif cfg.num_splits is not None:
      splits = _checks.check_positive_int("config.num_splits", cfg.num_splits)
    else:
      programs = plan.batch * plan.kv_heads * row_blocks
      sms = 1 if interpret else _checks.num_sms()
      want = -(-cfg.waves * sms // programs)
      splits = min(want, -(-plan.capacity // cfg.min_split_tokens))
    splits = max(1, min(splits, n_blocks))
    return KernelSpec(plan=plan, block_kv=cfg.block_kv, block_rows=rows, row_blocks=row_blocks,
                      num_splits=splits, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                      interpret=interpret)


def not_supported_reasons(plan_or_shapes, *, interpret: bool) -> list[str]:
  """Why the compiled Triton kernel (or the interpreter) cannot run a plan (empty when it can).

  ``plan_or_shapes`` is a :class:`PagedPlan` (or anything with ``head_dim``, ``v_dim`` and
  ``dtype``).
  """
  reasons = []
  if jnp.dtype(plan_or_shapes.dtype) == jnp.float64:
    reasons.append("float64 inputs: the Pallas kernel runs float32 at most (backend='jax' runs "
                   "float64)")
  if interpret:
    return reasons
  gpu = _checks.gpu_reasons("the Triton lowering", hint=" (use backend='interpret' to run the "
                            "kernel in the Pallas interpreter)")
  if gpu and jax.default_backend() != "gpu":
    return reasons + gpu
  for name in ("head_dim", "v_dim"):
    d = getattr(plan_or_shapes, name)
    if d < 16 or d & (d - 1) or d > 256:
      reasons.append(f"{name} {d} is not a power of two in [16, 256]")
  return reasons + gpu


# ----------------------------------------------------------------------------- the kernel


def _kernel(len_ref, bt_ref, q_ref, k_ref, v_ref, *rest, spec: KernelSpec):
  plan = spec.plan
  n_scales = 2 if plan.quantized else 0
  scale_refs, rest = rest[:n_scales], rest[n_scales:]
  leaf_refs, (o_ref, lse_ref) = rest[:-2], rest[-2:]
  b, hk, r, s = (pl.program_id(i) for i in range(4))
  rows, bk, ps = spec.block_rows, spec.block_kv, plan.page_size
  length = len_ref[b]

  score_fn, mask_fn = plan.mod_fns([ops_lib.RefArray(ref, shape, dtype)
                                    for ref, (shape, dtype) in zip(leaf_refs, plan.mods.meta)])
  row = r * rows + lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
  h, q_pos = row_positions(row, length, plan.q_len, plan.groups, first_kv_head=hk)
  q = q_ref[...]
  compute_dtype = q.dtype

  # This split's token blocks: the row's blocks divided evenly among the splits.
  n_blocks = lax.div(length + (bk - 1), jnp.int32(bk))
  per_split = lax.div(n_blocks + (spec.num_splits - 1), jnp.int32(spec.num_splits))
  first = s * per_split
  last = jnp.minimum(first + per_split, n_blocks)
  lane = lax.broadcasted_iota(jnp.int32, (bk,), 0)
  d_k = lax.broadcasted_iota(jnp.int32, (1, plan.head_dim), 1)
  d_v = lax.broadcasted_iota(jnp.int32, (1, plan.v_dim), 1)

  def body(t, carry):
    acc, m, l = carry
    tok = t * bk + lane                                   # absolute positions of the block
    valid = tok < length
    page = bt_ref[jnp.minimum(lax.div(tok, jnp.int32(ps)), plan.pages_per_sequence - 1)]
    slot = lax.rem(tok, jnp.int32(ps))
    page2, slot2, valid2 = page[:, None], slot[:, None], valid[:, None]
    # Masked loads: slots past the length are never read (they may hold anything, NaN too).
    k = plgpu.load(k_ref.at[page2, slot2, d_k], mask=valid2, other=0)
    v = plgpu.load(v_ref.at[page2, slot2, d_v], mask=valid2, other=0)
    scale = plan.scale
    if plan.quantized:
      ks_ref, vs_ref = scale_refs
      k_scale = plgpu.load(ks_ref.at[page, slot], mask=valid, other=0)
      v_scale = plgpu.load(vs_ref.at[page, slot], mask=valid, other=0)
      k, v = k.astype(compute_dtype), v.astype(compute_dtype)
      scale = (k_scale * plan.scale)[None, :]
    sc = lax.dot_general(q, k, _NT, preferred_element_type=f32) * scale
    sc, visible = tiles.tile_scores(sc, score_fn=score_fn, mask_fn=mask_fn, b=b, h=h,
                                    q_idx=q_pos, kv_idx=tok[None, :], kv_len=length)
    p, alpha, m, l = tiles.online_softmax_step(sc, visible, m, l)
    if plan.quantized:
      p = p * v_scale[None, :]
    p = tiles.low_precision(p, v.dtype)
    acc = acc * alpha[:, None] + lax.dot(p, v, preferred_element_type=f32)
    return acc, m, l

  m, l = tiles.init_stats((rows,))
  acc = jnp.zeros((rows, plan.v_dim), f32)
  acc, m, l = lax.fori_loop(first, last, body, (acc, m, l))
  out, lse = tiles.finalize(acc, m, l)
  if spec.rows_padded == plan.rows:
    o_ref[...] = out
    lse_ref[...] = lse
  else:   # padding rows are never stored: the merge reads the real rows only
    real = row < plan.rows
    plgpu.store(o_ref, out, mask=real)
    plgpu.store(lse_ref, lse, mask=real[:, 0])


def _whole(x):
  """BlockSpec for a whole operand (lengths, mod arrays)."""
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def partials(spec: KernelSpec, q_rows, k_pages, v_pages, k_scales, v_scales, block_tables,
             lengths, operands):
  """Split-K partials: f32 ``(num_splits, B, Hkv, rows_padded, Dv)`` and lses.

  ``q_rows`` ``(B, Hkv, rows_padded, D)``: the packed query rows, zero-padded to whole blocks.
  """
  plan = spec.plan
  rows = spec.block_rows
  hkv, num_pages, ps, d = k_pages.shape
  dv = v_pages.shape[-1]
  leaves = ops_lib.ModOperands.kernel_operands(operands)
  scales = (k_scales, v_scales) if plan.quantized else ()
  grid = (plan.batch, hkv, spec.row_blocks, spec.num_splits)
  in_specs = [
      _whole(lengths),
      pl.BlockSpec((None, plan.pages_per_sequence), lambda b, h, r, s: (b, 0)),
      pl.BlockSpec((None, None, rows, d), lambda b, h, r, s: (b, h, r, 0)),
      pl.BlockSpec((None, num_pages, ps, d), lambda b, h, r, s: (h, 0, 0, 0)),
      pl.BlockSpec((None, num_pages, ps, dv), lambda b, h, r, s: (h, 0, 0, 0)),
  ] + [pl.BlockSpec((None, num_pages, ps), lambda b, h, r, s: (h, 0, 0)) for _ in scales]
  in_specs += [_whole(x) for x in leaves]
  out_specs = [
      pl.BlockSpec((None, None, None, rows, dv), lambda b, h, r, s: (s, b, h, r, 0)),
      pl.BlockSpec((None, None, None, rows), lambda b, h, r, s: (s, b, h, r)),
  ]
  out_shape = [
      jax.ShapeDtypeStruct((spec.num_splits, plan.batch, hkv, spec.rows_padded, dv), f32),
      jax.ShapeDtypeStruct((spec.num_splits, plan.batch, hkv, spec.rows_padded), f32),
  ]
  params = None if spec.interpret else plgpu.CompilerParams(num_warps=spec.num_warps,
                                                             num_stages=spec.num_stages)
  return pl.pallas_call(
      lambda *refs: _kernel(*refs, spec=spec), grid=grid, in_specs=in_specs,
      out_specs=out_specs, out_shape=out_shape, interpret=spec.interpret,
      compiler_params=params, name="attnax_paged_attention",
  )(lengths, block_tables, q_rows, k_pages, v_pages, *scales, *leaves)
