"""attnax.MultiHeadAttention: every kernel, GQA/MQA, RoPE, QK-norm, mods, KV-cache decoding, errors.

Kernel discovery (so that new kernels join these tests without edits): every name in
``attnax.kernels.__all__`` that ends in ``_attention``, is callable and binds the AttentionFn call
``fn(q, k, v, score_mod=, mask_mod=, scale=)`` (:func:`attnax.attention.is_attention_fn`), except
the kernels that need a context the module does not have: ``paged_attention`` (a paged KV cache:
k_pages, v_pages, block_tables, lengths) and ``ring_attention*`` (a device mesh; the reference is
the same maths laid out for a ring).

Two groups among them:
  - softmax kernels compute attnax's maths and are compared with the ``standard_attention`` module
    at DESIGN.md's tolerances (``tests/helpers.tol``). ``aether_attention`` prunes with a certified
    error bound ``2 * epsilon * max|v|``; it runs with ``epsilon=1e-12`` here, where the bound is
    far below the tolerance, so the module's plumbing is checked exactly.
  - ``DIFFERENT_MATHS`` (``linear_attention``) is not softmax attention: it is checked against the
    same kernel called directly on hand-projected inputs, and for decode == full pass.
A test skips a kernel only when the kernel itself, called directly, rejects the feature under test
(``ValueError``/``NotImplementedError``); the skip message carries the kernel's reason.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnax import AttentionType, MultiHeadAttention, kernels
from attnax import attention as attention_lib
from attnax.attention import is_attention_fn
from attnax.kernels import score_mods as sm
from attnax.kernels import (alibi_mod, causal_mod, compose_score_mods, document_mask_mod,
                            sliding_window_mod, standard_attention)
from attnax.rope import apply_rope
from tests.helpers import rel_err, tol

NEEDS_CONTEXT = {"paged_attention", "ring_attention", "ring_attention_reference"}
DIFFERENT_MATHS = {"linear_attention"}
EXACT_OPTIONS = {"aether_attention": dict(epsilon=1e-12)}


def discover_kernels() -> dict:
  found = {}
  for name in kernels.__all__:
    fn = getattr(kernels, name, None)
    if (name.endswith("_attention") and callable(fn) and name not in NEEDS_CONTEXT
        and is_attention_fn(fn)):
      opts = EXACT_OPTIONS.get(name)
      found[name] = functools.partial(fn, **opts) if opts else fn
  return found


KERNELS = discover_kernels()
SOFTMAX = [n for n in KERNELS if n not in DIFFERENT_MATHS]

def reference_fast(names, *extra):
  """Parameters for the module paths that do not depend on the kernel's own code paths (a bf16
  module, a second mask family in decoding): ``standard_attention`` in the default run, the others
  marked slow (they are covered per kernel by the kernels' own tests)."""
  return [pytest.param(n, *extra, marks=() if n == "standard_attention" else pytest.mark.slow)
          for n in names]


# Small shapes (Pallas kernels interpret on CPU); head_dim 32 is the Pallas minimum.
B, S, F, H, HKV, QKV = 2, 13, 48, 4, 2, 128


def make(attention_fn=standard_attention, seed=0, **kw):
  cfg = dict(num_heads=H, in_features=F, qkv_features=QKV, num_kv_heads=HKV)
  cfg.update(kw)
  return MultiHeadAttention(nnx.Rngs(seed), attention_fn=attention_fn, **cfg)


def inputs(seed, *shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def apply(model, *args, score_mod=None, mask_mod=None, decode=None):
  """``model(*args, ...)`` under nnx.jit (one compile instead of many eager ops); the mods are
  closed over, as they may be plain functions."""
  fn = lambda model, *args: model(*args, score_mod=score_mod, mask_mod=mask_mod, decode=decode)
  return nnx.jit(fn)(model, *args)


def probe(kernel, *, q_len=5, kv_len=7, dtype=jnp.float32, **kwargs):
  """Call ``kernel`` directly on inputs of the module's head layout; skip the test if it rejects
  the feature."""
  d = QKV // H
  q = inputs(1, B, H, q_len, d).astype(dtype)
  k, v = (inputs(i, B, HKV, kv_len, d).astype(dtype) for i in (2, 3))
  try:
    jax.block_until_ready(jax.jit(lambda q, k, v: kernel(q, k, v, **kwargs))(q, k, v))
  except (ValueError, NotImplementedError) as e:
    pytest.skip(f"the kernel itself rejects this feature: {type(e).__name__}: {e}")


def manual_forward(m, xq, xkv, kernel, *, positions=True, **kernel_kwargs):
  """The module's maths written out: projections, heads, optional RoPE, kernel, output (jitted)."""
  return _manual(m, xq, xkv, kernel, positions, **kernel_kwargs)


@functools.partial(nnx.jit, static_argnums=(3, 4))
def _manual(m, xq, xkv, kernel, positions, **kernel_kwargs):
  proj = lambda x, lin: jnp.einsum("bsf,fhd->bhsd", x, lin.kernel[...]) + (
      lin.bias[...][None, :, None, :] if lin.use_bias else 0.0)
  q, k, v = proj(xq, m.query), proj(xkv, m.key), proj(xkv, m.value)
  if m.rope and positions:
    q = apply_rope(q, jnp.arange(q.shape[2]), theta=m.rope_theta)
    k = apply_rope(k, jnp.arange(k.shape[2]), theta=m.rope_theta)
  out = kernel(q, k, v, **kernel_kwargs)
  return jnp.einsum("bhsd,hdo->bso", out, m.out.kernel[...]) + m.out.bias[...]


def grad_leaves_close(grads, ref, dtype=jnp.float32):
  """Every parameter gradient within 2x the dtype tolerance of the reference.

  Relative per leaf; a leaf whose reference is tiny compared with the largest (e.g. the key bias,
  whose gradient is ~0 because softmax is invariant to a per-row shift) is judged relative to that
  largest norm, as its relative error would measure rounding noise only.
  """
  g_leaves, r_leaves = jax.tree.leaves(grads), jax.tree.leaves(ref)
  assert len(g_leaves) == len(r_leaves)
  scale = max(float(np.linalg.norm(np.asarray(r, np.float64))) for r in r_leaves)
  for g, r in zip(g_leaves, r_leaves):
    rn = float(np.linalg.norm(np.asarray(r, np.float64)))
    diff = float(np.linalg.norm(np.asarray(g, np.float64) - np.asarray(r, np.float64)))
    err = diff / rn if rn > 1e-3 * scale else diff / scale
    assert err < tol(dtype, grad=True), (err, g.shape)


# ----------------------------------------------------------------------------- every kernel


def test_discovery_finds_the_reference():
  assert "standard_attention" in KERNELS
  assert not NEEDS_CONTEXT & set(KERNELS)


@pytest.mark.parametrize("name", list(KERNELS))
def test_module_equals_kernel_on_hand_projections(name):
  """Self- and cross-attention (Sq != Sk), GQA: the module is exactly projections + kernel."""
  kernel = KERNELS[name]
  probe(kernel)
  m = make(kernel, in_kv_features=24)
  xq, xkv = inputs(1, B, S, F), inputs(2, B, S + 6, 24)
  out = apply(m, xq, xkv)
  assert out.shape == (B, S, F)
  ref = manual_forward(m, xq, xkv, kernel)
  assert rel_err(out, ref) < tol(jnp.float32)


@pytest.mark.parametrize("name", SOFTMAX)
def test_kernel_matches_reference_module_under_jit_and_grad(name):
  """GQA + RoPE + QK-norm + causal/ALiBi constructor mods + a per-call document mask, jitted."""
  kernel = KERNELS[name]
  doc = jnp.asarray(np.repeat([[0, 1, 2]], B, 0).repeat([5, 4, 4], axis=1), jnp.int32)
  probe(kernel, q_len=S, kv_len=S, score_mod=compose_score_mods(alibi_mod(num_heads=H),
                                                                causal_mod()),
        mask_mod=lambda b, h, i, j: i >= j)
  kw = dict(rope=True, qk_norm=True,
            score_mod=compose_score_mods(alibi_mod(num_heads=H), causal_mod()))
  m, ref_m = make(kernel, **kw), make(standard_attention, **kw)
  x = inputs(4, B, S, F)
  ct = inputs(5, B, S, F)

  @nnx.jit
  def out_and_grads(model, x):
    def loss(model):
      out = model(x, score_mod=document_mask_mod(doc))
      return jnp.sum(out * ct), out
    (_, out), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return out, grads

  out, g = out_and_grads(m, x)
  ref, g_ref = out_and_grads(ref_m, x)
  assert rel_err(out, ref) < tol(jnp.float32)
  grad_leaves_close(g, g_ref)


@pytest.mark.parametrize("name,config", [(n, "causal_alibi_doc") for n in KERNELS]
                         + reference_fast(KERNELS, "window"))
def test_decode_matches_full_causal_pass(name, config):
  """Prefill 5 tokens, then one at a time under nnx.jit: equal to one full causal pass."""
  kernel = KERNELS[name]
  total, prefill, batch = 11, 5, 2
  if config == "window":
    ctor = compose_score_mods(sliding_window_mod(window_size=4))
    call_mod = None
  else:
    ctor = compose_score_mods(alibi_mod(num_heads=H), causal_mod())
    doc = jnp.asarray([[0] * 3 + [1] * 6 + [2] * 2, [0] * 7 + [1] * 4], jnp.int32)
    call_mod = document_mask_mod(doc)
  # The kernel must take what decoding hands it: the mods, and the cache as keys with a mask of
  # the written slots and the mods' masks at shifted query positions.
  probe(kernel, q_len=total, kv_len=total, score_mod=compose_score_mods(ctor, call_mod))
  offset = jnp.array([prefill], jnp.int32)
  probe(kernel, q_len=1, kv_len=total + 3, score_mod=ctor,
        mask_mod=sm.and_masks(attention_lib.ShiftedWindowMask(offset),
                              attention_lib.KVLengthMask(offset + 1)))
  m = make(kernel, rope=True, qk_norm=True, score_mod=ctor)
  x = inputs(6, batch, total, F)
  full = apply(m, x, score_mod=call_mod)

  m.init_cache(batch, total + 3)
  step = nnx.jit(lambda model, x: model(x, score_mod=call_mod, decode=True))
  outs = [step(m, x[:, :prefill])]
  for t in range(prefill, total):
    outs.append(step(m, x[:, t:t + 1]))
  dec = jnp.concatenate(outs, axis=1)
  assert int(m.cache_index[...]) == total
  assert rel_err(dec, full) < tol(jnp.float32)


@pytest.mark.parametrize("name", reference_fast(SOFTMAX))
def test_bfloat16_module(name):
  kernel = KERNELS[name]
  probe(kernel, dtype=jnp.bfloat16)
  m = make(kernel, dtype=jnp.bfloat16, score_mod=causal_mod())
  ref_m = make(standard_attention, dtype=jnp.bfloat16, score_mod=causal_mod())
  x = inputs(7, B, S, F).astype(jnp.bfloat16)
  out = apply(m, x)
  assert out.dtype == jnp.bfloat16
  assert rel_err(out, apply(ref_m, x)) < tol(jnp.bfloat16)


# ----------------------------------------------------------------------------- GQA / MQA


@pytest.mark.parametrize("kv_heads,expected", [(4, AttentionType.MULTI_HEAD),
                                               (2, AttentionType.GROUPED_QUERY),
                                               (1, AttentionType.MULTI_QUERY)])
def test_head_layouts(kv_heads, expected):
  m = make(num_kv_heads=kv_heads)
  assert m.attention_type is expected
  assert m.key.kernel.shape == (F, kv_heads, QKV // H)
  x = inputs(8, B, S, F)
  assert rel_err(apply(m, x), manual_forward(m, x, x, standard_attention)) < tol(jnp.float32)


def test_gqa_equals_mha_with_repeated_kv_heads():
  """Query head h reads kv head h // (H // Hkv): an MHA with copied kv weights is identical."""
  gqa = make(num_kv_heads=2, score_mod=causal_mod())
  mha = make(num_kv_heads=4, score_mod=causal_mod(), seed=1)
  mha.query.kernel[...] = gqa.query.kernel[...]
  mha.query.bias[...] = gqa.query.bias[...]
  for name in ("key", "value"):
    src, dst = getattr(gqa, name), getattr(mha, name)
    dst.kernel[...] = jnp.repeat(src.kernel[...], 2, axis=1)
    dst.bias[...] = jnp.repeat(src.bias[...], 2, axis=0)
  mha.out.kernel[...] = gqa.out.kernel[...]
  mha.out.bias[...] = gqa.out.bias[...]
  x = inputs(9, B, S, F)
  assert rel_err(apply(gqa, x), apply(mha, x)) < tol(jnp.float32)


def test_attention_type_argument():
  assert make(num_kv_heads=None, attention_type="multi_query").num_kv_heads == 1
  assert make(num_kv_heads=None, attention_type=AttentionType.MULTI_HEAD).num_kv_heads == H
  assert make(num_kv_heads=2, attention_type="GROUPED_QUERY").attention_type is \
      AttentionType.GROUPED_QUERY
  one = make(num_heads=1, num_kv_heads=1, attention_type=AttentionType.MULTI_QUERY)
  assert one.attention_type is AttentionType.MULTI_HEAD  # one head: both names fit


# ----------------------------------------------------------------------------- RoPE and QK-norm


def test_rope_matches_the_rotation_formula():
  x = np.asarray(inputs(10, 2, 3, 7, 8), np.float64)
  pos = np.array([0, 1, 2, 5, 17, 100, 1234])
  theta = 500.0
  got = np.asarray(apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos), theta=theta))
  want = np.empty_like(x)
  d = x.shape[-1]
  for s, p in enumerate(pos):
    for i in range(d // 2):
      a = p * theta ** (-2.0 * i / d)
      x1, x2 = x[..., s, i], x[..., s, i + d // 2]
      want[..., s, i] = x1 * np.cos(a) - x2 * np.sin(a)
      want[..., s, i + d // 2] = x2 * np.cos(a) + x1 * np.sin(a)
  assert rel_err(got, want) < tol(jnp.float32)
  # A rotation: norms are kept.
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_rope_scores_depend_on_relative_position_only():
  q, k = inputs(11, 16), inputs(12, 16)
  dot = lambda m, n: float(apply_rope(q[None], jnp.array([m]))[0]
                           @ apply_rope(k[None], jnp.array([n]))[0])
  base = dot(3, 1)
  for shift in (1, 10, 250):
    assert abs(dot(3 + shift, 1 + shift) - base) < 1e-4 * (1 + abs(base))
  assert abs(dot(5, 1) - base) > 1e-3


def test_rope_in_module_is_applied_at_positions():
  m = make(rope=True, rope_theta=1000.0)
  x = inputs(13, B, S, F)
  ref = manual_forward(m, x, x, standard_attention)
  assert rel_err(apply(m, x), ref) < tol(jnp.float32)
  no_rope = manual_forward(m, x, x, standard_attention, positions=False)
  assert rel_err(apply(m, x), no_rope) > 1e-3


@pytest.mark.parametrize("kind", [True, "layer"])
def test_qk_norm(kind):
  m = make(qk_norm=kind)
  assert isinstance(m.query_norm, nnx.RMSNorm if kind is True else nnx.LayerNorm)
  m.query_norm.scale[...] = 1.0 + 0.1 * inputs(14, QKV // H)
  m.key_norm.scale[...] = 1.0 - 0.1 * inputs(15, QKV // H)
  x = inputs(16, B, S, F)

  def norm(y, scale):  # y (B, H, S, D), normalised per head over D
    if kind == "layer":
      y = y - y.mean(-1, keepdims=True)
      var = (y * y).mean(-1, keepdims=True)
    else:
      var = (y * y).mean(-1, keepdims=True)
    return y / jnp.sqrt(var + 1e-6) * scale

  def kernel(q, k, v, **kw):
    return standard_attention(norm(q, m.query_norm.scale[...]), norm(k, m.key_norm.scale[...]),
                              v, **kw)

  assert rel_err(apply(m, x), manual_forward(m, x, x, kernel)) < tol(jnp.float32)


# ----------------------------------------------------------------------------- mods


def test_per_call_mods_compose_with_constructor_mods():
  alibi, causal = alibi_mod(num_heads=H), causal_mod()
  doc = jnp.asarray([[0] * 6 + [1] * 7] * B, jnp.int32)
  x = inputs(17, B, S, F)
  both = make(score_mod=compose_score_mods(alibi, causal, document_mask_mod(doc)))
  split = make(score_mod=compose_score_mods(alibi, causal))
  ref = apply(both, x)
  out = apply(split, x, score_mod=document_mask_mod(doc))
  assert rel_err(out, ref) < tol(jnp.float32)
  # A per-call mask_mod is and-ed in.
  out2 = apply(split, x, mask_mod=lambda b, h, i, j: jnp.take(doc[0], i) == jnp.take(doc[0], j))
  assert rel_err(out2, ref) < tol(jnp.float32)
  # And the constructor's mask_mod too.
  masked = make(score_mod=alibi, mask_mod=lambda b, h, i, j: j <= i)
  assert rel_err(apply(masked, x, score_mod=document_mask_mod(doc)), ref) < tol(jnp.float32)
  assert rel_err(out, apply(split, x)) > 1e-3


def test_mods_with_arrays_are_module_state_under_jit():
  """ALiBi slopes live in the module as ModBuffer state and trace under nnx.jit."""
  m = make(score_mod=compose_score_mods(alibi_mod(num_heads=H), causal_mod()))
  buffers = jax.tree.leaves(nnx.state(m, attention_lib.ModBuffer))
  assert [b.shape for b in buffers] == [(H,)]
  # Not parameters: gradients and optimisers leave them alone.
  assert all(leaf.shape != (H,) for leaf in jax.tree.leaves(nnx.state(m, nnx.Param)))
  x = inputs(18, B, S, F)
  assert rel_err(nnx.jit(lambda m, x: m(x))(m, x), m(x)) < tol(jnp.float32)
  user = make(score_mod=lambda s, b, h, i, j: s - 0.1 * jnp.abs(i - j))
  assert rel_err(nnx.jit(lambda m, x: m(x))(user, x), user(x)) < tol(jnp.float32)


def test_leading_batch_dims():
  m = make(score_mod=causal_mod())
  x = inputs(19, 2, 3, S, F)
  out = apply(m, x)
  assert out.shape == (2, 3, S, F)
  assert rel_err(out, apply(m, x.reshape(6, S, F)).reshape(out.shape)) < tol(jnp.float32)
  assert rel_err(apply(m, x[0, 0]), out[0, 0]) < tol(jnp.float32)


def test_nnx_vmap_and_scan_over_layers():
  """vmap over inputs; layers created with vmap (ALiBi slopes stacked as state) run by nnx.scan."""
  mod = compose_score_mods(alibi_mod(num_heads=H), causal_mod())
  m = make(rope=True, score_mod=mod)
  x = inputs(26, 3, B, S, F)
  y = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0))(m, x)
  assert rel_err(y, apply(m, x)) < tol(jnp.float32)

  @nnx.split_rngs(splits=2)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return MultiHeadAttention(rngs, num_heads=H, in_features=F, qkv_features=QKV, score_mod=mod)

  layers = create(nnx.Rngs(0))
  assert layers.query.kernel.shape == (2, F, H, QKV // H)

  @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
  def run(layer, h):
    return h + layer(h)

  out = nnx.jit(run)(layers, x[0])
  h = x[0]
  for i in range(2):
    layer = MultiHeadAttention(nnx.Rngs(0), num_heads=H, in_features=F, qkv_features=QKV,
                               score_mod=mod)
    nnx.update(layer, jax.tree.map(lambda a: a[i], nnx.state(layers)))
    h = h + apply(layer, h)
  assert rel_err(out, h) < tol(jnp.float32)


# ----------------------------------------------------------------------------- dropout


def test_dropout_with_standard_attention():
  m = make(dropout_rate=0.5, score_mod=causal_mod())
  plain = make(score_mod=causal_mod())
  x = inputs(20, B, S, F)
  assert rel_err(m(x, deterministic=True), plain(x)) < tol(jnp.float32)
  a = m(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
  b = m(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
  c = m(x, deterministic=False)  # the stream kept at construction
  assert rel_err(a, b) == 0.0 and rel_err(a, plain(x)) > 1e-2 and rel_err(c, a) > 1e-3
  with pytest.raises(ValueError, match="deterministic"):
    m(x)
  view = nnx.view(m, deterministic=True)
  assert rel_err(view(x), plain(x)) < tol(jnp.float32)


def test_dropout_needs_a_kernel_that_supports_it_only_when_it_drops():
  """A kernel without dropout serves a module with dropout_rate > 0 whenever dropout is off
  (deterministic=True: the plain module's output); a call that would drop raises, naming it."""
  def no_dropout(q, k, v, *, score_mod=None, mask_mod=None, scale=None):
    return standard_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, scale=scale)
  m = make(no_dropout, dropout_rate=0.1, score_mod=causal_mod())
  x = inputs(22, B, S, F)
  assert rel_err(m(x, deterministic=True), make(score_mod=causal_mod())(x)) < tol(jnp.float32)
  assert rel_err(nnx.view(m, deterministic=True)(x), make(score_mod=causal_mod())(x)) \
      < tol(jnp.float32)
  with pytest.raises(ValueError, match="dropout_rate=0.1 with deterministic=False.*no_dropout"):
    m(x, deterministic=False)
  make(no_dropout, dropout_rate=0.0)(x)


# Fused kernels with dropout: flash_attention is the default run's representative; the others run
# under -m slow (compile-heavy on CPU: pallas interprets); tests/kernels/test_dropout.py checks
# every dropout kernel's mask and gradients against the reference in the default run.
FUSED_DROPOUT = [pytest.param("flash_attention"),
                 pytest.param("memory_efficient_attention", marks=pytest.mark.slow),
                 pytest.param("pallas_flash_attention", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", FUSED_DROPOUT)
def test_dropout_with_fused_kernels(name):
  """Training with dropout through a fused kernel: the module passes the key of its rngs'
  dropout stream, and the kernel drops exactly the weights standard_attention drops with that key,
  so output and parameter gradients equal those of the standard_attention module (same params);
  deterministic=True turns dropout off."""
  kernel = KERNELS[name]
  mod = causal_mod()
  m = make(kernel, dropout_rate=0.3, score_mod=mod)
  ref = make(dropout_rate=0.3, score_mod=mod)
  x = inputs(23, B, S, F)

  def loss(model, x):
    out = model(x, deterministic=False, rngs=nnx.Rngs(dropout=5))
    return jnp.sum(out ** 2), out

  step = nnx.jit(nnx.grad(loss, has_aux=True))    # one compile per module: output and gradients
  (g, got), (g_ref, want) = step(m, x), step(ref, x)
  assert rel_err(got, want) < tol(jnp.float32)
  plain = apply(make(score_mod=mod), x)
  assert rel_err(got, plain) > 1e-2                     # it did drop
  grad_leaves_close(g, g_ref)
  assert rel_err(nnx.jit(lambda m, x: m(x, deterministic=True))(m, x), plain) < tol(jnp.float32)


# ----------------------------------------------------------------------------- decoding


def test_decode_cache_state_and_errors():
  m = make(score_mod=causal_mod(), rope=True)
  x = inputs(21, B, 4, F)
  with pytest.raises(ValueError, match="init_cache"):
    m(x, decode=True)
  m.init_cache(B, 6)
  assert m.cached_key.shape == (B, HKV, 6, QKV // H)
  assert isinstance(m.cache_index, nnx.Cache)
  m(x, decode=True)
  assert int(m.cache_index[...]) == 4
  with pytest.raises(ValueError, match="overflow"):
    m(x, decode=True)
  with pytest.raises(ValueError, match="self-attention"):
    m(x[:, :1], inputs(22, B, 3, F), decode=True)
  m.init_cache(B, 6)
  assert int(m.cache_index[...]) == 0
  # Decoding is a view too: nnx.view(decode=True) makes it the default.
  dec = nnx.view(m, decode=True)
  dec(x[:, :2])
  assert int(m.cache_index[...]) == 2


def test_decode_overflow_under_jit_is_nan_not_a_wrong_answer():
  """Traced cache_index cannot raise: the overflowing step (and every later one) returns NaN."""
  m = make(score_mod=causal_mod())
  x = inputs(26, B, 2, F)
  m.init_cache(B, 5)
  step = nnx.jit(lambda m, x: m(x, decode=True))
  for t, fits in enumerate([True, True, False, False]):    # 2 + 2 fit in 5; 6 and 8 do not
    out = step(m, x)
    assert int(m.cache_index[...]) == 2 * (t + 1)           # keeps counting past max_length
    assert np.all(np.isfinite(out)) if fits else np.all(np.isnan(out)), t
  m.init_cache(B, 5)                                        # a fresh cache decodes again
  assert np.all(np.isfinite(step(m, x)))


@pytest.mark.parametrize("args,match", [
    ((1.5, 6), r"batch must be a positive int, got 1.5"),
    ((B, 0), r"max_length must be a positive int, got 0"),
    ((B, 6.0), r"max_length must be a positive int, got 6.0"),
    ((True, 6), r"batch must be a positive int, got True"),
])
def test_init_cache_needs_positive_ints(args, match):
  with pytest.raises(ValueError, match="init_cache: " + match):
    make().init_cache(*args)


def test_decode_without_causal_mod_sees_only_written_slots():
  """No mod: prefill is bidirectional over the prompt, never over unwritten cache slots."""
  m = make()
  x = inputs(23, B, 4, F)
  m.init_cache(B, 9)
  out = apply(m, x, decode=True)
  assert rel_err(out, apply(m, x)) < tol(jnp.float32)


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("kwargs,match", [
    (dict(qkv_features=102), r"qkv_features \(102\).*num_heads \(4\)"),
    (dict(num_kv_heads=3), r"num_heads \(4\).*num_kv_heads \(3\)"),
    (dict(num_kv_heads=0), "num_kv_heads"),
    (dict(num_heads=0), "num_heads"),
    (dict(in_features=-1), "in_features"),
    (dict(attention_type="multi_query"), r"attention_type=MULTI_QUERY.*num_kv_heads=2"),
    (dict(num_kv_heads=4, attention_type="grouped_query"), "GROUPED_QUERY"),
    (dict(num_kv_heads=None, attention_type="grouped_query"), "needs num_kv_heads"),
    (dict(attention_type="sparse"), "attention_type must be one of"),
    (dict(dropout_rate=1.0), "dropout_rate"),
    (dict(rope=True, qkv_features=12, num_heads=4, num_kv_heads=1), "even head_dim"),
    (dict(qk_norm="batch"), "qk_norm"),
    (dict(score_mod=lambda s, b: s), "score_mod"),
    (dict(mask_mod=lambda b, h, i, j, extra: True), "mask_mod"),
    (dict(attention_fn=lambda q, k, v, block_tables: q), "AttentionFn"),
])
def test_bad_constructor_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    make(**kwargs)


def test_rngs_first_positional_or_keyword():
  a = MultiHeadAttention(nnx.Rngs(0), num_heads=4, in_features=32)
  b = MultiHeadAttention(num_heads=4, in_features=32, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(a.query.kernel[...], b.query.kernel[...])
  with pytest.raises(TypeError, match="rngs first"):
    MultiHeadAttention(8, in_features=32, num_heads=4)


def test_bad_call_arguments():
  m = make()
  with pytest.raises(ValueError, match="inputs_q"):
    m(inputs(24, B, S, F + 1))
  with pytest.raises(ValueError, match="inputs_k"):
    m(inputs(24, B, S, F), inputs(25, B + 1, S, F))
  with pytest.raises(ValueError, match="inputs_v given without inputs_k"):
    m(inputs(24, B, S, F), None, inputs(25, B, S, F))
