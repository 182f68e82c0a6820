"""pallas_flash_attention on the GPU (Triton lowering): realistic shapes against the references.

Run on the accelerator machine: ``python3 -m pytest -m gpu tests/kernels/pallas -x -q``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.kernels import (additive_bias_mod, alibi_mod, causal_mod, compose_score_mods,
                            document_mask_mod, sliding_window_mod, standard_attention)
from attnax.kernels.pallas import pallas_flash_attention, pack_sequences, varlen_attention
from tests.helpers import (kernel_grads, random_qkv, reference_attention, reference_grads,
                           rel_err, tol)

pytestmark = pytest.mark.gpu


def check_against_reference(q, k, v, *, grads=True, backend="auto", **kw):
  """out, LSE (and q/k/v gradients) of pallas_flash_attention against the references."""
  out, lse = pallas_flash_attention(q, k, v, return_lse=True, backend=backend, **kw)
  assert not np.isnan(np.asarray(out, np.float32)).any()
  ref, ref_lse = reference_attention(q, k, v, return_lse=True, **kw)
  assert rel_err(out, ref) < tol(q.dtype), rel_err(out, ref)
  fin = np.isfinite(ref_lse)
  assert np.array_equal(np.isfinite(np.asarray(lse)), fin)
  assert rel_err(np.where(fin, lse, 0), np.where(fin, ref_lse, 0)) < tol(q.dtype)
  if grads:
    ct = jax.random.normal(jax.random.key(7), out.shape, jnp.float32).astype(q.dtype)
    got = kernel_grads(pallas_flash_attention, q, k, v, ct, backend=backend, **kw)
    want = reference_grads(q, k, v, ct, **kw)
    for name, g, w in zip("qkv", got, want):
      assert rel_err(g, w) < tol(q.dtype, grad=True), (name, rel_err(g, w))


_check = check_against_reference


def test_causal_gqa_bf16_d128():
  q, k, v = random_qkv(0, batch=1, q_heads=4, kv_heads=2, q_len=2048, kv_len=2048,
                       head_dim=128, dtype=jnp.bfloat16)
  _check(q, k, v, score_mod=causal_mod())


def test_dense_ragged_bf16_d128():
  q, k, v = random_qkv(1, batch=2, q_heads=2, kv_heads=2, q_len=1000, kv_len=4096,
                       head_dim=128, dtype=jnp.bfloat16)
  _check(q, k, v, grads=False)


def test_window_alibi_f16_d64():
  q, k, v = random_qkv(2, batch=1, q_heads=4, kv_heads=1, q_len=4096, kv_len=4096,
                       head_dim=64, dtype=jnp.float16)
  _check(q, k, v, score_mod=compose_score_mods(alibi_mod(4), sliding_window_mod(512)))


def test_document_f32_d256():
  q, k, v = random_qkv(3, batch=1, q_heads=2, kv_heads=2, q_len=1024, kv_len=1024,
                       head_dim=256, dtype=jnp.float32)
  ids = jnp.repeat(jnp.arange(4), jnp.array([100, 400, 300, 224]), total_repeat_length=1024)
  _check(q, k, v, score_mod=compose_score_mods(document_mask_mod(ids), causal_mod()))


def test_padded_head_dim_softcap_bf16():
  q, k, v = random_qkv(4, batch=1, q_heads=2, kv_heads=2, q_len=1536, kv_len=1536,
                       head_dim=96, dtype=jnp.bfloat16, scale=3.0)
  out = pallas_flash_attention(q, k, v, score_mod=causal_mod(), softcap=20.0)
  cap = lambda s, b, h, i, j: 20.0 * jnp.tanh(s / 20.0)
  ref = reference_attention(q, k, v, score_mod=compose_score_mods(cap, causal_mod()))
  assert rel_err(out, ref) < tol(q.dtype)
  ct = jax.random.normal(jax.random.key(8), out.shape, jnp.float32).astype(q.dtype)
  got = kernel_grads(pallas_flash_attention, q, k, v, ct, score_mod=causal_mod(), softcap=20.0)
  want = reference_grads(q, k, v, ct, score_mod=compose_score_mods(cap, causal_mod()))
  for g, w in zip(got, want):
    assert rel_err(g, w) < tol(q.dtype, grad=True)


def test_matches_cudnn_causal_bf16():
  q, k, v = random_qkv(5, batch=2, q_heads=8, kv_heads=8, q_len=4096, kv_len=4096,
                       head_dim=128, dtype=jnp.bfloat16)
  out = pallas_flash_attention(q, k, v, score_mod=causal_mod())
  t = lambda x: jnp.swapaxes(x, 1, 2)
  ref = t(jax.nn.dot_product_attention(t(q), t(k), t(v), is_causal=True,
                                       implementation="cudnn"))
  assert rel_err(out, ref) < tol(q.dtype)


def test_varlen_bf16():
  lens = [700, 1300, 48, 2000]
  seqs = [random_qkv(10 + i, batch=1, q_heads=4, kv_heads=2, q_len=n, kv_len=n, head_dim=128,
                     dtype=jnp.bfloat16) for i, n in enumerate(lens)]
  q, cu = pack_sequences([s[0] for s in seqs])
  k, _ = pack_sequences([s[1] for s in seqs])
  v, _ = pack_sequences([s[2] for s in seqs])
  out = varlen_attention(q, k, v, cu, score_mod=causal_mod())
  for i, (qs, ks, vs) in enumerate(seqs):
    ref = reference_attention(qs, ks, vs, score_mod=causal_mod())
    got = out[:, :, int(cu[i]):int(cu[i + 1])]
    assert rel_err(got, ref) < tol(jnp.bfloat16)


def test_mod_array_gradients_and_closures_bf16():
  """Learned bias table and ALiBi slopes get their true gradients on the GPU; closures over
  arrays (a document-id mask and a bias table) run in the Triton kernels."""
  b, h, s = 1, 4, 1024
  q, k, v = random_qkv(20, batch=b, q_heads=h, kv_heads=2, q_len=s, kv_len=s, head_dim=128,
                       dtype=jnp.bfloat16)
  rng = np.random.default_rng(21)
  bias = jnp.asarray(rng.standard_normal((1, h, s, s)), jnp.float32)
  slopes = jnp.asarray(rng.uniform(0.01, 0.5, h), jnp.float32)
  ids = jnp.asarray(np.arange(s) // 300, jnp.int32)
  ct = jax.random.normal(jax.random.key(22), (b, h, s, 128), jnp.float32)

  def loss(kernel):
    def f(q, k, v, bias, slopes):
      mod = compose_score_mods(causal_mod(), additive_bias_mod(bias), alibi_mod(slopes=slopes))
      mask = lambda b_, h_, i, j: ids[i] == ids[j]
      return jnp.sum(kernel(q, k, v, score_mod=mod, mask_mod=mask).astype(jnp.float32) * ct)
    return f

  got = jax.jit(jax.grad(loss(pallas_flash_attention), argnums=(0, 1, 2, 3, 4)))(
      q, k, v, bias, slopes)
  with jax.enable_x64(True):
    up = lambda x: jnp.asarray(np.asarray(x, np.float64))
    ct = up(ct)
    want = jax.grad(loss(standard_attention), argnums=(0, 1, 2, 3, 4))(
        up(q), up(k), up(v), up(bias), up(slopes))
  for name, g, w in zip(("q", "k", "v", "bias", "slopes"), got, want):
    assert rel_err(g, w) < tol(jnp.bfloat16, grad=True), (name, rel_err(g, w))


# A bias constant along keys (B, H, Sq, 1) is left out: softmax ignores it, its gradient is 0.
@pytest.mark.parametrize("bias_shape", [(2, 1, 1, 2048), (1, 4, 1, 2048)], ids=["row", "head_row"])
def test_broadcast_bias_gradients_bf16_d128_triton(bias_shape):
  """A bias broadcast over whole axes (a row of keys per sequence or per head) launches at D=128
  on the Triton lowering and its gradient is true. Found 2026-12-03: its loads had the tile's
  full (bq, bk) shape and the kernels asked for 256-352 KB of shared memory."""
  q, k, v = random_qkv(23, batch=2, q_heads=4, kv_heads=2, q_len=2048, kv_len=2048,
                       head_dim=128, dtype=jnp.bfloat16)
  bias = jnp.asarray(np.random.default_rng(24).standard_normal(bias_shape), jnp.float32)
  ct = jax.random.normal(jax.random.key(25), q.shape, jnp.float32)

  def loss(kernel, **kw):
    def f(q, k, v, bias):
      mod = compose_score_mods(additive_bias_mod(bias), causal_mod())
      return jnp.sum(kernel(q, k, v, score_mod=mod, **kw).astype(jnp.float32) * ct)
    return f

  got = jax.jit(jax.grad(loss(pallas_flash_attention, backend="triton"), argnums=(0, 1, 2, 3)))(
      q, k, v, bias)
  with jax.enable_x64(True):
    up = lambda x: jnp.asarray(np.asarray(x, np.float64))
    ct = up(ct)
    want = jax.grad(loss(standard_attention), argnums=(0, 1, 2, 3))(up(q), up(k), up(v), up(bias))
  for name, g, w in zip(("q", "k", "v", "bias"), got, want):
    assert rel_err(g, w) < tol(jnp.bfloat16, grad=True), (name, rel_err(g, w))


# ----------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_dropout_matches_reference_with_the_same_key(dtype):
  """In-kernel dropout (backend="auto": the Mosaic lowering has no dropout and is passed over for
  the Triton one) drops exactly the weights standard_attention drops with the same key: out, LSE
  and q/k/v gradients against the float64 reference with that key; GQA, ragged, causal + ALiBi."""
  q, k, v = random_qkv(30, batch=2, q_heads=8, kv_heads=2, q_len=1000, kv_len=1536,
                       head_dim=128, dtype=dtype)
  mod = compose_score_mods(causal_mod(offset=536), alibi_mod(8))
  _check(q, k, v, score_mod=mod, dropout_rate=0.1, dropout_rng=jax.random.key(31))


def test_dropout_mask_is_the_reference_mask_triton():
  """With v the identity, out is the dropped probability matrix: its nonzero pattern is
  tiles.dropout_keep bit for bit (the uint32 hash compiled by Triton: multiplies, xors, logical
  shifts, an unsigned compare), kept entries p / (1 - rate); also with f32 inputs."""
  from attnax.kernels import _checks, tiles
  rate, key, s = 0.25, jax.random.key(32), 256
  q, k, _ = random_qkv(33, batch=2, q_heads=4, kv_heads=2, q_len=s, kv_len=s, head_dim=64,
                       dtype=jnp.float32)
  v = jnp.broadcast_to(jnp.eye(s, dtype=jnp.float32), (2, 2, s, s))
  out = pallas_flash_attention(q, k, v, score_mod=causal_mod(), backend="triton",
                               dropout_rate=rate, dropout_rng=key)
  out = np.asarray(out, np.float64)
  seed = _checks.check_dropout(rate, key)[1]
  i32 = lambda n, shape: jnp.arange(n, dtype=jnp.int32).reshape(shape)
  keep = np.asarray(tiles.dropout_keep(seed, rate, i32(2, (-1, 1, 1, 1)), i32(4, (1, -1, 1, 1)),
                                       i32(s, (1, 1, -1, 1)), i32(s, (1, 1, 1, -1))))
  visible = np.broadcast_to(np.tril(np.ones((s, s), bool)), out.shape)
  np.testing.assert_array_equal(out[visible] != 0, keep[visible])
  p = np.asarray(reference_attention(q, k, v, score_mod=causal_mod()))
  kept = visible & keep
  # tf32 matmuls: the probabilities carry ~1e-3 relative rounding.
  np.testing.assert_allclose(out[kept], p[kept] / (1 - rate), rtol=2e-3, atol=1e-6)


def test_dropout_refused_by_mosaic_lowering():
  """An explicit backend without dropout raises a ValueError that says so."""
  q, k, v = random_qkv(34, batch=1, q_heads=2, kv_heads=2, q_len=512, kv_len=512, head_dim=128,
                       dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="(?s)mosaic.*dropout"):
    pallas_flash_attention(q, k, v, backend="mosaic", dropout_rate=0.1,
                           dropout_rng=jax.random.key(0))
