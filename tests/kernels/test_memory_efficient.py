"""memory_efficient_attention vs the float64 reference.

The mod cases and the generic checks defined here (``MOD_CASES``, ``check_*``) are shared with
``test_flash.py``: each check takes the kernel (with its small chunk / block options bound) as its
first argument.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.kernels import (
    additive_bias_mod, alibi_mod, causal_mod, compose_score_mods, document_mask_mod,
    memory_efficient_attention, prefix_lm_mod, sliding_window_mod,
)
from tests.helpers import (
    random_qkv, reference_attention, reference_grads, rel_err, tol,
)

# Small chunks so that every test walks several chunks and a remainder chunk.
KERNEL = functools.partial(memory_efficient_attention, query_chunk_size=16, key_chunk_size=16)


# ----------------------------------------------------------------------------- shared cases


def _doc_ids(seed, batch, length, ndocs=3):
  """Sorted random document ids ``(batch, length)`` (packed documents)."""
  ids = jax.random.randint(jax.random.key(seed), (batch, length), 0, ndocs)
  return jnp.sort(ids, axis=-1).astype(jnp.int32)


def _user_mask(b, h, q_idx, kv_idx):
  """A user mask mod with no tile rule, depending on the head: evaluated tile by tile."""
  return ((q_idx + 2 * kv_idx + h) % 3 != 0) | (kv_idx == 0)


def _softcap(score, b, h, q_idx, kv_idx):
  """A user score mod that is not additive (its derivative is not 1)."""
  return 8.0 * jnp.tanh(score / 8.0) + 0.01 * (q_idx - kv_idx).astype(score.dtype)


def mod_cases():
  """name -> builder ``(batch, q_heads, q_len, kv_len) -> kwargs`` for the kernel."""
  return {
      "none": lambda b, h, sq, sk: {},
      "causal": lambda b, h, sq, sk: dict(score_mod=causal_mod()),
      "causal_bottom_right": lambda b, h, sq, sk: dict(score_mod=causal_mod(offset=sk - sq)),
      "sliding_window": lambda b, h, sq, sk: dict(score_mod=sliding_window_mod(9)),
      "prefix_lm": lambda b, h, sq, sk: dict(score_mod=prefix_lm_mod(jnp.array([5, 21][:b]))),
      "document": lambda b, h, sq, sk: dict(score_mod=document_mask_mod(
          _doc_ids(7, b, sq), _doc_ids(8, b, sk))),
      "alibi": lambda b, h, sq, sk: dict(score_mod=alibi_mod(num_heads=h)),
      "additive_bias": lambda b, h, sq, sk: dict(score_mod=additive_bias_mod(
          jax.random.normal(jax.random.key(9), (b, h, sq, sk)))),
      "user_score_mod": lambda b, h, sq, sk: dict(score_mod=_softcap),
      "user_mask_mod": lambda b, h, sq, sk: dict(mask_mod=_user_mask),
      "compose": lambda b, h, sq, sk: dict(score_mod=compose_score_mods(
          alibi_mod(num_heads=h), sliding_window_mod(20, offset=sk - sq),
          document_mask_mod(_doc_ids(3, 1, sq, 2), _doc_ids(4, 1, sk, 2)))),
      "compose_with_mask_mod": lambda b, h, sq, sk: dict(
          score_mod=compose_score_mods(_softcap, causal_mod(offset=sk - sq)),
          mask_mod=_user_mask),
  }


MOD_CASES = mod_cases()
SHAPES = {  # (batch, q_heads, kv_heads, q_len, kv_len)
    "mha_ragged": (2, 4, 4, 37, 45),
    "gqa": (2, 4, 2, 40, 33),
    "mqa": (1, 4, 1, 29, 64),
}


def run_kernel(kernel, q, k, v, ct, mods):
  """One jitted call: ``(out, lse, (dq, dk, dv))`` with the gradients of ``sum(out * ct)``."""
  def f(q, k, v):
    (out, lse), vjp = jax.vjp(lambda q, k, v: kernel(q, k, v, return_lse=True, **mods), q, k, v)
    return out, lse, vjp((ct, jnp.zeros_like(lse)))
  return jax.jit(f)(q, k, v)


def check_case(kernel, seed, shape, dtype, mods, scale=1.0, grads=True):
  """Output, LSE and (optionally) gradients vs the float64 reference."""
  b, hq, hkv, sq, sk = shape
  q, k, v = random_qkv(seed, b, hq, hkv, sq, sk, head_dim=16, dtype=dtype, scale=scale)
  ct = jax.random.normal(jax.random.key(seed + 100), (b, hq, sq, 16)).astype(dtype)
  out, lse, gs = run_kernel(kernel, q, k, v, ct, mods)
  ref_out, ref_lse = reference_attention(q, k, v, return_lse=True, **mods)
  assert out.shape == ref_out.shape and out.dtype == q.dtype
  assert lse.shape == (b, hq, sq) and lse.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
  assert rel_err(out, ref_out) < tol(dtype), rel_err(out, ref_out)
  fin = np.isfinite(ref_lse)
  assert rel_err(np.asarray(lse)[fin], ref_lse[fin]) < tol(dtype)
  if not grads:
    return
  refs = reference_grads(q, k, v, ct, **mods)
  for name, g, r in zip("qkv", gs, refs):
    assert g.shape == r.shape and g.dtype == q.dtype, name
    assert np.all(np.isfinite(np.asarray(g, np.float32))), name
    assert rel_err(g, r) < tol(dtype, grad=True), (name, rel_err(g, r))


def check_lse_grad(kernel):
  """Gradients through both outputs: ``sum(out * ct) + sum(lse * ct_lse)``."""
  q, k, v = random_qkv(61, 2, 4, 2, 30, 40, head_dim=16)
  ct = jax.random.normal(jax.random.key(62), (2, 4, 30, 16))
  ct_lse = jax.random.normal(jax.random.key(63), (2, 4, 30))
  mods = dict(score_mod=compose_score_mods(alibi_mod(num_heads=4), causal_mod(offset=10)))

  def loss(attn, q, k, v):
    out, lse = attn(q, k, v, return_lse=True, **mods)
    return jnp.sum(out * ct) + jnp.sum(lse * ct_lse)

  grads = jax.jit(jax.grad(lambda q, k, v: loss(kernel, q, k, v), argnums=(0, 1, 2)))(q, k, v)
  with jax.enable_x64(True):
    from attnax.kernels import standard_attention
    up = lambda x: jnp.asarray(np.asarray(x, np.float64))
    refs = jax.grad(lambda q, k, v: loss(standard_attention, q, k, v), argnums=(0, 1, 2))(
        up(q), up(k), up(v))
  for g, r in zip(grads, refs):
    assert rel_err(g, r) < tol(jnp.float32, grad=True)


def check_empty_rows(kernel):
  """Rows that see no key: output 0, lse -inf, zero and finite gradients."""
  q, k, v = random_qkv(11, 2, 4, 2, 24, 40, head_dim=16)
  ct = jax.random.normal(jax.random.key(5), (2, 4, 24, 16))
  mods = dict(score_mod=causal_mod(offset=-5))   # the first 5 queries see nothing
  out, lse, grads = run_kernel(kernel, q, k, v, ct, mods)
  ref_out = reference_attention(q, k, v, **mods)
  np.testing.assert_array_equal(np.asarray(out[:, :, :5]), 0.0)
  assert np.all(np.isneginf(np.asarray(lse[:, :, :5])))
  assert np.all(np.isfinite(np.asarray(lse[:, :, 5:])))
  assert rel_err(out, ref_out) < tol(jnp.float32)
  for g, r in zip(grads, reference_grads(q, k, v, ct, **mods)):
    assert np.all(np.isfinite(np.asarray(g)))
    assert rel_err(g, r) < tol(jnp.float32, grad=True)
  np.testing.assert_array_equal(np.asarray(grads[0][:, :, :5]), 0.0)
  # Every row empty (documents that never meet): zeros everywhere, still no NaN.
  mods = dict(score_mod=document_mask_mod(jnp.zeros((24,), jnp.int32), jnp.ones((40,), jnp.int32)))
  out, lse, grads = run_kernel(kernel, q, k, v, ct, mods)
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  assert np.all(np.isneginf(np.asarray(lse)))
  for g in grads:
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def check_jit_vmap(kernel):
  q, k, v = random_qkv(21, 2, 4, 2, 24, 40, head_dim=16)
  ids = _doc_ids(22, 2, 24)
  kv_ids = _doc_ids(22, 2, 40)   # same draw: prefixes agree, so most rows see keys
  # jit, with a mod carrying traced arrays passed as an argument.
  f = jax.jit(lambda q, k, v, mod: kernel(q, k, v, score_mod=mod))
  mod = document_mask_mod(ids, kv_ids)
  assert rel_err(f(q, k, v, mod), reference_attention(q, k, v, score_mod=mod)) < tol(jnp.float32)
  # vmap over an extra leading axis of q/k/v and of the document ids.
  qs, ks, vs = (jnp.stack([x, x[::-1]]) for x in (q, k, v))
  id_stack = jnp.stack([ids, ids[:, ::-1]])
  g = jax.vmap(lambda q, k, v, i: kernel(q, k, v, score_mod=document_mask_mod(i, kv_ids)))
  out = g(qs, ks, vs, id_stack)
  for n in range(2):
    ref = reference_attention(qs[n], ks[n], vs[n], score_mod=document_mask_mod(id_stack[n], kv_ids))
    assert rel_err(out[n], ref) < tol(jnp.float32)
  # grad under jit and vmap together.
  ct = jax.random.normal(jax.random.key(23), (2,) + q.shape)
  loss = lambda q, k, v: jnp.sum(jax.vmap(functools.partial(kernel, score_mod=causal_mod()))(
      q, k, v) * ct)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(qs, ks, vs)
  for n in range(2):
    refs = reference_grads(qs[n], ks[n], vs[n], ct[n], score_mod=causal_mod())
    for g_, r in zip(grads, refs):
      assert rel_err(g_[n], r) < tol(jnp.float32, grad=True)


def check_closure_lambda(kernel):
  """A user lambda that closes over an array vmapped / traced by the caller."""
  q, k, v = random_qkv(31, 1, 2, 2, 20, 24, head_dim=16)
  biases = jax.random.normal(jax.random.key(32), (3, 20, 24))
  f = lambda bias: kernel(q, k, v, score_mod=lambda s, b, h, i, j: s + bias[i, j])
  out = jax.jit(jax.vmap(f))(biases)
  for n in range(3):
    bias = np.asarray(biases[n], np.float64)
    ref = reference_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + bias[i, j])
    assert rel_err(out[n], ref) < tol(jnp.float32)
  # Differentiating q while the lambda closes over a traced array.
  gq = jax.grad(lambda q, bias: jnp.sum(kernel(
      q, k, v, score_mod=lambda s, b, h, i, j: s + bias[i, j]) ** 2))(q, biases[0])
  bias0 = np.asarray(biases[0], np.float64)
  with jax.enable_x64(True):
    from attnax.kernels import standard_attention
    up = lambda x: jnp.asarray(np.asarray(x, np.float64))
    ref = jax.grad(lambda q: jnp.sum(standard_attention(
        q, up(k), up(v), score_mod=lambda s, b, h, i, j: s + bias0[i, j]) ** 2))(up(q))
  assert rel_err(gq, ref) < tol(jnp.float32, grad=True)


def check_against_jax_nn(kernel):
  """Independent code: jax.nn.dot_product_attention (layout (B, S, N, H)), causal and window."""
  q, k, v = random_qkv(41, 2, 4, 2, 48, 48, head_dim=16)
  t = lambda x: jnp.swapaxes(x, 1, 2)
  ref = t(jax.nn.dot_product_attention(t(q), t(k), t(v), is_causal=True, implementation="xla"))
  assert rel_err(kernel(q, k, v, score_mod=causal_mod()), ref) < tol(jnp.float32)
  ref = t(jax.nn.dot_product_attention(t(q), t(k), t(v), local_window_size=(6, 0),
                                       implementation="xla"))
  assert rel_err(kernel(q, k, v, score_mod=sliding_window_mod(7)), ref) < tol(jnp.float32)


def check_bad_inputs(kernel):
  q, k, v = random_qkv(51, 1, 4, 2, 8, 8, head_dim=16)
  bad = [
      (q[0], k, v),                                  # rank
      (q, k[..., :8], v),                            # head_dim mismatch
      (q[:, :3], k, v),                              # Hq % Hkv
      (q, k, v[:, :, :5]),                           # Sk mismatch
      (jnp.concatenate([q, q]), k, v),               # batch mismatch
      (q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32)),   # dtype
      (q, k.astype(jnp.bfloat16), v),                # mixed dtypes
  ]
  for args in bad:
    with pytest.raises(ValueError):
      kernel(*args)
  with pytest.raises(ValueError, match="score_mod"):
    kernel(q, k, v, score_mod=lambda s, b: s)
  with pytest.raises(ValueError, match="mask_mod"):
    kernel(q, k, v, mask_mod=lambda b, h, i: True)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("mod", sorted(MOD_CASES))
def test_mods(mod):
  """Every mod and composition: output, LSE and gradients (GQA, Sq != Sk, ragged)."""
  b, hq, hkv, sq, sk = SHAPES["gqa"]
  check_case(KERNEL, 0, SHAPES["gqa"], jnp.float32, MOD_CASES[mod](b, hq, sq, sk))


@pytest.mark.parametrize("mod", ["causal_bottom_right", "user_mask_mod", "compose"])
@pytest.mark.parametrize("shape", ["mha_ragged", "mqa"])
def test_shapes(shape, mod):
  b, hq, hkv, sq, sk = SHAPES[shape]
  check_case(KERNEL, 1, SHAPES[shape], jnp.float32, MOD_CASES[mod](b, hq, sq, sk))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("mod", ["none", "compose"])
def test_low_precision(dtype, mod):
  b, hq, hkv, sq, sk = SHAPES["gqa"]
  check_case(KERNEL, 2, SHAPES["gqa"], dtype, MOD_CASES[mod](b, hq, sq, sk))


@pytest.mark.parametrize("chunks", [(1024, 4096), (7, 5), (37, 45)])
def test_chunk_sizes(chunks):
  """One chunk; many tiny chunks with overlapping last chunks; exact multiples."""
  kernel = functools.partial(memory_efficient_attention, query_chunk_size=chunks[0],
                             key_chunk_size=chunks[1])
  b, hq, hkv, sq, sk = SHAPES["mha_ragged"]
  check_case(kernel, 4, SHAPES["mha_ragged"], jnp.float32, MOD_CASES["compose"](b, hq, sq, sk))


def test_large_logits():
  """Logits in the hundreds: the running max keeps exp from overflowing.

  Gradients are checked at logits of a few tens: at hundreds, f32 rounding of the logits alone
  (also in f32 standard_attention) brings the gradient error to about half the tolerance.
  """
  b, hq, hkv, sq, sk = SHAPES["gqa"]
  mods = MOD_CASES["causal"](b, hq, sq, sk)
  check_case(KERNEL, 6, SHAPES["gqa"], jnp.float32, mods, scale=100.0, grads=False)
  check_case(KERNEL, 7, SHAPES["gqa"], jnp.float32, mods, scale=30.0)


def test_scale_and_value_dim():
  q, k, _ = random_qkv(7, 1, 2, 1, 20, 30, head_dim=16)
  v = jax.random.normal(jax.random.key(8), (1, 1, 30, 24))
  out = KERNEL(q, k, v, scale=0.3, score_mod=causal_mod(offset=10))
  ref = reference_attention(q, k, v, scale=0.3, score_mod=causal_mod(offset=10))
  assert out.shape == (1, 2, 20, 24)
  assert rel_err(out, ref) < tol(jnp.float32)


@pytest.mark.slow   # the conformance suite runs this check on every kernel by default
def test_empty_rows():
  check_empty_rows(KERNEL)


@pytest.mark.slow   # the conformance suite runs this check on every kernel by default
def test_jit_vmap_grad():
  check_jit_vmap(KERNEL)


def test_against_jax_nn():
  check_against_jax_nn(KERNEL)


def test_bad_chunk_sizes():
  # The generic bad inputs (shapes, dtypes, mod signatures) are checked for every kernel by
  # tests/kernels/test_conformance.py::test_bad_inputs.
  q, k, v = random_qkv(52, 1, 2, 2, 8, 8)
  for bad in (dict(query_chunk_size=0), dict(key_chunk_size=-3), dict(key_chunk_size=2.5)):
    with pytest.raises(ValueError):
      memory_efficient_attention(q, k, v, **bad)


def test_exported():
  import attnax.kernels as K
  assert K.memory_efficient_attention is memory_efficient_attention
  assert "memory_efficient_attention" in K.__all__
