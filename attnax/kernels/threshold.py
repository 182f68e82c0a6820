"""threshold_sparse_attention: flash-sparse-attention's ``softmax_threshold``, with a true gradient.

Inside the kv loop of the flash kernels (the pure-JAX :func:`~attnax.kernels.flash_attention` and
the Pallas Triton lowering), each visited ``(block_q, block_k)`` tile of one query head is either
computed or skipped; a skipped tile does no ``P V`` work and adds nothing to the running max,
the running sum ``l`` or the output. The rule (:func:`attnax.kernels.tiles.threshold_skip`, the
same function in both kernels) is flash-sparse-attention's ``online_sparse_softmax``:

  skip the tile  iff  ``max(S_tile) - M < log(threshold)``

where ``S_tile`` are the tile's scaled, modded, masked scores over the rows inside ``Sq`` and ``M``
is the running max of the tiles kept so far for this q tile (it starts at ``MASK_VALUE``, so the
first visited tile is always computed). ``rule="row"`` is the stricter per-row form: skip iff, for
every row ``r`` of the tile, ``max_j S_rj - m_r < log(threshold)`` with ``m_r`` the row's running
max. The kv tiles are walked in the order of the mask's BlockMask: the full tiles in ascending
order, then the partial ones (flash-sparse-attention walks from the last kv block down; the
decisions depend on the order).

The forward records its decisions, int8 ``(B, Hq, nq, nk)`` (``TILE_UNVISITED`` 0 for tiles the
mask never visits, ``TILE_KEPT`` 1, ``TILE_SKIPPED`` 2), and returns them as a ``custom_vjp``
residual. The backward replays them (it gives skipped tiles no probability and does no work on
them), so its gradient is exactly the gradient of the sparse forward: attention restricted to the
kept tiles, with the decisions held fixed. (flash-sparse-attention's backward recomputes dense
probabilities from the sparse LSE, which is not that gradient.)

No error bound: the rule looks at the running max only, never at the mass it drops. A row can lose
a large share of its softmax mass (many tiles each just below the threshold), and under the
``"tile"`` rule a row whose scores are small next to another row of its tile can lose all of its
visible keys (output 0, lse ``-inf``; never NaN). AETHER's pruning
(:func:`~attnax.kernels.aether_attention`) certifies the skipped mass instead.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from attnax.kernels import _checks
from attnax.kernels import flash as flash_lib
from attnax.kernels import score_mods as sm
from attnax.kernels.tiles import (THRESHOLD_RULES, TILE_KEPT, TILE_SKIPPED, TILE_UNVISITED)

__all__ = ["threshold_sparse_attention", "ThresholdStats", "ThresholdKeepMask",
           "default_softmax_threshold", "BACKENDS", "THRESHOLD_RULES", "TILE_UNVISITED",
           "TILE_KEPT", "TILE_SKIPPED"]

BACKENDS = ("auto", "flash", "pallas")
_NAME = "threshold_sparse_attention"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ThresholdKeepMask:
  """Mask mod: keep ``(b, h, i, j)`` unless the tile ``(i // block_q, j // block_k)`` of query
  head ``h`` was skipped (``decisions`` int8 ``(B, Hq, nq, nk)``).

  ``and_masks(mask_mod, stats.keep_mask_mod())`` given to any dense kernel reproduces the sparse
  forward (this is how the tests build their float64 reference).
  """
  decisions: jax.Array
  block_q: int = dataclasses.field(metadata=dict(static=True), default=128)
  block_k: int = dataclasses.field(metadata=dict(static=True), default=128)

  def __call__(self, b, h, q_idx, kv_idx):
    return sm.take(self.decisions, b, h, q_idx // self.block_q,
                   kv_idx // self.block_k) != TILE_SKIPPED


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ThresholdStats:
  """What the threshold rule skipped (the last element of the result with ``return_stats=True``).

  Attributes:
    skipped_fraction: f32 ``(B, Hq)``: tiles skipped / tiles the mask leaves to compute (as
      :class:`~attnax.kernels.aether.AetherStats`).
    decisions: int8 ``(B, Hq, nq, nk)``: ``TILE_UNVISITED`` (0: the mask hides the tile),
      ``TILE_KEPT`` (1) or ``TILE_SKIPPED`` (2), per query head and ``(q tile, kv tile)``.
    block_q, block_k: the tiling the decisions refer to.
    softmax_threshold: the threshold used (after the default was filled in).
  """
  skipped_fraction: jax.Array
  decisions: jax.Array
  block_q: int = dataclasses.field(metadata=dict(static=True), default=128)
  block_k: int = dataclasses.field(metadata=dict(static=True), default=128)
  softmax_threshold: float = dataclasses.field(metadata=dict(static=True), default=0.0)

  @property
  def skipped(self) -> jax.Array:
    """bool ``(B, Hq, nq, nk)``: the tiles the forward (and so the backward) skipped."""
    return self.decisions == TILE_SKIPPED

  def keep_mask_mod(self) -> ThresholdKeepMask:
    """A MaskMod hiding exactly the skipped tiles (see :class:`ThresholdKeepMask`)."""
    return ThresholdKeepMask(self.decisions, self.block_q, self.block_k)


def default_softmax_threshold(head_dim: int, kv_len: int) -> float:
  """flash-sparse-attention's default, ``head_dim / Sk`` (capped at 1 for ``Sk < head_dim``)."""
  return min(1.0, head_dim / kv_len)


def _check_threshold(threshold: Any, head_dim: int, kv_len: int) -> float:
  """A probability relative to the running max: a static float in ``[0, 1]`` (None: default)."""
  if threshold is None:
    return default_softmax_threshold(head_dim, kv_len)
  return _checks.static_float(threshold, "softmax_threshold", fn=_NAME, low=0.0, high=1.0)


def _resolve_backend(backend: Any, dtype: Any) -> str:
  if backend not in BACKENDS:
    raise ValueError(f"{_NAME}: backend must be one of {BACKENDS}, got {backend!r}")
  if backend != "auto":
    return backend
  # The Pallas interpreter is far slower than XLA on a CPU; float64 runs in pure JAX only.
  on_gpu = jax.default_backend() == "gpu"
  return "pallas" if on_gpu and jnp.dtype(dtype) != jnp.float64 else "flash"


def _stats(decisions: jax.Array, block_q: int, block_k: int, threshold: float) -> ThresholdStats:
  visited = (decisions != TILE_UNVISITED).sum((-2, -1)).astype(jnp.float32)
  skipped = (decisions == TILE_SKIPPED).sum((-2, -1)).astype(jnp.float32)
  frac = jnp.where(visited > 0, skipped / jnp.maximum(visited, 1.0), 0.0)
  return ThresholdStats(frac, decisions, block_q, block_k, threshold)


def _flash(q, k, v, *, threshold, rule, score_mod, mask_mod, scale, block_q, block_k):
  cfg, mods, values, bm, state = flash_lib._prepare(q, k, v, score_mod, mask_mod, scale,
                                                    block_q, block_k, None)
  cfg = dataclasses.replace(cfg, softmax_threshold=threshold, threshold_rule=rule)
  out, lse, decisions = flash_lib._make_flash(cfg, mods)(q, k, v, values, bm, state, None)
  return out, lse, decisions, cfg.block_q, cfg.block_k


def _pallas(q, k, v, *, threshold, rule, score_mod, mask_mod, scale, block_q, block_k,
            interpret):
  from attnax.kernels.pallas import api as pallas_api
  from attnax.kernels.pallas import triton as tk
  from attnax.kernels.pallas.plan import pow2

  if interpret is None:
    backend = "auto"
    interpreting = jax.default_backend() != "gpu"
  else:
    backend = "interpret" if interpret else "triton"
    interpreting = bool(interpret)
  # Fix the tiling here (the plan's rule: a power of two >= 16, at most the sequence's power of
  # two), so that the decisions' tiling is known to the stats.
  head_pad = max(16, pow2(max(q.shape[-1], v.shape[-1])))
  cfg = tk.default_config(head_pad, interpret=interpreting, dtype=q.dtype)
  bq = max(16, min(cfg.block_q if block_q is None else block_q, pow2(q.shape[2])))
  bk = max(16, min(cfg.block_k if block_k is None else block_k, pow2(k.shape[2])))
  out, lse, decisions = pallas_api.threshold_attention(
      q, k, v, softmax_threshold=threshold, threshold_rule=rule, score_mod=score_mod,
      mask_mod=mask_mod, scale=scale, block_q=bq, block_k=bk, backend=backend)
  return out, lse, decisions, bq, bk


def threshold_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                               softmax_threshold: float | None = None, rule: str = "tile",
                               score_mod: Any = None, mask_mod: Any = None,
                               scale: float | None = None, return_lse: bool = False,
                               return_stats: bool = False, backend: str = "auto",
                               block_q: int | None = None, block_k: int | None = None,
                               interpret: bool | None = None) -> Any:
  """Attention that skips, inside the kernel, the tiles whose probabilities fall below a threshold.

  flash-sparse-attention's ``softmax_threshold``: while the kernel walks the kv tiles of a
  ``(block_q)`` query tile, a tile is skipped (no ``P V`` work, nothing added to the softmax sum)
  when ``exp(max(S_tile) - M) < softmax_threshold``, ``M`` the running max of the tiles kept so
  far (``rule="tile"``, flash-sparse-attention's rule), or when every row's
  ``exp(rowmax - running row max)`` is below it (``rule="row"``, stricter). The forward records
  its decisions and the backward replays them, so the gradient is the exact gradient of the sparse
  forward (attention restricted to the kept tiles, decisions held fixed).

  This rule has **no error bound**: it never looks at how much softmax mass it drops. For a
  certified bound on the skipped mass use :func:`~attnax.kernels.aether_attention`.

  Args:
    q: ``(B, Hq, Sq, D)``; k: ``(B, Hkv, Sk, D)``; v: ``(B, Hkv, Sk, Dv)``; ``Hq % Hkv == 0``
      (GQA: query head ``h`` reads kv head ``h // (Hq // Hkv)``; decisions are per query head).
    softmax_threshold: static float in ``[0, 1]``; ``None`` is flash-sparse-attention's default
      ``head_dim / Sk`` (capped at 1). ``0`` skips nothing (dense attention).
    rule: ``"tile"`` (default, flash-sparse-attention's) or ``"row"``.
    score_mod, mask_mod, scale, return_lse: as every attnax kernel; masks give block skipping
      first (tiles the mask hides are never visited), then the threshold skips among the rest.
      Floating-point arrays the mods carry get their gradient (over the kept tiles).
    return_stats: also return a :class:`ThresholdStats` (last element): ``skipped_fraction``
      ``(B, Hq)`` and the recorded ``decisions``.
    backend: ``"flash"`` (pure JAX; float64 too), ``"pallas"`` (the Triton lowering, or its
      interpreter; the Mosaic lowering does not skip and is passed over), or ``"auto"``
      (``"pallas"`` on a GPU, ``"flash"`` elsewhere).
    block_q, block_k: the tiling, i.e. the granularity of the decisions (default 128, or the
      Pallas lowering's default). ``"flash"`` clips them to ``Sq``/``Sk``; ``"pallas"`` needs
      powers of two >= 16. Flash and Pallas make the same decisions on the same tiling (up to
      rounding at the boundary), except under a mask that differs between the query heads of
      one GQA group, where their walk orders may differ.
    interpret: ``"pallas"`` only: ``True`` runs the Pallas interpreter, ``False`` the compiled
      Triton kernel, ``None`` lets ``pallas_flash_attention``'s ``"auto"`` choose.

  Returns:
    ``out`` ``(B, Hq, Sq, Dv)``; with ``return_lse`` also the lse f32 ``(B, Hq, Sq)`` (that of the
    sparse softmax); with ``return_stats`` the stats last.
  """
  b, hq, hkv, sq, sk, d, dv = _checks.check_qkv(q, k, v, kernel=_NAME, allow_f64=True)
  threshold = _check_threshold(softmax_threshold, d, sk)
  if rule not in THRESHOLD_RULES:
    raise ValueError(f"{_NAME}: rule must be one of {THRESHOLD_RULES}, got {rule!r}")
  for name, value in (("block_q", block_q), ("block_k", block_k)):
    if value is not None:
      _checks.check_block(name, value)
  if interpret not in (None, True, False):
    raise ValueError(f"{_NAME}: interpret must be None, True or False, got {interpret!r}")
  impl = _resolve_backend(backend, q.dtype)
  if impl == "flash" and interpret is not None:
    raise ValueError(f"{_NAME}: interpret= applies to backend='pallas' only (got backend="
                     f"{backend!r}, which runs 'flash')")
  kw = dict(threshold=threshold, rule=rule, score_mod=score_mod, mask_mod=mask_mod, scale=scale)
  if impl == "flash":
    out, lse, decisions, bq, bk = _flash(q, k, v, block_q=128 if block_q is None else block_q,
                                         block_k=128 if block_k is None else block_k, **kw)
  else:
    if jnp.dtype(q.dtype) == jnp.float64:
      raise ValueError(f"{_NAME}: q has dtype float64, which backend='pallas' (f32 at most) "
                       f"cannot run; use backend='flash'; got q {tuple(q.shape)}, k "
                       f"{tuple(k.shape)}, v {tuple(v.shape)}")
    out, lse, decisions, bq, bk = _pallas(q, k, v, block_q=block_q, block_k=block_k,
                                          interpret=interpret, **kw)
  outs = (out, lse) if return_lse else (out,)
  if return_stats:
    outs = outs + (_stats(decisions, bq, bk, threshold),)
  return outs if len(outs) > 1 else outs[0]
