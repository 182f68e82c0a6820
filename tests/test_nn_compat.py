"""The peers' attention tests, ported, on every attnax kernel through the drop-ins.

``attnax.dot_product_attention`` (``jax.nn.dot_product_attention``'s API) and
``attnax.flax_attention_fn`` (Flax's ``attention_fn``) run the cases of:

- jax-ml/jax ``tests/nn_test.py``, ``NNFunctionsTest``: ``testDotProductAttention``,
  ``testDotProductAttentionMask``, ``testDotProductAttentionBiasGradient``;
- jax-ml/jax ``tests/pallas/gpu_ops_test.py``, ``FusedAttentionTest``:
  ``test_fused_attention_fwd`` and ``test_fused_attention_bwd`` (segment ids as a mask);
- google/flax ``tests/nnx/nn/attention_test.py``: ``TestMultiHeadAttention`` and
  ``TestLinenConsistency.test_nnx_attention_equivalence``;
- google/flax ``tests/linen/linen_attention_test.py``: ``AttentionTest``;
- openxla/tokamax ``tokamax/_src/ops/attention/test_base.py``: ``AttentionTestBase`` with its
  ``_run_test`` (forward, determinism, VJP against Flax's reference in float32 at HIGHEST).

The code is ours; each test names the case it ports and keeps its shapes, parameters and
tolerances, with two changes, both for CPU time: tokamax's sequence lengths of 1024 (and 1536, 512,
539) are divided by 8, and every input is a fresh numpy draw (the peers' inputs of ones are
replaced by random ones, so that the comparison means something). References are the peers' own
functions, as in the source. Cases the drop-ins cannot express are listed in
``docs/jax_compat.rst`` with the reason; the ones that must raise are tested to raise.

Kernels (:data:`IMPLS`): standard, memory_efficient, flash, Pallas (interpreted on CPU) and AETHER
(over flash, epsilon 1e-6: its certified bound ``2 epsilon max|v|`` is added to the output
tolerance, DESIGN.md section 6), with blocks of 32 so that masks meet several tiles. A few cases
per kernel are each test's ``fast`` ids, in the default run (CI: about 20 s on 2 cores); the other
cases are compile-heavy on CPU and run under ``-m slow`` (830 of 838 pass there on CPU: 166 per
kernel; the 8 others are the GPU-only default-implementation checks). attnax's own conventions for the drop-in (rows
that see no key, the residual, the mods, bad inputs) are tested in ``tests/test_nn.py``, in the
default run.
"""

from __future__ import annotations

import functools
import itertools

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import pop
from jax.lax import Precision

import attnax
from attnax.kernels import (AetherAttention, flash_attention, memory_efficient_attention,
                            pallas_flash_attention, standard_attention)


f32, bf16, f16 = jnp.float32, jnp.bfloat16, jnp.float16
BLOCK = 32
AETHER_EPSILON = 1e-6

IMPLS = {
    "standard": "standard",
    "memory_efficient": functools.partial(memory_efficient_attention, query_chunk_size=BLOCK,
                                          key_chunk_size=BLOCK),
    "flash": functools.partial(flash_attention, block_q=BLOCK, block_k=BLOCK),
    "pallas": functools.partial(pallas_flash_attention, backend="interpret", block_q=BLOCK,
                                block_k=BLOCK),
    "aether": AetherAttention(epsilon=AETHER_EPSILON, block_q=BLOCK, block_k=BLOCK,
                              implementation="flash"),
}
KERNELS = {n: standard_attention if i == "standard" else i for n, i in IMPLS.items()}
# Plain jax.jit: with XLA's backend optimisations off (the conformance suite's compile-time
# saver), XLA:CPU's fused code gives inf in standard_attention's autodiff backward for a bias with
# a causal mask at (2, 4, 128, 32), where the optimised program and the op-by-op one are finite.
jit = jax.jit


def cases(variants, fast=()) -> list:
  """``pytest.param(impl, variant)`` for every kernel and variant; the ``"impl-variant"`` ids in
  ``fast`` run by default, the others under ``-m slow`` (CPU compile time: a few representative
  cases per source and kernel, most on the reference kernel, which compiles fastest)."""
  params = []
  for impl, variant in itertools.product(IMPLS, variants):
    pid = f"{impl}-{variant}"
    marks = () if pid in fast else (pytest.mark.slow,)
    params.append(pytest.param(impl, variant, id=pid, marks=marks))
  return params


def rand(seed: int, shape, dtype=f32) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), np.float32).astype(dtype)


def bernoulli(seed: int, shape, p: float = 0.5) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).random(shape) < p)


def assert_close(actual, expected, *, atol, rtol, impl=None, v=None, what="out"):
  """``|actual - expected| <= atol + rtol |expected|`` elementwise (numpy's allclose, as the
  peers assert), in float64; AETHER's certified output bound is added to ``atol`` when ``v`` is
  given."""
  a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert a.shape == e.shape, (what, a.shape, e.shape)
  if impl == "aether" and v is not None:
    atol = atol + 2 * AETHER_EPSILON * float(np.abs(np.asarray(v, np.float64)).max())
  np.testing.assert_allclose(a, e, atol=atol, rtol=rtol, err_msg=f"{impl}: {what}")


def sdpa(impl: str, **fixed):
  """attnax.dot_product_attention on kernel ``impl``, with JAX's signature."""
  return functools.partial(attnax.dot_product_attention, implementation=IMPLS[impl], **fixed)


# ============================================================================= jax tests/nn_test.py

def _jax_reference_inputs(*xs):
  """jax.nn's f16 path asks for the F16_F16_F32 dot algorithm, which XLA:CPU does not have (the
  source runs on GPUs): on CPU its f16 cases take float32 copies (a closer reference)."""
  if jax.default_backend() == "cpu" and xs[0].dtype == f16:
    return tuple(None if x is None else x.astype(f32) for x in xs)
  return xs


JAX_GQA = {f"{d}-g{g}-{'vmap' if vm else 'novmap'}": (dt, g, vm)
           for (d, dt), g, vm in itertools.product((("bf16", bf16), ("f16", f16)), (1, 2, 4),
                                                   (False, True))}


@pytest.mark.parametrize("impl,variant", cases(JAX_GQA, fast={"standard-bf16-g2-vmap",
                                                               "pallas-f16-g2-novmap"}))
def test_jax_dot_product_attention(impl, variant):
  """nn_test.py testDotProductAttention: dtype bf16/f16 x group_num 1, 2, 4 x use_vmap;
  B, S, T, N, H = 2, 128, 128, 4, 32; out, dQ, dK, dV against jax.nn.dot_product_attention on
  K, V repeated per group (dK, dV summed back), atol = rtol = .01."""
  dtype, groups, use_vmap = JAX_GQA[variant]
  b, s, t, n, h = 2, 128, 128, 4, 32
  q, k, v = rand(1, (b, t, n, h), dtype), rand(2, (b, s, n // groups, h), dtype), rand(
      3, (b, s, n // groups, h), dtype)
  grad = rand(4, (b, t, n, h), dtype)
  ans = sdpa(impl)
  if use_vmap:
    ans = jax.vmap(ans, in_axes=(0, 0, 0, None, None), out_axes=0)

  def run(fn, q, k, v, grad):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, None, None), q, k, v)
    return out, vjp(grad)

  out, (dq, dk, dv) = jit(functools.partial(run, ans))(q, k, v, grad)
  k_ref, v_ref = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  ref, (dq_ref, dk_ref, dv_ref) = jax.jit(functools.partial(
      run, functools.partial(jax.nn.dot_product_attention, implementation=None)))(
          *_jax_reference_inputs(q, k_ref, v_ref, grad))
  dk_ref = dk_ref.reshape(b, s, n // groups, groups, h).sum(axis=3)
  dv_ref = dv_ref.reshape(b, s, n // groups, groups, h).sum(axis=3)
  assert out.dtype == dtype
  assert_close(out, ref, atol=.01, rtol=.01, impl=impl, v=v)
  for what, g, w in (("dQ", dq, dq_ref), ("dK", dk, dk_ref), ("dV", dv, dv_ref)):
    assert_close(g, w, atol=.01, rtol=.01, impl=impl, what=what)


JAX_MASK_MODES = ("bias", "causal", "padding", "custom", "causal+padding", "custom+padding",
                  "bias+causal", "causal+sliding_window")


@pytest.mark.parametrize("impl,variant", cases(JAX_MASK_MODES, fast={
    "standard-causal+sliding_window", "standard-custom+padding"}))
def test_jax_dot_product_attention_mask(impl, variant):
  """nn_test.py testDotProductAttentionMask: bias (1, N, T, S), causal, padding (query lengths
  T/2, T/4; key lengths S/4, S/2), a custom tril mask (1, 1, T, S) and their combinations,
  window (3, 2) with causal; bf16, B, S, T, N, H = 2, 128, 128, 4, 32. Tolerances: out .01, dQ
  .02, dK .02, dV .01, dbias .02 (atol = rtol)."""
  mode = variant.split("+")
  b, s, t, n, h = 2, 128, 128, 4, 32
  q, k, v = (rand(10 + i, (b, t, n, h), bf16) for i in range(3))
  grad = rand(13, (b, t, n, h), bf16)
  bias = rand(14, (1, n, t, s), bf16) if "bias" in mode else None
  mask = jnp.tril(jnp.ones((t, s), jnp.bool_))[None, None] if "custom" in mode else None
  kw = dict(is_causal="causal" in mode)
  if "padding" in mode:
    kw.update(query_seq_lengths=jnp.array([t // 2, t // 4], jnp.int32),
              key_value_seq_lengths=jnp.array([s // 4, s // 2], jnp.int32))
  if "sliding_window" in mode:
    kw.update(local_window_size=(3, 2) if kw["is_causal"] else (3, 0))

  def run(fn, q, k, v, bias, grad):
    out, vjp = jax.vjp(lambda q, k, v, bias: fn(q, k, v, bias, mask, **kw), q, k, v, bias)
    return out, vjp(grad)

  implementation = IMPLS[impl] if impl in IMPLS else None
  out, grads = jit(functools.partial(run, functools.partial(
      attnax.dot_product_attention, implementation=implementation)))(q, k, v, bias, grad)
  ref, ref_grads = jax.jit(functools.partial(
      run, functools.partial(jax.nn.dot_product_attention, implementation=None)))(
          q, k, v, bias, grad)
  assert_close(out, ref, atol=.01, rtol=.01, impl=impl, v=v)
  for what, g, w, tol in zip(("dQ", "dK", "dV", "dbias"), grads, ref_grads, (.02, .02, .01, .02)):
    if w is not None:
      assert_close(g, w, atol=tol, rtol=tol, impl=impl, what=what)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", JAX_MASK_MODES)
def test_jax_dot_product_attention_mask_gpu_default(variant):
  """testDotProductAttentionMask on a GPU with implementation=None: the compiled Pallas kernel."""
  from attnax.nn import resolve_implementation
  x = jnp.zeros((2, 4, 128, 32), bf16)
  assert resolve_implementation(None, x, x, x) is pallas_flash_attention
  test_jax_dot_product_attention_mask("default", variant)


JAX_BIAS_GRAD = {f"b{bs}-{'vmap' if vm else 'novmap'}": (bs, vm)
                 for bs, vm in itertools.product((1, 16), (False, True))}


@pytest.mark.parametrize("impl,variant", cases(JAX_BIAS_GRAD))
def test_jax_dot_product_attention_bias_gradient(impl, variant):
  """nn_test.py testDotProductAttentionBiasGradient: self-attention of x (B, 128, 4, 32) bf16 with
  a bias (B, N, S, S) and an all-True mask (1, 1, S), batch 1 and 16, with and without vmap;
  forward (bf16 default tolerance 1e-2) and dbias (atol = rtol = 0.1) against jax.nn. (cuDNN
  refuses dbias for batch 16; every attnax kernel differentiates any bias.)"""
  batch, use_vmap = JAX_BIAS_GRAD[variant]
  s, n, h = 128, 4, 32
  x = rand(20, (batch, s, n, h), bf16)
  bias = rand(21, (batch, n, s, s), bf16)
  mask = jnp.ones((1, 1, s), jnp.bool_)

  def attention(fn, x, bias, mask):
    return fn(query=x, key=x, value=x, bias=bias, mask=mask, is_causal=False)

  def batched(fn):
    f = functools.partial(attention, fn)
    return jax.vmap(f, in_axes=(0, 0, None)) if use_vmap else f

  def run(fn, x, bias, mask):
    y, vjp = jax.vjp(lambda x, bias: batched(fn)(x, bias, mask), x, bias)
    return y, vjp(x)[1]

  y, dbias = jit(functools.partial(run, sdpa(impl)))(x, bias, mask)
  y_ref, dbias_ref = jax.jit(functools.partial(
      run, functools.partial(jax.nn.dot_product_attention, implementation=None)))(x, bias, mask)
  assert_close(y, y_ref, atol=1e-2, rtol=1e-2, impl=impl, v=x)
  assert_close(dbias, dbias_ref, atol=0.1, rtol=0.1, impl=impl, what="dbias")


# ========================================================================== flax nnx attention_test


def _nnx_pair(impl, **kw):
  """The same nnx.MultiHeadAttention twice (same seed): Flax's attention and the attnax kernel."""
  ours = nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(0),
                                attention_fn=attnax.flax_attention_fn(KERNELS[impl]))
  ref = nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(0))
  return ours, ref


NNX_CASES = ("basic", "sow", "decode_x64")


@pytest.mark.parametrize("impl,variant", cases(NNX_CASES, fast={
    "flash-sow", "standard-decode_x64", "pallas-decode_x64"}))
def test_nnx_multihead_attention(impl, variant):
  """attention_test.py TestMultiHeadAttention: test_basic (2 heads, in 3, qkv 6, out 6, input
  (1, 7, 3)); test_multihead_sow_attention_weights (refused: the kernels never materialise the
  weights; the error says so); test_autoregressive_decode_with_x64 (decode of (1, 4, 4) under
  x64, 2 heads, qkv 4: float64 runs in the pure-JAX kernels; Pallas refuses it)."""
  if variant == "basic":
    ours, ref = _nnx_pair(impl, num_heads=2, in_features=3, qkv_features=6, out_features=6)
    x = rand(30, (1, 7, 3))
    call = nnx.jit(lambda m, x: m(x, decode=False))
    y = call(ours, x)
    assert y.shape == (1, 7, 6)
    assert_close(y, call(ref, x), atol=1e-6, rtol=1e-6, impl=impl)
  elif variant == "sow":
    ours, _ = _nnx_pair(impl, in_features=8, num_heads=8, deterministic=False, decode=False)
    with pytest.raises(ValueError, match="sow_weights.*materialise"):
      ours(rand(31, (4, 6, 8)), sow_weights=True)
  else:
    with jax.enable_x64(True):
      x = jnp.asarray(np.random.default_rng(32).standard_normal((1, 4, 4)))
      ours, ref = _nnx_pair(impl, in_features=4, num_heads=2, qkv_features=4, decode=True)
      for m in (ours, ref):
        m.init_cache(x.shape, dtype=x.dtype)
      assert ours.cached_key[...].shape == (1, 4, 2, 2)
      step = nnx.jit(lambda m, x: m(x))
      if impl == "pallas":
        with pytest.raises(ValueError, match="float64"):
          step(ours, x[:, :1, :])
        return
      for i in range(2):
        y, y_ref = step(ours, x[:, i:i + 1, :]), step(ref, x[:, i:i + 1, :])
        assert y.shape == (1, 1, 4) and y.dtype == jnp.float64
        # jax.nn.dot_product_attention (Flax's path) takes its softmax in float32 even for
        # float64 inputs: the reference is float32-accurate.
        assert_close(y, y_ref, atol=1e-6, rtol=1e-6, impl=impl)


NNX_LINEN = {
    f"{dn}-{pn}-{prec.name}-{'decode' if dec else 'nodecode'}-{'qk' if qk else 'noqk'}"
    + ("" if ub else "-nobias"): (ub, dt, pt, prec, dec, qk)
    for ub, (dn, dt), (pn, pt), prec, dec, qk in itertools.product(
        (True, False), (("f32", f32), ("f16", f16)), (("f32", f32), ("f16", f16)),
        (Precision.DEFAULT, Precision.HIGH, Precision.HIGHEST), (True, False), (True, False))}


@pytest.mark.parametrize("impl,variant", cases(NNX_LINEN, fast={
    "standard-f32-f32-HIGHEST-nodecode-qk", "pallas-f32-f16-DEFAULT-nodecode-noqk-nobias"}))
def test_nnx_linen_consistency(impl, variant):
  """attention_test.py TestLinenConsistency.test_nnx_attention_equivalence: use_bias x dtype
  (f32, f16) x param_dtype x precision (DEFAULT, HIGH, HIGHEST) x decode x normalize_qk; 2 heads,
  in 3, qkv 6, out 6, one token (1, 3). nnx with the attnax kernel (it receives Flax's
  precision=) equals Linen's MultiHeadDotProductAttention to 2 ulp (the source: bit-equal)."""
  use_bias, dtype, _, _, decode, _ = NNX_LINEN[variant]
  cfg, x, variables, ref = _linen_consistency_reference(variant)
  ours = nnx.MultiHeadAttention(in_features=3, rngs=nnx.Rngs(42),
                                attention_fn=attnax.flax_attention_fn(KERNELS[impl]), **cfg)
  for name in ("query", "key", "value", "out"):
    getattr(ours, name).kernel[...] = variables["params"][name]["kernel"]
    if use_bias:
      getattr(ours, name).bias[...] = variables["params"][name]["bias"]
  if decode:
    ours.init_cache(x.shape, dtype=dtype)
  # Eager, as the source: the projections run op by op on both sides, so the attention function
  # is the one thing that differs. The source asserts bit equality (the same maths twice); a
  # blockwise kernel normalises its one-key softmax through its own rounding (the Pallas kernel
  # moves the last bit of some f32 outputs), so the bound is 2 units in the last place.
  out = ours(x)
  assert out.dtype == ref.dtype
  np.testing.assert_array_max_ulp(np.asarray(out), np.asarray(ref), maxulp=2)


@functools.cache
def _linen_consistency_reference(variant):
  """Linen's module, its variables and its output for one configuration (shared by the
  kernels)."""
  use_bias, dtype, param_dtype, precision, decode, normalize_qk = NNX_LINEN[variant]
  cfg = dict(num_heads=2, qkv_features=6, out_features=6, use_bias=use_bias, dtype=dtype,
             param_dtype=param_dtype, precision=precision, decode=decode,
             normalize_qk=normalize_qk)
  x = rand(33, (1, 3))
  model = linen.MultiHeadDotProductAttention(**cfg)
  variables = model.init(jax.random.key(42), x)
  ref, _ = model.apply(variables, x, mutable=["cache"])
  return cfg, x, variables, ref


# ================================================================== flax linen linen_attention_test


def _linen(impl=None, **kw):
  fn = {} if impl is None else dict(attention_fn=attnax.flax_attention_fn(KERNELS[impl]))
  return linen.MultiHeadDotProductAttention(**kw, **fn)


LINEN_CASES = ("self", "encoder_decoder", "dtype_infer", "dropout", "explicit_dropout",
               "dropout_disabled", "decoding-5", "decoding-6x5", "receptive_field", "sow")
LINEN_KW = dict(num_heads=8, qkv_features=16, kernel_init=jax.nn.initializers.ones,
                bias_init=jax.nn.initializers.zeros)


def _takes_dropout(impl):
  from attnax.attention import accepts_keyword
  return accepts_keyword(KERNELS[impl], "dropout_rate")


@pytest.mark.parametrize("impl,variant", cases(LINEN_CASES, fast={
    "standard-self", "standard-dtype_infer", "standard-dropout_disabled", "pallas-sow"}))
def test_linen_attention(impl, variant):
  """linen_attention_test.py AttentionTest: test_multihead_self_attention ((4, 6, 5), 8 heads,
  qkv 16, kernel_init ones), test_multihead_encoder_decoder_attention ((4, 2, 3, 5): two batch
  dims), test_dtype_infer (complex64: refused, attnax kernels are real), the three dropout tests
  (rate 0.1 / 0.5; draws are the kernel's own: a kernel without dropout refuses, one with it is
  deterministic per rng, different across rngs; rate 0 or deterministic=True equals Flax),
  test_decoding ((2, 5) and (2, 6, 5) scanned over the attention axis, 3 heads x 4 features,
  HIGHEST, atol 1e-5 against the full causal pass), test_autoregresive_receptive_field_1d and
  test_multihead_sow_attention_weights (refused)."""
  rng = jax.random.key(0)
  if variant in ("self", "encoder_decoder"):
    shape = (4, 6, 5) if variant == "self" else (4, 2, 3, 5)
    x = rand(40, shape)
    y, vs = _linen(impl, deterministic=False, **LINEN_KW).init_with_output(rng, x)
    y_ref = _linen(deterministic=False, **LINEN_KW).apply(vs, x)
    assert y.shape == x.shape and y.dtype == f32
    assert_close(y, y_ref, atol=1e-5, rtol=1e-5, impl=impl)
  elif variant == "dtype_infer":
    x = (rand(41, (4, 6, 5)) + 1j * rand(42, (4, 6, 5))).astype(jnp.complex64)
    with pytest.raises(ValueError, match="complex64"):
      _linen(impl, deterministic=False, **LINEN_KW).init_with_output(rng, x)
  elif variant in ("dropout", "explicit_dropout"):
    x = rand(43, (4, 2, 3, 5))
    rate = 0.1 if variant == "dropout" else 0.5
    module = _linen(impl, dropout_rate=rate, deterministic=False, **LINEN_KW)
    r1, r2, r3 = jax.random.split(rng, 3)
    if not _takes_dropout(impl):
      with pytest.raises(ValueError, match="dropout"):
        module.init_with_output({"params": r1, "dropout": r2}, x)
      return
    vs = module.init({"params": r1, "dropout": r2}, x)
    a = module.apply(vs, x, rngs={"dropout": r2})
    c = module.apply(vs, x, rngs={"dropout": r2})
    e = module.apply(vs, x, rngs={"dropout": r3})
    plain = _linen(**LINEN_KW).apply(vs, x, deterministic=True)
    assert (a == c).all() and not (a == e).all() and a.shape == x.shape
    assert np.abs(np.asarray(a) - np.asarray(plain)).max() > 1e-3   # dropout did something
    # Every kernel draws the mask standard_attention draws (one seeded mask, regenerated per
    # tile): the reference kernel in the same module gives the same numbers.
    ref = _linen("standard", dropout_rate=rate, deterministic=False, **LINEN_KW)
    assert_close(a, ref.apply(vs, x, rngs={"dropout": r2}), atol=1e-5, rtol=1e-5, impl=impl)
  elif variant == "dropout_disabled":
    x = rand(44, (4, 2, 3, 5))
    r1, r2, r3, r4 = jax.random.split(rng, 4)
    ref = _linen(dropout_rate=0.0, deterministic=True, **LINEN_KW)
    for rate, det in ((0.0, True), (0.0, None), (0.5, None)):
      module = _linen(impl, dropout_rate=rate, **({} if det is None else {"deterministic": det}),
                      **LINEN_KW)
      kw = {} if det is not None else {"deterministic": True}
      vs = ref.init({"params": r1, "dropout": r2}, x)
      y1 = module.apply(vs, x, rngs={"params": r1, "dropout": r2}, **kw)
      y2 = module.apply(vs, x, rngs={"params": r3, "dropout": r4}, **kw)
      np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
      assert_close(y1, ref.apply(vs, x), atol=1e-5, rtol=1e-5, impl=impl)
  elif variant.startswith("decoding"):
    spatial, axis = ((5,), 1) if variant == "decoding-5" else ((6, 5), 2)
    bs, heads, feats = 2, 3, 4
    key1, key2 = jax.random.split(rng)
    inputs = rand(45, (bs,) + spatial + (heads * feats,))
    kw = dict(num_heads=heads, qkv_features=heads * feats, precision=jax.lax.Precision.HIGHEST,
              deterministic=False)
    module = _linen(impl, decode=False, **kw)
    decode_module = module.clone(decode=True)
    initial_vars = decode_module.init(key2, inputs)
    state, params = pop(initial_vars, "params")
    causal = linen.make_causal_mask(jnp.ones((bs,) + spatial))
    y_ref = jax.jit(lambda x, m: module.apply(initial_vars, x, mask=m))(inputs, causal)
    y_flax = _linen(decode=False, **kw).apply(initial_vars, inputs, mask=causal)
    assert_close(y_ref, y_flax, atol=1e-5, rtol=1e-5, impl=impl, what="full causal pass")

    def body(state, x):
      y, state = decode_module.apply({"params": params, **state}, x, mutable=["cache"])
      return state, y

    from flax import jax_utils
    _, y = jax.jit(lambda s, x: jax_utils.scan_in_dim(body, s, x, axis=(axis,), keepdims=True))(
        state, inputs)
    np.testing.assert_allclose(np.asarray(y_ref), np.asarray(y), atol=1e-5)
  elif variant == "receptive_field":
    length, dim = 10, 1
    r1, r2 = jax.random.split(rng)
    inputs = rand(46, (1, length, dim))
    module = _linen(impl, num_heads=1, kernel_init=jax.nn.initializers.ones, deterministic=False)
    initial_vars = module.init(r1, inputs)
    causal = linen.make_causal_mask(jnp.ones((1, length)))
    ref_module = _linen(num_heads=1, kernel_init=jax.nn.initializers.ones, deterministic=False)

    def grads(m):
      loss = lambda x, pos: m.apply(initial_vars, x, mask=causal)[0, pos, :].sum()
      return jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(inputs, jnp.arange(length))

    g, g_ref = grads(module)[:, 0], grads(ref_module)[:, 0]      # (pos, length, dim)
    assert_close(g, g_ref, atol=1e-5, rtol=1e-5, impl=impl, what="d out[pos] / d inputs")
    deps = np.any(np.abs(np.asarray(g)) > 1e-5, axis=-1)
    for i in range(length):
      assert deps[i, :i].all(), f"position {i} does not reach every earlier position"
      assert not deps[i, i + 1:].any(), f"position {i} reaches a later position"
  else:
    module = _linen(impl, deterministic=False, **LINEN_KW)
    x = rand(47, (4, 6, 5))
    vs = module.init(rng, x)
    with pytest.raises(ValueError, match="sow_weights.*materialise"):
      module.apply(vs, x, sow_weights=True, mutable=["intermediates"])


# ================================================================================ tokamax test_base

SEQ = 128          # tokamax's 1024 / 8


def _tokamax_inputs(q_shape, kv_shape=None, bias_shape=None, mask_shape=None, dtype=f32, seed=0):
  """test_base._create_inputs: normal q, k, v (and bias) in ``dtype``, a Bernoulli mask."""
  kv_shape = q_shape if kv_shape is None else kv_shape
  q, k, v = (rand(seed + i, shp, dtype) for i, shp in enumerate((q_shape, kv_shape, kv_shape)))
  bias = None if bias_shape is None else rand(seed + 3, bias_shape, dtype)
  mask = None if mask_shape is None else bernoulli(seed + 4, mask_shape)
  return q, k, v, bias, mask


def in_float64(fn, *args):
  """``jax.jit(fn)`` on float64 copies of the floating arrays of ``args``; numpy results.

  The source upcasts its reference's inputs to float32; on a CPU the float64 evaluation of the
  same reference is affordable and closer to the truth, so the tolerances measure the kernel's
  error alone (an f32 reference adds its own rounding: two correct f32 results of these cases
  differ by up to ~1.2e-6, over the source's atol of 1e-6).
  """
  def up(x):
    if isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating):
      return jnp.asarray(np.asarray(x, np.float64))
    return x

  with jax.enable_x64(True):
    res = jax.jit(fn)(*jax.tree.map(up, args))
    return jax.tree.map(lambda x: np.asarray(x, np.float64), res)


def tokamax_run(impl, q, k, v, *, bias=None, atol=1e-6, atol_grads=None, test_vjp=True,
                impl_fn=None, ref_impl=linen.dot_product_attention, impl_kwargs=None,
                ref_kwargs=None, output_mask_from=None, **kwargs):
  """test_base._run_test: inference forward, determinism, VJP forward and gradients of
  (q, k, v, bias) against ``ref_impl`` at precision HIGHEST on float64 copies (the source: float32
  copies; see :func:`in_float64`); atol given,
  rtol = max(atol / 10, 1e-6); atol_grads = max(2 atol, 5e-6), rtol_grads = max(atol_grads / 10,
  1e-6). Rows a mask leaves empty are zeroed on both sides (as the source does)."""
  impl_kwargs = dict(impl_kwargs or {})
  ref_kwargs = dict(ref_kwargs or {})
  ref_kwargs.setdefault("precision", jax.lax.Precision.HIGHEST)
  fn = impl_fn if impl_fn is not None else sdpa(impl)
  mask = output_mask_from if output_mask_from is not None else (impl_kwargs | kwargs).get("mask")
  impl_call = functools.partial(fn, **kwargs, **impl_kwargs)
  ref_call = lambda *a, **kw: ref_impl(*a, **kw, **kwargs, **ref_kwargs)
  if mask is not None:
    keep = jnp.where(jnp.all(jnp.swapaxes(mask, -2, -3) == 0, axis=-1), 0.0, 1.0)[..., None]
    masked = lambda f: (lambda *a, **kw: f(*a, **kw) * keep)
    impl_call, ref_call = masked(impl_call), masked(ref_call)

  rtol = max(atol / 10, 1e-6)
  fwd = jit(lambda q, k, v, bias: impl_call(q, k, v, bias=bias))
  actual = fwd(q, k, v, bias)
  expected = in_float64(lambda q, k, v, bias: ref_call(q, k, v, bias=bias), q, k, v, bias)
  assert_close(actual, expected, atol=atol, rtol=rtol, impl=impl, v=v)
  np.testing.assert_array_equal(np.asarray(actual), np.asarray(fwd(q, k, v, bias)))
  if not test_vjp:
    return
  dout = rand(42, expected.shape, actual.dtype)

  def vjp(f, q, k, v, bias, dout):
    out, pullback = jax.vjp(lambda q, k, v, bias: f(q, k, v, bias=bias), q, k, v, bias)
    return out, pullback(dout)

  run = jit(functools.partial(vjp, impl_call))
  out, grads = run(q, k, v, bias, dout)
  _, ref_grads = in_float64(functools.partial(vjp, ref_call), q, k, v, bias, dout)
  assert_close(out, expected, atol=atol, rtol=rtol, impl=impl, v=v)
  atol_grads = max(2 * atol, 5e-6) if atol_grads is None else atol_grads
  rtol_grads = max(atol_grads / 10, 1e-6)
  for name, g, w in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
    if w is not None:
      assert_close(g, w, atol=atol_grads, rtol=rtol_grads, impl=impl, what=name)
  out2, grads2 = run(q, k, v, bias, dout)
  for a, b in zip(jax.tree.leaves((out, grads)), jax.tree.leaves((out2, grads2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _repeat_kv_ref(q, k, v, **kw):
  reps = q.shape[-2] // k.shape[-2]
  return linen.dot_product_attention(q, jnp.repeat(k, reps, axis=-2),
                                     jnp.repeat(v, reps, axis=-2), **kw)


def _tanh_ref(q, k, v, *, logits_soft_cap=None, bias=None, precision=None, mask=None):
  """test_base._ref_impl_tanh: logits, + bias, soft cap, mask (finfo.min), softmax."""
  q = q / jnp.sqrt(q.shape[-1])
  logits = jnp.einsum("...qhd,...khd->...hqk", q, k, precision=precision)
  if bias is not None:
    logits = logits + bias
  if logits_soft_cap is not None:
    logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
  if mask is not None:
    logits = jnp.where(mask, logits, float(jnp.finfo(logits.dtype).min))
  return jnp.einsum("...hqk,...khd->...qhd", jax.nn.softmax(logits), v, precision=precision)


TOKAMAX_CASES = ("f32", "bf16", "f16", "cross", "mqa", "gqa", "no_batch_dim",
                 "multiple_batch_dims", "head_dim_48", "bias", "mask", "causal", "causal_cross-64",
                 "causal_cross-67", "causal_q_indices", "causal_k_indices", "q_start_end",
                 "padding", "nan_padding", "local", "tanh_nobias", "tanh_bias", "vmap-1", "vmap-2",
                 "invalid_shapes", "partial")


@pytest.mark.parametrize("impl,variant", cases(TOKAMAX_CASES, fast={
    "standard-f32", "standard-tanh_bias", "standard-invalid_shapes", "standard-nan_padding",
    "flash-gqa", "memory_efficient-partial", "aether-nan_padding"}))
def test_tokamax_attention(impl, variant):
  """test_base.py AttentionTestBase: test_self_attention (f32 / bf16 / f16, atol 1e-6 / 1e-2 /
  5e-4), test_cross_attention, test_multi_query_attention, test_grouped_query_attention (16 / 4
  heads, no VJP), test_no_batch_dim, test_multiple_batch_dims (through flax_attention_fn: jax.nn's
  API takes one batch axis), test_non_power_of_two_head_dim, test_bias (atol 5e-6), test_mask,
  test_causal_mask, test_causal_mask_cross_attention, test_causal_mask_q_indices / _k_indices
  and test_q_start_end_indices (as the mask arrays they stand for), test_padding_mask (as
  query_seq_lengths / key_value_seq_lengths), test_padding_mask_with_nans (NaN / float32 max in
  the padding must not leak), test_local_attention_mask (as local_window_size), test_tanh_clipping
  (logits_soft_cap=10 after the bias, atol 2e-6), test_vmap (atol 3e-6, grads 2e-5),
  test_invalid_shapes (must raise) and test_partial_attention (two halves of the keys merged by
  their residuals). Shapes (2, 1024, 4, 64) -> (2, 128, 4, 64)."""
  shape = (2, SEQ, 4, 64)
  run = functools.partial(tokamax_run, impl)
  if variant in ("f32", "bf16", "f16"):
    dtype = {"f32": f32, "bf16": bf16, "f16": f16}[variant]
    q, k, v, _, _ = _tokamax_inputs(shape, dtype=dtype)
    run(q, k, v, atol={"f32": 1e-6, "bf16": 1e-2, "f16": 5e-4}[variant])
  elif variant == "cross":
    q, k, v, _, _ = _tokamax_inputs(shape, kv_shape=(2, 192, 4, 64))
    run(q, k, v)
  elif variant == "mqa":
    q, k, v, _, _ = _tokamax_inputs(shape, kv_shape=(2, SEQ, 1, 64))
    run(q, k, v, ref_impl=_repeat_kv_ref)
  elif variant == "gqa":
    q, k, v, _, _ = _tokamax_inputs((2, SEQ, 16, 64), kv_shape=(2, SEQ, 4, 64))
    run(q, k, v, ref_impl=_repeat_kv_ref, test_vjp=False)
  elif variant == "no_batch_dim":
    q, k, v, _, _ = _tokamax_inputs((SEQ, 4, 64))
    run(q, k, v)
  elif variant == "multiple_batch_dims":
    q, k, v, _, _ = _tokamax_inputs((2, 3, 4, SEQ, 4, 64))
    run(q, k, v, impl_fn=attnax.flax_attention_fn(KERNELS[impl]))
  elif variant == "head_dim_48":
    q, k, v, _, _ = _tokamax_inputs((2, SEQ, 4, 48))
    run(q, k, v)
  elif variant == "bias":
    q, k, v, bias, _ = _tokamax_inputs(shape, bias_shape=(4, SEQ, SEQ))
    run(q, k, v, bias=bias, atol=5e-6)
  elif variant == "mask":
    q, k, v, _, mask = _tokamax_inputs(shape, mask_shape=(1, 4, 1, SEQ))
    run(q, k, v, mask=mask)
  elif variant == "causal":
    q, k, v, _, _ = _tokamax_inputs(shape)
    run(q, k, v, impl_kwargs=dict(is_causal=True),
        ref_kwargs=dict(mask=linen.make_causal_mask(jnp.ones((2, SEQ)))))
  elif variant.startswith("causal_cross"):
    sk = int(variant.split("-")[1])            # 512 and 539 of 1024, / 8
    q, k, v, _, _ = _tokamax_inputs(shape, kv_shape=(2, sk, 4, 64))
    run(q, k, v, impl_kwargs=dict(is_causal=True),
        ref_kwargs=dict(mask=jnp.tri(SEQ, sk, dtype=bool)))
  elif variant in ("causal_q_indices", "causal_k_indices"):
    perm = np.random.default_rng(48).permutation(SEQ // 2)       # 512 / 8
    tri = jnp.tri(SEQ // 2, dtype=bool)
    mask = tri[perm] if variant == "causal_q_indices" else tri[:, perm]
    q, k, v, _, _ = _tokamax_inputs((2, SEQ // 2, 4, 64))
    run(q, k, v, mask=mask[None, None])
  elif variant == "q_start_end":
    # base.Mask(q_start=42, q_end=42 + 256) at permuted query indices (of 512), / 8: a key
    # range per query position.
    perm = np.random.default_rng(49).permutation(SEQ // 2)
    q_start, q_end = 42 // 8, (42 + 256) // 8
    mask = jnp.asarray((perm[:, None] >= q_start) & (perm[:, None] < q_end)
                       & np.ones((1, SEQ // 2), bool))
    q, k, v, _, _ = _tokamax_inputs((2, SEQ // 2, 4, 64))
    run(q, k, v, mask=mask[None, None])
  elif variant == "padding":
    q_len, k_len = np.array([[456], [987]]) // 8, np.array([[123], [999]]) // 8
    q_valid, k_valid = np.arange(SEQ) < q_len, np.arange(SEQ) < k_len
    ref_mask = linen.make_attention_mask(q_valid, k_valid, dtype=bool)
    q, k, v, _, _ = _tokamax_inputs(shape)
    run(q, k, v, impl_kwargs=dict(query_seq_lengths=jnp.asarray(q_len[:, 0], jnp.int32),
                                  key_value_seq_lengths=jnp.asarray(k_len[:, 0], jnp.int32)),
        ref_kwargs=dict(mask=ref_mask), output_mask_from=ref_mask)
  elif variant == "nan_padding":
    q_valid = jnp.arange(SEQ) < jnp.array([[456], [987]]) // 8
    k_valid = jnp.arange(SEQ) < jnp.array([[123], [999]]) // 8
    mask = linen.make_attention_mask(q_valid, k_valid, dtype=bool)

    def poisoned(q, k, v, *, mask, bias=None):
      out = attnax.dot_product_attention(
          jnp.where(q_valid[:, :, None, None], q, float("nan")),
          jnp.where(k_valid[:, :, None, None], k, float("nan")),
          jnp.where(k_valid[:, :, None, None], v, jnp.finfo(jnp.float32).max),
          bias, mask, implementation=IMPLS[impl])
      return jnp.where(q_valid[:, :, None, None], out, 999.0)

    def ref_impl(q, k, v, **kw):
      out = linen.dot_product_attention(q, k, v, **kw)
      return jnp.where(q_valid[:, :, None, None], out, 999.0)

    q, k, v, _, _ = _tokamax_inputs(shape)
    run(q, k, v, mask=mask, impl_fn=poisoned, ref_impl=ref_impl, test_vjp=False)
  elif variant == "local":
    window = 128 // 8
    ref_mask = jnp.tri(SEQ, dtype=bool) & ~jnp.tri(SEQ, k=-window, dtype=bool)
    q, k, v, _, _ = _tokamax_inputs(shape)
    run(q, k, v, impl_kwargs=dict(local_window_size=(window - 1, 0), is_causal=True),
        ref_kwargs=dict(mask=ref_mask))
  elif variant.startswith("tanh"):
    bias_shape = (2, 4, SEQ, SEQ) if variant == "tanh_bias" else None
    q, k, v, bias, _ = _tokamax_inputs(shape, bias_shape=bias_shape)
    run(q, k, v, bias=bias, ref_impl=_tanh_ref, logits_soft_cap=10.0, atol=2e-6)
  elif variant.startswith("vmap"):
    in_axes_list = {"vmap-1": ((0, None, None, 0, 0), (0, None, None, 0, 0)),
                    "vmap-2": ((0, None, None, None, 0), (None, 0, 0, 0, None))}[variant]
    shapes = dict(q=[2, 3, SEQ, 4, 64], kv=[2, 3, SEQ, 4, 64], bias=[2, 3, 4, SEQ, SEQ],
                  mask=[2, 3, 4, SEQ, SEQ])
    for i, in_axes in enumerate(in_axes_list[::-1]):
      for name, axis in zip(("q", "kv", None, "bias", "mask"), in_axes):
        if name is not None and axis is None:
          del shapes[name][len(in_axes_list) - i - 1]

    def vmapped(f):
      def call(q, k, v, *, bias, mask, **kw):
        g = lambda q, k, v, bias, mask: f(q, k, v, bias=bias, mask=mask, **kw)
        for in_axes in in_axes_list:
          g = jax.vmap(g, in_axes=in_axes)
        return g(q, k, v, bias, mask)
      return call

    q, k, v, bias, mask = _tokamax_inputs(shapes["q"], kv_shape=shapes["kv"],
                                          bias_shape=shapes["bias"], mask_shape=shapes["mask"])
    run(q, k, v, bias=bias, mask=mask, impl_fn=vmapped(sdpa(impl)),
        ref_impl=vmapped(linen.dot_product_attention), atol=3e-6, atol_grads=2e-5)
  elif variant == "invalid_shapes":
    for kw in (dict(bias_shape=(4, 2, 1024 // 8, 512 // 8)),
               dict(mask_shape=(4, 2, 512 // 8, 1024 // 8))):
      q, k, v, bias, mask = _tokamax_inputs((4, SEQ, 2, 64), **kw)
      with pytest.raises(ValueError, match=r"(bias|mask) of shape \(4, 2, (64, 128|128, 64)\)"):
        jax.eval_shape(lambda q, k, v: sdpa(impl)(q, k, v, bias, mask), q, k, v)
  elif variant == "partial":
    def partial_impl(q, k, v, *, bias=None):
      half = k.shape[-3] // 2
      parts = [sdpa(impl)(q, k[:, i * half:(i + 1) * half], v[:, i * half:(i + 1) * half], bias,
                          return_residual=True) for i in range(2)]
      (o1, l1), (o2, l2) = parts
      lse = jnp.logaddexp(l1, l2)[..., None]
      return jnp.exp(l1[..., None] - lse) * o1 + jnp.exp(l2[..., None] - lse) * o2

    q, k, v, _, _ = _tokamax_inputs(shape)
    run(q, k, v, impl_fn=partial_impl, test_vjp=False)
  else:
    raise AssertionError(variant)


# ============================================================ jax tests/pallas/gpu_ops_test.py

# FusedAttentionTest samples jtu.sample_product over batch (1, 2) x seq (128, 384) x heads (1, 2,
# 8; bwd 1, 2) x head_dim (32, 64, 128) x block sizes x causal x use_fwd x use_segment_ids; these
# are fixed draws of it (block sizes are the kernel's own business here: attnax's are BLOCK).
PALLAS_OPS = {
    "b1-s128-n1-d32-causal-seg": (1, 128, 1, 32, True, True),
    "b2-s128-n2-d64-full": (2, 128, 2, 64, False, False),
    "b1-s384-n2-d32-causal": (1, 384, 2, 32, True, False),
    "b2-s128-n8-d128-seg": (2, 128, 8, 128, False, True),
}


def _pallas_ops_inputs(batch, seq, heads, head_dim, use_segment_ids):
  """The source's f16 (B, S, H, D) inputs and its two-segment ids (halves 0 and 1)."""
  q, k, v = (rand(seed, (batch, seq, heads, head_dim), f16) for seed in (41, 42, 43))
  seg = None
  if use_segment_ids:
    seg = jnp.concatenate([jnp.zeros((batch, seq // 2), jnp.int32),
                           jnp.ones((batch, seq // 2), jnp.int32)], axis=-1)
  return q, k, v, seg


def _segment_mask(seg):
  """Segment ids as the drop-in's boolean mask (B, 1, S, S): what mha's segment_ids mean."""
  return None if seg is None else seg[:, None, :, None] == seg[:, None, None, :]


@pytest.mark.parametrize("impl,variant", cases(PALLAS_OPS,
                                               fast={"pallas-b1-s128-n1-d32-causal-seg"}))
def test_jax_pallas_fused_attention_fwd(impl, variant):
  """gpu_ops_test.py FusedAttentionTest.test_fused_attention_fwd: out (and through jax.vjp, its
  use_fwd=True form) against attention.mha_reference with the same segment ids and causal flag,
  sm_scale 1 (mha's default), atol 0.05."""
  from jax.experimental.pallas.ops.gpu import attention as jax_attention
  batch, seq, heads, head_dim, causal, use_seg = PALLAS_OPS[variant]
  q, k, v, seg = _pallas_ops_inputs(batch, seq, heads, head_dim, use_seg)
  fn = lambda q, k, v: sdpa(impl)(q, k, v, mask=_segment_mask(seg), scale=1.0, is_causal=causal)
  out = jit(fn)(q, k, v)
  out_fwd = jit(lambda q, k, v: jax.vjp(fn, q, k, v)[0])(q, k, v)
  ref = jax_attention.mha_reference(*(x.astype(f32) for x in (q, k, v)), seg, causal=causal)
  assert out.dtype == f16
  for what, o in (("out", out), ("vjp out", out_fwd)):
    assert_close(o, ref, atol=0.05, rtol=0, impl=impl, v=v, what=what)


@pytest.mark.parametrize("impl,variant", cases(
    {k: c for k, c in PALLAS_OPS.items() if c[2] <= 2}, fast={"flash-b2-s128-n2-d64-full"}))
def test_jax_pallas_fused_attention_bwd(impl, variant):
  """gpu_ops_test.py FusedAttentionTest.test_fused_attention_bwd: dQ, dK, dV of out.sum()
  against those of attention.mha_reference (heads 1 and 2, as the source), atol 5e-2."""
  from jax.experimental.pallas.ops.gpu import attention as jax_attention
  batch, seq, heads, head_dim, causal, use_seg = PALLAS_OPS[variant]
  q, k, v, seg = _pallas_ops_inputs(batch, seq, heads, head_dim, use_seg)
  f = lambda q, k, v: sdpa(impl)(q, k, v, mask=_segment_mask(seg), scale=1.0,
                                 is_causal=causal).astype(f32).sum()
  f_ref = lambda q, k, v: jax_attention.mha_reference(q, k, v, seg, causal=causal).sum()
  got = jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(f_ref, argnums=(0, 1, 2)))(*(x.astype(f32) for x in (q, k, v)))
  for what, g, w in zip(("dQ", "dK", "dV"), got, want):
    assert g.dtype == f16
    assert_close(g, w, atol=5e-2, rtol=0, impl=impl, what=what)
