"""Use attnax kernels inside Flax: :func:`flax_attention_fn`.

``flax.nnx.MultiHeadAttention`` calls its ``attention_fn`` as
``attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None, is_causal=False)``
on ``(batch..., S, heads, head_dim)`` arrays. :func:`flax_attention_fn` turns an attnax kernel into
such a function: it moves the heads axis, turns Flax's dense ``bias`` and boolean ``mask`` into
attnax mods, and ``is_causal`` into :func:`~attnax.kernels.causal_mod`.

(The other direction, loading a Flax module's parameters into attnax's module, is
:meth:`attnax.MultiHeadAttention.from_flax` / :meth:`~attnax.MultiHeadAttention.load_flax_params`.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from attnax.attention import _kernel_name, accepts_keyword, is_attention_fn
from attnax.kernels import score_mods as sm

__all__ = ["flax_attention_fn", "ArrayMask"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ArrayMask:
  """A mask mod reading a boolean array: keep where ``mask[b, h, q_idx, kv_idx]``.

  ``mask`` has rank 4; size-1 axes broadcast (Flax's masks are broadcastable to
  ``(B, H, Sq, Sk)``).
  """
  mask: jax.Array

  def __call__(self, b, h, q_idx, kv_idx):
    return sm.take(self.mask, b, h, q_idx, kv_idx)


def _to_rank4(x: jax.Array, batch_shape: tuple[int, ...], name: str) -> jax.Array:
  """Flax's ``(batch..., H, Sq, Sk)``-broadcastable array -> rank 4 with one batch axis."""
  nb = len(batch_shape)
  if x.ndim > nb + 3:
    raise ValueError(f"{name} of shape {x.shape} has more axes than (batch..., heads, q, kv) "
                     f"with batch dims {batch_shape}")
  x = x.reshape((1,) * (nb + 3 - x.ndim) + x.shape)
  if nb == 0:
    return x[None]
  if nb == 1:
    return x
  lead = x.shape[:nb]
  if all(d == 1 for d in lead):
    return x.reshape((1,) + x.shape[nb:])
  x = jnp.broadcast_to(x, batch_shape + x.shape[nb:])
  return x.reshape((math.prod(batch_shape),) + x.shape[nb:])


def flax_attention_fn(kernel: Callable[..., Any], *, score_mod: Any = None, mask_mod: Any = None,
                      **options: Any) -> Callable[..., jax.Array]:
  """An ``attention_fn`` for ``flax.nnx.MultiHeadAttention`` that runs an attnax kernel.

  Example::

    layer = nnx.MultiHeadAttention(num_heads=8, in_features=512, decode=False, rngs=rngs,
                                   attention_fn=attnax.flax_attention_fn(flash_attention))

  Args:
    kernel: any :class:`~attnax.kernels.AttentionFn`.
    score_mod: a score mod applied at every call, before Flax's ``bias``.
    mask_mod: a mask mod and-ed with Flax's ``mask`` at every call.
    **options: static kernel options (block sizes, ...) passed on every call.

  Returns:
    ``fn(query, key, value, bias=None, mask=None, *, broadcast_dropout=True, dropout_rng=None,
    dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None,
    is_causal=False, **unused)``, taking ``query`` ``(batch..., Sq, H, D)``, ``key``
    ``(batch..., Sk, Hkv, D)``, ``value`` ``(batch..., Sk, Hkv, Dv)`` and returning
    ``(batch..., Sq, H, Dv)``. Flax's scaling ``D ** -0.5`` is the kernels' default.

  Translation rules: ``bias`` becomes :func:`~attnax.kernels.additive_bias_mod` and ``mask`` an
  :class:`ArrayMask` (False = masked), both read at the kernel's indices; ``is_causal`` is
  ``causal_mod()`` (top-left aligned, as Flax's ``tril``). Dropout is passed to the kernel when it
  takes ``dropout_rate``/``dropout_rng`` and raises ``ValueError`` otherwise; masks are drawn per
  weight (``broadcast_dropout`` is ignored), so they differ from Flax's own draws. ``module``
  (Flax's ``sow_weights=True``) raises: attnax kernels do not materialise the weights.
  """
  if not is_attention_fn(kernel):
    raise ValueError(f"{_kernel_name(kernel)!r} does not meet the AttentionFn signature "
                     "fn(q, k, v, *, score_mod=None, mask_mod=None, scale=None)")
  sm.check_mod(score_mod, 5, "score_mod")
  sm.check_mod(mask_mod, 4, "mask_mod")
  held = (score_mod, mask_mod)
  takes_dropout = accepts_keyword(kernel, "dropout_rate") and accepts_keyword(kernel, "dropout_rng")
  takes_precision = accepts_keyword(kernel, "precision")

  def attention_fn(query: jax.Array, key: jax.Array, value: jax.Array,
                   bias: jax.Array | None = None, mask: jax.Array | None = None, *,
                   broadcast_dropout: bool = True, dropout_rng: jax.Array | None = None,
                   dropout_rate: float = 0.0, deterministic: bool = False, dtype: Any = None,
                   precision: Any = None, module: Any = None, is_causal: bool = False,
                   **unused: Any) -> jax.Array:
    del broadcast_dropout
    if module is not None:
      raise ValueError(f"flax_attention_fn({_kernel_name(kernel)}): sow_weights is not supported, "
                       "attnax kernels do not materialise the attention weights")
    if unused.get("input_positions") is not None:
      raise ValueError("flax_attention_fn: input_positions (Flax's RoPE hook) is not supported; "
                       "use attnax.MultiHeadAttention(rope=True)")
    if query.ndim < 3 or key.ndim != query.ndim or value.ndim != query.ndim:
      raise ValueError(f"query, key, value must be (batch..., S, heads, head_dim) of one rank, got "
                       f"{query.shape}, {key.shape}, {value.shape}")
    batch_shape = query.shape[:-3]
    if key.shape[:-3] != batch_shape or value.shape[:-3] != batch_shape:
      raise ValueError(f"query, key, value batch dims differ: {query.shape}, {key.shape}, "
                       f"{value.shape}")
    dt = dtype if dtype is not None else jnp.result_type(query, key, value)
    to_kernel = lambda x: jnp.swapaxes(
        x.reshape((math.prod(batch_shape),) + x.shape[-3:]), 1, 2).astype(dt)
    q, k, v = to_kernel(query), to_kernel(key), to_kernel(value)

    base_score, base_mask = held
    score = sm.compose_score_mods(
        base_score, None if bias is None else sm.additive_bias_mod(
            _to_rank4(jnp.asarray(bias), batch_shape, "bias")))
    masks = [base_mask]
    if mask is not None:
      masks.append(ArrayMask(_to_rank4(jnp.asarray(mask), batch_shape, "mask").astype(bool)))
    if is_causal:
      masks.append(sm.CausalMask(0))
    kwargs = dict(options)
    if not deterministic and dropout_rate > 0.0:
      if not takes_dropout:
        raise ValueError(f"dropout_rate={dropout_rate}: {_kernel_name(kernel)!r} does not take "
                         "dropout_rate/dropout_rng (standard_attention does)")
      kwargs.update(dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    if precision is not None:
      if not takes_precision:
        raise ValueError(f"precision={precision}: {_kernel_name(kernel)!r} takes no precision")
      kwargs["precision"] = precision
    out = kernel(q, k, v, score_mod=score, mask_mod=sm.and_masks(*masks), **kwargs)
    out = jnp.swapaxes(out, 1, 2)                              # (B, Sq, H, Dv)
    return out.reshape(batch_shape + out.shape[1:])

  attention_fn.__name__ = f"flax_attention_fn({_kernel_name(kernel)})"
  attention_fn.kernel = kernel
  return attention_fn
