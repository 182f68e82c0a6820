"""aether_attention: certified geometric block-sparse attention (DESIGN.md section 6).

AETHER is a planner, not a second attention kernel. One call:

  _checks.check_qkv            ValueError with names and shapes
  -> certify.prepare           the mask's BlockMask, key-block geometry (centroids, radii), the
                               additive mods' bounds (all under stop_gradient)
  -> certify.screen            one representative row per q tile: can anything be skipped?
  -> lax.cond                  no: the dense kernel as is (iid data pays only the screen)
                               yes: certify.decide -> certified BlockMask (pruned tiles EMPTY,
                               kept tiles PARTIAL/FULL as the mask dictates), then the dense
                               block-sparse kernel (pallas_flash_attention / flash_attention) with
                               block_mask=, so the forward and the backward run the same schedule
                               and the gradient is exactly the gradient of the pruned forward
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from typing import Any

import jax
import jax.numpy as jnp

from attnax.kernels import _checks
from attnax.kernels import operands as ops_lib
from attnax.kernels import score_mods as sm
from attnax.kernels.aether import certify
from attnax.kernels.aether.certify import AetherStats, RULES, tile_mask_mod
from attnax.kernels.reference import standard_attention

__all__ = ["aether_attention", "AetherAttention", "AetherStats", "IMPLEMENTATIONS"]

IMPLEMENTATIONS = ("pallas", "flash", "reference")


def _kernel(implementation: str | None, dtype: Any = None):
  """The dense block-sparse kernel for ``implementation``.

  ``None``: the Pallas kernel on a GPU (when importable), the pure-JAX flash kernel elsewhere (the
  Pallas interpreter is far slower than XLA on a CPU) and for float64 inputs (which the Pallas
  kernels do not run), the materialised reference as a last resort.
  """
  if implementation is None:
    gpu = jax.default_backend() == "gpu" and not _is_f64(dtype)
    order = ("pallas", "flash") if gpu else ("flash", "pallas")
    for name in order:
      try:
        return name, _kernel(name)[1]
      except ImportError:
        continue
    return "reference", None
  if implementation == "pallas":
    return "pallas", importlib.import_module("attnax.kernels.pallas").pallas_flash_attention
  if implementation == "flash":
    return "flash", importlib.import_module("attnax.kernels.flash").flash_attention
  if implementation == "reference":
    return "reference", None
  raise ValueError(f"aether_attention: implementation must be one of {IMPLEMENTATIONS} or None, "
                   f"got {implementation!r}")


def _is_f64(dtype: Any) -> bool:
  return dtype is not None and jnp.dtype(dtype) == jnp.float64


def _run(q, k, v, *, score_mod, mask_mod, score_fn, mask_fn, impl, return_stats, **settings):
  """Plan, then run the kernel: a dense call when the screen rules out every skip (``lax.cond``)."""
  kernel = _kernel(impl)[1]
  b, hq = q.shape[:2]
  scale, bq, bk = settings["scale"], settings["block_q"], settings["block_k"]

  def call(block_mask):
    if impl == "reference":
      mm = mask_mod if block_mask is None else sm.and_masks(mask_mod, tile_mask_mod(block_mask, hq))
      return standard_attention(q, k, v, score_mod=score_mod, mask_mod=mm, scale=scale,
                                return_lse=True)
    kw = {} if block_mask is None else {"block_mask": block_mask}
    return kernel(q, k, v, score_mod=score_mod, mask_mod=mask_mod, scale=scale, return_lse=True,
                  block_q=bq, block_k=bk, **kw)

  prep = certify.prepare(q, k, score_fn=score_fn, mask_fn=mask_fn, **settings)
  if not prep.prunes:       # epsilon = 0 or an arbitrary score mod: dense, nothing to certify
    res = call(None)
    return res + ((certify.unpruned_plan(prep, True).stats(b, hq),) if return_stats else ())

  possible = certify.screen(prep)

  def pruned():
    plan = certify.decide(prep, possible, with_stats=return_stats)
    res = call(plan.block_mask)
    return res + ((plan.stats(b, hq),) if return_stats else ())

  def dense():
    res = call(None)
    return res + ((certify.unpruned_plan(prep, True).stats(b, hq),) if return_stats else ())

  return jax.lax.cond(jnp.any(possible), pruned, dense)


@functools.partial(jax.jit, static_argnames=("static", "settings"))
def _run_jit(q, k, v, arrays, *, static, settings):
  score_mod, mask_mod, score_fn, mask_fn = ops_lib.join_static(static, arrays)
  return _run(q, k, v, score_mod=score_mod, mask_mod=mask_mod, score_fn=score_fn, mask_fn=mask_fn,
              **dict(settings))


def _run_compiled(q, k, v, *, score_mod, mask_mod, score_fn, mask_fn, **settings):
  """:func:`_run`, compiled once per (shapes, mods' structure, settings) when the mods allow it."""
  static, arrays = ops_lib.split_static((score_mod, mask_mod, score_fn, mask_fn))
  if static is None:
    return _run(q, k, v, score_mod=score_mod, mask_mod=mask_mod, score_fn=score_fn,
                mask_fn=mask_fn, **settings)
  return _run_jit(q, k, v, arrays, static=static, settings=tuple(sorted(settings.items())))


def _check_settings(epsilon, threshold, block_q, block_k, rule):
  try:
    epsilon = float(epsilon)
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise ValueError(f"aether_attention: epsilon must be a static Python float, got "
                     f"{type(epsilon).__name__}") from None
  if not (epsilon >= 0 and math.isfinite(epsilon)):
    raise ValueError(f"aether_attention: epsilon must be finite and >= 0, got {epsilon}")
  if threshold is not None:
    try:
      threshold = float(threshold)
    except (TypeError, jax.errors.ConcretizationTypeError):
      raise ValueError(f"aether_attention: threshold must be a static Python float or None, got "
                       f"{type(threshold).__name__}") from None
    if math.isnan(threshold):
      raise ValueError("aether_attention: threshold must not be NaN")
  if threshold is not None and epsilon == 0:
    raise ValueError("aether_attention: epsilon=0 asks for dense attention and threshold= for the "
                     "pull request's pruning rule; give one of them")
  _checks.check_block("block_q", block_q)
  _checks.check_block("block_k", block_k)
  if rule not in RULES:
    raise ValueError(f"aether_attention: rule must be one of {RULES}, got {rule!r}")
  return epsilon, threshold


def aether_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, epsilon: float = 1e-3,
                     threshold: float | None = None, block_q: int = 128, block_k: int = 128,
                     score_mod: Any = None, mask_mod: Any = None, scale: float | None = None,
                     return_lse: bool = False, return_stats: bool = False,
                     implementation: str | None = None, rule: str = "budget") -> Any:
  """Attention that skips key blocks whose softmax mass is certified to be negligible.

  Each key block's centroid ``mu_b`` and radius ``r_b`` bound all its scores
  (``q.k <= q.mu_b + ||q|| r_b``); a ``(block_q, block_k)`` tile is skipped only when, for every
  query row of the tile (and every query head sharing the kv head), the skipped keys' softmax
  numerator is at most ``epsilon`` times the kept one. Hence, per row: the skipped probability mass
  is at most ``epsilon``, the LSE is low by at most ``epsilon`` and
  ``|out - dense| <= 2 epsilon max|v|``; no row is ever empty and nothing is NaN. The backward
  runs the forward's schedule: its gradient is the exact gradient of the pruned forward.

  Mods: masks give block sparsity (partial tiles always run; only fully visible blocks certify);
  ``alibi_mod`` and ``additive_bias_mod`` add their per-block bounds; any other score mod is
  computed densely (no pruning, still correct).

  Args:
    q: ``(B, Hq, Sq, D)``.
    k: ``(B, Hkv, Sk, D)``, ``Hq % Hkv == 0``.
    v: ``(B, Hkv, Sk, Dv)``.
    epsilon: certified bound (static float >= 0); ``0`` computes dense attention.
    threshold: the AETHER pull request's absolute rule instead: skip a tile when the bound ``U`` of
      every row is below ``threshold`` (certifies nothing, but never skips a row's last block).
    block_q, block_k: the kernel tile (decision granularity).
    score_mod, mask_mod, scale, return_lse: as every attnax kernel.
    return_stats: also return an :class:`AetherStats` (last element of the tuple):
      ``skipped_fraction`` ``(B, Hq)`` and per-row ``mass_bound`` ``(B, Hq, Sq)``.
    implementation: the dense block-sparse kernel: ``"pallas"`` (the default on a GPU),
      ``"flash"`` (pure JAX; the default elsewhere and for float64 inputs), or ``"reference"``
      (materialised scores; tests and small inputs). float64 runs with ``"flash"`` and
      ``"reference"`` (the planner's bounds are f32 with a rounding margin that covers it);
      ``"pallas"`` raises ValueError for it.
    rule: ``"budget"`` (default, tighter) or ``"margin"`` (``delta = log(Sk / epsilon)``).

  Returns:
    ``out`` ``(B, Hq, Sq, Dv)``; with ``return_lse`` also lse f32 ``(B, Hq, Sq)``; with
    ``return_stats`` the stats last.
  """
  b, hq, hkv, sq, sk, d, dv = _checks.check_qkv(q, k, v, kernel="aether_attention",
                                                allow_f64=True)
  scale = _checks.default_scale(scale, d)
  epsilon, threshold = _check_settings(epsilon, threshold, block_q, block_k, rule)
  # A tile larger than the sequence's power of two means one tile, whatever its size.
  block_q = min(block_q, max(16, 1 << (sq - 1).bit_length()))
  block_k = min(block_k, max(16, 1 << (sk - 1).bit_length()))
  score_fn, mask_fn = sm.resolve_mods(score_mod, mask_mod, batch=b, heads=hq, q_len=sq, kv_len=sk)
  impl = _kernel(implementation, q.dtype)[0]
  if impl == "pallas" and _is_f64(q.dtype):
    raise ValueError(f"aether_attention: q has dtype float64, which implementation='pallas' (the "
                     f"Pallas kernel, f32 at most) cannot run; use implementation='flash' or "
                     f"'reference' (or None) for float64; got q {tuple(q.shape)}, k "
                     f"{tuple(k.shape)}, v {tuple(v.shape)}")
  res = _run_compiled(q, k, v, score_mod=score_mod, mask_mod=mask_mod, score_fn=score_fn,
                      mask_fn=mask_fn, impl=impl, return_stats=bool(return_stats), scale=scale,
                      block_q=block_q, block_k=block_k, epsilon=epsilon, threshold=threshold,
                      rule=rule)
  out, lse = res[0], res[1]
  outs = (out, lse) if return_lse else (out,)
  if return_stats:
    outs = outs + (res[2],)
  return outs if len(outs) > 1 else outs[0]


@dataclasses.dataclass(frozen=True)
class AetherAttention:
  """AETHER's settings, itself an :class:`~attnax.kernels.AttentionFn`.

  Frozen and hashable, so it can be a static argument of ``jax.jit`` or a module attribute::

    attn = MultiHeadAttention(rngs, num_heads=8, in_features=512,
                              attention_fn=AetherAttention(epsilon=1e-4, block_k=64))

  Calling it is ``aether_attention(q, k, v, score_mod=..., mask_mod=..., scale=...,
  return_lse=..., **settings)``; with ``return_stats=True`` the stats come last.
  """
  epsilon: float = 1e-3
  threshold: float | None = None
  block_q: int = 128
  block_k: int = 128
  implementation: str | None = None
  rule: str = "budget"
  return_stats: bool = False

  def __post_init__(self):
    _check_settings(self.epsilon, self.threshold, self.block_q, self.block_k, self.rule)
    if self.implementation is not None and self.implementation not in IMPLEMENTATIONS:
      raise ValueError(f"AetherAttention: implementation must be one of {IMPLEMENTATIONS} or None, "
                       f"got {self.implementation!r}")

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, *, score_mod: Any = None,
               mask_mod: Any = None, scale: float | None = None, return_lse: bool = False) -> Any:
    """q ``(B, Hq, Sq, D)``, k ``(B, Hkv, Sk, D)``, v ``(B, Hkv, Sk, Dv)`` -> ``(B, Hq, Sq, Dv)``.
    """
    return aether_attention(q, k, v, epsilon=self.epsilon, threshold=self.threshold,
                            block_q=self.block_q, block_k=self.block_k, score_mod=score_mod,
                            mask_mod=mask_mod, scale=scale, return_lse=return_lse,
                            return_stats=self.return_stats, implementation=self.implementation,
                            rule=self.rule)
