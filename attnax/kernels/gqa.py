"""Grouped-query attention layouts: the query heads that read one kv head, packed together.

Query head ``h`` reads kv head ``h // G`` with ``G = Hq // Hkv``. Kernels that fold the ``G`` heads
of a group into the rows of one matmul (flash, ring, paged, linear) pack q to
``(B, Hkv, G, S, D)``; K and V are never repeated. The reference repeats K/V instead
(:func:`repeat_kv`), which is the readable form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["pack_gqa", "unpack_gqa", "repeat_kv", "fold_group", "head_index"]


def pack_gqa(x: jax.Array, num_kv_heads: int) -> jax.Array:
  """``(B, Hq, L, ...) -> (B, Hkv, G, L, ...)``: query head ``h`` goes to ``(h // G, h % G)``."""
  b, hq, length = x.shape[:3]
  return x.reshape(b, num_kv_heads, hq // num_kv_heads, length, *x.shape[3:])


def unpack_gqa(x: jax.Array) -> jax.Array:
  """``(B, Hkv, G, L, ...) -> (B, Hkv * G, L, ...)``, the inverse of :func:`pack_gqa`."""
  b, hkv, g, length = x.shape[:4]
  return x.reshape(b, hkv * g, length, *x.shape[4:])


def fold_group(x: jax.Array) -> jax.Array:
  """``(B, Hkv, G, L, X) -> (B, Hkv, G * L, X)``: the group folded into the rows of a matmul."""
  return x.reshape(x.shape[:2] + (x.shape[2] * x.shape[3],) + x.shape[4:])


def repeat_kv(x: jax.Array, groups: int) -> jax.Array:
  """``(B, Hkv, S, D) -> (B, Hkv * groups, S, D)``: query head ``h`` reads kv head ``h // groups``."""
  return x if groups == 1 else jnp.repeat(x, groups, axis=1)


def head_index(num_kv_heads: int, groups: int, first_kv_head=0) -> jax.Array:
  """Absolute query head of each packed ``(kv head, g)``, int32 ``(1, Hkv, G, 1, 1)``."""
  hk = first_kv_head + jnp.arange(num_kv_heads, dtype=jnp.int32)
  return (hk[:, None] * groups + jnp.arange(groups, dtype=jnp.int32)).reshape(
      1, num_kv_heads, groups, 1, 1)
