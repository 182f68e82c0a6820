"""Flax interop: attnax kernels in flax.nnx.MultiHeadAttention, Flax weights in attnax's module.

Flax's own ``nnx.MultiHeadAttention`` (default ``dot_product_attention``) is the independent
reference: outputs and parameter gradients must agree at DESIGN.md's tolerances. Kernels are
discovered as in ``tests/test_attention.py``; ``linear_attention`` is not softmax attention, so it
cannot match Flax and is left out here. Loading parameters does not depend on the kernel, so
``from_flax`` runs with ``standard_attention`` by default and with every kernel under ``-m slow``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnax
from attnax import MultiHeadAttention, flax_attention_fn
from attnax.kernels import alibi_mod, causal_mod, standard_attention
from tests.helpers import rel_err, tol
from tests.test_attention import (KERNELS, SOFTMAX, grad_leaves_close, inputs, probe,
                                  reference_fast)

B, S, F, H, HKV, QKV = 2, 11, 48, 4, 2, 128


def flax_mha(seed=0, **kw):
  cfg = dict(num_heads=H, in_features=F, qkv_features=QKV, num_kv_heads=HKV, decode=False)
  cfg.update(kw)
  return nnx.MultiHeadAttention(rngs=nnx.Rngs(seed), **cfg)


def call(model, *args, **kwargs):
  return nnx.jit(lambda model, *args: model(*args, **kwargs))(model, *args)


def out_and_grads(model, ct, *args, **kwargs):
  """``model(*args)`` and the parameter gradients of ``sum(model(*args) * ct)``, in one jit."""
  def loss(model):
    out = model(*args, **kwargs)
    return jnp.sum(out * ct), out

  @nnx.jit
  def run(model):
    (_, out), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return out, grads

  return run(model)


def by_path(state):
  """``{path: array}`` of a parameter state, so Flax's and attnax's trees can be matched by name."""
  return {tuple(str(p) for p in path): v for path, v in nnx.to_flat_state(state)}


# ----------------------------------------------------------------------------- adapter


@pytest.mark.parametrize("name", SOFTMAX)
def test_adapter_in_flax_module_matches_flax(name):
  """Same Flax module, Flax's attention vs an attnax kernel: GQA, a causal mask array, is_causal."""
  kernel = KERNELS[name]
  probe(kernel, q_len=S, kv_len=S, mask_mod=lambda b, h, i, j: j <= i)
  ours = flax_mha(attention_fn=flax_attention_fn(kernel))
  ref = flax_mha()
  x, ct = inputs(1, B, S, F), inputs(2, B, S, F)
  mask = nnx.make_causal_mask(jnp.ones((B, S)))                      # (B, 1, S, S)
  out, g = out_and_grads(ours, ct, x, mask=mask)
  out_ref, g_ref = out_and_grads(ref, ct, x, mask=mask)
  assert rel_err(out, out_ref) < tol(jnp.float32)
  grad_leaves_close(g, g_ref)
  assert rel_err(call(ours, x, is_causal=True), call(ref, x, is_causal=True)) < tol(jnp.float32)


def test_adapter_cross_attention_bias_mods_and_batch_dims():
  xq, xkv = inputs(3, 2, 3, 7, F), inputs(4, 2, 3, 9, F)
  bias = 0.3 * inputs(5, 3, 1, 7, 9)                                 # (batch2, 1, Sq, Sk)
  mask = inputs(6, 2, 3, 1, 7, 9) > -1.0                             # (b1, b2, 1, Sq, Sk)
  ours = flax_mha(attention_fn=flax_attention_fn(standard_attention))
  ref = flax_mha()
  out = call(ours, xq, xkv, mask=mask)
  assert out.shape == (2, 3, 7, F)
  assert rel_err(out, call(ref, xq, xkv, mask=mask)) < tol(jnp.float32)
  # Flax's dot_product_attention adds a bias; drive both through the attention functions directly.
  q, k, v = inputs(7, 3, 7, H, 32), inputs(8, 3, 9, HKV, 32), inputs(9, 3, 9, HKV, 32)
  fn = flax_attention_fn(standard_attention)
  want = nnx.dot_product_attention(q, k, v, bias=bias, mask=mask[0])
  assert rel_err(fn(q, k, v, bias=bias, mask=mask[0]), want) < tol(jnp.float32)
  # Mods given to the adapter apply at every call, before Flax's bias/mask.
  fn_mod = flax_attention_fn(standard_attention, score_mod=alibi_mod(num_heads=H),
                             mask_mod=lambda b, h, i, j: j <= i + 2)
  slopes = attnax.kernels.alibi_slopes(H)
  rel = jnp.arange(9)[None, :] - jnp.arange(7)[:, None]
  alibi = slopes[:, None, None] * rel                                # (H, Sq, Sk)
  want = nnx.dot_product_attention(q, k, v, bias=bias + alibi, mask=mask[0] & (rel <= 2))
  assert rel_err(fn_mod(q, k, v, bias=bias, mask=mask[0]), want) < tol(jnp.float32)


def test_adapter_in_flax_decoding():
  """Flax's own KV cache (one token at a time, an occupancy mask) through an attnax kernel."""
  ours = flax_mha(attention_fn=flax_attention_fn(standard_attention), decode=True)
  ref = flax_mha(decode=True)
  x = inputs(10, B, 6, F)
  for m in (ours, ref):
    m.init_cache((B, 6, F))
  step = nnx.jit(lambda m, x: m(x))
  for t in range(6):
    a, b = step(ours, x[:, t:t + 1]), step(ref, x[:, t:t + 1])
    assert rel_err(a, b) < tol(jnp.float32), t


def test_adapter_errors():
  fn = flax_attention_fn(standard_attention)
  q = inputs(11, 1, 4, H, 32)
  with pytest.raises(ValueError, match="sow_weights"):
    fn(q, q, q, module=object())
  with pytest.raises(ValueError, match="input_positions"):
    fn(q, q, q, input_positions=jnp.arange(4))

  def no_dropout(q, k, v, *, score_mod=None, mask_mod=None, scale=None):
    return standard_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, scale=scale)

  with pytest.raises(ValueError, match="dropout"):
    flax_attention_fn(no_dropout)(q, q, q, dropout_rate=0.1, dropout_rng=jax.random.key(0))
  # Deterministic calls never need dropout support.
  flax_attention_fn(no_dropout)(q, q, q, dropout_rate=0.1, deterministic=True)
  with pytest.raises(ValueError, match="AttentionFn"):
    flax_attention_fn(lambda q, k, v, block_tables: q)


def test_adapter_dropout_reaches_the_kernel():
  fn = flax_attention_fn(standard_attention)
  q, k, v = inputs(12, 1, 6, H, 32), inputs(13, 1, 6, H, 32), inputs(14, 1, 6, H, 32)
  plain = fn(q, k, v)
  dropped = fn(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(3), deterministic=False)
  again = fn(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(3), deterministic=False)
  assert rel_err(dropped, again) == 0.0 and rel_err(dropped, plain) > 1e-2


# ----------------------------------------------------------------------------- from_flax


@pytest.mark.parametrize("name", reference_fast(SOFTMAX))
def test_from_flax_matches_flax_outputs_and_gradients(name):
  kernel = KERNELS[name]
  probe(kernel, q_len=S, kv_len=S)
  ref = flax_mha(normalize_qk=True)
  ours = MultiHeadAttention.from_flax(ref, attention_fn=kernel)
  assert ours.qk_norm == "layer" and ours.num_kv_heads == HKV
  x, ct = inputs(15, B, S, F), inputs(16, B, S, F)
  out, g = out_and_grads(ours, ct, x)
  out_ref, g_ref = out_and_grads(ref, ct, x)
  assert rel_err(out, out_ref) < tol(jnp.float32)
  g, g_ref = by_path(g), by_path(g_ref)
  rename = {"query_norm": "query_ln", "key_norm": "key_ln"}
  g = {tuple(rename.get(p, p) for p in path): v for path, v in g.items()}
  assert set(g) == set(g_ref)
  keys = sorted(g_ref)
  grad_leaves_close([g[k] for k in keys], [g_ref[k] for k in keys])


def test_from_flax_cross_attention_and_causal_mod():
  ref = flax_mha(in_kv_features=24, use_bias=False, num_kv_heads=1)
  ours = MultiHeadAttention.from_flax(ref, score_mod=causal_mod())
  assert ours.attention_type is attnax.AttentionType.MULTI_QUERY and not ours.use_bias
  xq, xkv = inputs(17, B, 7, F), inputs(18, B, 9, 24)
  assert rel_err(call(ours, xq, xkv), call(ref, xq, xkv, is_causal=True)) < tol(jnp.float32)


def test_load_flax_params_in_place_and_mismatches():
  ref = flax_mha(seed=3)
  ours = MultiHeadAttention(nnx.Rngs(9), num_heads=H, in_features=F, qkv_features=QKV,
                            num_kv_heads=HKV)
  x = inputs(19, B, S, F)
  assert rel_err(call(ours, x), call(ref, x)) > 1e-2
  ours.load_flax_params(ref)
  assert rel_err(call(ours, x), call(ref, x)) < tol(jnp.float32)
  np.testing.assert_array_equal(ours.out.kernel[...], ref.out.kernel[...])
  other = MultiHeadAttention(nnx.Rngs(0), num_heads=H, in_features=F, qkv_features=QKV)
  with pytest.raises(ValueError, match=r"num_kv_heads: flax 2 vs attnax 4"):
    other.load_flax_params(ref)
  rms = MultiHeadAttention(nnx.Rngs(0), num_heads=H, in_features=F, qkv_features=QKV,
                           num_kv_heads=HKV, qk_norm=True)
  with pytest.raises(ValueError, match="normalize_qk.*RMSNorm"):
    rms.load_flax_params(flax_mha(normalize_qk=True))


# ----------------------------------------------------------------------------- Flax's arguments


@pytest.mark.parametrize("name", reference_fast(SOFTMAX))
def test_adapter_takes_flax_precision_for_every_kernel(name):
  """nnx.MultiHeadAttention passes precision= on every call; every kernel takes it (the
  reference uses it, the fused kernels ignore it) and matches Flax's module with the same
  precision."""
  kernel = KERNELS[name]
  ours = flax_mha(attention_fn=flax_attention_fn(kernel), precision=jax.lax.Precision.HIGHEST)
  ref = flax_mha(precision=jax.lax.Precision.HIGHEST)
  x = inputs(20, B, S, F)
  assert rel_err(call(ours, x, is_causal=True), call(ref, x, is_causal=True)) < tol(jnp.float32)


def test_adapter_precision_reaches_kernels_that_take_it():
  seen = []

  def with_precision(q, k, v, *, score_mod=None, mask_mod=None, scale=None, return_lse=False,
                     precision=None):
    seen.append(precision)
    return standard_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, scale=scale,
                              return_lse=return_lse, precision=precision)

  def without(q, k, v, *, score_mod=None, mask_mod=None, scale=None, return_lse=False):
    return standard_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, scale=scale,
                              return_lse=return_lse)

  q, k, v = inputs(21, 2, 5, H, 8), inputs(22, 2, 6, HKV, 8), inputs(23, 2, 6, HKV, 8)
  want = jax.jit(lambda q, k, v: nnx.dot_product_attention(q, jnp.repeat(k, 2, 2),
                                                           jnp.repeat(v, 2, 2)))(q, k, v)
  for kernel in (with_precision, without):
    out = jax.jit(lambda q, k, v: flax_attention_fn(kernel)(
        q, k, v, precision=jax.lax.Precision.HIGHEST))(q, k, v)
    assert rel_err(out, want) < tol(jnp.float32)
  assert seen == [jax.lax.Precision.HIGHEST]


def test_adapter_sow_weights_says_why():
  fn = flax_attention_fn(attnax.kernels.flash_attention)
  q = inputs(24, 1, 4, H, 8)
  with pytest.raises(ValueError, match="sow_weights=True.*never materialise"):
    fn(q, q, q, module=object())


def test_adapter_checks_shapes_before_anything_else():
  """A shape error is reported as one (naming the shapes) even when the call also asks for
  dropout the kernel lacks, or for sow_weights."""
  def no_dropout(q, k, v, *, score_mod=None, mask_mod=None, scale=None, return_lse=False):
    return standard_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, scale=scale,
                              return_lse=return_lse)

  fn = flax_attention_fn(no_dropout)
  q, k = inputs(25, 2, 5, H, 8), inputs(26, 2, 6, HKV, 8)
  bad_k = k[..., :4]
  drop = dict(dropout_rate=0.1, dropout_rng=jax.random.key(0), deterministic=False)
  with pytest.raises(ValueError, match=r"head_dim.*\(2, 6, 2, 4\)"):
    fn(q, bad_k, bad_k, **drop)
  with pytest.raises(ValueError, match=r"head_dim.*\(2, 6, 2, 4\)"):
    fn(q, bad_k, bad_k, module=object())
  with pytest.raises(ValueError, match=r"multiple of the key/value heads.*\(2, 5, 3, 8\)"):
    fn(q[:, :, :3], k, k, **drop)
  with pytest.raises(ValueError, match=r"bias of shape \(2, 4, 5, 7\)"):
    fn(q, k, k, bias=jnp.zeros((2, H, 5, 7)), **drop)
  with pytest.raises(ValueError, match=r"mask of shape \(3, 1, 5, 6\)"):
    fn(q, k, k, mask=jnp.ones((3, 1, 5, 6), bool), **drop)
  with pytest.raises(ValueError, match="dropout"):        # shapes fine: now the dropout
    fn(q, k, k, **drop)


@pytest.mark.parametrize("name", reference_fast(SOFTMAX))
def test_adapter_rows_that_see_no_key_match_flax(name):
  """Flax's padding mask (make_attention_mask of query and key validity) leaves the padded
  queries with no key: Flax gives them the mean of the values, and so does the adapter (the
  kernels' own convention is 0); gradients of q, k, v agree too."""
  q, k, v = inputs(27, 2, 7, H, 8), inputs(28, 2, 9, HKV, 8), inputs(29, 2, 9, HKV, 8)
  q_valid = jnp.arange(7)[None] < jnp.array([[5], [7]])
  k_valid = jnp.arange(9)[None] < jnp.array([[9], [0]])           # row 1: no key at all
  mask = nnx.make_attention_mask(q_valid, k_valid)              # (B, 1, Sq, Sk)
  ct = inputs(30, 2, 7, H, 8)
  fn = flax_attention_fn(KERNELS[name])
  ref_fn = lambda q, k, v, mask: nnx.dot_product_attention(q, jnp.repeat(k, 2, 2),
                                                           jnp.repeat(v, 2, 2), mask=mask)

  def out_and_grads(f):
    loss = lambda q, k, v: jnp.sum(f(q, k, v, mask=mask) * ct)
    return jax.jit(lambda q, k, v: (f(q, k, v, mask=mask),
                                    jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)

  out, grads = out_and_grads(fn)
  want, want_grads = out_and_grads(ref_fn)
  assert np.abs(np.asarray(want)[1]).min() > 0          # Flax: the mean of V, not 0
  assert rel_err(out, want) < tol(jnp.float32)
  for g, w in zip(grads, want_grads):
    assert rel_err(g, w) < tol(jnp.float32, grad=True)


def test_adapter_needs_the_lse_for_masks():
  def no_lse(q, k, v, *, score_mod=None, mask_mod=None, scale=None):
    return standard_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, scale=scale)

  q = inputs(31, 1, 4, H, 8)
  fn = flax_attention_fn(no_lse)
  assert rel_err(fn(q, q, q), nnx.dot_product_attention(q, q, q)) < tol(jnp.float32)
  with pytest.raises(ValueError, match="return_lse"):
    fn(q, q, q, is_causal=True)
