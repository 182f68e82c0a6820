"""One conformance suite for every kernel and backend: the rows of ``tests/kernels/conformance.py``.

Each check runs every row against the float64 reference (``standard_attention`` in float64, with
the row's fixed semantics, e.g. paged decoding's bottom-right causal mask) on fresh random inputs:
GQA (Hq=4, Hkv=2), ragged lengths (Sq=37, Sk=45 against blocks of 16), Sq != Sk and one Sq = Sk
case, f32 and bf16. A row may run them at scaled lengths, in its own dtype and head dim
(``Kernel.seq_scale``, ``dtype``, ``head_dim``: the Mosaic GPU row, bf16 only, 128 x 128 tiles);
cotangents, mod arrays and tolerances follow its inputs. Checks:

- ``forward``: out and LSE.
- ``grads``: q/k/v gradients, with a cotangent on out, and on out and LSE (with mods).
- ``mod_array_grads``: gradients w.r.t. the float arrays mods carry (bias tables, ALiBi slopes);
  integer arrays (document ids) get a float0 cotangent.
- ``closures``: mods that close over arrays (ids, a bias table), eagerly, under jit (tracers),
  vmap and grad w.r.t. the closed-over table.
- ``prebuilt_mods``: every factory of ``attnax.kernels.score_mods`` and a composition.
- ``empty_rows``: rows that see no key: out 0, lse -inf, zero (finite) gradients.
- ``bad_inputs``: ValueError at trace time naming the argument and the shapes (and naming float64,
  or the closure, for rows without ``f64`` / ``closures``).
- ``certified_bound``: AETHER's certificate on data it prunes.

Compile time dominates on CPU: every check compiles the kernel once (one ``jax.jit``), the shapes
are few, inputs are drawn with numpy. Compile-heavy rows (Pallas interpret) keep a few fast
representatives; the rest of their checks run under ``-m slow``.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.kernels import (additive_bias_mod, alibi_mod, causal_mod, compose_score_mods,
                            document_mask_mod, prefix_lm_mod, sliding_window_mod)
from attnax.kernels import score_mods as sm
from tests.helpers import rand, random_qkv, tol
from tests.kernels.conformance import (Kernel, assert_grads, assert_lse, assert_out, in_float64,
                                       jit, reference_key, reference_kernel, rows)

f32, bf16 = jnp.float32, jnp.bfloat16
B, HQ, HKV, SQ, SK, D = 2, 4, 2, 37, 45, 16
SQUARE = 40


def inputs(row: Kernel, seed: int, sq: int = SQ, sk: int = SK, dtype=f32, batch: int = B):
  """Fresh q, k, v for a check written for lengths ``sq``, ``sk`` and ``dtype``, as the row runs
  it (its lengths, dtype and head dim)."""
  sq, sk = row.lengths(sq, sk)
  return random_qkv(seed, batch=batch, q_heads=HQ, kv_heads=HKV, q_len=sq, kv_len=sk,
                    head_dim=row.head_dim or D, dtype=row.input_dtype(dtype))


def doc_ids(seed: int, length: int, batch: int | None = B, ndocs: int = 3) -> jax.Array:
  """Sorted random document ids (packed documents), ``(batch, length)`` or ``(length,)``."""
  shape = (length,) if batch is None else (batch, length)
  ids = np.sort(np.random.default_rng(seed).integers(0, ndocs, shape), axis=-1)
  return jnp.asarray(ids, jnp.int32)


def _is_array_pytree(mod) -> bool:
  leaves, treedef = jax.tree.flatten(mod)
  return (mod is not None and not jax.tree_util.treedef_is_leaf(treedef)
          and all(isinstance(x, (jax.Array, np.ndarray)) for x in leaves))


def _split_mods(score_mod, mask_mod):
  """Pytree mods travel as jit arguments (their arrays are tracers); functions are closed over."""
  mods = {"score_mod": score_mod, "mask_mod": mask_mod}
  dyn = {n: m for n, m in mods.items() if _is_array_pytree(m)}
  static = {n: m for n, m in mods.items() if n not in dyn}
  return dyn, static


def run(row: Kernel, q, k, v, *, score_mod=None, mask_mod=None, **kw):
  """One jitted call of the row's kernel: ``(out, lse)`` (lse None for rows without one)."""
  dyn, static = _split_mods(score_mod, mask_mod)
  f = lambda q, k, v, dyn: row.fn(q, k, v, return_lse=row.lse, **dyn, **static, **kw)
  res = jit(f)(q, k, v, dyn)
  return res if row.lse else (res, None)


def reference(row: Kernel, key, q, k, v, *, score_mod=None, mask_mod=None, **kw):
  """The float64 reference ``(out, lse)``, cached under ``key`` (+ shapes and row semantics)."""
  dyn, static = _split_mods(score_mod, mask_mod)
  ref = reference_kernel(row)
  return in_float64(lambda q, k, v, dyn: ref(q, k, v, return_lse=True, **dyn, **static, **kw),
                    q, k, v, dyn, key=reference_key(row, *key, q.shape, k.shape, q.dtype))


def check_forward(row: Kernel, out, lse, ref, ref_lse, v):
  """out (in the inputs' dtype) and LSE (f32) against the reference, at the inputs' tolerance."""
  dtype = v.dtype
  assert out.shape == ref.shape and out.dtype == dtype, (out.shape, out.dtype)
  assert_out(row, out, ref, v, tol(dtype))
  if row.lse:
    assert lse.shape == ref_lse.shape and lse.dtype == f32, (lse.shape, lse.dtype)
    assert_lse(row, lse, ref_lse, tol(dtype))


def grads(row: Kernel, key, loss, args, argnums, **kw):
  """``(kernel grads, float64 reference grads)`` of ``loss(fn, *args)``, one jit each; the
  reference is cached under ``key`` (+ the shapes of ``args`` and the row's semantics)."""
  got = jit(jax.grad(functools.partial(loss, row.fn), argnums=argnums, **kw))(*args)
  shapes = tuple(getattr(a, "shape", None) for a in jax.tree.leaves(args))
  want = in_float64(jax.grad(functools.partial(loss, reference_kernel(row)), argnums=argnums,
                             **kw), *args, key=reference_key(row, *key, shapes))
  return got, want


# ----------------------------------------------------------------------------- forward

FORWARD = {  # variant: (dtype, Sq, Sk, scale)
    "f32": (f32, SQ, SK, None),
    "bf16": (bf16, SQ, SK, None),
    "square": (f32, SQUARE, SQUARE, 0.3),
}


@pytest.mark.parametrize("row,variant", rows("forward", FORWARD))
def test_forward(row, variant):
  dtype, sq, sk, scale = FORWARD[variant]
  q, k, v = inputs(row, 0, sq, sk, dtype)
  out, lse = run(row, q, k, v, scale=scale)
  ref, ref_lse = reference(row, ("forward", variant), q, k, v, scale=scale)
  check_forward(row, out, lse, ref, ref_lse, v)


# ----------------------------------------------------------------------------- q/k/v gradients


@pytest.mark.parametrize("row,variant", rows("grads", ("out", "out_lse"),
                                             needs=("softmax", "grad")))
def test_grads(row, variant):
  """Cotangent on out (no mods: the dense walk); on out and LSE with masked, biased, soft-capped
  scores (a score mod whose derivative is not 1)."""
  q, k, v = inputs(row, 1)
  sq, sk = q.shape[2], k.shape[2]
  ct = rand(2, q.shape)     # out's shape
  if variant == "out":
    def loss(fn, q, k, v):
      return jnp.sum(fn(q, k, v).astype(f32) * ct)
  else:
    assert row.lse
    ct_lse = rand(3, q.shape[:3])
    mod = compose_score_mods(sm.softcap_mod(2.0), alibi_mod(num_heads=HQ),
                             causal_mod(offset=sk - sq))

    def loss(fn, q, k, v):
      out, lse = fn(q, k, v, score_mod=mod, return_lse=True)
      return jnp.sum(out.astype(f32) * ct) + jnp.sum(lse * ct_lse)
  got, want = grads(row, ("grads", variant), loss, (q, k, v), (0, 1, 2))
  assert all(g.dtype == q.dtype for g in got)
  assert_grads(row, got, want, "qkv", tol(q.dtype, grad=True))


# ----------------------------------------------------------------------------- mod-array gradients


@pytest.mark.parametrize("row,variant", rows(
    "mod_array_grads", ("bias_heads_docs", "bias_rows", "alibi_slopes", "alibi_slopes_long_bf16",
                        "temperature_closure"),
    needs=("softmax", "grad", "mods")))
def test_mod_array_grads(row, variant):
  """d/d(bias) through additive_bias_mod ((1, H, Sq, Sk) with document ids, (B, 1, 1, Sk)),
  d/d(slopes) through alibi_mod(slopes=...) and d/d(temperature) of a closure scaling each query's
  scores (``s * t[b, h, i]``: a per-row operand, as a gate's alpha), with q/k/v; integer ids get a
  float0 cotangent. Together: a table, a column vector, a scalar per head and a row vector.

  ``alibi_slopes_long_bf16``: the slopes' gradient weights dS by the distances, so at 296 x 360 in
  bf16 it shows a backward whose delta comes from the rounded output (16% off; the residual must
  be the f32 output, ``tiles.residual_out_dtype``)."""
  if variant == "alibi_slopes_long_bf16":
    long = lambda n: n * 8 // row.seq_scale
    q, k, v = inputs(row, 4, long(SQ), long(SK), bf16, batch=1)
  else:
    q, k, v = inputs(row, 4)
  sq, sk = q.shape[2], k.shape[2]
  ct = rand(5, q.shape)
  if variant == "bias_heads_docs":
    array = rand(6, (1, HQ, sq, sk))
    ids = (doc_ids(7, sq), doc_ids(7, sk))     # the same draw: the q ids' documents have keys
    make = lambda bias, ids: compose_score_mods(additive_bias_mod(bias), document_mask_mod(*ids))
  elif variant == "bias_rows":
    array, ids = rand(8, (B, 1, 1, sk)), None
    make = lambda bias, ids: additive_bias_mod(bias)
  elif variant.startswith("alibi_slopes"):
    array, ids = 0.5 * rand(9, (HQ,)), None
    make = lambda slopes, ids: compose_score_mods(alibi_mod(slopes=slopes),
                                                  causal_mod(offset=sk - sq))
  else:
    if not row.closures:
      pytest.skip(f"{row.name} lacks closures")
    array, ids = 1.0 + 0.3 * rand(11, (B, HQ, sq)), None
    make = lambda temp, ids: (lambda s, b, h, i, j: s * temp[b, h, i])

  def loss(fn, q, k, v, array, ids):
    return jnp.sum(fn(q, k, v, score_mod=make(array, ids)).astype(f32) * ct)

  argnums = (0, 1, 2, 3) if ids is None else (0, 1, 2, 3, 4)
  got, want = grads(row, ("mod_array_grads", variant), loss, (q, k, v, array, ids), argnums,
                    allow_int=True)
  name = "slopes" if variant.startswith("alibi") else ("temperature" if "temperature" in variant
                                                        else "bias")
  assert_grads(row, got[:4], want[:4], ("q", "k", "v", name), tol(q.dtype, grad=True))
  if ids is not None:
    for d_ids in got[4]:
      assert d_ids.dtype == jax.dtypes.float0, f"{row.name}: cotangent of int ids is {d_ids.dtype}"


# ----------------------------------------------------------------------------- closures


def closure_mods(ids, bias):
  """A mask mod and a score mod that close over arrays (not pytrees: functions)."""
  return dict(mask_mod=lambda b, h, i, j: ids[i] == ids[j],
              score_mod=lambda s, b, h, i, j: s + bias[h, i, j])


@pytest.mark.parametrize("row,variant", rows("closures", ("eager", "jit", "vmap", "grad"),
                                             needs=("softmax", "mods", "closures")))
def test_closures(row, variant):
  q, k, v = inputs(row, 10)
  sq, sk = q.shape[2], k.shape[2]
  ids = doc_ids(11, sk, batch=None)      # indexed by q and kv positions (Sq <= Sk)
  bias = rand(12, (HQ, sq, sk))
  ref_fn = reference_kernel(row)

  def attend(fn, q, k, v, ids, bias, **kw):
    return fn(q, k, v, **closure_mods(ids, bias), **kw)

  if variant in ("eager", "jit"):
    f = functools.partial(attend, row.fn, return_lse=row.lse)
    res = f(q, k, v, ids, bias) if variant == "eager" else jit(f)(q, k, v, ids, bias)
    out, lse = res if row.lse else (res, None)
    ref, ref_lse = in_float64(functools.partial(attend, ref_fn, return_lse=True),
                              q, k, v, ids, bias, key=reference_key(row, "closures", q.shape,
                                                                    k.shape))
    check_forward(row, out, lse, ref, ref_lse, v)
  elif variant == "vmap":
    # An extra leading batch axis over q, k, v and the closed-over bias (the ids are shared).
    qs, ks, vs = (jnp.stack([x, 0.5 * x[::-1]]) for x in (q, k, v))
    biases = jnp.stack([bias, -bias])
    f = jax.vmap(functools.partial(attend, row.fn, return_lse=row.lse), (0, 0, 0, None, 0))
    res = jit(f)(qs, ks, vs, ids, biases)
    out, lse = res if row.lse else (res, None)
    ref, ref_lse = in_float64(jax.vmap(functools.partial(attend, ref_fn, return_lse=True),
                                       (0, 0, 0, None, 0)), qs, ks, vs, ids, biases,
                              key=reference_key(row, "closures-vmap", q.shape, k.shape))
    for n in range(2):
      check_forward(row, out[n], None if lse is None else lse[n], ref[n], ref_lse[n], vs[n])
  else:
    if not row.grad:
      pytest.skip(f"{row.name} has no backward")
    ct = rand(13, q.shape)

    def loss(fn, bias, q, k, v, ids):
      return jnp.sum(attend(fn, q, k, v, ids, bias).astype(f32) * ct)

    got, want = grads(row, ("closures", variant), loss, (bias, q, k, v, ids), (0, 1))
    assert_grads(row, got, want, ("bias (closed over)", "q"), tol(q.dtype, grad=True))


# ----------------------------------------------------------------------------- prebuilt mods


def prebuilt_mod(name: str, sq: int, sk: int, seq_scale: int = 1):
  return {
      "causal": lambda: causal_mod(),
      "causal_offset": lambda: causal_mod(offset=sk - sq),
      "sliding_window": lambda: sliding_window_mod(12, offset=sk - sq),
      "prefix_lm": lambda: prefix_lm_mod(jnp.array([5, 21], jnp.int32)),    # one per batch row
      "document": lambda: document_mask_mod(doc_ids(14, sq), doc_ids(15, sk)),
      "alibi_bias": lambda: compose_score_mods(alibi_mod(num_heads=HQ),
                                               additive_bias_mod(rand(16, (B, HQ, sq, sk)))),
      "softcap": lambda: compose_score_mods(sm.softcap_mod(2.0), alibi_mod(num_heads=HQ)),
      "padding": lambda: compose_score_mods(     # lengths (B,) and a 0/1 (B, Sk) pattern
          sm.padding_mask_mod(jnp.array([sk - 9, sk], jnp.int32)),
          sm.padding_mask_mod(jnp.asarray(np.random.default_rng(27).random((B, sk)) < 0.7))),
      # jax.nn.dot_product_attention's mask= and local_window_size=: a (B, 1, Sq, Sk) boolean
      # array with whole empty and full tiles, and a two-sided band (Sk - Sq aligns it).
      "array_mask": lambda: sm.array_mask_mod(_structured_mask(28, (B, 1, sq, sk), seq_scale)),
      "local_window": lambda: sm.local_window_mod(5, 3, offset=sk - sq),
      # Arrays whose query axis (or every axis) is 1: bias (B, H, 1, Sk), (1, 1, Sq, 1),
      # (1, 1, 1, 1) and a (1, H, 1, Sk) mask (AETHER's per-row bias bound once crashed on them).
      "broadcast_arrays": lambda: compose_score_mods(
          additive_bias_mod(rand(29, (B, HQ, 1, sk))), additive_bias_mod(rand(30, (1, 1, sq, 1))),
          additive_bias_mod(rand(31, (1, 1, 1, 1))),
          sm.array_mask_mod(jnp.asarray(np.random.default_rng(32).random((1, HQ, 1, sk)) < 0.8))),
      "compose": lambda: compose_score_mods(
          sm.softcap_mod(3.0), alibi_mod(num_heads=HQ), sliding_window_mod(20, offset=sk - sq),
          document_mask_mod(doc_ids(17, sq, batch=1, ndocs=2), doc_ids(18, sk, batch=1, ndocs=2)),
          additive_bias_mod(rand(19, (sq, sk)))),
  }[name]()


def _structured_mask(seed: int, shape, seq_scale: int = 1) -> jax.Array:
  """A random boolean (B, 1, Sq, Sk) mask (70% kept) with an empty kv range in batch row 0 and a
  kept 16 x 16 square (both scaled by the row's ``seq_scale``): with the suite's blocks of 16
  (or a scaled row's tiles), some tiles are empty and some full."""
  t = 16 * seq_scale
  mask = np.random.default_rng(seed).random(shape) < 0.7
  mask[0, :, :, 2 * t:] = False
  mask[:, :, t:2 * t, :t] = True
  return jnp.asarray(mask)


PREBUILT = ("causal", "causal_offset", "sliding_window", "prefix_lm", "document", "alibi_bias",
            "softcap", "padding", "array_mask", "local_window", "broadcast_arrays", "compose")


@pytest.mark.parametrize("row,variant", rows("prebuilt_mods", PREBUILT, needs=("softmax", "mods")))
def test_prebuilt_mods(row, variant):
  q, k, v = inputs(row, 20)
  mod = prebuilt_mod(variant, q.shape[2], k.shape[2], row.seq_scale)
  out, lse = run(row, q, k, v, score_mod=mod)
  ref, ref_lse = reference(row, ("prebuilt_mods", variant), q, k, v, score_mod=mod)
  check_forward(row, out, lse, ref, ref_lse, v)


# ----------------------------------------------------------------------------- empty rows

EMPTY = 20      # causal_mod(offset=-20): queries 0..19 see no key (a whole 16-row tile and more;
                # a row with seq_scale s: 20 s queries)


@pytest.mark.parametrize("row,variant", rows("empty_rows", ("forward", "grads"),
                                             needs=("softmax", "mods")))
def test_empty_rows(row, variant):
  """``forward``: out 0 and lse -inf on the empty rows, the rest as the reference; ``grads``:
  finite gradients equal to the reference's, dq 0 on the empty rows (cotangents on out and LSE)."""
  q, k, v = inputs(row, 21)
  empty = EMPTY * row.seq_scale
  mod = causal_mod(offset=-empty)
  ct, ct_lse = rand(22, q.shape), rand(23, q.shape[:3])

  def outputs(fn, q, k, v):
    if not row.lse:
      return fn(q, k, v, score_mod=mod), None
    return fn(q, k, v, score_mod=mod, return_lse=True)

  def loss(fn, q, k, v):
    out, lse = outputs(fn, q, k, v)
    total = jnp.sum(out.astype(f32) * ct)
    if lse is not None:   # the LSE's cotangent is 0 where it is -inf
      total += jnp.sum(jnp.where(jnp.isfinite(lse), lse * ct_lse, 0.0))
    return total

  if variant == "forward":
    out, lse = jit(functools.partial(outputs, row.fn))(q, k, v)
    ref, ref_lse = in_float64(functools.partial(outputs, reference_kernel(row)), q, k, v,
                              key=reference_key(row, "empty_rows", row.lse, q.shape, k.shape))
    assert np.isneginf(ref_lse[:, :, :empty]).all() and np.isfinite(ref_lse[:, :, empty:]).all()
    out64 = np.asarray(out, np.float64)
    assert not np.isnan(out64).any(), f"{row.name}: NaN in out"
    assert np.all(out64[:, :, :empty] == 0), f"{row.name}: empty rows' output is not 0"
    check_forward(row, out, lse, ref, ref_lse, v)
  else:
    if not row.grad:
      pytest.skip(f"{row.name} has no backward")
    got, want = grads(row, ("empty_rows", row.lse), loss, (q, k, v), (0, 1, 2))
    assert_grads(row, got, want, "qkv", tol(q.dtype, grad=True))
    assert np.all(np.asarray(got[0])[:, :, :empty] == 0), f"{row.name}: dq of empty rows is not 0"


# ----------------------------------------------------------------------------- bad inputs


def bad_cases(row: Kernel):
  """name -> (args, kwargs, words the message must contain (regexes), arrays whose shapes it
  must name). Small square inputs in the row's dtype and head dim: 16 positions (times the
  row's seq_scale) are two pages and two ring shards."""
  q, k, v = inputs(row, 24, 16, 16, batch=1)
  other_dtype = f32 if q.dtype == bf16 else bf16
  q2, q3, k8, v8 = jnp.concatenate([q, q]), q[:, :3], k[..., :8], v[..., :8]
  v_short = v[:, :, :8]
  i32 = lambda x: x.astype(jnp.int32)
  return {
      "q_rank": ((q[0], k, v), {}, (r"\bq\b", "rank"), (q[0],)),
      "k_rank": ((q, k[None], v), {}, (r"\bk(_pages)?\b", "rank"), (k[None],)),
      "batch": ((q2, k, v), {}, ("batch",), (q2,)),
      "heads": ((q3, k, v), {}, ("heads",), (q3,)),
      "kv_length": ((q, k, v_short), {}, (r"\bv(_pages)?\b",), (v_short,)),
      "head_dim": ((q, k8, v8), {}, ("head_dim",), (q, k8)),
      "dtype": ((i32(q), i32(k), i32(v)), {}, ("dtype", "int32"), (q,)),
      "mixed_dtype": ((q, k.astype(other_dtype), v), {}, ("dtype",), (q,)),
      "score_mod_signature": ((q, k, v), dict(score_mod=lambda s, b: s), ("score_mod",), ()),
      "mask_mod_signature": ((q, k, v), dict(mask_mod=lambda b, h, i: True), ("mask_mod",), ()),
      "short_doc_ids": ((q, k, v), dict(score_mod=document_mask_mod(jnp.zeros(10, jnp.int32))),
                        ("doc_ids",), (jnp.zeros((1, 10)),)),
      "alibi_heads": ((q, k, v), dict(score_mod=alibi_mod(num_heads=2)), ("ALiBi slopes",),
                      (jnp.zeros(2),)),
  }


MOD_CASES = ("score_mod_signature", "mask_mod_signature", "short_doc_ids", "alibi_heads")


@pytest.mark.parametrize("row,variant", rows("bad_inputs", needs=()))
def test_bad_inputs(row, variant):
  """Every bad input raises ValueError while tracing (jax.eval_shape: nothing runs), and the
  message names the argument and the shapes. Failures are collected so one run lists them all."""
  problems = []
  for name, (args, kw, words, named) in bad_cases(row).items():
    if name in MOD_CASES and not row.mods:
      continue
    try:
      jax.eval_shape(lambda *a: row.fn(*a, **kw), *args)
    except ValueError as e:
      msg = str(e)
      missing = [w for w in words if not re.search(w, msg)]
      missing += [str(tuple(x.shape)) for x in named if str(tuple(x.shape)) not in msg]
      if missing:
        problems.append(f"{name}: message lacks {missing}: {msg[:200]!r}")
    except Exception as e:   # noqa: BLE001 - the point is to report what was raised instead
      problems.append(f"{name}: {type(e).__name__} instead of ValueError: {str(e)[:200]!r}")
    else:
      problems.append(f"{name}: no error")
  # float64 inputs: only rows that declare f64 accept them.
  with jax.enable_x64(True):
    q, k, v = (jnp.asarray(x, jnp.float64) for x in inputs(row, 25, 16, 16, batch=1))
    try:
      out = jax.eval_shape(lambda q, k, v: row.fn(q, k, v), q, k, v)
      if not row.f64:
        problems.append(f"float64: accepted (out {out.dtype})")
    except ValueError as e:
      if row.f64:
        problems.append(f"float64: rejected: {str(e)[:200]!r}")
      elif "float64" not in str(e):
        problems.append(f"float64: message lacks 'float64': {str(e)[:200]!r}")
  # Mods closing over arrays, at the row's own shapes: only rows that declare closures accept them.
  if row.mods and not row.closures:
    q, k, v = inputs(row, 26)
    mods = closure_mods(doc_ids(11, k.shape[2], batch=None), rand(12, (HQ, q.shape[2], k.shape[2])))
    try:
      jax.eval_shape(lambda q, k, v: row.fn(q, k, v, **mods), q, k, v)
      problems.append("closures: accepted")
    except ValueError as e:
      if "closure" not in str(e):
        problems.append(f"closures: message lacks 'closure': {str(e)[:200]!r}")
  assert not problems, f"{row.name}:\n  " + "\n  ".join(problems)


# ----------------------------------------------------------------------------- AETHER certificate


@pytest.mark.parametrize("row,variant", rows("certified_bound", needs=("certified_epsilon",)))
def test_certified_bound(row, variant):
  """On clustered keys AETHER prunes; out stays within 2 eps max|v|, the LSE within eps below."""
  from attnax.kernels.aether import clustered_qkv
  eps = 1e-3
  q, k, v = clustered_qkv(jax.random.key(26), batch=B, q_heads=HQ, kv_heads=HKV, q_len=64,
                          kv_len=80, head_dim=D, block_q=16, block_k=16, num_clusters=4,
                          norm=10.0)
  mod = causal_mod(offset=16)
  out, lse, stats = jit(lambda q, k, v: row.fn(q, k, v, score_mod=mod, return_lse=True,
                                                   epsilon=eps, return_stats=True))(q, k, v)
  assert float(np.asarray(stats.skipped_fraction).mean()) > 0.2, "the data does not prune"
  ref, ref_lse = reference(row, ("certified_bound",), q, k, v, score_mod=mod)
  vmax = float(np.abs(np.asarray(v)).max())
  err = np.abs(np.asarray(out, np.float64) - ref).max()
  assert err <= 2 * eps * vmax + tol(f32) * vmax, err
  lse = np.asarray(lse, np.float64)
  rnd = tol(f32) * (1 + np.abs(ref_lse))
  assert np.all(lse <= ref_lse + rnd) and np.all(ref_lse - lse <= eps + rnd)


# ----------------------------------------------------------------------------- non-finite inputs


@pytest.mark.parametrize("row,variant", rows("non_finite"))
def test_non_finite(row, variant):
  """NaN in one query row (or inf in one key) gives NaN where it reaches, never an "empty row"
  (output 0, lse -inf); the other rows are the reference's."""
  q, k, v = inputs(row, 40)
  q = q.at[0, 1, 3, 0].set(jnp.nan)
  k = k.at[1, 0, 5, 2].set(jnp.inf)
  out, lse = run(row, q, k, v)
  out = np.asarray(out, np.float64)
  assert np.isnan(out[0, 1, 3]).all(), f"{row.name}: a NaN query row did not give NaN"
  if lse is not None:
    assert np.isnan(np.asarray(lse)[0, 1, 3]), f"{row.name}: its lse is not NaN"
  # inf in key 5 of kv head 0, batch 1: every query of that head's group that sees it is NaN.
  assert np.isnan(out[1, :HQ // HKV]).any(), f"{row.name}: an inf key vanished"
  clean = np.ones(out.shape[:3], bool)
  clean[0, 1, 3] = False
  clean[1, :HQ // HKV] = False
  assert np.isfinite(out[clean]).all(), f"{row.name}: NaN leaked into other rows"


# ----------------------------------------------------------------------------- what mods return

_STATE = {"offset": 0}


@pytest.mark.parametrize("row,variant", rows("mod_results", ("int_mask", "bad_shape",
                                                               "python_state"),
                                             needs=("softmax", "mods")))
def test_mod_results(row, variant):
  """A mask returning ints 0/2 means what a boolean mask means; a mod result that does not fit
  the scores raises ValueError; a mod reading Python state sees its current value (no stale
  cached trace)."""
  q, k, v = inputs(row, 41)
  sq, sk = q.shape[2], k.shape[2]
  if variant == "int_mask":
    out, _ = run(row, q, k, v, mask_mod=lambda b, h, i, j: jnp.where(j <= i + sk - sq, 2, 0))
    ref, _ = reference(row, ("mod_results", "causal"), q, k, v,
                       mask_mod=lambda b, h, i, j: j <= i + sk - sq)
    assert_out(row, out, ref, v, tol(q.dtype))
  elif variant == "bad_shape":
    extra_axis = lambda s, b, h, i, j: jnp.stack([s, s])
    with pytest.raises(ValueError, match="score_mod"):
      jax.eval_shape(lambda q, k, v: row.fn(q, k, v, score_mod=extra_axis), q, k, v)
  else:
    mask = lambda b, h, i, j: j <= i + _STATE["offset"]
    outs = []
    for offset in (sk - sq, sk - sq - 6):
      _STATE["offset"] = offset
      outs.append(np.asarray(row.fn(q, k, v, mask_mod=mask), np.float64))
    _STATE["offset"] = 0
    ref = reference_kernel(row)
    for out, offset in zip(outs, (sk - sq, sk - sq - 6)):
      want = in_float64(lambda q, k, v: ref(q, k, v, mask_mod=lambda b, h, i, j, o=offset:
                                            j <= i + o), q, k, v)
      assert_out(row, out, want, v, tol(q.dtype))
