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

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from attnax.attention import _kernel_name, accepts_keyword, is_attention_fn
from attnax.kernels import score_mods as sm
from attnax.nn import check_broadcast, check_layout, peer_empty_rows, run_kernel

__all__ = ["flax_attention_fn", "ArrayMask"]

# Flax's boolean mask as a mask mod (kept under its old name here).
ArrayMask = sm.ArrayMask


def _to_rank4(x: jax.Array, batch_shape: tuple[int, ...]) -> jax.Array:
  """Flax's ``(batch..., H, Sq, Sk)``-broadcastable array -> rank 4 with one batch axis."""
  nb = len(batch_shape)
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


_SOW_REASON = ("sow_weights=True asks for the (batch, heads, q, kv) attention weights, which an "
               "attnax kernel never materialises (that is what keeps it O(seq) in memory); run the "
               "layers whose weights you inspect with Flax's own dot_product_attention")


def flax_attention_fn(kernel: Callable[..., Any], *, score_mod: Any = None, mask_mod: Any = None,
                      **options: Any) -> Callable[..., jax.Array]:
  """An ``attention_fn`` for Flax's attention modules (nnx and Linen) that runs an attnax kernel.

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

  Translation rules: shapes are checked first (a ValueError naming them, whatever else the call
  asks for); ``bias`` becomes :func:`~attnax.kernels.additive_bias_mod` and ``mask``
  :func:`~attnax.kernels.array_mask_mod` (False = masked), both read at the kernel's indices;
  ``is_causal`` is ``causal_mod()`` (top-left aligned, as Flax's ``tril``). A query that sees no
  key gets the mean of the values, as Flax gives (its softmax over equal masked logits is
  uniform), instead of the kernels' 0. ``precision`` reaches kernels that take one
  (``standard_attention``); the fused kernels ignore it (their matmuls accumulate in f32 at the
  input precision; Flax itself ignores it unless dropout or ``sow_weights`` is on). Dropout is
  passed to the kernel when it takes ``dropout_rate``/``dropout_rng`` and raises ``ValueError``
  otherwise; masks are drawn per weight (``broadcast_dropout`` is ignored), so they differ from
  Flax's own draws. ``sow_weights=True`` (Flax passes ``module``) raises ``ValueError``: the
  kernels never materialise the weights.
  """
  if not is_attention_fn(kernel):
    raise ValueError(f"{_kernel_name(kernel)!r} does not meet the AttentionFn signature "
                     "fn(q, k, v, *, score_mod=None, mask_mod=None, scale=None)")
  sm.check_mod(score_mod, 5, "score_mod")
  sm.check_mod(mask_mod, 4, "mask_mod")
  held = (score_mod, mask_mod)
  takes_dropout = accepts_keyword(kernel, "dropout_rate") and accepts_keyword(kernel, "dropout_rng")
  takes_precision = accepts_keyword(kernel, "precision")
  name = f"flax_attention_fn({_kernel_name(kernel)})"

  def attention_fn(query: jax.Array, key: jax.Array, value: jax.Array,
                   bias: jax.Array | None = None, mask: jax.Array | None = None, *,
                   broadcast_dropout: bool = True, dropout_rng: jax.Array | None = None,
                   dropout_rate: float = 0.0, deterministic: bool = False, dtype: Any = None,
                   precision: Any = None, module: Any = None, is_causal: bool = False,
                   **unused: Any) -> jax.Array:
    del broadcast_dropout
    # Shapes first: a shape error is reported as one, whatever else the call asks for.
    batch_shape, sq, sk, heads, _ = check_layout(query, key, value, fn=name)
    target = batch_shape + (heads, sq, sk)
    axes = "(batch..., heads, q_length, kv_length)"
    if bias is not None:
      bias = check_broadcast(bias, target, "bias", name, axes)
    if mask is not None:
      mask = check_broadcast(mask, target, "mask", name, axes)
    if module is not None:
      raise ValueError(f"{name}: {_SOW_REASON}")
    if unused.get("input_positions") is not None:
      raise ValueError(f"{name}: input_positions (Flax's RoPE hook) is not supported; "
                       "use attnax.MultiHeadAttention(rope=True)")
    kwargs = dict(options)
    if not deterministic and dropout_rate > 0.0:
      if not takes_dropout:
        raise ValueError(f"{name}: dropout_rate={dropout_rate}: {_kernel_name(kernel)!r} does not "
                         "take dropout_rate/dropout_rng")
      kwargs.update(dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    if precision is not None and takes_precision:
      kwargs["precision"] = precision
    dt = dtype if dtype is not None else jnp.result_type(query, key, value)
    to_kernel = lambda x: jnp.swapaxes(
        x.reshape((math.prod(batch_shape),) + x.shape[-3:]), 1, 2).astype(dt)
    q, k, v = to_kernel(query), to_kernel(key), to_kernel(value)

    base_score, base_mask = held
    score = sm.compose_score_mods(
        base_score, None if bias is None else sm.additive_bias_mod(_to_rank4(bias, batch_shape)))
    masks = [base_mask]
    if mask is not None:
      masks.append(sm.array_mask_mod(_to_rank4(mask, batch_shape).astype(bool)).mask_mod)
    if is_causal:
      masks.append(sm.CausalMask(0))
    combined = sm.and_masks(*masks)
    # Rows that see no key get Flax's mean of the values; only a mask (Flax's, is_causal or one
    # the held mods carry) can empty a row.
    maybe_empty = sm.and_masks(sm.split_score_mod(score)[1], combined) is not None
    out, lse = run_kernel(kernel, q, k, v, score_mod=score, mask_mod=combined, scale=None,
                          need_lse=maybe_empty, fn=name, **kwargs)
    if maybe_empty:
      out, _ = peer_empty_rows(out, lse, v)
    out = jnp.swapaxes(out, 1, 2)                              # (B, Sq, H, Dv)
    return out.reshape(batch_shape + out.shape[1:])

  attention_fn.__name__ = name
  attention_fn.kernel = kernel
  return attention_fn
