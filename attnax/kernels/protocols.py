"""The three protocols every attnax kernel and mod conforms to."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

__all__ = ["AttentionFn", "ScoreMod", "MaskMod"]


@runtime_checkable
class ScoreMod(Protocol):
  """Modifies attention scores elementwise, FlexAttention style.

  ``score_mod(score, b, h, q_idx, kv_idx) -> score``. ``score`` is f32 and already scaled;
  ``b``, ``h``, ``q_idx`` and ``kv_idx`` are int32 arrays that broadcast against ``score``
  (the whole ``(Sq, Sk)`` matrix in a reference kernel, one tile inside a Pallas kernel). A mod
  is pure elementwise ``jnp`` code. Mods that carry arrays are pytrees, so a kernel can pass the
  arrays to a Pallas kernel as operands.
  """

  def __call__(self, score: jax.Array, b: jax.Array, h: jax.Array, q_idx: jax.Array,
               kv_idx: jax.Array) -> jax.Array:
    ...


@runtime_checkable
class MaskMod(Protocol):
  """Says which keys a query may attend to: ``mask_mod(b, h, q_idx, kv_idx) -> bool``.

  True where query ``q_idx`` of batch row ``b`` and head ``h`` may attend to key ``kv_idx``.
  Arguments broadcast as for :class:`ScoreMod`.
  """

  def __call__(self, b: jax.Array, h: jax.Array, q_idx: jax.Array,
               kv_idx: jax.Array) -> jax.Array:
    ...


@runtime_checkable
class AttentionFn(Protocol):
  """The signature of every attnax kernel.

  ``kernel(q, k, v, *, score_mod=None, mask_mod=None, scale=None, return_lse=False, **options)``

  Args:
    q: ``(B, Hq, Sq, D)`` queries.
    k: ``(B, Hkv, Sk, D)`` keys, ``Hq % Hkv == 0`` (grouped-query attention).
    v: ``(B, Hkv, Sk, Dv)`` values.
    score_mod: optional :class:`ScoreMod`, applied after scaling.
    mask_mod: optional :class:`MaskMod`.
    scale: multiplies ``q @ k.T``; ``None`` means ``D ** -0.5``.
    return_lse: also return the f32 log-sum-exp ``(B, Hq, Sq)`` of the modded scores.

  Returns:
    ``out`` of shape ``(B, Hq, Sq, Dv)`` in q's dtype, or ``(out, lse)``.
  """

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, *,
               score_mod: ScoreMod | None = None, mask_mod: MaskMod | None = None,
               scale: float | None = None, return_lse: bool = False, **options: Any) -> Any:
    ...
