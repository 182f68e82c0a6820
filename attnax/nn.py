"""``attnax.dot_product_attention``: ``jax.nn.dot_product_attention``'s API on any attnax kernel.

A JAX user swaps one import::

  out = attnax.dot_product_attention(q, k, v, bias, mask, is_causal=True)   # was jax.nn.

Arrays keep JAX's ``(batch, seq, heads, head_dim)`` layout (or ``(seq, heads, head_dim)``) and its
semantics; every argument becomes a mod, so block kernels skip what the masks hide:

====================================  ==================================================
``jax.nn.dot_product_attention``      attnax mod
====================================  ==================================================
``bias``                              :func:`~attnax.kernels.additive_bias_mod`
``mask``                              :func:`~attnax.kernels.array_mask_mod`
``is_causal``                         :func:`~attnax.kernels.causal_mod` (top-left, as ``tril``)
``local_window_size=(left, right)``   :func:`~attnax.kernels.local_window_mod`
``query_seq_lengths``                 a query-length mask (padded queries output 0)
``key_value_seq_lengths``             :func:`~attnax.kernels.padding_mask_mod`
====================================  ==================================================

Where JAX's result and attnax's kernel conventions differ, this function gives JAX's (see the
"JAX and Flax compatibility" page): a query that sees no key gets the mean of the values, the
residual (LSE) is returned without a gradient, in the key's dtype.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from attnax.attention import _kernel_name, accepts_keyword, is_attention_fn
from attnax.kernels import _checks
from attnax.kernels import score_mods as sm
from attnax.kernels.aether import aether_attention
from attnax.kernels.flash import flash_attention
from attnax.kernels.gqa import repeat_kv
from attnax.kernels.memory_efficient import memory_efficient_attention
from attnax.kernels.pallas import AUTO_ORDER, not_supported_reasons, pallas_flash_attention
from attnax.kernels.reference import standard_attention

__all__ = ["dot_product_attention", "IMPLEMENTATIONS", "resolve_implementation", "to_mods"]

# implementation= names -> kernels. "xla" is JAX's name for its materialised path.
IMPLEMENTATIONS: dict[str, Callable[..., Any]] = {
    "standard": standard_attention,
    "memory_efficient": memory_efficient_attention,
    "flash": flash_attention,
    "pallas": pallas_flash_attention,
    "aether": aether_attention,
}
_ALIASES = {"xla": "standard"}

_LAYOUT = "(batch..., seq, heads, head_dim)"


# ----------------------------------------------------------------------------- checks shared with
# flax_attention_fn (both take the (batch..., seq, heads, head_dim) layout)


def check_layout(query: Any, key: Any, value: Any, *, fn: str,
                 max_batch_dims: int | None = None) -> tuple[tuple[int, ...], int, int, int, int]:
  """Validate ``query (..., T, N, H)``, ``key (..., S, K, H)``, ``value (..., S, K, Hv)``.

  Returns ``(batch_shape, T, S, N, K)``; a ValueError naming the arguments and their shapes
  otherwise (before any dtype cast, mask or dropout is looked at).
  """
  for name, x in (("query", query), ("key", key), ("value", value)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise ValueError(f"{fn}: {name} must be an array, got {type(x).__name__}")
  shapes = f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
  ranks = " (3 or 4)" if max_batch_dims == 1 else " (at least 3)"
  if query.ndim < 3 or not query.ndim == key.ndim == value.ndim:
    raise ValueError(f"{fn}: query, key and value must be {_LAYOUT} arrays of the same "
                     f"rank{ranks}, got {shapes}")
  if max_batch_dims is not None and query.ndim - 3 > max_batch_dims:
    raise ValueError(f"{fn}: query, key and value must have rank 3 or 4 ({_LAYOUT} with at most "
                     f"{max_batch_dims} batch axis), got {shapes}")
  batch = tuple(query.shape[:-3])
  if tuple(key.shape[:-3]) != batch or tuple(value.shape[:-3]) != batch:
    raise ValueError(f"{fn}: query, key and value batch dims differ: {shapes}")
  t, n, h = query.shape[-3:]
  s, kh, hk = key.shape[-3:]
  sv, kv, _ = value.shape[-3:]
  if hk != h:
    raise ValueError(f"{fn}: query and key head_dim differ ({h} vs {hk}): {shapes}")
  if sv != s:
    raise ValueError(f"{fn}: key and value lengths differ ({s} vs {sv}): {shapes}")
  if kv != kh:
    raise ValueError(f"{fn}: key and value heads differ ({kh} vs {kv}): {shapes}")
  if kh == 0 or n % kh:
    raise ValueError(f"{fn}: the number of query heads ({n}) must be a multiple of the key/value "
                     f"heads ({kh}): {shapes}")
  if 0 in tuple(query.shape) + tuple(key.shape) + tuple(value.shape):
    raise ValueError(f"{fn}: empty dimension: {shapes}")
  for name, x in (("query", query), ("key", key), ("value", value)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{fn}: {name} must be floating point, got {x.dtype}: {shapes}")
  return batch, t, s, n, kh


def check_broadcast(x: Any, target: tuple[int, ...], name: str, fn: str,
                    axes: str) -> jax.Array:
  """``x`` as an array whose (right-aligned) axes are 1 or ``target``'s; a ValueError otherwise.

  ``axes`` names the target's axes for the message (e.g. ``"(B, N, T, S)"``).
  """
  try:
    x = jnp.asarray(x)
  except (TypeError, ValueError):
    raise ValueError(f"{fn}: {name} must be an array, got {type(x).__name__}") from None
  shape = tuple(x.shape)
  if x.ndim > len(target) or any(d not in (1, t) for d, t in zip(shape[::-1], target[::-1])):
    raise ValueError(f"{fn}: {name} of shape {shape} is not broadcastable to {axes} = "
                     f"{tuple(target)} (each axis must be 1 or the inputs' size)")
  return x


def _window(size: Any, fn: str) -> tuple[Any, Any] | None:
  if size is None:
    return None
  if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
    return int(size), int(size)
  if isinstance(size, (tuple, list)) and len(size) == 2:
    return tuple(size)
  raise ValueError(f"{fn}: local_window_size must be an int or a (left, right) pair, got "
                   f"{size!r}")


# ----------------------------------------------------------------------------- kernels


def default_implementation(q: jax.Array, k: jax.Array, v: jax.Array) -> str:
  """The fastest kernel for the device and inputs (kernel layout ``(B, H, S, D)``).

  On a GPU the Pallas kernel, when one of its compiled lowerings takes the inputs (float64 and
  very large head dims it does not); elsewhere the pure-JAX flash kernel (the Pallas interpreter
  is far slower than XLA on a CPU).
  """
  if jax.default_backend() == "gpu" and q.dtype != jnp.float64:
    compiled = [b for b in AUTO_ORDER if b != "interpret"]
    if any(not not_supported_reasons(b, q, k, v) for b in compiled):
      return "pallas"
  return "flash"


def resolve_implementation(implementation: Any, q: jax.Array, k: jax.Array,
                           v: jax.Array) -> Callable[..., Any]:
  """The kernel ``implementation=`` names: a name of :data:`IMPLEMENTATIONS` (``"xla"`` is
  ``"standard"``), an :class:`~attnax.kernels.AttentionFn`, or None for
  :func:`default_implementation`."""
  if implementation is None:
    return IMPLEMENTATIONS[default_implementation(q, k, v)]
  if isinstance(implementation, str):
    name = _ALIASES.get(implementation, implementation)
    if name == "cudnn":
      raise ValueError("attnax.dot_product_attention: implementation='cudnn' is JAX's own cuDNN "
                       "call; attnax runs its kernels (implementation='pallas' is the fused GPU "
                       "kernel), or call jax.nn.dot_product_attention(implementation='cudnn')")
    if name not in IMPLEMENTATIONS:
      raise ValueError(f"attnax.dot_product_attention: unknown implementation {implementation!r}; "
                       f"choose one of {tuple(IMPLEMENTATIONS)}, 'xla', None, or pass an "
                       "AttentionFn")
    return IMPLEMENTATIONS[name]
  if is_attention_fn(implementation):
    return implementation
  raise ValueError(f"attnax.dot_product_attention: implementation must be a name, None or an "
                   f"AttentionFn fn(q, k, v, *, score_mod=None, mask_mod=None, scale=None, "
                   f"return_lse=False), got {_kernel_name(implementation)!r}")


def run_kernel(kernel: Callable[..., Any], q, k, v, *, score_mod, mask_mod, scale, need_lse: bool,
               fn: str, **options) -> tuple[jax.Array, jax.Array | None]:
  """``kernel(q, k, v, ...)`` -> ``(out, lse or None)``; a ValueError if the LSE is needed and the
  kernel does not return one."""
  if not need_lse:
    return kernel(q, k, v, score_mod=score_mod, mask_mod=mask_mod, scale=scale, **options), None
  if not accepts_keyword(kernel, "return_lse"):
    raise ValueError(f"{fn}: {_kernel_name(kernel)!r} takes no return_lse; it is needed for the "
                     "residual and, with masks, for the rows that see no key")
  return kernel(q, k, v, score_mod=score_mod, mask_mod=mask_mod, scale=scale, return_lse=True,
                **options)


def peer_empty_rows(out: jax.Array, lse: jax.Array, v: jax.Array,
                    query_valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """JAX's and Flax's result for the rows that see no key (kernel layout ``(B, H, S, D)``).

  Their softmax of equal masked logits is uniform, so such a row is the mean of the values over
  all keys, and its LSE ``MASK_VALUE + log(Sk)`` (finite); attnax kernels give 0 and ``-inf``.
  Gradients follow: d(out)/d(v) is ``1 / Sk`` there, nothing reaches q, k or the bias. Rows past
  ``query_valid`` (``(B, Sq)``, JAX's ``query_seq_lengths``) keep 0, as JAX zeroes them.
  """
  empty = lse == -jnp.inf                                        # (B, Hq, Sq); NaN is not empty
  fill = empty if query_valid is None else empty & query_valid[:, None, :]
  acc = jnp.promote_types(v.dtype, jnp.float32)
  mean_v = jnp.mean(v.astype(acc), axis=2, keepdims=True)         # (B, Hkv, 1, Dv)
  mean_v = repeat_kv(mean_v, out.shape[1] // v.shape[1]).astype(out.dtype)
  out = jnp.where(fill[..., None], mean_v, out)
  empty_lse = jnp.asarray(sm.MASK_VALUE, lse.dtype) + jnp.log(jnp.asarray(v.shape[2], lse.dtype))
  return out, jnp.where(empty, empty_lse, lse)


def _to_kernel(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, 1, 2)          # (B, S, N, H) <-> (B, N, S, H)


# ----------------------------------------------------------------------------- arguments -> mods


def to_mods(shape: tuple[int, int, int, int], *, bias: Any = None, mask: Any = None,
            is_causal: bool = False, query_seq_lengths: Any = None,
            key_value_seq_lengths: Any = None, local_window_size: Any = None,
            logits_soft_cap: float | None = None,
            fn: str = "attnax.dot_product_attention") -> tuple[Any, Any]:
  """The ``(score_mod, mask_mod)`` that :func:`dot_product_attention` runs for its arguments.

  ``shape`` is ``(B, N, T, S)``: batch, query heads, query and key lengths. The score part is the
  bias then the soft cap; the mask part is the conjunction of the mask array, the causal mask,
  the window and the two length masks (each with its own tile rule, so block kernels skip the
  tiles they hide). Arguments are validated here (ValueErrors naming them and their shapes).
  """
  b = shape[0]
  axes = "(B, N, T, S)"
  score_parts, mask_parts = [], []
  if bias is not None:
    score_parts.append(sm.additive_bias_mod(check_broadcast(bias, shape, "bias", fn, axes)))
  if logits_soft_cap is not None:
    score_parts.append(sm.softcap_mod(logits_soft_cap))
  if mask is not None:
    mask = check_broadcast(mask, shape, "mask", fn, axes)
    if mask.dtype != jnp.bool_:
      raise ValueError(f"{fn}: mask must be boolean (True = attend), got {mask.dtype}"
                       f"{tuple(mask.shape)}; an additive mask belongs in bias")
    mask_parts.append(sm.array_mask_mod(mask).mask_mod)
  if is_causal:
    mask_parts.append(sm.CausalMask(0))
  window = _window(local_window_size, fn)
  if window is not None:
    mask_parts.append(sm.local_window_mod(*window).mask_mod)
  q_lengths = _checks.check_lengths(query_seq_lengths, b, "query_seq_lengths", fn)
  kv_lengths = _checks.check_lengths(key_value_seq_lengths, b, "key_value_seq_lengths",
                                      fn)
  if q_lengths is not None:
    mask_parts.append(sm.QueryLengthMask(q_lengths))
  if kv_lengths is not None:
    mask_parts.append(sm.PaddingLengthMask(kv_lengths))
  return sm.compose_score_mods(*score_parts), sm.and_masks(*mask_parts)


# ----------------------------------------------------------------------------- the function


def dot_product_attention(query: Any, key: Any, value: Any, bias: Any = None, mask: Any = None, *,
                          scale: float | None = None, is_causal: bool = False,
                          query_seq_lengths: Any = None, key_value_seq_lengths: Any = None,
                          local_window_size: int | tuple[int, int] | None = None,
                          implementation: Any = None, return_residual: bool = False,
                          logits_soft_cap: float | None = None) -> Any:
  r"""Scaled dot-product attention with ``jax.nn.dot_product_attention``'s API, on attnax kernels.

  ``softmax(scale * q k^T + bias, masked) v`` per head, with JAX's layout, arguments and results
  (the same code runs after ``import attnax`` and ``jax.nn.`` -> ``attnax.``). Each argument
  becomes an attnax mod, so the block kernels (flash, Pallas, AETHER) skip the tiles that the
  mask, the causal mask, the window or the lengths hide, in the forward and the backward; every
  kernel differentiates q, k, v and ``bias``.

  Args:
    query: ``(B, T, N, H)`` or ``(T, N, H)``.
    key: ``(B, S, K, H)`` or ``(S, K, H)``; ``N % K == 0`` (grouped-query and multi-query
      attention: query head ``n`` reads kv head ``n // (N // K)``).
    value: ``(B, S, K, Hv)`` (JAX requires ``Hv == H``; attnax also takes another value dim).
      query, key and value share one floating dtype.
    bias: added to the scaled logits; rank <= 4, broadcastable to ``(B, N, T, S)``.
    mask: boolean, True where a query may attend; rank <= 4, broadcastable to ``(B, N, T, S)``.
    scale: the logit scale, a static Python float; default ``1 / sqrt(H)``.
    is_causal: query ``i`` sees keys ``j <= i`` (top-left aligned, as JAX's ``tril``).
    query_seq_lengths: int ``(B,)``; queries at or past the length output 0.
    key_value_seq_lengths: int ``(B,)``; keys at or past the length are masked.
    local_window_size: ``(left, right)``: query ``i`` sees keys ``i - left .. i + right``; an
      int ``w`` means ``(w, w)``.
    implementation: which attnax kernel runs: ``"standard"`` (alias ``"xla"``: materialised
      scores), ``"memory_efficient"``, ``"flash"``, ``"pallas"``, ``"aether"`` (certified
      pruning at its default ``epsilon=1e-3``: approximate), any
      :class:`~attnax.kernels.AttentionFn` (e.g. ``functools.partial(flash_attention,
      block_q=64)`` or ``AetherAttention(epsilon=1e-5)``), or None: the fastest for the device
      (the Pallas kernel on a GPU, flash elsewhere).
    return_residual: also return the log-sum-exp of the logits, ``(B, T, N)`` (``(T, N)``) in
      the key's dtype, with its gradient stopped (as JAX).
    logits_soft_cap: ``cap * tanh(logits / cap)`` after the bias and before the masks (tokamax's
      ``logits_soft_cap``; not in ``jax.nn``).

  Returns:
    ``out`` of query's shape with value's last dim, or ``(out, residual)``. A query that sees no
    key gets the mean of the values (JAX's uniform softmax over masked logits) and residual
    ``-0.7 * float32_max + log(S)``; a query past ``query_seq_lengths`` gets 0.

  Raises:
    ValueError: shapes or dtypes that do not fit (named with their shapes), a non-boolean mask,
      a bias or mask that does not broadcast, lengths that are not ``(B,)`` integers, an unknown
      implementation, or inputs the chosen kernel cannot run (its own message).
  """
  fn = "attnax.dot_product_attention"
  arrays = []
  for name, x in (("query", query), ("key", key), ("value", value)):
    try:
      arrays.append(jnp.asarray(x))
    except (TypeError, ValueError):
      raise ValueError(f"{fn}: {name} must be an array, got {type(x).__name__}") from None
  query, key, value = arrays
  check_layout(query, key, value, fn=fn, max_batch_dims=1)
  if not query.dtype == key.dtype == value.dtype:
    raise ValueError(f"{fn}: query, key and value must share a dtype, got {query.dtype}, "
                     f"{key.dtype}, {value.dtype}")
  out_shape = query.shape[:-1] + value.shape[-1:]
  if query.ndim == 3:
    query, key, value = query[None], key[None], value[None]
  b, t, n, _ = query.shape
  score_mod, mask_mod = to_mods(
      (b, n, t, key.shape[1]), bias=bias, mask=mask, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size, logits_soft_cap=logits_soft_cap, fn=fn)
  q, k, v = _to_kernel(query), _to_kernel(key), _to_kernel(value)
  kernel = resolve_implementation(implementation, q, k, v)
  out, lse = run_kernel(kernel, q, k, v, score_mod=score_mod, mask_mod=mask_mod, scale=scale,
                        need_lse=bool(return_residual) or mask_mod is not None, fn=fn)
  if mask_mod is not None:
    valid = None
    if query_seq_lengths is not None:
      valid = jnp.arange(t)[None, :] < jnp.asarray(query_seq_lengths)[:, None]
    out, lse = peer_empty_rows(out, lse, v, valid)
  out = _to_kernel(out).reshape(out_shape)
  if not return_residual:
    return out
  residual = jax.lax.stop_gradient(jnp.swapaxes(lse, 1, 2)).astype(key.dtype)   # (B, T, N)
  return out, residual.reshape(out_shape[:-1])
