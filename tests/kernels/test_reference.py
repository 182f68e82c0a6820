"""Tests for attnax.kernels.standard_attention, the reference every other kernel is tested against.

Two independent checks: ``jax.nn.dot_product_attention`` (layout ``(B, S, H, D)``, so inputs are
transposed) for the cases it covers, and the float64 evaluation of ``standard_attention``
(``tests.helpers.reference_attention``) for dtypes, gradients and edge cases.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.kernels import score_mods as sm
from attnax.kernels import standard_attention as _standard_attention
from tests import helpers
from tests.helpers import rel_err, tol, rand, random_qkv


# CPU compile time dominates this file. Everything runs under jit (one compile per configuration
# instead of one per primitive and shape): mods are pytree arguments, a mask_mod lambda and the
# settings are static.
_STATIC = ("mask_mod", "scale", "return_lse", "dropout_rate", "precision")
standard_attention = jax.jit(_standard_attention, static_argnames=_STATIC)


def reference_attention(q, k, v, **kwargs):
  """tests.helpers.reference_attention (float64 standard_attention), jitted."""
  with jax.enable_x64(True):
    up = lambda x: jnp.asarray(np.asarray(x, np.float64))
    out = standard_attention(up(q), up(k), up(v), **kwargs)
    return jax.tree.map(lambda x: np.asarray(x, np.float64), out)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _grads(q, k, v, ct, **kwargs):
  return helpers.kernel_grads(_standard_attention, q, k, v, ct, **kwargs)


def kernel_grads(kernel, q, k, v, ct, **kwargs):
  """tests.helpers.kernel_grads for standard_attention, jitted."""
  assert kernel is standard_attention
  return _grads(q, k, v, ct, **kwargs)


def reference_grads(q, k, v, ct, **kwargs):
  """tests.helpers.reference_grads (float64), jitted."""
  with jax.enable_x64(True):
    up = lambda x: jnp.asarray(np.asarray(x, np.float64))
    grads = _grads(up(q), up(k), up(v), up(ct), **kwargs)
    return tuple(np.asarray(g, np.float64) for g in grads)

# One shape for most of the file (eager JAX compiles each primitive once per shape).
B, HQ, HKV, SQ, SK, D = 2, 4, 2, 37, 45, 16
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def qkv(seed, dtype=jnp.float32, q_heads=HQ, kv_heads=HKV, q_len=SQ, kv_len=SK, scale=1.0,
        v_dim=None):
  return random_qkv(seed, batch=B, q_heads=q_heads, kv_heads=kv_heads, q_len=q_len,
                    kv_len=kv_len, head_dim=D, v_dim=v_dim, dtype=dtype, scale=scale)


def bshd(x):
  """(B, H, S, D) <-> (B, S, H, D)."""
  return jnp.swapaxes(x, 1, 2)


@functools.partial(jax.jit, static_argnames=("is_causal", "local_window_size", "return_residual",
                                             "scale"))
def jax_attention(q, k, v, **kwargs):
  """jax.nn.dot_product_attention in attnax's layout; with return_residual, lse is (B, H, S)."""
  r = jax.nn.dot_product_attention(bshd(q), bshd(k), bshd(v), implementation="xla", **kwargs)
  if kwargs.get("return_residual"):
    return bshd(r[0]), bshd(r[1][..., None])[..., 0]
  return bshd(r)


# ----------------------------------------------------------------------------- vs jax.nn


def test_plain_matches_jax_nn_with_lse():
  q, k, v = qkv(0)
  out, lse = standard_attention(q, k, v, return_lse=True)
  ref_out, ref_lse = jax_attention(q, k, v, return_residual=True)
  assert out.shape == (B, HQ, SQ, D) and lse.shape == (B, HQ, SQ)
  assert rel_err(out, ref_out) < tol(jnp.float32)
  assert rel_err(lse, ref_lse) < tol(jnp.float32)


def test_causal_matches_jax_nn():
  for sq, sk in ((SQ, SK), (SK, SQ)):
    q, k, v = qkv(1, q_len=sq, kv_len=sk)
    out, lse = standard_attention(q, k, v, score_mod=sm.causal_mod(), return_lse=True)
    ref_out, ref_lse = jax_attention(q, k, v, is_causal=True, return_residual=True)
    assert rel_err(out, ref_out) < tol(jnp.float32)
    assert rel_err(lse, ref_lse) < tol(jnp.float32)


@pytest.mark.parametrize("window", [pytest.param(1, marks=pytest.mark.slow), 4,
                                    pytest.param(16, marks=pytest.mark.slow)])
def test_sliding_window_matches_jax_nn_local_window(window):
  q, k, v = qkv(2, kv_len=SQ)
  out = standard_attention(q, k, v, score_mod=sm.sliding_window_mod(window))
  # jax's (left, right) window: keys i - left .. i + right.
  ref = jax_attention(q, k, v, local_window_size=(window - 1, 0))
  assert rel_err(out, ref) < tol(jnp.float32)


def test_two_sided_window_mask_mod_matches_jax_nn():
  q, k, v = qkv(3)
  out = standard_attention(q, k, v, mask_mod=lambda b, h, i, j: (j >= i - 3) & (j <= i + 5))
  ref = jax_attention(q, k, v, local_window_size=(3, 5))
  assert rel_err(out, ref) < tol(jnp.float32)


@pytest.mark.parametrize("bias_shape", [(B, HQ, SQ, SK),
                                        pytest.param((1, HQ, SQ, SK), marks=pytest.mark.slow),
                                        pytest.param((B, 1, 1, SK), marks=pytest.mark.slow)])
def test_bias_matches_jax_nn(bias_shape):
  q, k, v = qkv(4)
  bias = 2.0 * rand(5, bias_shape)
  out, lse = standard_attention(q, k, v, score_mod=sm.additive_bias_mod(bias), return_lse=True)
  ref_out, ref_lse = jax_attention(q, k, v, bias=bias, return_residual=True)
  assert rel_err(out, ref_out) < tol(jnp.float32)
  assert rel_err(lse, ref_lse) < tol(jnp.float32)


def test_bias_gradient_matches_jax_nn():
  """Mods are pytrees: jax.grad flows into a bias carried by additive_bias_mod."""
  q, k, v = qkv(6)
  bias = rand(7, (1, HQ, SQ, SK))
  ct = rand(8, (B, HQ, SQ, D))
  ours = jax.jit(jax.grad(lambda bias, q: jnp.sum(_standard_attention(
      q, k, v, score_mod=sm.additive_bias_mod(bias)) * ct), argnums=(0, 1)))(bias, q)
  ref = jax.jit(jax.grad(lambda bias, q: jnp.sum(jax_attention(q, k, v, bias=bias) * ct),
                         argnums=(0, 1)))(bias, q)
  for a, b in zip(ours, ref):
    assert rel_err(a, b) < tol(jnp.float32, grad=True)


def test_boolean_mask_matches_jax_nn():
  q, k, v = qkv(9)
  mask = np.random.default_rng(10).random((B, HQ, SQ, SK)) < 0.6
  mask[..., 0] = True  # jax.nn gives masked-out rows a uniform average: avoid them
  mask = jnp.asarray(mask)
  out = standard_attention(q, k, v, mask_mod=lambda b, h, i, j: mask[b, h, i, j])
  ref = jax_attention(q, k, v, mask=mask)
  assert rel_err(out, ref) < tol(jnp.float32)


@pytest.mark.parametrize("hq,hkv", [(4, 1), (4, 2), pytest.param(4, 4, marks=pytest.mark.slow)])
def test_gqa_matches_jax_nn(hq, hkv):
  q, k, v = qkv(11, q_heads=hq, kv_heads=hkv)
  out, lse = standard_attention(q, k, v, score_mod=sm.causal_mod(), return_lse=True)
  ref_out, ref_lse = jax_attention(q, k, v, is_causal=True, return_residual=True)
  assert rel_err(out, ref_out) < tol(jnp.float32)
  assert rel_err(lse, ref_lse) < tol(jnp.float32)
  # (jax.nn's grouping is attnax's: query head h reads kv head h // (Hq // Hkv).)


def test_scale_matches_jax_nn():
  q, k, v = qkv(12)
  out, lse = standard_attention(q, k, v, scale=0.37, return_lse=True)
  ref_out, ref_lse = jax_attention(q, k, v, scale=0.37, return_residual=True)
  assert rel_err(out, ref_out) < tol(jnp.float32)
  assert rel_err(lse, ref_lse) < tol(jnp.float32)


def test_value_dim_differs_from_head_dim():
  # jax.nn requires Dv == D: float64 reference only.
  q, k, v = qkv(12, v_dim=24)
  out = standard_attention(q, k, v, score_mod=sm.causal_mod(SK - SQ))
  assert out.shape == (B, HQ, SQ, 24)
  assert rel_err(out, reference_attention(q, k, v, score_mod=sm.causal_mod(SK - SQ))) < tol(
      jnp.float32)


# ----------------------------------------------------------------------------- vs float64


def _mods():
  ids = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 3, (B, SK))), jnp.int32)
  return {
      "none": None,
      "causal_br": sm.causal_mod(SK - SQ),
      "alibi_window": sm.compose_score_mods(sm.alibi_mod(num_heads=HQ),
                                            sm.sliding_window_mod(9, offset=SK - SQ)),
      "document_bias": sm.compose_score_mods(
          sm.document_mask_mod(ids[:, :SQ], ids), sm.additive_bias_mod(rand(13, (SQ, SK)))),
      "prefix": sm.prefix_lm_mod(jnp.array([4, 30])),
  }


def _dtype_mod_params(mods, fast):
  """The dtype x mod cross product; pairs not in ``fast`` are marked slow (each pair costs CPU
  compile time; the fast pairs cover every dtype and the composed mods)."""
  params = []
  for dtype in DTYPES:
    for mod in mods:
      fast_ = (jnp.dtype(dtype).name, mod) in fast
      params.append(pytest.param(dtype, mod, id=f"{jnp.dtype(dtype).name}-{mod}",
                                 marks=() if fast_ else pytest.mark.slow))
  return params


@pytest.mark.parametrize("dtype,mod", _dtype_mod_params(list(_mods()), (
    ("float32", "document_bias"), ("float32", "prefix"), ("bfloat16", "alibi_window"),
    ("float16", "document_bias"))))
def test_dtypes_vs_float64(dtype, mod):
  score_mod = _mods()[mod]
  q, k, v = qkv(14, dtype)
  out, lse = standard_attention(q, k, v, score_mod=score_mod, return_lse=True)
  assert out.dtype == dtype and lse.dtype == jnp.float32
  ref_out, ref_lse = reference_attention(q, k, v, score_mod=score_mod, return_lse=True)
  assert rel_err(out, ref_out) < tol(dtype)
  assert rel_err(lse, ref_lse) < tol(dtype)


@pytest.mark.parametrize("dtype,mod", _dtype_mod_params(
    ["none", "causal_br", "alibi_window", "document_bias"],
    (("float32", "alibi_window"), ("float32", "document_bias"), ("bfloat16", "alibi_window"),
     ("float16", "causal_br"))))
def test_gradients_vs_float64(dtype, mod):
  score_mod = _mods()[mod]
  q, k, v = qkv(15, dtype)
  ct = rand(16, (B, HQ, SQ, D)).astype(dtype)
  grads = kernel_grads(standard_attention, q, k, v, ct, score_mod=score_mod)
  ref = reference_grads(q, k, v, ct, score_mod=score_mod)
  for name, g, r in zip("qkv", grads, ref):
    assert g.dtype == dtype
    assert rel_err(g, r) < tol(dtype, grad=True), name


def test_sq_ne_sk_and_single_query():
  for sq in (1, SK):   # decode (one query, bottom-right) and Sq > Sk (rows before the keys empty)
    q, k, v = qkv(19, q_len=sq, kv_len=SK if sq == 1 else SQ)
    offset = SK - sq if sq == 1 else SQ - sq
    out, lse = standard_attention(q, k, v, score_mod=sm.causal_mod(offset), return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, score_mod=sm.causal_mod(offset),
                                           return_lse=True)
    fin = np.isfinite(ref_lse)
    assert rel_err(out, ref_out) < tol(jnp.float32)
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), fin)
    assert rel_err(np.asarray(lse)[fin], ref_lse[fin]) < tol(jnp.float32)


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow),
                                   pytest.param(jnp.float16, marks=pytest.mark.slow)],
                         ids=lambda d: jnp.dtype(d).name)
def test_fully_masked_rows(dtype):
  """Rows with no visible key: out 0, lse -inf, zero gradients; no NaN anywhere."""
  q, k, v = qkv(20, dtype)
  dead = np.zeros(SQ, bool)
  dead[[0, 5, 6, SQ - 1]] = True
  dead_j = jnp.asarray(dead)
  mask_mod = lambda b, h, i, j: ~dead_j[i] & ((j + i) % 4 != 0)
  score_mod = sm.alibi_mod(num_heads=HQ)
  out, lse = standard_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, return_lse=True)
  out, lse = np.asarray(out, np.float32), np.asarray(lse)
  assert not np.isnan(out).any() and not np.isnan(lse).any()
  assert (out[:, :, dead] == 0).all() and np.isneginf(lse[:, :, dead]).all()
  assert np.isfinite(lse[:, :, ~dead]).all()
  ref_out, ref_lse = reference_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod,
                                         return_lse=True)
  assert rel_err(out, ref_out) < tol(dtype)
  assert rel_err(lse[:, :, ~dead], ref_lse[:, :, ~dead]) < tol(dtype)

  ct = rand(21, (B, HQ, SQ, D)).astype(dtype)
  grads = kernel_grads(standard_attention, q, k, v, ct, score_mod=score_mod, mask_mod=mask_mod)
  ref = reference_grads(q, k, v, ct, score_mod=score_mod, mask_mod=mask_mod)
  for g, r in zip(grads, ref):
    assert np.isfinite(np.asarray(g, np.float32)).all()
    assert rel_err(g, r) < tol(dtype, grad=True)
  assert (np.asarray(grads[0], np.float32)[:, :, dead] == 0).all()


def test_everything_masked():
  q, k, v = qkv(22)
  never = sm.causal_mod(-SQ - 1)      # j <= i - Sq - 1: nothing
  out, lse = standard_attention(q, k, v, score_mod=never, return_lse=True)
  assert (np.asarray(out) == 0).all() and np.isneginf(np.asarray(lse)).all()
  ct = rand(23, (B, HQ, SQ, D))

  def loss(q, k, v):
    out, lse = _standard_attention(q, k, v, score_mod=never, return_lse=True)
    return jnp.sum(out * ct) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  for g in jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v):
    assert (np.asarray(g) == 0).all()


def test_masked_key_with_huge_score_does_not_leak():
  """A masked key whose score is far larger than every visible one must get probability 0."""
  q, k, v = qkv(24)
  k = k.at[:, :, 3].set(50.0 * q[:, ::2].mean(2))   # key 3 dominates every logit
  v = v.at[:, :, 3].set(1e4)
  mask_mod = lambda b, h, i, j: j != 3
  out = standard_attention(q, k, v, mask_mod=mask_mod)
  keep = np.arange(SK) != 3
  ref_np = jax_attention(q, k[:, :, keep], v[:, :, keep])
  assert rel_err(out, ref_np) < tol(jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16,
                                   pytest.param(jnp.float16, marks=pytest.mark.slow)],
                         ids=lambda d: jnp.dtype(d).name)
def test_large_magnitude_logits(dtype):
  """q scaled by 30 (logits in the hundreds): finite and accurate, forward and backward."""
  q, k, v = qkv(25, dtype, scale=30.0)
  mod = sm.causal_mod(SK - SQ)
  out, lse = standard_attention(q, k, v, score_mod=mod, return_lse=True)
  assert np.isfinite(np.asarray(out, np.float32)).all() and np.isfinite(np.asarray(lse)).all()
  ref_out, ref_lse = reference_attention(q, k, v, score_mod=mod, return_lse=True)
  assert np.abs(ref_lse).max() > 100  # the test really exercises large logits
  assert rel_err(out, ref_out) < tol(dtype)
  assert rel_err(lse, ref_lse) < tol(dtype)
  if dtype == jnp.float32:
    ct = rand(26, (B, HQ, SQ, D))
    grads = kernel_grads(standard_attention, q, k, v, ct, score_mod=mod)
    ref = reference_grads(q, k, v, ct, score_mod=mod)
    for g, r in zip(grads, ref):
      assert np.isfinite(np.asarray(g)).all()
      assert rel_err(g, r) < tol(dtype, grad=True)


# ----------------------------------------------------------------------------- transformations


def test_eager_matches_float64():
  """Everything else in this file runs under jit (mods as pytree arguments); this runs eagerly."""
  q, k, v = qkv(27)
  mod = _mods()["alibi_window"]
  out, lse = _standard_attention(q, k, v, score_mod=mod, return_lse=True)
  ref_out, ref_lse = reference_attention(q, k, v, score_mod=mod, return_lse=True)
  assert rel_err(out, ref_out) < tol(jnp.float32)
  assert rel_err(lse, ref_lse) < tol(jnp.float32)


def test_vmap_over_extra_axis():
  qs, ks, vs = zip(*[qkv(28 + n) for n in range(3)])
  q, k, v = jnp.stack(qs), jnp.stack(ks), jnp.stack(vs)       # (3, B, H, S, D)
  mod = sm.causal_mod(SK - SQ)
  f = lambda q, k, v: _standard_attention(q, k, v, score_mod=mod, return_lse=True)
  out, lse = jax.jit(jax.vmap(f))(q, k, v)
  assert out.shape == (3, B, HQ, SQ, D) and lse.shape == (3, B, HQ, SQ)
  for n in range(3):
    o, l = f(qs[n], ks[n], vs[n])
    np.testing.assert_allclose(np.asarray(out[n]), np.asarray(o), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(lse[n]), np.asarray(l), rtol=1e-5, atol=1e-6)
  # vmap over a head axis of a 3-D problem gives the same as the batched call.
  out_h = jax.jit(jax.vmap(lambda q, k, v: f(q[None], k[None], v[None])[0][0]))(
      qs[0], ks[0], vs[0])
  np.testing.assert_allclose(np.asarray(out_h), np.asarray(f(qs[0], ks[0], vs[0])[0]),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_precision_highest():
  q, k, v = qkv(31)
  out = standard_attention(q, k, v, precision=jax.lax.Precision.HIGHEST)
  assert rel_err(out, reference_attention(q, k, v)) < tol(jnp.float32)


# ----------------------------------------------------------------------------- dropout


def test_dropout():
  q, k, v = qkv(32)
  no = standard_attention(q, k, v)
  np.testing.assert_array_equal(
      np.asarray(standard_attention(q, k, v, dropout_rate=0.0, dropout_rng=jax.random.key(33))),
      np.asarray(no))
  # 64 copies of the problem along the batch axis draw 64 independent dropout masks in one call
  # (vmapping over keys compiles far slower on CPU).
  reps = 64
  qr, kr, vr = (jnp.asarray(np.tile(np.asarray(x), (reps, 1, 1, 1))) for x in (q, k, v))
  f = jax.jit(lambda key: _standard_attention(qr, kr, vr, dropout_rate=0.3, dropout_rng=key))
  key = jax.random.key(35)
  samples = f(key)
  # deterministic per key, different across keys and across the copies
  np.testing.assert_array_equal(np.asarray(f(key)), np.asarray(samples))
  assert not np.allclose(np.asarray(f(jax.random.key(36))), np.asarray(samples))
  samples = np.asarray(samples).reshape((reps,) + no.shape)
  assert not np.allclose(samples[0], samples[1])
  # Inverted dropout is unbiased: the mean over the copies approaches the dropout-free output.
  # Monte-Carlo error ~ sqrt(0.3 / 0.7 / 64) ~ 0.08 of the typical term: a statistical bound.
  assert rel_err(samples.mean(0), no) < 0.15
  with pytest.raises(ValueError, match="dropout_rng"):
    _standard_attention(q, k, v, dropout_rate=0.3)
  with pytest.raises(ValueError, match="dropout_rate"):
    _standard_attention(q, k, v, dropout_rate=1.0, dropout_rng=key)
