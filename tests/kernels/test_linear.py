"""linear_attention vs a direct quadratic reference (phi(q) phi(k)^T, normalised) in float64."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.kernels import (alibi_mod, causal_mod, favor_projection, linear_attention,
                            sliding_window_mod, standard_attention)
from tests.helpers import random_qkv, rel_err, tol


def lin(q, k, v, **kw):
  """linear_attention compiled as one program (much faster on CPU than op-by-op dispatch)."""
  return jax.jit(functools.partial(linear_attention, **kw))(q, k, v)


def _features64(x, kind, proj):
  if kind == "elu+1":
    return jnp.where(x > 0, x + 1.0, jnp.exp(x))
  if kind == "relu":
    return jnp.maximum(x, 0.0)
  # FAVOR+ without any stabiliser: the constants the kernel divides out cancel exactly.
  return jnp.exp(x @ proj.T - 0.5 * jnp.sum(x * x, -1, keepdims=True)) / jnp.sqrt(proj.shape[0])


def quadratic_reference(q, k, v, *, causal, kind, scale=None, proj=None, offset=0):
  """float64 ``phi(q) phi(k)^T v / phi(q) phi(k)^T 1`` (JAX, so it can be differentiated);
  causal keeps ``j <= i + offset``."""
  d = q.shape[-1]
  scale = d ** -0.5 if scale is None else scale
  g = q.shape[1] // k.shape[1]
  k, v = jnp.repeat(k, g, 1), jnp.repeat(v, g, 1)
  if kind == "softmax":
    r = scale ** 0.5
    pq, pk = _features64(q * r, kind, proj), _features64(k * r, kind, proj)
  else:
    pq, pk = _features64(q * scale, kind, proj), _features64(k, kind, proj)
  a = pq @ jnp.swapaxes(pk, -1, -2)
  if causal:
    a = a * jnp.tril(jnp.ones(a.shape[-2:], a.dtype), k=offset)
  den = a.sum(-1, keepdims=True)
  ok = den > 0
  return jnp.where(ok, (a @ v) / jnp.where(ok, den, 1.0), 0.0)


def ref64(q, k, v, proj=None, **kw):
  with jax.enable_x64(True):
    up = lambda x: None if x is None else jnp.asarray(np.asarray(x, np.float64))
    f = jax.jit(functools.partial(quadratic_reference, **kw))
    return np.asarray(f(up(q), up(k), up(v), proj=up(proj)))


def ref64_grads(q, k, v, ct, proj=None, **kw):
  with jax.enable_x64(True):
    up = lambda x: None if x is None else jnp.asarray(np.asarray(x, np.float64))
    f = lambda q, k, v, ct, proj: jnp.sum(quadratic_reference(q, k, v, proj=proj, **kw) * ct)
    grads = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(up(q), up(k), up(v), up(ct), up(proj))
    return [np.asarray(g) for g in grads]


PROJ = favor_projection(jax.random.key(42), 48, 16)


def _opts(kind):
  return dict(projection=PROJ) if kind == "softmax" else {}


@pytest.mark.parametrize("kind", ["elu+1", "relu", "softmax"])
# chunk 8 does not divide S = 45; 64 > S is a single chunk (the non-causal form has no chunks).
@pytest.mark.parametrize("causal,chunk", [(False, 8), (True, 8), (True, 64)])
def test_matches_quadratic_reference(kind, causal, chunk):
  q, k, v = random_qkv(1, q_len=45, kv_len=45)
  out = lin(q, k, v, causal=causal, feature_map=kind, chunk_size=chunk, **_opts(kind))
  ref = ref64(q, k, v, causal=causal, kind=kind, proj=PROJ)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert rel_err(out, ref) < tol(jnp.float32)


@pytest.mark.parametrize("kind", ["elu+1", "softmax"])
def test_noncausal_cross_lengths_and_value_dim(kind):
  q, k, v = random_qkv(2, q_len=9, kv_len=31, v_dim=24, q_heads=6, kv_heads=3)
  out = lin(q, k, v, feature_map=kind, scale=0.3, **_opts(kind))
  assert out.shape == (2, 6, 9, 24)
  assert rel_err(out, ref64(q, k, v, causal=False, kind=kind, scale=0.3, proj=PROJ)) < 1e-5


@pytest.mark.parametrize("q_len,kv_len,offset", [
    (9, 31, 22), (12, 7, 0), (10, 10, -3),
    pytest.param(6, 8, 40, marks=pytest.mark.slow), pytest.param(9, 31, 5, marks=pytest.mark.slow)])
def test_causal_mod_offsets_and_cross_lengths(q_len, kv_len, offset):
  """causal_mod(offset): keys before the offset enter as an initial state (decode alignment)."""
  q, k, v = random_qkv(12, q_len=q_len, kv_len=kv_len)
  out = lin(q, k, v, score_mod=causal_mod(offset), chunk_size=4)
  ref = ref64(q, k, v, causal=True, kind="elu+1", offset=offset)
  assert rel_err(out, ref) < tol(jnp.float32)


@pytest.mark.parametrize("kind", ["elu+1", "relu", "softmax"])
@pytest.mark.parametrize("causal", [False, True])
def test_grads(kind, causal):
  q, k, v = random_qkv(3, q_len=21, kv_len=21, q_heads=4, kv_heads=1)
  ct = jax.random.normal(jax.random.key(30), q.shape)
  f = lambda q, k, v: jnp.sum(linear_attention(q, k, v, causal=causal, feature_map=kind,
                                               chunk_size=5, **_opts(kind)) * ct)
  grads = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
  refs = ref64_grads(q, k, v, ct, causal=causal, kind=kind, proj=PROJ)
  for g, r in zip(grads, refs):
    assert np.all(np.isfinite(g))
    assert rel_err(g, r) < tol(jnp.float32, grad=True)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, pytest.param(jnp.float16, marks=pytest.mark.slow)])
def test_low_precision_inputs(dtype):
  q, k, v = random_qkv(4, q_len=40, kv_len=40, dtype=dtype)
  out = lin(q, k, v, causal=True, chunk_size=16)
  assert out.dtype == dtype
  assert rel_err(out, ref64(q, k, v, causal=True, kind="elu+1")) < tol(dtype)


def test_chunk_size_does_not_change_the_result():
  q, k, v = random_qkv(5, q_len=50, kv_len=50)
  outs = [lin(q, k, v, causal=True, chunk_size=c) for c in (1, 7, 128)]
  for o in outs[1:]:
    assert rel_err(o, outs[0]) < 1e-5


def test_causal_mod_is_causal_and_callable_feature_map():
  q, k, v = random_qkv(6, q_len=19, kv_len=19)
  a = lin(q, k, v, causal=True, chunk_size=4)
  b = lin(q, k, v, score_mod=causal_mod(), chunk_size=4)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  phi = lambda x: jnp.where(x > 0, x + 1.0, jnp.exp(x))       # elu+1 written by hand
  c = lin(q, k, v, causal=True, feature_map=phi, chunk_size=4)
  np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-6)


def test_relu_row_with_no_features_gives_zero():
  q, k, v = random_qkv(7, q_len=8, kv_len=8)
  q = q.at[:, :, 0].set(-jnp.abs(q[:, :, 0]))                 # relu(q_0) = 0: nothing seen
  for causal in (False, True):
    out = lin(q, k, v, causal=causal, feature_map="relu", chunk_size=3)
    assert np.all(np.isfinite(out)) and np.all(np.asarray(out[:, :, 0]) == 0)
    g = jax.jit(jax.grad(lambda q: linear_attention(q, k, v, causal=causal,
                                                    feature_map="relu").sum()))(q)
    assert np.all(np.isfinite(g))


def test_favor_plus_approximates_softmax_attention():
  """FAVOR+ is a Monte-Carlo estimator of exp(q.k): its error shrinks like 1/sqrt(F).

  Not a kernel-accuracy test (those compare with the exact quadratic form above): small-norm
  inputs keep the estimator's variance moderate, and 4096 features bring the output within 10%.
  """
  q, k, v = random_qkv(8, q_len=45, kv_len=45)
  q, k = 0.5 * q, 0.5 * k
  ref = standard_attention(q, k, v)
  errs = [rel_err(lin(q, k, v, feature_map="softmax", key=jax.random.key(1),
                                   num_features=m), ref) for m in (16, 4096)]
  assert errs[1] < 0.1 and errs[1] < errs[0] / 3


def test_orthogonal_projection_rows():
  p = favor_projection(jax.random.key(0), 40, 16)
  assert p.shape == (40, 16)
  block = np.asarray(p[:16])
  gram = block @ block.T
  np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-4)


def test_jit_and_vmap():
  q, k, v = random_qkv(9, q_len=12, kv_len=12)
  f = jax.jit(lambda q, k, v: linear_attention(q, k, v, causal=True, chunk_size=5))
  out = f(q, k, v)
  vm = jax.jit(jax.vmap(lambda q, k, v: linear_attention(q[None], k[None], v[None], causal=True,
                                                         chunk_size=5)[0]))(q, k, v)
  np.testing.assert_allclose(out, vm, rtol=1e-6, atol=1e-6)


def test_errors_name_the_problem():
  q, k, v = random_qkv(10, q_len=8, kv_len=8)
  with pytest.raises(ValueError, match="return_lse"):
    linear_attention(q, k, v, return_lse=True)
  with pytest.raises(ValueError, match="score_mod"):
    linear_attention(q, k, v, score_mod=alibi_mod(num_heads=4))
  with pytest.raises(ValueError, match="SlidingWindow"):
    linear_attention(q, k, v, score_mod=sliding_window_mod(4))
  with pytest.raises(ValueError, match="mask"):
    linear_attention(q, k, v, mask_mod=lambda b, h, i, j: j <= i)
  with pytest.raises(ValueError, match="key="):
    linear_attention(q, k, v, feature_map="softmax")
  with pytest.raises(ValueError, match="feature_map"):
    linear_attention(q, k, v, feature_map="tanh")
  with pytest.raises(ValueError, match="multiple of kv heads"):
    linear_attention(*random_qkv(10, q_heads=3, kv_heads=2))


@pytest.mark.parametrize("causal", [False, True])
def test_nan_input_propagates(causal):
  """NaN in one query row gives NaN in that row (not 0); the other rows stay finite."""
  q, k, v = random_qkv(90, batch=1, q_heads=2, kv_heads=1, q_len=12, kv_len=12, head_dim=8)
  q = q.at[0, 1, 4, 0].set(jnp.nan)
  out = np.asarray(linear_attention(q, k, v, causal=causal))
  assert np.isnan(out[0, 1, 4]).all()
  rest = np.ones(out.shape[:3], bool)
  rest[0, 1, 4] = False
  assert np.isfinite(out[rest]).all()
