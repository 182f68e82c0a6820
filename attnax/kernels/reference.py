"""standard_attention: the materialised, readable definition of attnax's maths."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attnax.kernels import _checks
from attnax.kernels import score_mods as sm
from attnax.kernels import tiles

from attnax.kernels.gqa import repeat_kv

__all__ = ["standard_attention"]


def standard_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, score_mod: Any = None,
                       mask_mod: Any = None, scale: float | None = None, return_lse: bool = False,
                       dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
                       precision: Any = None) -> Any:
  """Attention with the full score matrix materialised: ``softmax(mod(scale * q k^T)) v``.

  The reference every other kernel is tested against; it supports everything (mods, GQA, LSE,
  dropout) and costs ``O(B * Hq * Sq * Sk)`` memory.

  Args:
    q: ``(B, Hq, Sq, D)``.
    k: ``(B, Hkv, Sk, D)``, ``Hq % Hkv == 0``.
    v: ``(B, Hkv, Sk, Dv)``.
    score_mod: :class:`~attnax.kernels.ScoreMod` applied to the scaled scores.
    mask_mod: :class:`~attnax.kernels.MaskMod`; False entries get probability 0.
    scale: score scale, default ``D ** -0.5``.
    return_lse: also return the log-sum-exp ``(B, Hq, Sq)`` (f32; f64 for float64 inputs).
    dropout_rate: probability of dropping an attention weight (static float in ``[0, 1)``; needs
      ``dropout_rng``). Kept weights are scaled by ``1 / (1 - dropout_rate)``; the LSE is that of
      the undropped softmax.
    dropout_rng: a PRNG key (``jax.random.key``, or a legacy ``PRNGKey``) or an integer seed,
      possibly traced. The mask is :func:`attnax.kernels.tiles.dropout_keep` of the key and the
      absolute ``(b, h, q_idx, kv_idx)``: ``flash_attention`` and ``pallas_flash_attention`` with
      the same key drop exactly the same weights.
    precision: ``jax.lax.Precision`` of the two matmuls.

  Returns:
    ``out`` ``(B, Hq, Sq, Dv)`` in q's dtype, or ``(out, lse)``. A query that sees no key gets
    output 0 and lse ``-inf``.
  """
  b, hq, hkv, sq, sk, d, _ = _checks.check_qkv(q, k, v, kernel="standard_attention",
                                                allow_f64=True)
  scale = _checks.default_scale(scale, d)
  score_fn, mask_fn = sm.resolve_mods(score_mod, mask_mod, batch=b, heads=hq, q_len=sq, kv_len=sk)
  dropout_rate, seed = _checks.check_dropout(dropout_rate, dropout_rng,
                                             kernel="standard_attention")

  groups = hq // hkv
  k, v = repeat_kv(k, groups), repeat_kv(v, groups)
  s = tiles.qk_dot(q, k, precision) * scale
  bi, hi, qi, ki = sm.index_grid(b, hq, sq, sk)
  s, visible = tiles.tile_scores(s, score_fn=score_fn, mask_fn=mask_fn, b=bi, h=hi, q_idx=qi,
                                 kv_idx=ki)
  m, l = tiles.init_stats(s.shape[:-1], s.dtype)
  p, _, m, l = tiles.online_softmax_step(s, visible, m, l)
  if dropout_rate > 0.0:
    # The mask every fused kernel regenerates per tile (tiles.dropout_keep); the LSE is unaffected.
    keep = tiles.dropout_keep(seed, dropout_rate, bi, hi, qi, ki)
    p = tiles.apply_dropout(p, keep, dropout_rate)
  # Low-precision inputs: probabilities enter the second matmul in v's dtype, as in the kernels.
  acc = tiles.pv_dot(tiles.low_precision(p, v.dtype), v, precision)
  out, lse = tiles.finalize(acc, m, l)
  out = out.astype(q.dtype)
  return (out, lse) if return_lse else out
