"""Combining partial attention results by their log-sum-exp (xFormers' ``merge_attentions``).

Attention over a union of key sets is the LSE-weighted mean of the attentions over each part:
``out = sum_i exp(lse_i - lse) out_i`` with ``lse = logsumexp_i lse_i``. Ring attention, split-K
decoding and chunked kernels all merge this way; a part that saw no key has ``lse = -inf`` and
weight 0, and when every part is empty the result is 0 with ``lse = -inf``. A NaN lse (NaN in a
part's inputs) is never taken for "empty": it makes the merged row NaN.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

__all__ = ["merge_attentions", "merge_two", "safe_lse"]


def safe_lse(m: jax.Array, l: jax.Array) -> jax.Array:
  """``m + log(l)`` for running max ``m`` and sum ``l``; ``-inf`` where ``l == 0`` (no key seen).

  Only an exact zero is "empty": a NaN sum (NaN in the inputs) gives a NaN lse.
  """
  empty = l == 0
  return jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))


def _logsumexp(lses: jax.Array, axis: int = 0) -> jax.Array:
  """``logsumexp`` over ``axis`` that is ``-inf`` with zero (not NaN) gradients where every entry
  is ``-inf`` (``jax.nn.logsumexp`` and ``jnp.logaddexp`` give NaN gradients there)."""
  m = jax.lax.stop_gradient(jnp.max(lses, axis=axis))
  m = jnp.where(jnp.isinf(m), 0.0, m)   # a NaN max stays NaN and propagates
  l = jnp.sum(jnp.exp(lses - jnp.expand_dims(m, axis)), axis=axis)
  return safe_lse(m, l)


def merge_two(out_a, lse_a, out_b, lse_b):
  """Merge two partial results; outs f32 ``(..., S, D)``, lses f32 ``(..., S)`` (f64 stays f64)."""
  acc = jnp.promote_types(jnp.promote_types(out_a.dtype, out_b.dtype), jnp.float32)
  lse = _logsumexp(jnp.stack([lse_a, lse_b]))
  finite = lse != -jnp.inf   # NaN counts as "not empty": it propagates into the output
  ref = jnp.where(finite, lse, 0.0)
  wa = jnp.where(finite, jnp.exp(lse_a - ref), 0.0)
  wb = jnp.where(finite, jnp.exp(lse_b - ref), 0.0)
  out = wa[..., None] * out_a.astype(acc) + wb[..., None] * out_b.astype(acc)
  return out, lse


def merge_attentions(outs: Sequence[jax.Array] | jax.Array, lses: Sequence[jax.Array] | jax.Array,
                     *, out_dtype=None) -> tuple[jax.Array, jax.Array]:
  """Merge attentions computed over disjoint key sets.

  Args:
    outs: ``N`` partial outputs ``(B, H, S, D)`` (a list, or one array ``(N, B, H, S, D)``).
    lses: their f32 log-sum-exps ``(B, H, S)`` (a list, or ``(N, B, H, S)``).
    out_dtype: dtype of the merged output; defaults to the dtype of ``outs``.

  Returns:
    ``(out, lse)``: out ``(B, H, S, D)``, lse f32 ``(B, H, S)``.
  """
  outs = jnp.stack(list(outs)) if not isinstance(outs, jax.Array) else outs
  lses = jnp.stack(list(lses)) if not isinstance(lses, jax.Array) else lses
  if outs.ndim != lses.ndim + 1 or outs.shape[:-1] != lses.shape:
    raise ValueError(f"merge_attentions: outs {outs.shape} must be lses {lses.shape} plus a "
                     "trailing head_dim axis")
  out_dtype = outs.dtype if out_dtype is None else out_dtype
  # f32 statistics (f64 ones stay f64: the float64 kernels merge in float64)
  lses = lses.astype(jnp.promote_types(lses.dtype, jnp.float32))
  lse = _logsumexp(lses)
  finite = lse != -jnp.inf   # NaN counts as "not empty": it propagates into the output
  w = jnp.where(finite, jnp.exp(lses - jnp.where(finite, lse, 0.0)), 0.0)
  out = jnp.einsum("n...s,n...sd->...sd", w, outs.astype(jnp.promote_types(outs.dtype,
                                                                           jnp.float32)))
  return out.astype(out_dtype), lse
