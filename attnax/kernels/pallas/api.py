"""pallas_flash_attention: checks, plan (BlockMask), backend choice, custom_vjp.

One call flows: ``_checks`` -> mods split into score part and mask part -> plan (a
:class:`~attnax.kernels.BlockMask` from the mask part, a caller's precomputed one, or "dense" when
nothing is masked) -> padding to the tiling -> :mod:`attnax.kernels.pallas.triton` kernels (Triton
lowering on GPU, the Pallas interpreter on CPU) -> ``(out, lse)``.

GQA: forward and dQ programs are per query head and read kv head ``h // G`` through their BlockSpec
index map (no repeated copy of K/V; the G programs of a group read the same K/V tiles, mostly from
L2). The dK/dV program of a kv head loops over the G query heads of its group and accumulates dK/dV
in registers, so no reduction over a repeated copy is needed. Because programs are per query head,
a caller's BlockMask with ``H' = Hq`` is used exactly (each head its own lists; no union over the
group is needed), ``H' = Hkv`` is shared by the group, ``H' = 1`` by all heads.

Gradients: the custom_vjp differentiates q, k, v (and ``lse`` as an output); arrays carried by mods
(bias tables, ALiBi slopes, ids) receive zero cotangents.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from attnax.kernels import _checks
from attnax.kernels import block_mask as bm_lib
from attnax.kernels import score_mods as sm
from attnax.kernels.pallas import triton as tk
from attnax.kernels.pallas import varlen

__all__ = [
    "FlashConfig", "default_config", "pallas_flash_attention", "pallas_flash_attention_fwd",
    "pallas_flash_attention_bwd", "not_supported_reasons", "BACKENDS",
]

BACKENDS = ("auto", "triton", "interpret", "mosaic")
MAX_HEAD_DIM = 256


def _pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class FlashConfig:
  """Tiling and launch knobs (static, hashable).

  ``block_q``/``block_k`` is the BlockMask tiling (the unit of block skipping). Each pass may run
  finer: a program owns ``*_rows`` rows of a tile and walks the other axis in ``*_cols`` chunks;
  every fine size divides its coarse block (``None``: the coarse block). For dK/dV the rows are
  keys and the chunks are queries. ``*_num_warps``/``*_num_stages`` are Triton's launch knobs.
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


def _cfg(fwd, dq, dkv, block=128):
  return FlashConfig(block, block, *fwd, *dq, *dkv)


# Defaults for the Triton lowering on H100, by (padded head dim, bytes per element): forward
# (rows, cols, warps, stages), dQ (rows, cols, warps, stages), dK/dV (rows, cols, warps, stages).
# Measured with benchmarks/tune_pallas.py (bf16, D=128); the others are sized to fit shared memory.
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


def default_config(head_dim: int, *, interpret: bool, dtype: Any = jnp.bfloat16) -> FlashConfig:
  """The default :class:`FlashConfig` for a (padded) head dim, dtype and backend."""
  if interpret:
    # The interpreter's cost is per grid step and per loop iteration: small coarse tiles, no split.
    return FlashConfig(block_q=32, block_k=32)
  d = min(k for k in (32, 64, 128, 256) if k >= min(head_dim, 256))
  size = 4 if jnp.dtype(dtype).itemsize >= 4 else 2
  return _GPU_DEFAULTS[(d, size)]


def _clamp_block(b: int, length: int) -> int:
  return max(16, min(b, _pow2(length)))


# ----------------------------------------------------------------------------- backend choice


def not_supported_reasons(backend: str, q: Any, k: Any, v: Any) -> list[str]:
  """Why ``backend`` cannot run these inputs (empty when it can); xFormers' not_supported_reasons."""
  reasons = []
  if backend not in BACKENDS:
    return [f"unknown backend {backend!r}; choose one of {BACKENDS}"]
  d, dv = q.shape[-1], v.shape[-1]
  if max(d, dv) > MAX_HEAD_DIM:
    reasons.append(f"head_dim {d} / value dim {dv} exceeds {MAX_HEAD_DIM}")
  if backend == "mosaic":
    reasons.append("the Mosaic GPU lowering is not implemented yet; use backend='triton'")
  if backend == "triton":
    platform = jax.default_backend()
    if platform != "gpu":
      reasons.append(f"the Triton lowering needs a CUDA GPU, but jax.default_backend() is "
                     f"{platform!r} (use backend='interpret' or 'auto')")
    else:
      dev = jax.devices()[0]
      cc = getattr(dev, "compute_capability", None)
      try:
        if cc is not None and float(cc) < 8.0:
          reasons.append(f"the Triton kernels need compute capability >= 8.0, device has {cc}")
      except ValueError:
        pass
  return reasons


def _resolve_backend(backend: str, q, k, v) -> str:
  chosen = backend
  if backend == "auto":
    chosen = "triton" if jax.default_backend() == "gpu" else "interpret"
  reasons = not_supported_reasons(chosen, q, k, v)
  if reasons:
    raise ValueError(f"pallas_flash_attention: backend {backend!r}"
                     + (f" (resolved to {chosen!r})" if chosen != backend else "")
                     + " cannot run these inputs:\n  - " + "\n  - ".join(reasons))
  return chosen


# ----------------------------------------------------------------------------- plan


def _unit_grad(score_fn: Any) -> bool:
  """True when the score part only adds to scores (its derivative is 1): the backward skips jvp."""
  if score_fn is None:
    return True
  if isinstance(score_fn, sm.ComposedScoreMod):
    return all(_unit_grad(m) for m in score_fn.mods)
  return isinstance(score_fn, (sm.AlibiMod, sm.AdditiveBiasMod, sm.MaskScoreMod))


def _fix_block_mask(block_mask: bm_lib.BlockMask, *, batch, q_heads, kv_heads, q_len, kv_len):
  """Validate a caller's BlockMask; ragged-tail tiles marked FULL become PARTIAL."""
  if not isinstance(block_mask, bm_lib.BlockMask):
    raise ValueError(f"block_mask must be an attnax BlockMask, got {type(block_mask).__name__}")
  bq, bk = block_mask.block_q, block_mask.block_k
  nq, nk = -(-q_len // bq), -(-kv_len // bk)
  b_, h_, nq_, nk_ = block_mask.tiles.shape
  if (nq_, nk_) != (nq, nk):
    raise ValueError(f"block_mask has {nq_}x{nk_} tiles of {bq}x{bk}, but Sq={q_len}, Sk={kv_len} "
                     f"need {nq}x{nk}")
  if b_ not in (1, batch):
    raise ValueError(f"block_mask batch axis {b_} must be 1 or {batch}")
  if h_ not in (1, kv_heads, q_heads):
    raise ValueError(f"block_mask head axis {h_} must be 1, Hkv={kv_heads} or Hq={q_heads}")
  for name in ("bq", "bk"):
    val = bq if name == "bq" else bk
    if val < 16 or val & (val - 1):
      raise ValueError(f"block_mask tiles must be powers of two >= 16, got {bq}x{bk}")
  if q_len % bq or kv_len % bk:
    ragged = np.zeros((nq, nk), bool)
    if q_len % bq:
      ragged[-1, :] = True
    if kv_len % bk:
      ragged[:, -1] = True
    tiles = jnp.where(ragged & (block_mask.tiles == bm_lib.FULL), bm_lib.PARTIAL, block_mask.tiles)
    block_mask = bm_lib.BlockMask.from_tiles(tiles, block_q=bq, block_k=bk, q_len=q_len,
                                             kv_len=kv_len)
  return block_mask


class _Plan(NamedTuple):
  spec: tk.KernelSpec
  q: jax.Array
  k: jax.Array
  v: jax.Array
  lists: tuple
  tlists: tuple
  leaves: tuple
  q_len: int
  v_dim: int


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


def _pad_to(x, axis_sizes):
  pads = [(0, s - d) for d, s in zip(x.shape, axis_sizes)]
  return x if all(p == (0, 0) for p in pads) else jnp.pad(x, pads)


def _plan(q, k, v, *, score_mod, mask_mod, scale, block_q, block_k, block_mask, softcap,
          cu_seqlens_q, cu_seqlens_k, backend, num_warps, num_stages, config) -> _Plan:
  b, hq, hkv, sq, sk, d, dv = _checks.check_qkv(q, k, v, kernel="pallas_flash_attention")
  scale = _checks.default_scale(scale, d)
  score_fn, mask_fn = sm.resolve_mods(score_mod, mask_mod, batch=b, heads=hq, q_len=sq, kv_len=sk)
  if cu_seqlens_q is not None or cu_seqlens_k is not None:
    cu_q = cu_seqlens_q if cu_seqlens_q is not None else cu_seqlens_k
    mask_fn = sm.and_masks(mask_fn, varlen.varlen_mask_mod(cu_q, cu_seqlens_k, q_len=sq,
                                                           kv_len=sk))
  chosen = _resolve_backend(backend, q, k, v)
  interpret = chosen == "interpret"
  if softcap is not None:
    try:
      softcap = float(softcap)
    except TypeError:
      raise ValueError(f"softcap must be a positive Python float, got {softcap!r}") from None
    if not softcap > 0:
      raise ValueError(f"softcap must be > 0, got {softcap}")

  d_pad, dv_pad = max(16, _pow2(d)), max(16, _pow2(dv))
  cfg = config if config is not None else default_config(max(d_pad, dv_pad), interpret=interpret,
                                                         dtype=q.dtype)
  if not isinstance(cfg, FlashConfig):
    raise ValueError(f"config must be a FlashConfig, got {type(cfg).__name__}")
  if block_mask is not None:
    block_mask = _fix_block_mask(block_mask, batch=b, q_heads=hq, kv_heads=hkv, q_len=sq,
                                 kv_len=sk)
    for name, given, have in (("block_q", block_q, block_mask.block_q),
                              ("block_k", block_k, block_mask.block_k)):
      if given is not None and given != have:
        raise ValueError(f"{name}={given} disagrees with block_mask.{name}={have}")
    bq, bk = block_mask.block_q, block_mask.block_k
  else:
    bq = _checks.check_block("block_q", block_q) if block_q is not None else cfg.block_q
    bk = _checks.check_block("block_k", block_k) if block_k is not None else cfg.block_k
    for name, val in (("block_q", bq), ("block_k", bk)):
      if val < 16 or val & (val - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {val}")
    bq, bk = _clamp_block(bq, sq), _clamp_block(bk, sk)

  def fine(val, coarse, name):
    val = coarse if val is None else min(val, coarse)
    if coarse % val or val < 16:
      raise ValueError(f"config.{name}={val} must be >= 16 and divide its block ({coarse})")
    return val

  warps = lambda w: num_warps if num_warps is not None else w
  stages = lambda st: num_stages if num_stages is not None else st

  dense = mask_fn is None and block_mask is None
  if dense:
    lists = tlists = tuple(jnp.zeros((1,), jnp.int32) for _ in range(tk.NUM_LISTS))
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

  mods, leaves = tk.split_mods(score_fn, mask_fn)
  q_pad, kv_pad = -(-sq // bq) * bq, -(-sk // bk) * bk
  spec = tk.KernelSpec(
      batch=b, q_heads=hq, kv_heads=hkv, q_len=sq, kv_len=sk, q_pad=q_pad, kv_pad=kv_pad,
      head_dim=d_pad, v_dim=dv_pad, scale=scale, softcap=softcap, block_q=bq, block_k=bk,
      bm_batch=int(bm_batch), bm_heads=int(bm_heads), dense=dense,
      fwd_rows=fine(cfg.fwd_rows, bq, "fwd_rows"), fwd_cols=fine(cfg.fwd_cols, bk, "fwd_cols"),
      fwd_warps=warps(cfg.fwd_num_warps), fwd_stages=stages(cfg.fwd_num_stages),
      dq_rows=fine(cfg.dq_rows, bq, "dq_rows"), dq_cols=fine(cfg.dq_cols, bk, "dq_cols"),
      dkv_rows=fine(cfg.dkv_rows, bk, "dkv_rows"), dkv_cols=fine(cfg.dkv_cols, bq, "dkv_cols"),
      dq_warps=warps(cfg.dq_num_warps), dq_stages=stages(cfg.dq_num_stages),
      dkv_warps=warps(cfg.dkv_num_warps), dkv_stages=stages(cfg.dkv_num_stages),
      dkv_transposed=cfg.dkv_transposed, mods=mods, unit_grad=softcap is None and
      _unit_grad(score_fn), interpret=interpret)
  qp = _pad_to(q, (b, hq, q_pad, d_pad))
  kp = _pad_to(k, (b, hkv, kv_pad, d_pad))
  vp = _pad_to(v, (b, hkv, kv_pad, dv_pad))
  return _Plan(spec, qp, kp, vp, lists, tlists, leaves, sq, dv)


# ----------------------------------------------------------------------------- custom_vjp


def _zero_cotangent(x):
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)


def _backward(spec, q, k, v, out, lse, dout, dlse, lists, tlists, leaves):
  delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1)
  if dlse is not None:
    delta = delta - jnp.where(jnp.isfinite(lse), dlse.astype(jnp.float32), 0.0)
  return tk.backward(spec, q, k, v, dout.astype(q.dtype), lse, delta, lists, tlists, leaves)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(spec, q, k, v, lists, tlists, leaves):
  return tk.forward(spec, q, k, v, lists, leaves)


def _flash_fwd(spec, q, k, v, lists, tlists, leaves):
  out, lse = tk.forward(spec, q, k, v, lists, leaves)
  return (out, lse), (q, k, v, lists, tlists, leaves, out, lse)


def _flash_bwd(spec, res, cts):
  q, k, v, lists, tlists, leaves, out, lse = res
  dout, dlse = cts
  dq, dk, dv = _backward(spec, q, k, v, out, lse, dout, dlse, lists, tlists, leaves)
  zeros = lambda t: jax.tree.map(_zero_cotangent, t)
  return dq, dk, dv, zeros(lists), zeros(tlists), zeros(leaves)


_flash.defvjp(_flash_fwd, _flash_bwd)
_backward_jit = jax.jit(_backward, static_argnums=(0,))


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
      Gradients flow to q, k, v only, not to arrays a mod carries.
    mask_mod: a MaskMod (True = may attend), combined with the score mod's mask part.
    scale: ``None`` = ``D ** -0.5``.
    block_q, block_k: the BlockMask tiling (powers of two >= 16); default per head dim.
    block_mask: a precomputed :class:`~attnax.kernels.BlockMask` (e.g. from the AETHER planner);
      leading axes ``(B' in {1, B}, H' in {1, Hkv, Hq})``. Tiles it marks EMPTY are skipped, FULL
      tiles skip the elementwise mask; forward and backward run this same schedule.
    softcap: logit soft-cap ``softcap * tanh(s / softcap)`` on the scaled scores, before the mods.
    cu_seqlens_q, cu_seqlens_k: packed variable-length sequences (``(n + 1,)`` offsets along the
      sequence axis): each query attends within its own sequence (a document mask with block
      skipping); ``cu_seqlens_k`` defaults to ``cu_seqlens_q``.
    backend: ``"auto"`` (Triton lowering on a GPU, the Pallas interpreter on CPU), ``"triton"``,
      ``"interpret"`` or ``"mosaic"``; a backend that cannot run the inputs raises ValueError
      listing the reasons.
    num_warps, num_stages: override the Triton launch knobs of every pass.
    config: a :class:`FlashConfig` (tiling and launch knobs of each pass).
"""


def _split_static(tree):
  """Flatten ``tree`` into a hashable static key and its array leaves (None key: not hashable)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  is_arr = tuple(tk._is_array_leaf(x) for x in leaves)
  static = tuple(None if a else x for x, a in zip(leaves, is_arr))
  arrays = tuple(x for x, a in zip(leaves, is_arr) if a)
  try:
    hash((treedef, static))
  except TypeError:
    return None, arrays
  return (treedef, static, is_arr), arrays


def _join_static(key, arrays):
  treedef, static, is_arr = key
  it = iter(arrays)
  return jax.tree_util.tree_unflatten(treedef, [next(it) if a else x
                                                for x, a in zip(static, is_arr)])


def _attention(q, k, v, tree, options):
  score_mod, mask_mod, block_mask, cu_q, cu_k = tree
  plan = _plan(q, k, v, score_mod=score_mod, mask_mod=mask_mod, block_mask=block_mask,
               cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **dict(options))
  out, lse = _flash(plan.spec, plan.q, plan.k, plan.v, plan.lists, plan.tlists, plan.leaves)
  return out[:, :, :plan.q_len, :plan.v_dim], lse[:, :, :plan.q_len]


def _attention_static(key, options, q, k, v, arrays):
  return _attention(q, k, v, _join_static(key, arrays), options)


_attention_jit = jax.jit(_attention_static, static_argnums=(0, 1))


def pallas_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, score_mod: Any = None,
                           mask_mod: Any = None, scale: float | None = None,
                           return_lse: bool = False, block_q: int | None = None,
                           block_k: int | None = None, block_mask: Any = None,
                           softcap: float | None = None, cu_seqlens_q: Any = None,
                           cu_seqlens_k: Any = None, backend: str = "auto",
                           num_warps: int | None = None, num_stages: int | None = None,
                           config: FlashConfig | None = None) -> Any:
  options = (("scale", scale), ("block_q", block_q), ("block_k", block_k), ("softcap", softcap),
             ("backend", backend), ("num_warps", num_warps), ("num_stages", num_stages),
             ("config", config))
  tree = (score_mod, mask_mod, block_mask, cu_seqlens_q, cu_seqlens_k)
  key, arrays = _split_static(tree)
  try:
    hash(options)
  except TypeError:
    key = None
  if key is None:   # unhashable static parts: trace every call
    out, lse = _attention(q, k, v, tree, options)
  else:
    out, lse = _attention_jit(key, options, q, k, v, arrays)
  return (out, lse) if return_lse else out


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
                               num_stages=None, config=None):
  """Backward entry point: ``(dq, dk, dv)`` from the forward's ``out`` and ``lse``.

  ``dout`` is the cotangent of ``out``; ``dlse`` (optional) that of ``lse``. The mods and tiling
  must be the ones the forward ran with; the backward then visits exactly the forward's tiles.
  """
  plan = _plan(q, k, v, score_mod=score_mod, mask_mod=mask_mod, scale=scale, block_q=block_q,
               block_k=block_k, block_mask=block_mask, softcap=softcap,
               cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, backend=backend,
               num_warps=num_warps, num_stages=num_stages, config=config)
  _checks.check_lse(lse, q)
  want = tuple(q.shape[:3]) + (v.shape[-1],)
  for name, x in (("out", out), ("dout", dout)):
    if tuple(x.shape) != want:
      raise ValueError(f"{name} must have shape {want} (B, Hq, Sq, Dv), got {tuple(x.shape)}")
  if dlse is not None:
    _checks.check_lse(dlse, q)
  spec = plan.spec
  shape = (spec.batch, spec.q_heads, spec.q_pad, spec.v_dim)
  outp = _pad_to(out.astype(q.dtype), shape)
  doutp = _pad_to(dout.astype(q.dtype), shape)
  lsep = jnp.pad(lse.astype(jnp.float32), ((0, 0), (0, 0), (0, spec.q_pad - plan.q_len)),
                 constant_values=-jnp.inf)
  dlsep = None if dlse is None else _pad_to(dlse.astype(jnp.float32), lsep.shape)
  dq, dk, dv = _backward_jit(spec, plan.q, plan.k, plan.v, outp, lsep, doutp, dlsep, plan.lists,
                             plan.tlists, plan.leaves)
  d = q.shape[-1]
  return (dq[:, :, :plan.q_len, :d], dk[:, :, :k.shape[2], :d],
          dv[:, :, :k.shape[2], :plan.v_dim])
