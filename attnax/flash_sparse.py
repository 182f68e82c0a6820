"""flash-sparse-attention's function names on attnax's kernels.

Code written for ``flash_sparse_attn`` (its Triton interface) runs on attnax by swapping the
import; arrays keep its ``(batch, seq, heads, head_dim)`` layout and its argument names::

  from attnax.flash_sparse import flash_gated_attn_func     # was: flash_sparse_attn.ops.triton...
  out = flash_gated_attn_func(query, key, value, alpha, delta, is_causal=True)

Each function is a thin wrapper: its arguments become attnax mods (``is_causal`` ->
:func:`~attnax.kernels.causal_mod` aligned to the bottom right, ``window_size`` ->
:func:`~attnax.kernels.local_window_mod`, ``alpha``/``delta`` -> :func:`~attnax.kernels.gated_mod`,
the packed sequences of the varlen forms -> one key range per query row), and one attnax kernel
runs them: ``implementation=`` picks it (``"standard"``, ``"memory_efficient"``, ``"flash"``,
``"pallas"``, ``"aether"``, or any :class:`~attnax.kernels.AttentionFn`; None: the fastest for the
device, as :func:`attnax.dot_product_attention` chooses). The sparse forms call
:func:`attnax.kernels.threshold_sparse_attention` (``implementation=`` is its ``backend=``).

Differences from flash-sparse-attention, on purpose: the gated functions skip nothing unless asked
(``softmax_threshold=None`` and ``gate_threshold=None`` mean exact gated attention, the maths of
its reference implementation; its kernel defaults are ``1 / seqlen_k`` and ``head_dim / seqlen_k``:
pass them to skip), and ``gate_threshold`` follows :func:`~attnax.kernels.gated_mod`'s exact,
tile-independent rule. Everything is differentiable (``alpha`` and ``delta`` included); the LSE
is returned with a gradient.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnax.kernels import _checks, gated
from attnax.kernels import score_mods as sm
from attnax.kernels import varlen as varlen_lib
from attnax.nn import IMPLEMENTATIONS, check_layout, default_implementation

__all__ = [
    "flash_dense_attn_func", "flash_dense_attn_varlen_func",
    "flash_sparse_attn_func", "flash_sparse_attn_varlen_func",
    "flash_gated_attn_func", "flash_gated_attn_varlen_func",
]

_NAMES = tuple(IMPLEMENTATIONS) + ("xla",)


# ----------------------------------------------------------------------------- arguments


def _layout(fn: str, query: Any, key: Any, value: Any, rank: int) -> tuple[int, ...]:
  """Check ``(B, S, H, D)`` (rank 4) or packed ``(T, H, D)`` (rank 3) query/key/value."""
  ranks = [getattr(x, "ndim", None) for x in (query, key, value)]
  if None not in ranks and ranks != [rank] * 3:      # a non-array: check_layout names it
    what = "(batch, seqlen, heads, head_dim)" if rank == 4 else "(total_seqlen, heads, head_dim)"
    raise ValueError(f"{fn}: query, key and value must be {what} arrays (rank {rank}), got query "
                     f"{tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}")
  batch, t, s, n, kh = check_layout(query, key, value, fn=fn, max_batch_dims=1)
  return (batch[0] if batch else 1), t, s, n, kh


def _window(fn: str, window_size: Any) -> tuple[int | None, int | None]:
  """``(left, right)``: None (or -1, flash-attn's convention) is unbounded."""
  if window_size is None:
    return None, None
  if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
    raise ValueError(f"{fn}: window_size must be a (left, right) pair of ints or None, got "
                     f"{window_size!r}")
  sides = []
  for name, w in zip(("left", "right"), window_size):
    if w is None or (isinstance(w, (int, np.integer)) and not isinstance(w, bool) and w == -1):
      sides.append(None)
    elif isinstance(w, (int, np.integer)) and not isinstance(w, bool) and w >= 0:
      sides.append(int(w))
    else:
      raise ValueError(f"{fn}: window_size {name} must be an int >= 0, or None / -1 (unbounded), "
                       f"got {w!r} in window_size={window_size!r}")
  return sides[0], sides[1]


def _band(is_causal: bool, left: int | None, right: int | None, offset: int) -> Any:
  """The mask of ``is_causal`` and ``window_size`` with the diagonal at ``i + offset``, or None.

  flash-sparse-attention keeps ``aligned - left <= j <= aligned + right`` with ``aligned = i + Sk -
  Sq`` (bottom right), and causal adds ``j <= aligned``.
  """
  if is_causal:
    right = 0 if right is None else min(right, 0)
  if left is None and right is None:
    return None
  if left is None and right == 0:
    return sm.causal_mod(offset).mask_mod
  return sm.local_window_mod(left, right, offset).mask_mod


def _kernel(fn: str, implementation: Any, q, k, v):
  if implementation is None:
    return IMPLEMENTATIONS[default_implementation(q, k, v)]
  if isinstance(implementation, str):
    name = "standard" if implementation == "xla" else implementation
    if name not in IMPLEMENTATIONS:
      raise ValueError(f"{fn}: unknown implementation {implementation!r}; choose one of "
                       f"{_NAMES}, None (the fastest for the device) or an AttentionFn")
    return IMPLEMENTATIONS[name]
  if callable(implementation):
    return implementation
  raise ValueError(f"{fn}: implementation must be a name of {_NAMES}, None or an AttentionFn, "
                   f"got {type(implementation).__name__}")


def _to_bhsd(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, 1, 2)             # (B, S, H, D) <-> (B, H, S, D)


def _run(fn: str, q, k, v, *, score_mod, scale, return_lse, implementation, sparse: bool,
         softmax_threshold: Any = None):
  """One kernel call in attnax's layout: ``(out, lse or None)``."""
  if sparse:
    from attnax.kernels import threshold_sparse_attention
    kw = {} if implementation is None else {"backend": implementation}
    res = threshold_sparse_attention(q, k, v, softmax_threshold=softmax_threshold,
                                     score_mod=score_mod, scale=scale, return_lse=return_lse,
                                     **kw)
  else:
    res = _kernel(fn, implementation, q, k, v)(q, k, v, score_mod=score_mod, scale=scale,
                                               return_lse=return_lse)
  if return_lse:
    return res[0], res[1]
  return res, None


def _gates(fn: str, alpha: Any, delta: Any, want_a: tuple, want_d: tuple, what: dict):
  """alpha/delta as arrays of exactly the shapes the inputs need (a ValueError naming them)."""
  return [gated._gate_array(x, name, fn=fn, shape=want, layout=what[name])
          for name, x, want in (("alpha", alpha, want_a), ("delta", delta, want_d))]


def _softmax_threshold(fn: str, value: Any) -> float | None:
  """None, or a softmax-probability threshold: a static float in ``[0, 1]`` (0 skips nothing)."""
  return _checks.static_float(value, "softmax_threshold", fn=fn, low=0.0, high=1.0,
                              allow_none=True)


def _gate_threshold(fn: str, value: Any) -> float | None:
  """None, or ``gated_mod``'s threshold: a static float > 0."""
  return _checks.static_float(value, "gate_threshold", fn=fn, low=0.0, low_inclusive=False,
                              allow_none=True)


# ----------------------------------------------------------------------------- base (B, S, H, D)


def _base(fn, query, key, value, *, is_causal, softmax_scale, window_size, return_lse,
          implementation, sparse, softmax_threshold=None, gate=None):
  b, sq, sk, hq, hkv = _layout(fn, query, key, value, 4)
  scale = _checks.default_scale(softmax_scale, query.shape[-1], name="softmax_scale", fn=fn)
  left, right = _window(fn, window_size)
  mask = _band(bool(is_causal), left, right, sk - sq)
  if gate is None:
    score_mod = None if mask is None else sm.MaskScoreMod(mask)
  else:
    alpha, delta, kw = gate
    alpha, delta = _gates(fn, alpha, delta, (b, hq, sq), (b, hkv, sk),
                          {"alpha": "(batch, num_heads, seqlen_q)",
                           "delta": "(batch, num_kv_heads, seqlen_k)"})
    kw["gate_threshold"] = _gate_threshold(fn, kw["gate_threshold"])
    score_mod = gated.gated_mod(alpha, delta, gate_scale=scale, mask_mod=mask, **kw)
  out, lse = _run(fn, _to_bhsd(query), _to_bhsd(key), _to_bhsd(value), score_mod=score_mod,
                  scale=scale, return_lse=return_lse, implementation=implementation,
                  sparse=sparse, softmax_threshold=softmax_threshold)
  out = _to_bhsd(out)
  return (out, lse) if return_lse else out


def flash_dense_attn_func(query: Any, key: Any, value: Any, is_causal: bool = False,
                          softmax_scale: float | None = None,
                          window_size: tuple = (None, None), return_lse: bool = False, *,
                          implementation: Any = None) -> Any:
  """Dense attention, flash-sparse-attention's ``flash_dense_attn_func``.

  Args:
    query: ``(batch, seqlen_q, num_heads, head_dim)``.
    key: ``(batch, seqlen_k, num_kv_heads, head_dim)``, ``num_heads % num_kv_heads == 0``.
    value: ``(batch, seqlen_k, num_kv_heads, head_dim_v)``.
    is_causal: causal mask aligned to the bottom right (query ``i`` sees keys
      ``j <= i + seqlen_k - seqlen_q``).
    softmax_scale: default ``head_dim ** -0.5``.
    window_size: ``(left, right)``: query ``i`` sees keys ``a - left .. a + right`` around its
      aligned position ``a = i + seqlen_k - seqlen_q``; None (or -1) leaves a side unbounded.
    return_lse: also return the log-sum-exp ``(batch, num_heads, seqlen_q)`` (f32).
    implementation: the attnax kernel (see the module docstring); None: the fastest one.

  Returns:
    ``out`` ``(batch, seqlen_q, num_heads, head_dim_v)``, or ``(out, lse)``. A query that sees no
    key gets output 0 and lse ``-inf``.
  """
  return _base("flash_dense_attn_func", query, key, value, is_causal=is_causal,
               softmax_scale=softmax_scale, window_size=window_size, return_lse=return_lse,
               implementation=implementation, sparse=False)


def flash_sparse_attn_func(query: Any, key: Any, value: Any, is_causal: bool = False,
                           softmax_scale: float | None = None,
                           softmax_threshold: float | None = None,
                           window_size: tuple = (None, None), return_lse: bool = False, *,
                           implementation: Any = None) -> Any:
  """Threshold-sparse attention, flash-sparse-attention's ``flash_sparse_attn_func``.

  As :func:`flash_dense_attn_func`, through :func:`attnax.kernels.threshold_sparse_attention`:
  ``softmax_threshold`` (None: its default ``head_dim / seqlen_k``, as flash-sparse-attention's)
  skips the tiles whose probabilities are all below it relative to the row's running statistics,
  in the forward and, with the same decisions, in the backward. ``implementation`` is that
  function's ``backend=`` (None: its default).
  """
  return _base("flash_sparse_attn_func", query, key, value, is_causal=is_causal,
               softmax_scale=softmax_scale, window_size=window_size, return_lse=return_lse,
               implementation=implementation, sparse=True,
               softmax_threshold=_softmax_threshold("flash_sparse_attn_func",
                                                    softmax_threshold))


def flash_gated_attn_func(query: Any, key: Any, value: Any, alpha: Any, delta: Any,
                          is_causal: bool = False, softmax_scale: float | None = None,
                          softmax_threshold: float | None = None,
                          gate_threshold: float | None = None, is_logsigmoid_gate: bool = True,
                          is_adapt_gate: bool = True, window_size: tuple = (None, None),
                          return_lse: bool = False, *, implementation: Any = None) -> Any:
  """Gated attention, flash-sparse-attention's ``flash_gated_attn_func``.

  Scores ``softmax_scale * (q.k + G(alpha_i * delta_j))`` with ``G`` the log-sigmoid
  (``is_logsigmoid_gate``) or the identity (:func:`attnax.kernels.gated_mod` with
  ``gate_scale=softmax_scale``), then as :func:`flash_dense_attn_func`.

  Args:
    alpha: ``(batch, num_heads, seqlen_q)`` query gates.
    delta: ``(batch, num_kv_heads, seqlen_k)`` key gates.
    softmax_threshold: None (no softmax skipping) or a threshold in ``[0, 1]``: the call runs
      :func:`attnax.kernels.threshold_sparse_attention` with the gate as its score mod.
    gate_threshold: None (no gate masking) or ``gated_mod``'s threshold: a key whose gate gives it
      less than this fraction of the weight the row's strongest visible gate gives is masked
      (tiles where that holds everywhere are skipped).
    is_adapt_gate: with ``is_causal``, scale the gate threshold of query ``i`` by its visible
      fraction of the keys, as flash-sparse-attention does.
    query, key, value, is_causal, softmax_scale, window_size, return_lse, implementation: as
      :func:`flash_dense_attn_func`.
  """
  fn = "flash_gated_attn_func"
  softmax_threshold = _softmax_threshold(fn, softmax_threshold)
  gate = (alpha, delta, dict(is_logsigmoid_gate=is_logsigmoid_gate, is_adapt_gate=is_adapt_gate,
                             gate_threshold=gate_threshold))
  return _base(fn, query, key, value, is_causal=is_causal, softmax_scale=softmax_scale,
               window_size=window_size, return_lse=return_lse, implementation=implementation,
               sparse=softmax_threshold is not None, softmax_threshold=softmax_threshold,
               gate=gate)


# ----------------------------------------------------------------------------- varlen (T, H, D)


def varlen_key_ranges(cu_seqlens_q: Any, cu_seqlens_k: Any, *, total_q: int, total_k: int,
                      seqused_q: Any = None, seqused_k: Any = None, is_causal: bool = False,
                      window_size: tuple = (None, None), fn: str = "varlen_key_ranges"):
  """Packed sequences as one visible key range per query: ``(lo, hi, adapt)``, each ``(1, Tq)``.

  Query ``i`` of sequence ``d`` (offset ``cu_seqlens_q[d]``, length ``seqused_q[d]`` or
  ``cu_seqlens_q[d + 1] - cu_seqlens_q[d]``) sees the keys of sequence ``d`` inside the window
  around its aligned position (bottom right within the sequence, as every flash-attention varlen
  function); positions past a sequence's used length, or past ``cu_seqlens_q[-1]``, see nothing.
  ``adapt`` is the causally visible fraction of the sequence's keys (``gated_mod``'s adaptive
  threshold; 1 when not causal). ``cu_seqlens`` may be traced.
  """
  cu_q = varlen_lib._as_cu(cu_seqlens_q, "cu_seqlens_q", length=total_q,
                           length_name="total_seqlen_q")
  cu_k = varlen_lib._as_cu(cu_seqlens_k, "cu_seqlens_k", length=total_k,
                           length_name="total_seqlen_k")
  if cu_q.shape != cu_k.shape:
    raise ValueError(f"{fn}: cu_seqlens_q {tuple(cu_q.shape)} and cu_seqlens_k "
                     f"{tuple(cu_k.shape)} must describe the same number of sequences")
  n = cu_q.shape[0] - 1
  used_q = _checks.check_lengths(seqused_q, n, "seqused_q", fn)
  used_k = _checks.check_lengths(seqused_k, n, "seqused_k", fn)
  alloc_q, alloc_k = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
  for name, used, alloc in (("seqused_q", used_q, alloc_q), ("seqused_k", used_k, alloc_k)):
    if used is not None and not isinstance(used, jax.core.Tracer) and not isinstance(
        alloc, jax.core.Tracer) and np.any(np.asarray(used) > np.asarray(alloc)):
      raise ValueError(f"{fn}: {name} {np.asarray(used).tolist()} exceeds the sequences' "
                       f"lengths in cu_seqlens ({np.asarray(alloc).tolist()})")
  len_q = alloc_q if used_q is None else jnp.minimum(used_q, alloc_q)
  len_k = alloc_k if used_k is None else jnp.minimum(used_k, alloc_k)
  left, right = _window(fn, window_size)
  if is_causal:
    right = 0 if right is None else min(right, 0)

  pos = jnp.arange(total_q, dtype=jnp.int32)
  doc = jnp.searchsorted(cu_q[1:], pos, side="right").astype(jnp.int32)   # n past the end
  dc = jnp.minimum(doc, n - 1)
  qi = pos - cu_q[dc]
  lq, lk, start_k = len_q[dc], len_k[dc], cu_k[dc]
  aligned = start_k + qi + lk - lq
  lo = start_k if left is None else jnp.maximum(start_k, aligned - left)
  hi = start_k + lk - 1
  if right is not None:
    hi = jnp.minimum(hi, aligned + right)
  ok = (doc < n) & (qi < lq) & (lo <= hi)
  lo = jnp.where(ok, lo, total_k).astype(jnp.int32)
  hi = jnp.where(ok, hi, -1).astype(jnp.int32)
  if is_causal:
    adapt = jnp.clip(qi + lk - lq + 1, 0, lk) / jnp.maximum(lk, 1)
  else:
    adapt = jnp.ones((total_q,))
  return lo[None], hi[None], adapt[None].astype(jnp.float32)


def _varlen(fn, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
            is_causal, softmax_scale, window_size, seqused_q, seqused_k, return_lse,
            implementation, sparse, softmax_threshold=None, gate=None):
  _, tq, tk, hq, hkv = _layout(fn, query, key, value, 3)
  _checks.check_positive_int(f"{fn}: max_seqlen_q", max_seqlen_q)
  max_k = _checks.check_positive_int(f"{fn}: max_seqlen_k", max_seqlen_k)
  scale = _checks.default_scale(softmax_scale, query.shape[-1], name="softmax_scale", fn=fn)
  lo, hi, adapt = varlen_key_ranges(cu_seqlens_q, cu_seqlens_k, total_q=tq, total_k=tk,
                                    seqused_q=seqused_q, seqused_k=seqused_k,
                                    is_causal=is_causal, window_size=window_size, fn=fn)
  ranges = gated.KeyRangeMask(lo, hi, tk)
  if gate is None:
    score_mod = sm.MaskScoreMod(ranges)
  else:
    alpha, delta, kw = gate
    alpha, delta = _gates(fn, alpha, delta, (hq, tq), (hkv, tk),
                          {"alpha": "(num_heads_q, total_seqlen_q)",
                           "delta": "(num_heads_kv, total_seqlen_k)"})
    alpha, delta = alpha[None], delta[None]                 # (1, H, T): gated_mod's layout
    thr = _gate_threshold(fn, kw["gate_threshold"])
    score_mod = gated._build(alpha, delta, logsigmoid=kw["is_logsigmoid_gate"], gate_scale=scale,
                             gate_threshold=thr, mask=ranges, lo=lo, hi=hi,
                             adapt=adapt if (kw["is_adapt_gate"] and is_causal) else None)
  if sparse and softmax_threshold is None:
    # flash-sparse-attention's varlen default (capped at 1, as the base default is).
    softmax_threshold = min(1.0, query.shape[-1] / max_k)
  q, k, v = (jnp.swapaxes(x, 0, 1)[None] for x in (query, key, value))   # (1, H, T, D)
  out, lse = _run(fn, q, k, v, score_mod=score_mod, scale=scale, return_lse=return_lse,
                  implementation=implementation, sparse=sparse,
                  softmax_threshold=softmax_threshold)
  out = jnp.swapaxes(out[0], 0, 1)
  return (out, jnp.swapaxes(lse[0], 0, 1)) if return_lse else out


_VARLEN_ARGS = """
  Args:
    query: ``(total_seqlen_q, num_heads, head_dim)``: the sequences packed along axis 0.
    key, value: ``(total_seqlen_k, num_kv_heads, head_dim)`` (value: ``head_dim_v``).
    cu_seqlens_q, cu_seqlens_k: int ``(batch + 1,)`` offsets of the sequences (may be traced).
    max_seqlen_q, max_seqlen_k: the longest sequences (static ints; the sparse default threshold
      is ``head_dim / max_seqlen_k``).
    seqused_q, seqused_k: int ``(batch,)``: how many positions of each sequence are real (the rest
      is padding: its queries output 0, its keys are never seen); default the whole sequence.
    is_causal, softmax_scale, window_size, implementation: as the base function, per sequence
      (the causal diagonal is aligned to the bottom right of each sequence).
    return_lse: also return the LSE ``(total_seqlen_q, num_heads)``.
"""


def flash_dense_attn_varlen_func(query: Any, key: Any, value: Any, cu_seqlens_q: Any,
                                 cu_seqlens_k: Any, max_seqlen_q: int, max_seqlen_k: int,
                                 is_causal: bool = False, softmax_scale: float | None = None,
                                 window_size: tuple = (None, None), seqused_q: Any = None,
                                 seqused_k: Any = None, return_lse: bool = False, *,
                                 implementation: Any = None) -> Any:
  return _varlen("flash_dense_attn_varlen_func", query, key, value, cu_seqlens_q, cu_seqlens_k,
                 max_seqlen_q, max_seqlen_k, is_causal=is_causal, softmax_scale=softmax_scale,
                 window_size=window_size, seqused_q=seqused_q, seqused_k=seqused_k,
                 return_lse=return_lse, implementation=implementation, sparse=False)


def flash_sparse_attn_varlen_func(query: Any, key: Any, value: Any, cu_seqlens_q: Any,
                                  cu_seqlens_k: Any, max_seqlen_q: int, max_seqlen_k: int,
                                  is_causal: bool = False, softmax_scale: float | None = None,
                                  softmax_threshold: float | None = None,
                                  window_size: tuple = (None, None), seqused_q: Any = None,
                                  seqused_k: Any = None, return_lse: bool = False, *,
                                  implementation: Any = None) -> Any:
  fn = "flash_sparse_attn_varlen_func"
  return _varlen(fn, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 is_causal=is_causal, softmax_scale=softmax_scale, window_size=window_size,
                 seqused_q=seqused_q, seqused_k=seqused_k, return_lse=return_lse,
                 implementation=implementation, sparse=True,
                 softmax_threshold=_softmax_threshold(fn, softmax_threshold))


def flash_gated_attn_varlen_func(query: Any, key: Any, value: Any, alpha: Any, delta: Any,
                                 cu_seqlens_q: Any, cu_seqlens_k: Any, max_seqlen_q: int,
                                 max_seqlen_k: int, is_causal: bool = False,
                                 softmax_scale: float | None = None,
                                 softmax_threshold: float | None = None,
                                 gate_threshold: float | None = None,
                                 is_logsigmoid_gate: bool = True, is_adapt_gate: bool = True,
                                 window_size: tuple = (None, None), seqused_q: Any = None,
                                 seqused_k: Any = None, return_lse: bool = False, *,
                                 implementation: Any = None) -> Any:
  fn = "flash_gated_attn_varlen_func"
  softmax_threshold = _softmax_threshold(fn, softmax_threshold)
  gate = (alpha, delta, dict(is_logsigmoid_gate=is_logsigmoid_gate, is_adapt_gate=is_adapt_gate,
                             gate_threshold=gate_threshold))
  return _varlen(fn, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 is_causal=is_causal, softmax_scale=softmax_scale, window_size=window_size,
                 seqused_q=seqused_q, seqused_k=seqused_k, return_lse=return_lse,
                 implementation=implementation, sparse=softmax_threshold is not None,
                 softmax_threshold=softmax_threshold, gate=gate)


flash_dense_attn_varlen_func.__doc__ = (
    """Dense attention over packed sequences, flash-sparse-attention's
  ``flash_dense_attn_varlen_func``: each query attends only within its own sequence.
""" + _VARLEN_ARGS + """
  Returns:
    ``out`` ``(total_seqlen_q, num_heads, head_dim_v)``, or ``(out, lse)``; padding queries
    output 0 (lse ``-inf``).
""")
flash_sparse_attn_varlen_func.__doc__ = (
    """Threshold-sparse attention over packed sequences, ``flash_sparse_attn_varlen_func``:
  as :func:`flash_dense_attn_varlen_func` through :func:`attnax.kernels.threshold_sparse_attention`
  (``softmax_threshold`` None: ``head_dim / max_seqlen_k``, as flash-sparse-attention's).
""" + _VARLEN_ARGS)
flash_gated_attn_varlen_func.__doc__ = (
    """Gated attention over packed sequences, ``flash_gated_attn_varlen_func``: as
  :func:`flash_gated_attn_func` per sequence, with ``alpha`` ``(num_heads, total_seqlen_q)`` and
  ``delta`` ``(num_kv_heads, total_seqlen_k)``; a row's strongest gate (``gate_threshold``) is
  taken among the keys of its own sequence that it sees.
""" + _VARLEN_ARGS)
