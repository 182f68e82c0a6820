"""Rotary position embedding (RoPE), Su et al., "RoFormer" (arXiv:2104.09864).

attnax uses the "rotate half" layout of GPT-NeoX, LLaMA and ``flax.nnx.RoPE``: for a head vector
``x`` of even size ``D`` and ``i < D / 2``, the pair ``(x[i], x[i + D/2])`` is rotated by the angle
``pos * theta ** (-2 i / D)``::

  y[i]       = x[i] cos(a_i) - x[i + D/2] sin(a_i)
  y[i + D/2] = x[i + D/2] cos(a_i) + x[i] sin(a_i)

so that ``<rope(q, m), rope(k, n)>`` depends on the positions only through ``m - n``. Angles are
computed in f32 from integer positions (exact up to 2**24); the result is cast back to ``x``'s
dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["rope_frequencies", "apply_rope"]


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> jax.Array:
  """The ``D / 2`` inverse frequencies ``theta ** (-2 i / D)``, f32 ``(head_dim // 2,)``."""
  if head_dim <= 0 or head_dim % 2:
    raise ValueError(f"rotary embedding needs a positive even head_dim, got {head_dim}")
  if theta <= 0:
    raise ValueError(f"rope_theta must be positive, got {theta}")
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float = 10000.0) -> jax.Array:
  """Rotate ``x`` by the angles of its positions.

  Args:
    x: ``(..., S, D)`` with ``D`` even, e.g. ``(B, H, S, D)`` in the kernel layout.
    positions: integer positions broadcastable to ``x.shape[:-1]``, e.g. ``(S,)`` or
      ``(B, 1, S)``; absolute positions (a decoding step passes ``cache_index + arange(S)``).
    theta: the base of the frequencies.

  Returns:
    An array of ``x``'s shape and dtype.
  """
  d = x.shape[-1]
  inv_freq = rope_frequencies(d, theta)
  angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq       # (..., S, D/2)
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
