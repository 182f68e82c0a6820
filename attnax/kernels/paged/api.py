"""paged_attention: checks -> plan -> a backend's split-K partials -> LSE merge -> run-time guard.

One call flows: :func:`~attnax.kernels.paged.plan.build_plan` (ValueErrors, mods with their
operands, clamped tables, the bad-row guard) -> the backend (``"jax"``: pure JAX over gathered
groups of pages; ``"pallas"``/``"interpret"``: the Pallas kernel reading pages in place) ->
:func:`~attnax.kernels.merge_attentions` over the splits -> unpacked GQA heads, bad rows NaN.

Gradients: the ``"jax"`` backend is differentiated by autodiff. The Pallas backend is a forward
kernel (decoding needs no backward); under differentiation its ``custom_vjp`` runs the VJP of the
pure-JAX backend on the same inputs, so q, the pages, the int8 scales and the mods' float arrays
all get their true gradient.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attnax.kernels import _checks
from attnax.kernels.gqa import fold_group, pack_gqa, unpack_gqa
from attnax.kernels.merge import merge_attentions
from attnax.kernels.paged import jax_backend
from attnax.kernels.paged import pallas as pallas_backend
from attnax.kernels.paged.pallas import KernelSpec, PagedConfig
from attnax.kernels.paged.plan import PagedPlan, build_plan

__all__ = ["paged_attention", "BACKENDS", "AUTO_ORDER", "not_supported_reasons"]

BACKENDS = ("auto", "jax", "pallas", "interpret")
AUTO_ORDER = ("pallas", "jax")


def not_supported_reasons(backend: str, plan: PagedPlan) -> list[str]:
  """Why ``backend`` cannot run ``plan`` (empty when it can)."""
  if backend == "jax":
    return []
  if backend in ("pallas", "interpret"):
    return pallas_backend.not_supported_reasons(plan, interpret=backend == "interpret")
  return [f"unknown backend {backend!r}; supported: {', '.join(BACKENDS)}"]


def _resolve_backend(backend: str, plan: PagedPlan) -> str:
  if backend not in BACKENDS:
    raise ValueError(f"paged_attention: backend {backend!r} is not available; supported: "
                     f"{', '.join(BACKENDS)}")
  if backend == "auto":
    return next(name for name in AUTO_ORDER if not not_supported_reasons(name, plan))
  reasons = not_supported_reasons(backend, plan)
  if reasons:
    raise ValueError(f"paged_attention: backend {backend!r} cannot run these inputs:\n  - "
                     + "\n  - ".join(reasons))
  return backend


def _jax_merged(plan: PagedPlan, pages_per_split: int, q5, k_pages, v_pages, k_scales, v_scales,
                block_tables, lengths, operands):
  """``(out (B, Hkv, G, Sq, Dv) in q's dtype, lse f32)`` by the pure-JAX backend."""
  outs, lses = jax_backend.partials(plan, q5, k_pages, v_pages, k_scales, v_scales, block_tables,
                                    lengths, operands, pages_per_split=pages_per_split)
  return merge_attentions(outs, lses, out_dtype=q5.dtype)


def _pallas_merged(spec: KernelSpec, q5, k_pages, v_pages, k_scales, v_scales, block_tables,
                   lengths, operands):
  """The same result by the Pallas kernel."""
  plan = spec.plan
  b, hkv, g, sq, d = q5.shape
  rows = fold_group(q5)                                     # (B, Hkv, G * Sq, D)
  rows = jnp.pad(rows, ((0, 0), (0, 0), (0, spec.rows_padded - plan.rows), (0, 0)))
  outs, lses = pallas_backend.partials(spec, rows, k_pages, v_pages, k_scales, v_scales,
                                       block_tables, lengths, operands)
  n = spec.num_splits
  outs = outs[:, :, :, :plan.rows].reshape(n, b, hkv, g, sq, plan.v_dim)
  lses = lses[:, :, :, :plan.rows].reshape(n, b, hkv, g, sq)
  return merge_attentions(outs, lses, out_dtype=q5.dtype)


def _pallas_with_jax_vjp(spec: KernelSpec, pages_per_split: int):
  """The Pallas forward, differentiated through the pure-JAX backend (same maths)."""
  reference = lambda *args: _jax_merged(spec.plan, pages_per_split, *args)

  @jax.custom_vjp
  def attend(*args):
    return _pallas_merged(spec, *args)

  def fwd(*args):
    return _pallas_merged(spec, *args), args

  def bwd(args, cts):
    _, pullback = jax.vjp(reference, *args)
    return pullback(cts)

  attend.defvjp(fwd, bwd)
  return attend


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
                    lengths: jax.Array, *, k_scales: jax.Array | None = None,
                    v_scales: jax.Array | None = None, score_mod: Any = None,
                    mask_mod: Any = None, scale: float | None = None,
                    softcap: float | None = None, return_lse: bool = False,
                    pages_per_split: int | None = None, backend: str = "auto",
                    config: PagedConfig | None = None) -> Any:
  """Attention of a few new queries per sequence over a paged KV cache.

  For decoding ``Sq = 1``; for ``Sq > 1`` (chunked prefill, speculative verification) the queries
  are the *last* ``Sq`` tokens of each sequence: query ``i`` of row ``b`` sits at absolute position
  ``lengths[b] - Sq + i`` and attends causally to keys at positions up to its own (and
  ``< lengths[b]``). The new tokens' K/V must already be written to the cache. A row with fewer
  than ``Sq`` tokens (``lengths[b] < Sq``: a shorter chunk, right-aligned in the ``Sq`` query
  slots) has queries at negative positions: they see no key (output 0, lse ``-inf``).

  The cache layout is that of ``jax.experimental.pallas.ops.gpu.paged_attention``: pools of pages
  shared by every sequence; row ``b`` of ``block_tables`` lists the pages of sequence ``b`` in
  order; logical position ``p`` of sequence ``b`` lives at
  ``k_pages[:, block_tables[b, p // page_size], p % page_size]``.
  (:class:`~attnax.kernels.paged.PagedKVCache` keeps such a cache: allocate, append, free.)

  Split-K: each sequence's pages are cut into groups, a partial ``(out, lse)`` is computed per
  group with the query heads of each kv head packed together (K/V are read once per kv head,
  never repeated) and the partials are merged with :func:`~attnax.kernels.merge_attentions`.

  Args:
    q: ``(B, Hq, Sq, D)``, ``Hq % Hkv == 0`` (the ``Hq / Hkv`` query heads of a kv head are packed).
    k_pages: ``(Hkv, num_pages, page_size, D)`` key pages shared by all sequences, in q's dtype,
      or int8 with ``k_scales``.
    v_pages: ``(Hkv, num_pages, page_size, Dv)``, likewise.
    block_tables: int ``(B, pages_per_sequence)``: the pages of each sequence, in order, each in
      ``[0, num_pages)``; entries past the pages that hold a sequence's ``lengths[b]`` tokens are
      ignored (any value).
    lengths: int ``(B,)``: valid tokens per sequence, in ``[0, capacity]`` with
      ``capacity = pages_per_sequence * page_size``; ``0`` is an empty or inactive row (output 0,
      lse ``-inf``). Cache slots at or past ``lengths[b]`` may hold anything (even NaN): they
      contribute exactly 0.
    k_scales, v_scales: for int8 pages, float32 ``(Hkv, num_pages, page_size)``: the per-token
      scale of each key / value row (the cached value is ``pages * scales[..., None]``), as
      :func:`~attnax.kernels.paged.quantize_kv` produces them. Dequantised in the kernel.
    score_mod, mask_mod: mods evaluated on absolute positions (``q_idx`` as above, ``kv_idx`` the
      key's position in its sequence; ``h`` the query head). The arrays they carry are checked
      against ``batch=B``, ``heads=Hq`` and ``q_len = kv_len = capacity`` (positions run up to
      the capacity), e.g. document ids need one entry per cache position.
    scale: default ``D ** -0.5``.
    softcap: shorthand for ``compose_score_mods(softcap_mod(softcap), score_mod)``: scores become
      ``softcap * tanh(scale * q.k / softcap)`` (Gemma 2) after scaling, before the score mod.
    return_lse: also return the f32 lse ``(B, Hq, Sq)``.
    pages_per_split: pages per split-K group; ``"jax"`` default ``ceil(pages_per_sequence / 8)``.
      The Pallas backend runs ``ceil(pages_per_sequence / pages_per_split)`` splits and divides
      each row's pages evenly among them at run time (default: from ``config``).
    backend: ``"auto"`` (the Pallas kernel on a GPU when it supports the inputs, else ``"jax"``),
      ``"jax"`` (pure JAX; runs everywhere; gathers each group of pages into a contiguous copy),
      ``"pallas"`` (the Triton-lowered Pallas kernel: pages read in place through the block
      table) or ``"interpret"`` (that kernel in the Pallas interpreter, any device). An explicit
      backend that cannot run the inputs raises ValueError listing why.
    config: :class:`~attnax.kernels.paged.PagedConfig`, the Pallas backends' launch knobs
      (ignored by ``"jax"``).

  Returns:
    ``out`` ``(B, Hq, Sq, Dv)`` in q's dtype, or ``(out, lse)``.

  Raises:
    ValueError: bad shapes or dtypes (int8 pages without their f32 scales, scales of the wrong
      shape); mod arrays that do not fit; a backend that cannot run the inputs; and, where
      ``lengths`` / ``block_tables`` are concrete (not traced), lengths outside
      ``[0, capacity]`` or page indices (of the pages a sequence uses) outside
      ``[0, num_pages)``, naming the argument, the bad rows and the shapes.

  Under ``jit`` those values cannot be checked. Then a row ``b`` whose length lies outside
  ``[0, capacity]``, or whose used pages lie outside ``[0, num_pages)``, gets output NaN and lse
  NaN (the indices are clamped into range for the computation, which is then discarded): never a
  plausible-looking wrong answer. The other rows are unaffected.

  Gradients (with respect to q, the pages, the scales and the mods' float arrays) are exact with
  every backend; the Pallas backends compute them by the pure-JAX backend's VJP.
  """
  plan, operands, bt, ln, bad_row = build_plan(
      q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales, score_mod=score_mod,
      mask_mod=mask_mod, scale=scale, softcap=softcap)
  name = _resolve_backend(backend, plan)
  n_pages = plan.pages_per_sequence
  if pages_per_split is not None:
    _checks.check_block("pages_per_split", pages_per_split)
    pages_per_split = min(pages_per_split, n_pages)
  jax_split = pages_per_split if pages_per_split is not None else max(1, -(-n_pages // 8))
  if config is not None and not isinstance(config, PagedConfig):
    raise ValueError(f"paged_attention: config must be a PagedConfig, got "
                     f"{type(config).__name__}")
  if not plan.quantized:
    k_scales = v_scales = None

  q5 = pack_gqa(q, plan.kv_heads)
  args = (q5, k_pages, v_pages, k_scales, v_scales, bt, ln, operands)
  if name == "jax":
    out, lse = _jax_merged(plan, jax_split, *args)
  else:
    interpret = name == "interpret"
    cfg = config if config is not None else pallas_backend.default_config(
        interpret=interpret, quantized=plan.quantized)
    spec = KernelSpec.resolve(plan, cfg, interpret=interpret, pages_per_split=pages_per_split)
    out, lse = _pallas_with_jax_vjp(spec, jax_split)(*args)
  out, lse = unpack_gqa(out), unpack_gqa(lse)
  out = jnp.where(bad_row[:, None, None, None], jnp.asarray(jnp.nan, out.dtype), out)
  lse = jnp.where(bad_row[:, None, None], jnp.nan, lse)
  return (out, lse) if return_lse else out
