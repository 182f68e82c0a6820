"""The conformance table: every attnax kernel and backend, one row each, with its capabilities.

A kernel joins the suite in ``tests/kernels/test_conformance.py`` by adding one :class:`Kernel`
row to :data:`KERNELS`: a name, an adapter with the ``AttentionFn`` signature
``fn(q, k, v, *, score_mod=None, mask_mod=None, scale=None, return_lse=False)`` (small blocks or
chunks bound, so several tiles and ragged tails occur at the suite's small shapes) and capability
flags. Each check in the suite is parametrised over the rows and skips a row whose flags say the
check does not apply (tokamax's test base class with capability flags, as a table).

Tolerances are those of DESIGN.md section 8 (``tests.helpers.tol``). The one override the design
allows is AETHER's certificate (section 6): a row with ``certified_epsilon`` may differ from dense
attention by at most ``2 * epsilon * max|v|`` per output entry and ``epsilon`` per LSE entry; the
suite adds those bounds (as norms) to the rounding tolerance.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.kernels import (aether_attention, compose_score_mods, causal_mod, flash_attention,
                            linear_attention, memory_efficient_attention, paged_attention,
                            pallas_flash_attention, ring_attention, ring_attention_reference,
                            standard_attention)
from attnax.kernels import score_mods as sm

# Every check that a row can restrict with ``fast`` / ``slow`` (ids as in test_conformance.py).
CHECKS = ("forward", "grads", "mod_array_grads", "closures", "prebuilt_mods", "empty_rows",
          "bad_inputs", "certified_bound", "non_finite", "mod_results",
          "dropout", "float64")   # the last two: tests/kernels/test_dropout.py, test_float64.py


@dataclasses.dataclass(frozen=True)
class Kernel:
  """One row of the conformance table.

  Attributes:
    name: the test id.
    fn: adapter with the AttentionFn signature (kernel options bound).
    softmax: it computes softmax attention (False: only the bad-input checks apply).
    grad: it has a backward (q/k/v, LSE and mod-array gradients are checked).
    lse: it returns the log-sum-exp with ``return_lse=True``.
    mods: it accepts arbitrary score/mask mods (prebuilt, pytrees; closures: see ``closures``).
    closures: it accepts mods that close over arrays (plain functions, not pytrees); rows without
      it must refuse them with a ValueError naming the closure (checked by test_bad_inputs). The
      Mosaic GPU kernel reads a mod's arrays as per-tile loads and cannot gather from a captured
      array (``backend="auto"`` then runs Triton).
    gqa: ``Hq > Hkv`` (grouped-query attention).
    ragged: sequence lengths that are not multiples of its blocks.
    sq_ne_sk: ``Sq != Sk``.
    block_sparse: it skips tiles from a BlockMask (informational: what the row's kernel does).
    f64: it runs float64 inputs in float64 (the pure-JAX kernels); rows without it must raise a
      ValueError naming float64 (the Pallas kernels). Checked by test_bad_inputs and, against the
      float64 reference, by tests/kernels/test_float64.py.
    dropout: it takes ``dropout_rate``/``dropout_rng`` and drops exactly the weights
      ``standard_attention`` drops with the same key (tests/kernels/test_dropout.py).
    seq_multiple: sequence lengths must be multiples of this (the ring: its shard count); the
      suite rounds its lengths up for the row.
    seq_scale: the suite's sequence lengths (and the positions of its tile-structured masks) are
      multiplied by this for the row: a kernel whose tiles are larger than the suite's blocks of
      16 still sees several tiles, ragged tails and ``Sq != Sk`` (Mosaic GPU: 128 x 128 tiles,
      which it refuses to shrink for short sequences).
    dtype: the dtype the row runs the suite's float32 checks in, at that dtype's tolerances
      (``None``: as written). The Mosaic GPU kernel takes only bf16/f16 inputs.
    head_dim: the row's head dim (``None``: the suite's). The Mosaic GPU kernel refuses head dims
      <= 32 (padding them to its 64-column tiles would waste the matmuls).
    bottom_right_causal: the kernel always applies ``causal_mod(offset=Sk - Sq)`` (queries at the
      end of the sequence, as paged decoding); the reference adds that mask.
    certified_epsilon: AETHER's epsilon: the tolerance override of DESIGN.md section 6.
    fast: if given, only these check ids (``"check"`` or ``"check[variant]"``) run by default;
      every other check of the row is marked slow (compile-heavy rows: Pallas interpret).
    slow: check ids marked slow (for rows without ``fast``).
    gpu: the row needs a CUDA GPU (a compiled lowering): every check carries the ``gpu`` marker
      (run with ``pytest -m gpu``), none is slow.
  """
  name: str
  fn: Callable[..., Any]
  softmax: bool = True
  grad: bool = True
  lse: bool = True
  mods: bool = True
  closures: bool = True
  gqa: bool = True
  ragged: bool = True
  sq_ne_sk: bool = True
  block_sparse: bool = False
  f64: bool = False
  dropout: bool = False
  seq_multiple: int = 1
  seq_scale: int = 1
  dtype: Any = None
  head_dim: int | None = None
  bottom_right_causal: bool = False
  certified_epsilon: float = 0.0
  fast: frozenset | None = None
  slow: frozenset = frozenset()
  gpu: bool = False

  def __post_init__(self):
    for cid in (self.fast or frozenset()) | self.slow:
      if cid.split("[")[0] not in CHECKS:
        raise ValueError(f"{self.name}: unknown check id {cid!r}; checks are {CHECKS}")

  def __repr__(self):      # pytest ids and assertion messages
    return self.name

  def lengths(self, sq: int, sk: int) -> tuple[int, int]:
    """The suite's lengths ``(sq, sk)`` as the row runs them: scaled, rounded up to multiples."""
    up = lambda n: -(-(n * self.seq_scale) // self.seq_multiple) * self.seq_multiple
    return up(sq), up(sk)

  def input_dtype(self, dtype: Any) -> Any:
    """The dtype the row runs a check written for ``dtype`` in (its own instead of float32)."""
    return self.dtype if self.dtype is not None and jnp.dtype(dtype) == jnp.float32 else dtype

  def is_slow(self, check: str, variant: str | None = None) -> bool:
    ids = {check} if variant is None else {check, f"{check}[{variant}]"}
    if self.fast is not None:
      return not (ids & self.fast)
    return bool(ids & self.slow)


def adapter(kernel: Callable[..., Any], **options: Any) -> Callable[..., Any]:
  """``kernel`` with ``options`` bound, as a function of the AttentionFn signature.

  Keyword ``overrides`` replace bound options (e.g. AETHER's ``epsilon`` in one check).
  """
  def fn(q, k, v, *, score_mod=None, mask_mod=None, scale=None, return_lse=False, **overrides):
    return kernel(q, k, v, score_mod=score_mod, mask_mod=mask_mod, scale=scale,
                  return_lse=return_lse, **{**options, **overrides})
  fn.__name__ = getattr(kernel, "__name__", "kernel")
  return fn


# ----------------------------------------------------------------------------- ring on a mesh

RING_SHARDS = 2


@functools.cache
def ring_mesh() -> jax.sharding.Mesh:
  if len(jax.devices()) < RING_SHARDS:
    pytest.skip(f"ring_attention needs {RING_SHARDS} devices (conftest forces 4 host CPU devices)")
  return jax.sharding.Mesh(np.array(jax.devices()[:RING_SHARDS]), ("sp",))


def ring_on_mesh(q, k, v, *, score_mod=None, mask_mod=None, scale=None, return_lse=False):
  """ring_attention over a 2-device mesh axis ``'sp'`` of the host CPU devices."""
  return ring_attention(q, k, v, mesh=ring_mesh(), axis_name="sp", score_mod=score_mod,
                        mask_mod=mask_mod, scale=scale, return_lse=return_lse, block_q=16)


# ----------------------------------------------------------------------------- paged cache

PAGE_SIZE = 8
SPARE_PAGES = 5     # pages of the pool no sequence owns (random contents: must never be read)


def _binds(mod: Any, nargs: int) -> bool:
  if mod is None:
    return True
  try:
    inspect.signature(mod).bind(*range(nargs))
    return True
  except (TypeError, ValueError):
    return False


def _shift_q(mod: Any, nargs: int, offset: int) -> Any:
  """``mod`` seen from absolute query positions ``offset + i`` (what paged_attention passes)."""
  if mod is None or offset == 0 or not callable(mod) or not _binds(mod, nargs):
    return mod      # nothing to shift, or a bad mod the kernel must reject itself
  if any(isinstance(x, (jax.Array, np.ndarray)) for x in jax.tree_util.tree_leaves(mod)):
    # A pytree mod carrying arrays stays a pytree (a closure would hide its arrays from a Pallas
    # kernel, which must receive them as operands): the module's decode-time shift wrappers.
    from attnax.attention import ShiftedMask, ShiftedScoreMod
    shift = jnp.full((1,), -offset, jnp.int32)
    return ShiftedScoreMod(mod, shift) if nargs == 5 else ShiftedMask(mod, shift)
  if nargs == 5:
    return lambda s, b, h, i, j: mod(s, b, h, i - offset, j)
  return lambda b, h, i, j: mod(b, h, i - offset, j)


def write_pages(x: jax.Array, tables: np.ndarray, num_pages: int, seed: int) -> jax.Array:
  """A random ``(Hkv, num_pages, PAGE_SIZE, D)`` pool with ``x`` ``(B, Hkv, S, D)`` written into
  the pages ``tables`` ``(B, n)`` names (differentiable w.r.t. ``x``). The slots past ``S`` in a
  sequence's last page and the pages no sequence owns hold large random values: a kernel that
  read them would be visibly wrong."""
  b, hkv, s, d = x.shape
  n = tables.shape[1]
  rng = np.random.default_rng(seed)
  noise = 10 * rng.standard_normal((hkv, num_pages, PAGE_SIZE, d))
  pool = jnp.asarray(noise.astype(np.float32)).astype(x.dtype)
  tail = 10 * rng.standard_normal((b, hkv, n * PAGE_SIZE - s, d))
  x = jnp.concatenate([x, jnp.asarray(tail.astype(np.float32)).astype(x.dtype)], axis=2)
  x = jnp.moveaxis(x.reshape(b, hkv, n, PAGE_SIZE, d), 1, 0)    # (Hkv, B, n, page, D)
  return pool.at[:, jnp.asarray(tables)].set(x)


def paged_adapter(q, k, v, *, score_mod=None, mask_mod=None, scale=None, return_lse=False,
                  backend="auto"):
  """paged_attention on a contiguous ``(q, k, v)``: K/V written into a random page pool through a
  shuffled block table, every sequence ``Sk`` long, so the ``Sq`` queries sit at positions
  ``Sk - Sq .. Sk - 1`` and are causal. The mods are given on relative query positions (as every
  other row) and shifted to the absolute positions paged_attention evaluates them on."""
  if getattr(k, "ndim", 0) != 4 or getattr(v, "ndim", 0) != 4 or k.shape[:3] != v.shape[:3]:
    # Not a contiguous cache: hand the arrays over as pages, for the kernel's own checks.
    b = q.shape[0] if getattr(q, "ndim", 0) == 4 else 1
    tables = jnp.zeros((b, 1), jnp.int32)
    return paged_attention(q, k, v, tables, jnp.ones((b,), jnp.int32), score_mod=score_mod,
                           mask_mod=mask_mod, scale=scale, return_lse=return_lse, backend=backend)
  b, _, sk, _ = k.shape
  n = -(-sk // PAGE_SIZE)
  num_pages = b * n + SPARE_PAGES
  tables = np.random.default_rng(sk).permutation(num_pages)[:b * n].reshape(b, n)
  k_pages = write_pages(k, tables, num_pages, seed=1)
  v_pages = write_pages(v, tables, num_pages, seed=2)
  offset = sk - q.shape[2] if getattr(q, "ndim", 0) == 4 else 0
  if offset and _binds(score_mod, 5) and (mask_mod is None or _binds(mask_mod, 4)):
    # Shift the score part and the mask part separately: a mask must stay a mask (a fully
    # masked row is empty), not become a score mod that writes the mask value.
    score_mod, carried = sm.split_score_mod(score_mod)
    mask_mod = sm.and_masks(carried, mask_mod)
  return paged_attention(q, k_pages, v_pages, jnp.asarray(tables, jnp.int32),
                         jnp.full((b,), sk, jnp.int32), score_mod=_shift_q(score_mod, 5, offset),
                         mask_mod=_shift_q(mask_mod, 4, offset), scale=scale,
                         return_lse=return_lse, pages_per_split=2, backend=backend)


# ----------------------------------------------------------------------------- the table

BLOCK = 16                # blocks / chunks of every blocked row: several tiles, ragged tails
AETHER_EPSILON = 1e-6     # small: the certified bound stays far below the f32 tolerance

# Compile time budget (CI runs the CPU suite on 2 cores). Rows that evaluate mods elementwise on
# absolute positions (no tile classification) run the single prebuilt mods and the eager closures
# only under -m slow: the compositions and the jitted closures cover the same code. Rows
# differentiated by plain autodiff also leave the (B, 1, 1, Sk) bias gradient to -m slow.
_ELEMENTWISE_SLOW = frozenset({"prebuilt_mods[causal]", "prebuilt_mods[sliding_window]",
                               "prebuilt_mods[document]", "prebuilt_mods[alibi_bias]",
                               "prebuilt_mods[softcap]", "prebuilt_mods[padding]",
                               "prebuilt_mods[array_mask]", "prebuilt_mods[local_window]",
                               "prebuilt_mods[broadcast_arrays]", "closures[eager]"})
_AUTODIFF_SLOW = _ELEMENTWISE_SLOW | {"mod_array_grads[bias_rows]"}
# Pallas interpret mode (and AETHER over it) compiles slowly on CPU: these checks are the rows'
# fast representatives (one q/k/v gradient, one mod-array gradient, the closures); everything
# else of those rows runs under -m slow.
_PALLAS_FAST = frozenset({"forward[f32]", "forward[bf16]", "grads[out_lse]",
                          "mod_array_grads[bias_heads_docs]", "closures[eager]", "closures[jit]",
                          "prebuilt_mods[compose]", "empty_rows[forward]", "bad_inputs",
                          "non_finite", "mod_results[python_state]", "dropout"})
_AETHER_FLASH_FAST = frozenset({"forward[f32]", "grads[out_lse]", "mod_array_grads[bias_rows]",
                                "closures[jit]", "prebuilt_mods[compose]",
                                "prebuilt_mods[broadcast_arrays]", "empty_rows[forward]",
                                "bad_inputs", "non_finite", "float64[forward]"})
_AETHER_PALLAS_FAST = frozenset({"forward[f32]", "grads[out_lse]", "bad_inputs"})
# The Pallas paged kernel (interpreted): a forward kernel whose gradients are the pure-JAX
# backend's VJP (the "paged" row checks that path in full).
_PAGED_PALLAS_FAST = frozenset({"forward[f32]", "forward[bf16]", "grads[out_lse]",
                                "closures[jit]", "prebuilt_mods[compose]", "empty_rows[forward]",
                                "bad_inputs", "non_finite"})
# ring_attention_reference shares its step maths with ring_attention (fully checked).
_RING_REFERENCE_FAST = frozenset({"forward[f32]", "grads[out_lse]", "prebuilt_mods[compose]",
                                  "mod_array_grads[alibi_slopes]", "bad_inputs", "non_finite"})

KERNELS = (
    Kernel("standard", adapter(standard_attention), f64=True, dropout=True, slow=_AUTODIFF_SLOW),
    Kernel("memory_efficient", adapter(memory_efficient_attention, query_chunk_size=BLOCK,
                                       key_chunk_size=BLOCK), f64=True, dropout=True,
           slow=_AUTODIFF_SLOW),
    Kernel("flash", adapter(flash_attention, block_q=BLOCK, block_k=BLOCK), block_sparse=True,
           f64=True, dropout=True, slow=frozenset({"closures[eager]"})),
    Kernel("pallas_interpret", adapter(pallas_flash_attention, backend="interpret",
                                       block_q=BLOCK, block_k=BLOCK),
           block_sparse=True, dropout=True, fast=_PALLAS_FAST),
    Kernel("aether_flash", adapter(aether_attention, implementation="flash",
                                   epsilon=AETHER_EPSILON, block_q=BLOCK, block_k=BLOCK),
           block_sparse=True, f64=True, certified_epsilon=AETHER_EPSILON,
           fast=_AETHER_FLASH_FAST),
    Kernel("aether_pallas", adapter(aether_attention, implementation="pallas",
                                    epsilon=AETHER_EPSILON, block_q=BLOCK, block_k=BLOCK),
           block_sparse=True, certified_epsilon=AETHER_EPSILON, fast=_AETHER_PALLAS_FAST),
    Kernel("ring_reference", adapter(ring_attention_reference, num_shards=RING_SHARDS,
                                     block_q=BLOCK), seq_multiple=RING_SHARDS, f64=True,
           fast=_RING_REFERENCE_FAST),
    Kernel("ring_mesh", ring_on_mesh, seq_multiple=RING_SHARDS, f64=True, slow=_ELEMENTWISE_SLOW),
    Kernel("paged", paged_adapter, bottom_right_causal=True, f64=True, slow=_AUTODIFF_SLOW),
    Kernel("paged_interpret", functools.partial(paged_adapter, backend="interpret"),
           bottom_right_causal=True, fast=_PAGED_PALLAS_FAST),
    # Kernelised attention is not softmax attention: it only joins the bad-input checks.
    Kernel("linear", adapter(linear_attention), softmax=False, lse=False, mods=False, f64=True),
    # The compiled lowerings (GPU only): the same checks, run with -m gpu.
    Kernel("pallas_gpu", adapter(pallas_flash_attention, backend="triton", block_q=BLOCK,
                                 block_k=BLOCK), block_sparse=True, dropout=True, gpu=True),
    Kernel("aether_pallas_gpu", adapter(aether_attention, implementation="pallas",
                                        epsilon=AETHER_EPSILON, block_q=BLOCK, block_k=BLOCK),
           block_sparse=True, certified_epsilon=AETHER_EPSILON, gpu=True),
    Kernel("paged_gpu", functools.partial(paged_adapter, backend="pallas"),
           bottom_right_causal=True, gpu=True),
    # Mosaic GPU (sm90): bf16/f16 only, head dims > 32, its default 128 x 128 tiles (8 x the
    # suite's lengths: 296 x 360, ragged); no dropout in its forward, no closures over arrays.
    Kernel("mosaic_gpu", adapter(pallas_flash_attention, backend="mosaic"), block_sparse=True,
           closures=False, gpu=True, dtype=jnp.bfloat16, seq_scale=8, head_dim=64),
)


def rows(check: str, variants: Any = (None,), *, needs: tuple[str, ...] = ("softmax",)):
  """``pytest.param(row, variant)`` for every row and variant of ``check``.

  A row lacking one of the flags in ``needs`` gets a skip mark naming the flag; rows' ``fast`` /
  ``slow`` settings give slow marks.
  """
  params = []
  for row in KERNELS:
    missing = [f for f in needs if not getattr(row, f)]
    for variant in variants:
      marks = []
      if missing:
        marks.append(pytest.mark.skip(reason=f"{row.name} lacks {', '.join(missing)}"))
      elif row.gpu:
        marks.append(pytest.mark.gpu)
      elif row.is_slow(check, variant):
        marks.append(pytest.mark.slow)
      pid = row.name if variant is None else f"{row.name}-{variant}"
      params.append(pytest.param(row, variant, id=pid, marks=marks))
  return params


# ----------------------------------------------------------------------------- references


def reference_kernel(row: Kernel) -> Callable[..., Any]:
  """standard_attention with the row's fixed semantics (paged: bottom-right causal)."""
  def ref(q, k, v, *, score_mod=None, mask_mod=None, scale=None, return_lse=False):
    if row.bottom_right_causal:
      score_mod = compose_score_mods(causal_mod(k.shape[2] - q.shape[2]), score_mod)
    return standard_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, scale=scale,
                              return_lse=return_lse)
  return ref


def f64(x: Any) -> Any:
  """Floating arrays (and pytrees of them) upcast to float64 (inside ``jax.enable_x64``)."""
  def up(a):
    if isinstance(a, (jax.Array, np.ndarray)) and jnp.issubdtype(a.dtype, jnp.floating):
      return jnp.asarray(np.asarray(a, np.float64))
    return a
  return jax.tree.map(up, x)


# XLA's backend optimisations off: the suite's programs are tiny, compiling them dominates (this
# roughly halves compile time; results are the same maths).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

_REFERENCES: dict = {}


def in_float64(fn: Callable[..., Any], *args: Any, key: Any = None) -> Any:
  """``jit(fn)`` on float64 copies of ``args``; numpy float64 results.

  With a ``key`` (which must determine ``fn`` and ``args``), the result is cached: rows that share
  inputs and semantics share their reference.
  """
  if key is not None and key in _REFERENCES:
    return _REFERENCES[key]
  with jax.enable_x64(True):
    res = jit(fn)(*f64(args))
    res = jax.tree.map(lambda x: np.asarray(x, np.float64)
                       if jnp.issubdtype(x.dtype, jnp.floating) else np.asarray(x), res)
  if key is not None:
    _REFERENCES[key] = res
  return res


def reference_key(row: "Kernel", *parts: Any) -> tuple:
  """A cache key for a reference: the check's own ``parts`` (check, variant, seed, shapes ...)
  plus the row's semantics and input dtype (a bf16 row's inputs are rounded, so its reference
  differs from a float32 row's)."""
  return parts + (row.bottom_right_causal, row.dtype)


# ----------------------------------------------------------------------------- comparisons


def _norm(x) -> float:
  return float(np.linalg.norm(np.asarray(x, np.float64)))


def rel(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  d = _norm(ref)
  return _norm(x - ref) / d if d > 0 else _norm(x)


def assert_out(row: Kernel, out, ref, v, tolerance: float, what: str = "out"):
  out64 = np.asarray(out, np.float64)
  assert out64.shape == ref.shape, (what, out64.shape, ref.shape)
  assert not np.isnan(out64).any(), f"{row.name}: NaN in {what}"
  bound = tolerance
  if row.certified_epsilon:
    # DESIGN.md section 6: |out - dense| <= 2 epsilon max|v| per entry, as a norm.
    vmax = float(np.abs(np.asarray(v, np.float64)).max())
    bound += 2 * row.certified_epsilon * vmax * np.sqrt(ref.size) / max(_norm(ref), 1e-30)
  err = rel(out64, ref)
  assert err < bound, f"{row.name}: {what} relative error {err:.3g} >= {bound:.3g}"


def assert_lse(row: Kernel, lse, ref_lse, tolerance: float):
  lse = np.asarray(lse, np.float64)
  assert lse.shape == ref_lse.shape, (lse.shape, ref_lse.shape)
  assert not np.isnan(lse).any(), f"{row.name}: NaN in lse"
  fin = np.isfinite(ref_lse)
  np.testing.assert_array_equal(np.isfinite(lse), fin, err_msg=f"{row.name}: lse finiteness")
  assert np.all(lse[~fin] == -np.inf), f"{row.name}: lse of an empty row is not -inf"
  bound = tolerance
  if row.certified_epsilon:    # the LSE is low by at most epsilon
    bound += row.certified_epsilon * np.sqrt(fin.sum()) / max(_norm(ref_lse[fin]), 1e-30)
  err = rel(lse[fin], ref_lse[fin])
  assert err < bound, f"{row.name}: lse relative error {err:.3g} >= {bound:.3g}"


def assert_grads(row: Kernel, got, want, names, tolerance: float):
  for name, g, w in zip(names, got, want):
    g = np.asarray(g, np.float64)
    assert g.shape == w.shape, (name, g.shape, w.shape)
    assert np.all(np.isfinite(g)), f"{row.name}: non-finite d{name}"
    if _norm(w) > 0:
      assert _norm(g) > 0, f"{row.name}: d{name} is identically zero (reference is not)"
    err = rel(g, w)
    assert err < tolerance, f"{row.name}: d{name} relative error {err:.3g} >= {tolerance:.3g}"
