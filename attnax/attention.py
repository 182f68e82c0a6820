"""``MultiHeadAttention``: a Flax NNX attention module that runs any attnax kernel.

The module does the parts of attention that are not the kernel: the query/key/value and output
projections (laid out as ``flax.nnx.MultiHeadAttention``'s, so parameters load across),
grouped-query heads, optional QK-normalisation and rotary position embedding, composition of the
constructor's and the call's score/mask mods, attention-weight dropout, and a KV cache for
autoregressive decoding.
The kernel sees ``(B, H, S, D)`` arrays and is called as
``attention_fn(q, k, v, score_mod=..., mask_mod=..., scale=...)``.

One call, step by step::

  inputs (..., S, F) -> projections (B, S, H, D) -> qk_norm -> (B, H, S, D) -> RoPE
    [decode: write k, v into the cache at cache_index; mods moved to absolute positions]
    -> attention_fn -> (B, S, H, Dv) -> output projection (..., S, out_features)
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import initializers
from flax.nnx.nn.linear import default_kernel_init

from attnax.kernels import _checks
from attnax.kernels import score_mods as sm
from attnax.kernels.reference import standard_attention
from attnax.rope import apply_rope, rope_frequencies

__all__ = ["MultiHeadAttention", "AttentionType", "ModBuffer", "is_attention_fn",
           "accepts_keyword"]


# ----------------------------------------------------------------------------- AttentionType


class AttentionType(enum.Enum):
  """How query heads share key/value heads.

  ``MULTI_HEAD``: every query head has its own key/value head (``num_kv_heads == num_heads``).
  ``GROUPED_QUERY``: groups of ``num_heads // num_kv_heads`` query heads share a key/value head
  (``1 < num_kv_heads < num_heads``; Ainslie et al., GQA). Query head ``h`` reads key/value head
  ``h // (num_heads // num_kv_heads)``.
  ``MULTI_QUERY``: all query heads share one key/value head (``num_kv_heads == 1``; Shazeer, MQA).

  :attr:`MultiHeadAttention.attention_type` reports the layout a module has; the constructor's
  ``attention_type=`` argument either picks ``num_kv_heads`` (``MULTI_HEAD``, ``MULTI_QUERY``) or is
  checked against it; it also takes the names as strings (``"grouped_query"``, ``"MULTI_QUERY"``).
  """

  MULTI_HEAD = "multi_head"
  GROUPED_QUERY = "grouped_query"
  MULTI_QUERY = "multi_query"

  @classmethod
  def of(cls, num_heads: int, num_kv_heads: int) -> "AttentionType":
    """The layout of ``num_heads`` query heads over ``num_kv_heads`` key/value heads."""
    if num_kv_heads == num_heads:
      return cls.MULTI_HEAD
    if num_kv_heads == 1:
      return cls.MULTI_QUERY
    return cls.GROUPED_QUERY

  @classmethod
  def parse(cls, value: Any) -> "AttentionType":
    """An ``AttentionType`` from itself or its name / value as a string (any case)."""
    if isinstance(value, cls):
      return value
    if isinstance(value, str):
      key = value.strip().lower().replace("-", "_").replace(" ", "_")
      for member in cls:
        if key in (member.value, member.name.lower()):
          return member
    raise ValueError(f"attention_type must be one of {[m.name for m in cls]}, got {value!r}")


# ----------------------------------------------------------------------------- helpers


def accepts_keyword(fn: Callable, name: str) -> bool:
  """True if ``fn``'s signature names a parameter ``name`` (a ``**kwargs`` does not count)."""
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False
  p = params.get(name)
  return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def is_attention_fn(fn: Any) -> bool:
  """Whether ``fn`` can be called as ``fn(q, k, v, score_mod=, mask_mod=, scale=)`` (AttentionFn).

  Decided from the signature alone: kernels that need more arguments (``paged_attention``'s block
  tables, ``ring_attention``'s mesh) do not bind and are not attention functions in this sense.
  """
  if not callable(fn):
    return False
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return True  # a builtin without a signature: give it the benefit of the doubt
  try:
    sig.bind(0, 0, 0, score_mod=None, mask_mod=None, scale=None)
  except TypeError:
    return False
  return True


def _kernel_name(fn: Any) -> str:
  inner = fn.func if isinstance(fn, functools.partial) else fn
  return getattr(inner, "__name__", type(inner).__name__)


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


class ModBuffer(nnx.Variable):
  """An array carried by a score or mask mod (ALiBi slopes, document ids, a bias table).

  Module state like ``nnx.Cache``, not a trained parameter: ``nnx.Param`` filters (optimisers,
  ``nnx.grad``) leave it out, while ``nnx.state``, ``nnx.update``, ``nnx.vmap``/``nnx.scan`` over
  layers and checkpoints carry it.
  """


def _split_mod(mod: Any) -> tuple[Any, nnx.List]:
  """A mod -> (hashable static description, ``nnx.List`` of :class:`ModBuffer`)."""
  if mod is None:
    return None, nnx.List([])
  leaves, treedef = jax.tree.flatten(mod)
  buffers = nnx.List([ModBuffer(jnp.asarray(x)) for x in leaves if _is_array(x)])
  return (treedef, tuple(None if _is_array(x) else x for x in leaves)), buffers


def _join_mod(static: Any, buffers: nnx.List) -> Any:
  if static is None:
    return None
  treedef, leaves = static
  it = iter(buffers)
  return jax.tree.unflatten(treedef, [next(it)[...] if x is None else x for x in leaves])


# ----------------------------------------------------------------------------- decode-time mods
#
# During decoding the kernel sees q rows 0..Sq-1 and the whole cache as keys 0..L-1, while the
# queries sit at absolute positions cache_index + 0..Sq-1 (a traced value). These pytree mods shift
# the query index by an int32 offset of shape (1,) (read with `take`, so a Pallas kernel can pass it
# in as an operand like any other captured array) and keep block-level skipping where they can.


def _ranges(block: int, length: int) -> tuple[jax.Array, jax.Array]:
  n = -(-length // block)
  lo = np.arange(n) * block
  return jnp.asarray(lo, jnp.int32), jnp.asarray(np.minimum(lo + block, length) - 1, jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVLengthMask:
  """Keep ``kv_idx < length``: the cache slots written so far (``length`` int32 ``(1,)``)."""
  length: jax.Array

  def __call__(self, b, h, q_idx, kv_idx):
    return kv_idx < sm.take(self.length, kv_idx)

  def tile_visibility(self, block_q, block_k, q_len, kv_len):
    k_lo, k_hi = _ranges(block_k, kv_len)
    n = self.length[0]
    return (k_lo < n)[None, None, None, :], (k_hi < n)[None, None, None, :]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["offset"],
                   meta_fields=["window_size"])
@dataclasses.dataclass(frozen=True)
class ShiftedWindowMask:
  """Keep ``0 <= q_idx + offset - kv_idx`` (and ``< window_size`` when set); ``offset`` ``(1,)``.

  The causal and sliding-window masks of a decoding step, whose queries start at ``offset``.
  """
  offset: jax.Array
  window_size: int | None = None

  def __call__(self, b, h, q_idx, kv_idx):
    d = q_idx + sm.take(self.offset, q_idx) - kv_idx
    keep = d >= 0
    return keep if self.window_size is None else keep & (d < self.window_size)

  def tile_visibility(self, block_q, block_k, q_len, kv_len):
    q_lo, q_hi = _ranges(block_q, q_len)
    k_lo, k_hi = _ranges(block_k, kv_len)
    o = self.offset[0]
    d_min = q_lo[:, None] + o - k_hi[None, :]
    d_max = q_hi[:, None] + o - k_lo[None, :]
    any_, all_ = d_max >= 0, d_min >= 0
    if self.window_size is not None:
      any_ = any_ & (d_min < self.window_size)
      all_ = all_ & (d_max < self.window_size)
    return any_[None, None], all_[None, None]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ShiftedMask:
  """``mask(b, h, q_idx + offset, kv_idx)`` for any mask mod; ``offset`` int32 ``(1,)``."""
  mask: Any
  offset: jax.Array

  def __call__(self, b, h, q_idx, kv_idx):
    return self.mask(b, h, q_idx + sm.take(self.offset, q_idx), kv_idx)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ShiftedScoreMod:
  """``mod(score, b, h, q_idx + offset, kv_idx)``; ``offset`` int32 ``(1,)``."""
  mod: Any
  offset: jax.Array

  def __call__(self, score, b, h, q_idx, kv_idx):
    return self.mod(score, b, h, q_idx + sm.take(self.offset, q_idx), kv_idx)


def _shift_mask(mask: Any, offset: jax.Array) -> Any:
  """``mask`` with query positions moved by ``offset``, keeping the built-in masks' tile rules."""
  if mask is None:
    return None
  if isinstance(mask, sm.AndMask):
    return sm.and_masks(*(_shift_mask(m, offset) for m in mask.masks))
  if isinstance(mask, sm.CausalMask):
    return ShiftedWindowMask(offset + mask.offset)
  if isinstance(mask, sm.SlidingWindowMask):
    return ShiftedWindowMask(offset + mask.offset, mask.window_size)
  return ShiftedMask(mask, offset)


# ----------------------------------------------------------------------------- the module


def _resolve_qk_norm(qk_norm: Any) -> str | None:
  if qk_norm is None or qk_norm is False:
    return None
  if qk_norm is True:
    return "rms"
  if isinstance(qk_norm, str) and qk_norm.lower() in ("rms", "rmsnorm"):
    return "rms"
  if isinstance(qk_norm, str) and qk_norm.lower() in ("layer", "layernorm"):
    return "layer"
  raise ValueError(f"qk_norm must be False, True, 'rms' or 'layer', got {qk_norm!r}")


def _first(*values):
  for v in values:
    if v is not None:
      return v
  return None


class MultiHeadAttention(nnx.Module):
  """Multi-head attention that runs any attnax kernel, with GQA/MQA, RoPE, QK-norm and a KV cache.

  Projects ``inputs_q`` ``(..., Sq, in_features)`` to ``num_heads`` query heads and ``inputs_k``,
  ``inputs_v`` ``(..., Sk, in_kv_features)`` to ``num_kv_heads`` key/value heads of size
  ``head_dim = qkv_features // num_heads``, runs ``attention_fn`` on ``(B, H, S, head_dim)`` arrays
  and projects the heads back to ``(..., Sq, out_features)``. Parameters have the names and
  shapes of :class:`flax.nnx.MultiHeadAttention`'s (``query``, ``key``, ``value``: ``LinearGeneral``
  ``(in, heads, head_dim)``; ``out``: ``(num_heads, head_dim, out)``), so
  :meth:`from_flax` / :meth:`load_flax_params` carry a Flax module's weights over.

  ``rngs`` may be given first, positionally, or as ``rngs=``; every other argument is keyword-only::

    attn = MultiHeadAttention(rngs, num_heads=8, in_features=512,
                              attention_fn=flash_attention, score_mod=causal_mod())

  Args:
    rngs: ``nnx.Rngs`` for the parameter initialisers (and the dropout stream when
      ``dropout_rate > 0``).
    num_heads: number of query heads.
    in_features: feature size of ``inputs_q``.
    qkv_features: total size of the query projection, ``num_heads * head_dim``; default
      ``in_features``. Must be divisible by ``num_heads``.
    out_features: feature size of the output; default ``in_features``.
    num_kv_heads: number of key/value heads; default ``num_heads`` (or what ``attention_type``
      implies). ``num_heads % num_kv_heads == 0``; fewer kv heads is grouped-query attention, one is
      multi-query attention.
    in_kv_features: feature size of ``inputs_k``/``inputs_v``; default ``in_features``.
    attention_type: optional :class:`AttentionType`. Without ``num_kv_heads``, ``MULTI_HEAD`` and
      ``MULTI_QUERY`` choose it (``GROUPED_QUERY`` needs an explicit ``num_kv_heads``); with it, the
      two must agree.
    attention_fn: the kernel, any :class:`~attnax.kernels.AttentionFn`
      (``standard_attention``, ``flash_attention``, a ``functools.partial`` of one with its options,
      an ``AetherAttention``, or a user function with the same signature).
    score_mod: :class:`~attnax.kernels.ScoreMod` applied at every call (e.g. ``causal_mod()``,
      ``alibi_mod(num_heads=8)``, a composition); per-call mods are composed after it.
    mask_mod: :class:`~attnax.kernels.MaskMod` applied at every call; per-call mask mods are and-ed
      with it.
    scale: score scale passed to the kernel; default ``head_dim ** -0.5``.
    dropout_rate: attention-weight dropout, applied inside the kernel to the softmax
      probabilities (kept ones scaled by ``1 / (1 - dropout_rate)``). Kernels whose signature
      takes ``dropout_rate`` and ``dropout_rng`` support it: ``standard_attention``,
      ``memory_efficient_attention``, ``flash_attention`` and ``pallas_flash_attention`` (fused:
      the mask is regenerated in the backward, never stored), and ``functools.partial`` objects
      of them. The key comes from the module's ``rngs`` (its ``dropout`` stream) at every training
      call. Any other kernel works with ``dropout_rate > 0`` whenever dropout is off
      (``deterministic=True``) and raises ``ValueError`` naming the kernel on a call that would
      drop, rather than silently not dropping.
    deterministic: default of the call's ``deterministic`` (dropout off when True).
    use_bias: whether the four projections have biases.
    dtype: computation dtype of the projections and the kernel (default: inferred from inputs and
      parameters, as in Flax).
    param_dtype: parameter dtype.
    precision: ``jax.lax.Precision`` of the projections.
    kernel_init: initialiser of the projection kernels.
    out_kernel_init: initialiser of the output kernel; default ``kernel_init``.
    bias_init: initialiser of the biases.
    out_bias_init: initialiser of the output bias; default ``bias_init``.
    rope: apply rotary position embedding (:mod:`attnax.rope`, "rotate half" layout) to queries and
      keys after QK-norm, at absolute positions (``0..S-1``; during decoding,
      ``cache_index + 0..S-1``). Needs an even ``head_dim``.
    rope_theta: base of the rotary frequencies.
    qk_norm: normalise every query and key head before RoPE: ``True``/``"rms"`` is an RMSNorm over
      ``head_dim`` with a learned scale shared by the heads (as in Qwen3, OLMo-2); ``"layer"`` is a
      bias-free LayerNorm, ``flax.nnx.MultiHeadAttention(normalize_qk=True)``'s choice.
    qk_norm_epsilon: epsilon of the QK-norm.
    decode: default of the call's ``decode`` (use the KV cache).

  Attributes:
    head_dim: ``qkv_features // num_heads``.
    cached_key, cached_value: ``nnx.Cache`` ``(B, num_kv_heads, max_length, head_dim)`` after
      :meth:`init_cache` (keys stored after QK-norm and RoPE).
    cache_index: ``nnx.Cache`` int32 scalar, the number of positions written.
  """

  def __init__(
      self,
      rngs: nnx.Rngs,
      *,
      num_heads: int,
      in_features: int,
      qkv_features: int | None = None,
      out_features: int | None = None,
      num_kv_heads: int | None = None,
      in_kv_features: int | None = None,
      attention_type: AttentionType | str | None = None,
      attention_fn: Callable[..., Any] = standard_attention,
      score_mod: Any = None,
      mask_mod: Any = None,
      scale: float | None = None,
      dropout_rate: float = 0.0,
      deterministic: bool | None = None,
      use_bias: bool = True,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      precision: Any = None,
      kernel_init: Any = default_kernel_init,
      out_kernel_init: Any = None,
      bias_init: Any = initializers.zeros_init(),
      out_bias_init: Any = None,
      rope: bool = False,
      rope_theta: float = 10000.0,
      qk_norm: bool | str = False,
      qk_norm_epsilon: float = 1e-6,
      decode: bool = False,
  ):
    if not isinstance(rngs, nnx.Rngs):
      raise TypeError(
          f"rngs must be an nnx.Rngs, got {type(rngs).__name__} {rngs!r}. MultiHeadAttention takes "
          "rngs first (or as rngs=) and every other argument by keyword, e.g. "
          "MultiHeadAttention(rngs, num_heads=8, in_features=512)")
    _checks.check_positive_int("num_heads", num_heads)
    _checks.check_positive_int("in_features", in_features)
    qkv_features = in_features if qkv_features is None else qkv_features
    out_features = in_features if out_features is None else out_features
    in_kv_features = in_features if in_kv_features is None else in_kv_features
    for name, value in (("qkv_features", qkv_features), ("out_features", out_features),
                        ("in_kv_features", in_kv_features)):
      _checks.check_positive_int(name, value)
    if qkv_features % num_heads:
      raise ValueError(f"qkv_features ({qkv_features}) must be divisible by num_heads "
                       f"({num_heads}): the heads split the projection evenly")

    if attention_type is not None:
      attention_type = AttentionType.parse(attention_type)
      if num_kv_heads is None:
        if attention_type is AttentionType.GROUPED_QUERY:
          raise ValueError("attention_type=GROUPED_QUERY needs num_kv_heads (1 < num_kv_heads < "
                           f"num_heads={num_heads}, dividing num_heads)")
        num_kv_heads = num_heads if attention_type is AttentionType.MULTI_HEAD else 1
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    _checks.check_positive_int("num_kv_heads", num_kv_heads)
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads "
                       f"({num_kv_heads}): each kv head serves a whole group of query heads")
    if attention_type is not None:
      allowed = {AttentionType.of(num_heads, num_kv_heads)}
      if num_kv_heads == 1:
        allowed.add(AttentionType.MULTI_QUERY)
      if num_kv_heads == num_heads:
        allowed.add(AttentionType.MULTI_HEAD)
      if attention_type not in allowed:
        raise ValueError(
            f"attention_type={attention_type.name} is inconsistent with num_heads={num_heads}, "
            f"num_kv_heads={num_kv_heads} (that layout is "
            f"{AttentionType.of(num_heads, num_kv_heads).name})")

    if not is_attention_fn(attention_fn):
      raise ValueError(
          f"attention_fn {_kernel_name(attention_fn)!r} does not meet the AttentionFn signature "
          "fn(q, k, v, *, score_mod=None, mask_mod=None, scale=None): kernels that need extra "
          "arguments (paged_attention, ring_attention) cannot serve as a module's attention_fn")
    sm.check_mod(score_mod, 5, "score_mod")
    sm.check_mod(mask_mod, 4, "mask_mod")
    if not 0.0 <= float(dropout_rate) < 1.0:
      raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    # Whether the kernel can drop is checked at the calls that drop (deterministic=False), so a
    # module with dropout_rate > 0 still evaluates with any kernel.
    head_dim = qkv_features // num_heads
    if rope:
      if head_dim % 2:
        raise ValueError(f"rope=True needs an even head_dim, got head_dim={head_dim} "
                         f"(qkv_features={qkv_features} / num_heads={num_heads})")
      rope_frequencies(head_dim, rope_theta)  # validates theta
    norm_kind = _resolve_qk_norm(qk_norm)

    self.num_heads = int(num_heads)
    self.num_kv_heads = int(num_kv_heads)
    self.in_features = int(in_features)
    self.in_kv_features = int(in_kv_features)
    self.qkv_features = int(qkv_features)
    self.out_features = int(out_features)
    self.head_dim = head_dim
    self.attention_fn = attention_fn
    # Mods are stored as a static structure plus their arrays as ModBuffer state.
    self._score_mod_def, self.score_mod_buffers = _split_mod(score_mod)
    self._mask_mod_def, self.mask_mod_buffers = _split_mod(mask_mod)
    self.scale = scale
    self.dropout_rate = float(dropout_rate)
    self.deterministic = deterministic
    self.use_bias = use_bias
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.rope = bool(rope)
    self.rope_theta = float(rope_theta)
    self.qk_norm = norm_kind
    self.decode = decode

    linear = functools.partial(nnx.LinearGeneral, dtype=dtype, param_dtype=param_dtype,
                               kernel_init=kernel_init, bias_init=bias_init, use_bias=use_bias,
                               precision=precision, rngs=rngs)
    self.query = linear(self.in_features, (self.num_heads, head_dim))
    self.key = linear(self.in_kv_features, (self.num_kv_heads, head_dim))
    self.value = linear(self.in_kv_features, (self.num_kv_heads, head_dim))
    self.out = nnx.LinearGeneral((self.num_heads, head_dim), self.out_features, axis=(-2, -1),
                                 dtype=dtype, param_dtype=param_dtype,
                                 kernel_init=out_kernel_init or kernel_init,
                                 bias_init=out_bias_init or bias_init, use_bias=use_bias,
                                 precision=precision, rngs=rngs)
    if norm_kind == "rms":
      norm = functools.partial(nnx.RMSNorm, head_dim, epsilon=qk_norm_epsilon, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
    elif norm_kind == "layer":
      norm = functools.partial(nnx.LayerNorm, head_dim, epsilon=qk_norm_epsilon, use_bias=False,
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if norm_kind is None:
      self.query_norm = nnx.data(None)
      self.key_norm = nnx.data(None)
    else:
      self.query_norm = norm()
      self.key_norm = norm()
    self.rngs = rngs.dropout.fork() if dropout_rate > 0.0 else nnx.data(None)

    self.cached_key = nnx.data(None)
    self.cached_value = nnx.data(None)
    self.cache_index = nnx.data(None)

  # --------------------------------------------------------------------------- properties

  @property
  def attention_type(self) -> AttentionType:
    """The :class:`AttentionType` of ``(num_heads, num_kv_heads)``."""
    return AttentionType.of(self.num_heads, self.num_kv_heads)

  @property
  def score_mod(self) -> Any:
    """The constructor's score mod (``None`` if none)."""
    return _join_mod(self._score_mod_def, self.score_mod_buffers)

  @property
  def mask_mod(self) -> Any:
    """The constructor's mask mod (``None`` if none)."""
    return _join_mod(self._mask_mod_def, self.mask_mod_buffers)

  def set_view(self, deterministic: bool | None = None, decode: bool | None = None):
    """Used by ``nnx.view(model, deterministic=..., decode=...)``.

    Args:
      deterministic: if given, the default of the call's ``deterministic``.
      decode: if given, the default of the call's ``decode``.
    """
    if deterministic is not None:
      self.deterministic = deterministic
    if decode is not None:
      self.decode = decode

  # --------------------------------------------------------------------------- cache

  def init_cache(self, batch: int, max_length: int, dtype: Any = None) -> None:
    """Allocate an empty KV cache for ``batch`` rows of up to ``max_length`` positions.

    Args:
      batch: number of sequences decoded together (the flattened leading dims of the inputs).
      max_length: capacity in positions (prompt plus generated tokens).
      dtype: dtype of the cached keys and values; default ``dtype``, else ``param_dtype``.

    Resets ``cache_index`` to 0. Writing past ``max_length`` raises ``ValueError`` when the index
    is concrete (not under ``jit``). Under ``jit`` (``nnx.jit``) it cannot raise; instead the
    overflow is made visible: ``cache_index`` keeps counting past ``max_length``, and the output
    of every step that does not fit (``cache_index + steps > max_length``), and of every later
    step, is NaN. The cache contents are then unspecified: call ``init_cache`` again.

    Raises:
      ValueError: ``batch`` or ``max_length`` not a positive int (``1.5`` is not truncated).
    """
    batch = _checks.check_positive_int("init_cache: batch", batch)
    max_length = _checks.check_positive_int("init_cache: max_length", max_length)
    dtype = _first(dtype, self.dtype, self.param_dtype)
    shape = (batch, self.num_kv_heads, max_length, self.head_dim)
    self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
    self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
    self.cache_index = nnx.Cache(jnp.array(0, dtype=jnp.int32))

  # --------------------------------------------------------------------------- call

  def __call__(self, inputs_q: jax.Array, inputs_k: jax.Array | None = None,
               inputs_v: jax.Array | None = None, *, score_mod: Any = None, mask_mod: Any = None,
               deterministic: bool | None = None, rngs: nnx.Rngs | Any = None,
               decode: bool | None = None) -> jax.Array:
    """Attend from ``inputs_q`` to ``inputs_k``/``inputs_v`` (self-attention when they are None).

    Args:
      inputs_q: ``(..., Sq, in_features)``; ``...`` is any number of batch dims (flattened into one
        batch axis for the kernel, so a mod's ``b`` index runs over the flattened batch).
      inputs_k: ``(..., Sk, in_kv_features)``; default ``inputs_q``.
      inputs_v: ``(..., Sk, in_kv_features)``; default ``inputs_k``.
      score_mod: a score mod for this call, applied after the constructor's.
      mask_mod: a mask mod for this call, and-ed with the constructor's.
      deterministic: True turns dropout off; default the constructor's ``deterministic``. Needed
        only when ``dropout_rate > 0``.
      rngs: ``nnx.Rngs`` (its ``dropout`` stream) or a stream for dropout; default the stream kept
        at construction.
      decode: use the KV cache (see :meth:`init_cache`); default the constructor's ``decode``. The
        call's tokens are written at ``cache_index`` and attend to every written slot that the mods
        allow; mods and RoPE see absolute positions, so give the module a causal mod (e.g.
        ``score_mod=causal_mod()``) for autoregressive decoding. Self-attention only. A call
        whose tokens do not fit (``cache_index + Sq > max_length``) raises ``ValueError`` when
        the index is concrete; under ``jit`` its output is NaN (see :meth:`init_cache`).

    Returns:
      ``(..., Sq, out_features)``.
    """
    decode = bool(_first(decode, self.decode, False))
    if inputs_k is None:
      if inputs_v is not None:
        raise ValueError("inputs_v given without inputs_k; pass the keys as inputs_k (inputs_v "
                         "defaults to inputs_k)")
      inputs_k = inputs_q
    elif decode and inputs_k is not inputs_q:
      raise ValueError("decode=True supports self-attention only (inputs_k must be None)")
    inputs_v = inputs_k if inputs_v is None else inputs_v

    if inputs_q.ndim < 2 or inputs_q.shape[-1] != self.in_features:
      raise ValueError(f"inputs_q must have shape (..., Sq, {self.in_features}), got "
                       f"{inputs_q.shape}")
    for name, x in (("inputs_k", inputs_k), ("inputs_v", inputs_v)):
      if x.ndim != inputs_q.ndim or x.shape[:-2] != inputs_q.shape[:-2] \
          or x.shape[-1] != self.in_kv_features:
        raise ValueError(f"{name} must have shape {inputs_q.shape[:-2] + ('Sk',)}"
                         f" + ({self.in_kv_features},) to match inputs_q {inputs_q.shape}, "
                         f"got {x.shape}")
    if inputs_k.shape[-2] != inputs_v.shape[-2]:
      raise ValueError(f"inputs_k {inputs_k.shape} and inputs_v {inputs_v.shape} differ in length")

    batch_shape = inputs_q.shape[:-2]
    flat = lambda x: x.reshape((math.prod(batch_shape),) + x.shape[-2:])
    q = self.query(flat(inputs_q))       # (B, Sq, H, D)
    k = self.key(flat(inputs_k))         # (B, Sk, Hkv, D)
    v = self.value(flat(inputs_v))       # (B, Sk, Hkv, D)
    if self.query_norm is not None:
      q, k = self.query_norm(q), self.key_norm(k)
    dt = jnp.result_type(q, k, v)
    q, k, v = (jnp.swapaxes(x, 1, 2).astype(dt) for x in (q, k, v))   # (B, H, S, D)

    score_mod = sm.compose_score_mods(self.score_mod, score_mod)
    sm.check_mod(mask_mod, 4, "mask_mod")
    mask_mod = sm.and_masks(self.mask_mod, mask_mod)

    overflow = None
    if decode:
      q, k, v, score_mod, mask_mod, overflow = self._decode_step(q, k, v, score_mod, mask_mod)
    elif self.rope:
      q = apply_rope(q, jnp.arange(q.shape[2]), theta=self.rope_theta)
      k = apply_rope(k, jnp.arange(k.shape[2]), theta=self.rope_theta)

    options = self._dropout_options(deterministic, rngs)
    out = self.attention_fn(q, k, v, score_mod=score_mod, mask_mod=mask_mod, scale=self.scale,
                            **options)                                 # (B, H, Sq, D)
    out = self.out(jnp.swapaxes(out, 1, 2))                            # (B, Sq, out_features)
    if overflow is not None:      # a traced cache overflow: NaN, never a plausible wrong output
      out = jnp.where(overflow, jnp.asarray(jnp.nan, out.dtype), out)
    return out.reshape(batch_shape + out.shape[-2:])

  def _dropout_options(self, deterministic, rngs) -> dict:
    if self.dropout_rate == 0.0:
      return {}
    deterministic = _first(deterministic, self.deterministic)
    if deterministic is None:
      raise ValueError("dropout_rate > 0: pass deterministic= to the call or the constructor "
                       "(or use nnx.view(model, deterministic=...))")
    if deterministic:
      return {}
    if not (accepts_keyword(self.attention_fn, "dropout_rate")
            and accepts_keyword(self.attention_fn, "dropout_rng")):
      raise ValueError(
          f"dropout_rate={self.dropout_rate} with deterministic=False needs an attention_fn that "
          f"takes dropout_rate and dropout_rng (standard_attention, memory_efficient_attention, "
          f"flash_attention, pallas_flash_attention do); {_kernel_name(self.attention_fn)!r} "
          "does not. Call with deterministic=True, use one of those kernels, or set "
          "dropout_rate=0 and put an nnx.Dropout on the module's output")
    stream = self.rngs if rngs is None else rngs
    if isinstance(stream, nnx.Rngs):
      stream = stream.dropout
    if stream is None:
      raise ValueError("dropout needs rngs: pass rngs= to the call")
    return dict(dropout_rate=self.dropout_rate, dropout_rng=stream())

  def _decode_step(self, q, k, v, score_mod, mask_mod):
    """Write ``k``, ``v`` at ``cache_index``, return the cache as keys and position-shifted mods.

    Also returns ``overflow``: ``None`` when the index is concrete (an overflow raised already),
    else a traced bool scalar, true when this step's tokens do not fit in the cache.
    """
    if self.cache_index is None:
      raise ValueError("decode=True needs a cache: call init_cache(batch, max_length) first")
    b, _, length, _ = self.cached_key.shape
    if k.shape[0] != b:
      raise ValueError(f"the cache holds {b} batch rows but the inputs have {k.shape[0]} "
                       "(after flattening leading dims)")
    steps = q.shape[2]
    index = self.cache_index[...]
    overflow = None
    if isinstance(index, jax.core.Tracer):
      overflow = index + steps > length      # cannot raise: the caller turns the output to NaN
    elif int(index) + steps > length:
      raise ValueError(f"KV cache overflow: {int(index)} positions written, {steps} more do not "
                       f"fit in max_length={length}")
    positions = index + jnp.arange(steps, dtype=jnp.int32)
    if self.rope:
      q = apply_rope(q, positions, theta=self.rope_theta)
      k = apply_rope(k, positions, theta=self.rope_theta)
    zero = jnp.zeros((), jnp.int32)
    start = (zero, zero, index, zero)
    ck = jax.lax.dynamic_update_slice(self.cached_key[...], k.astype(self.cached_key.dtype), start)
    cv = jax.lax.dynamic_update_slice(self.cached_value[...], v.astype(self.cached_value.dtype),
                                      start)
    self.cached_key[...] = ck
    self.cached_value[...] = cv
    self.cache_index[...] = index + steps

    offset = index.reshape(1).astype(jnp.int32)
    score_part, carried = sm.split_score_mod(score_mod)
    score_mod = None if score_part is None else ShiftedScoreMod(score_part, offset)
    mask_mod = sm.and_masks(_shift_mask(sm.and_masks(carried, mask_mod), offset),
                            KVLengthMask(offset + steps))
    return q, ck.astype(q.dtype), cv.astype(q.dtype), score_mod, mask_mod, overflow

  # --------------------------------------------------------------------------- paged decoding

  def decode_paged(self, inputs: jax.Array, cache: Any, layer: int = 0, *, score_mod: Any = None,
                   mask_mod: Any = None, **paged_options: Any) -> tuple[jax.Array, Any]:
    """One decoding step (or prefill chunk) over a paged KV cache: ``(out, cache)``.

    The functional counterpart of ``decode=True`` for serving many sequences of different lengths
    together: the cache is a :class:`~attnax.kernels.PagedKVCache` passed in and returned (one
    pytree of arrays, so the whole step jits), and its ``layer``-th pools hold this module's keys
    and values. Before the step, ``cache.allocate(num_new)`` gives row ``b`` room for
    ``num_new[b]`` tokens (once for all layers); this method then projects the step's tokens,
    writes their keys and values (after QK-norm and RoPE) into the cache
    (:meth:`~attnax.kernels.PagedKVCache.append`) and attends with
    :func:`~attnax.kernels.paged_attention`.

    Args:
      inputs: ``(B, S, in_features)``, ``B = cache.batch``: the step's ``S`` token slots per row,
        right-aligned: of row ``b`` the last ``cache.pending[b]`` are its new tokens, at absolute
        positions ``cache.lengths[b] - pending[b] ..``; slots before them are padding (their
        outputs are meaningless).
      cache: the :class:`~attnax.kernels.PagedKVCache` (its pools' dtype is the KV dtype: a float
        dtype, or int8 with per-token scales).
      layer: which of the cache's layers is this module's (static).
      score_mod, mask_mod: this call's mods, composed with the constructor's. Every mod sees
        absolute positions, and the kernel is causal on them (a ``causal_mod()`` given to the
        module is then redundant, and harmless).
      paged_options: options of ``paged_attention`` (``backend``, ``softcap``, ``config``, ...).

    Returns:
      ``(out (B, S, out_features), cache)`` with the step's keys and values written. Dropout is
      not applied (decoding is inference).
    """
    if inputs.ndim != 3 or inputs.shape[-1] != self.in_features or inputs.shape[0] != cache.batch:
      raise ValueError(f"decode_paged: inputs must have shape (batch={cache.batch}, S, "
                       f"in_features={self.in_features}); got {inputs.shape}")
    layer = _checks.static_int("decode_paged: layer", layer)
    if not 0 <= layer < cache.num_layers:
      raise ValueError(f"decode_paged: layer {layer} out of range for a cache of "
                       f"{cache.num_layers} layers")
    if cache.k_pages[layer].shape[0] != self.num_kv_heads or \
        cache.k_pages[layer].shape[-1] != self.head_dim:
      raise ValueError(f"decode_paged: cache layer {layer} holds pages "
                       f"{cache.k_pages[layer].shape} (num_kv_heads, num_pages, page_size, "
                       f"head_dim), but the module has {self.num_kv_heads} kv heads of "
                       f"{self.head_dim}")
    q, k, v = self.query(inputs), self.key(inputs), self.value(inputs)   # (B, S, H, D)
    if self.query_norm is not None:
      q, k = self.query_norm(q), self.key_norm(k)
    dt = jnp.result_type(q, k, v)
    q, k, v = (jnp.swapaxes(x, 1, 2).astype(dt) for x in (q, k, v))   # (B, H, S, D)
    steps = inputs.shape[1]
    # Right-aligned: slot i of row b is position lengths[b] - S + i (padding slots clamp to 0).
    positions = jnp.maximum(cache.lengths[:, None] - steps + jnp.arange(steps), 0)
    if self.rope:
      q = apply_rope(q, positions[:, None, :], theta=self.rope_theta)
      k = apply_rope(k, positions[:, None, :], theta=self.rope_theta)
    cache = cache.append(layer, k, v)
    score_mod = sm.compose_score_mods(self.score_mod, score_mod)
    sm.check_mod(mask_mod, 4, "mask_mod")
    mask_mod = sm.and_masks(self.mask_mod, mask_mod)
    if not cache.quantized:     # the kernel reads q in the pools' dtype
      q = q.astype(cache.k_pages[layer].dtype)
    out = cache.attend(layer, q, score_mod=score_mod, mask_mod=mask_mod, scale=self.scale,
                       **paged_options)
    out = self.out(jnp.swapaxes(out.astype(dt), 1, 2))                 # (B, S, out_features)
    return out, cache

  # --------------------------------------------------------------------------- Flax interop

  @classmethod
  def from_flax(cls, flax_mha: nnx.MultiHeadAttention, *, rngs: nnx.Rngs | None = None,
                **kwargs: Any) -> "MultiHeadAttention":
    """An attnax module with the configuration and parameters of a ``flax.nnx.MultiHeadAttention``.

    Args:
      flax_mha: the Flax module. Its ``normalize_qk=True`` becomes ``qk_norm="layer"``; its dropout
        rate carries over (so pick a kernel that supports dropout, or pass ``dropout_rate=0``).
      rngs: ``nnx.Rngs`` for the (overwritten) initialisation and the dropout stream; default
        ``nnx.Rngs(0)``.
      **kwargs: other constructor arguments (``attention_fn``, ``score_mod``, ``rope``, ...) or
        overrides.

    Returns:
      A :class:`MultiHeadAttention` whose outputs equal the Flax module's for the same inputs (up to
      the kernels' rounding), with the Flax module's parameter values copied in.
    """
    config = dict(
        num_heads=flax_mha.num_heads, in_features=flax_mha.in_features,
        qkv_features=flax_mha.qkv_features, out_features=flax_mha.out_features,
        num_kv_heads=getattr(flax_mha, "num_kv_heads", flax_mha.num_heads),
        in_kv_features=flax_mha.in_kv_features, dtype=flax_mha.dtype,
        param_dtype=flax_mha.param_dtype, use_bias=flax_mha.use_bias,
        dropout_rate=flax_mha.dropout_rate, deterministic=flax_mha.deterministic,
        precision=flax_mha.precision, qk_norm="layer" if flax_mha.normalize_qk else False,
        decode=bool(flax_mha.decode))
    if flax_mha.normalize_qk:
      config["qk_norm_epsilon"] = flax_mha.query_ln.epsilon
    config.update(kwargs)
    module = cls(nnx.Rngs(0) if rngs is None else rngs, **config)
    module.load_flax_params(flax_mha)
    return module

  def load_flax_params(self, flax_mha: nnx.MultiHeadAttention) -> None:
    """Copy the parameters of a ``flax.nnx.MultiHeadAttention`` into this module, in place.

    The two modules must agree on heads, feature sizes, biases and QK-norm (Flax's
    ``normalize_qk=True`` is ``qk_norm="layer"`` here); a mismatch raises ``ValueError`` naming
    every differing setting. Values are cast to this module's parameter dtypes.
    """
    ours = dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                in_features=self.in_features, in_kv_features=self.in_kv_features,
                qkv_features=self.qkv_features, out_features=self.out_features,
                use_bias=self.use_bias, normalize_qk=self.qk_norm == "layer")
    theirs = dict(num_heads=flax_mha.num_heads,
                  num_kv_heads=getattr(flax_mha, "num_kv_heads", flax_mha.num_heads),
                  in_features=flax_mha.in_features, in_kv_features=flax_mha.in_kv_features,
                  qkv_features=flax_mha.qkv_features, out_features=flax_mha.out_features,
                  use_bias=flax_mha.use_bias, normalize_qk=bool(flax_mha.normalize_qk))
    bad = [f"{k}: flax {theirs[k]} vs attnax {ours[k]}" for k in ours if ours[k] != theirs[k]]
    if self.qk_norm == "rms":
      bad.append("qk_norm: attnax uses RMSNorm, flax's normalize_qk is a LayerNorm "
                 "(use qk_norm='layer')")
    if bad:
      raise ValueError("cannot load flax.nnx.MultiHeadAttention parameters: " + "; ".join(bad))

    def copy(dst: nnx.Module, src: nnx.Module, names: tuple[str, ...]):
      for name in names:
        d, s = getattr(dst, name), getattr(src, name)
        if d.shape != s.shape:
          raise ValueError(f"parameter {name}: flax shape {s.shape} vs attnax {d.shape}")
        d.value = jnp.asarray(s.value, d.dtype)

    params = ("kernel", "bias") if self.use_bias else ("kernel",)
    for name in ("query", "key", "value", "out"):
      copy(getattr(self, name), getattr(flax_mha, name), params)
    if self.qk_norm == "layer":
      copy(self.query_norm, flax_mha.query_ln, ("scale",))
      copy(self.key_norm, flax_mha.key_ln, ("scale",))
