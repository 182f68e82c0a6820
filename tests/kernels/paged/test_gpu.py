"""The Pallas paged kernel compiled for the GPU (Triton lowering), at realistic decoding shapes.

Run on the accelerator machine: ``python3 -m pytest -m gpu tests/kernels/paged -x -q``.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.kernels import alibi_mod, compose_score_mods, document_mask_mod, paged_attention
from attnax.kernels.paged import PagedConfig, quantize_kv
from tests.helpers import rel_err, tol
from tests.kernels.paged.paged_helpers import reference

pytestmark = pytest.mark.gpu

HQ, HKV, D, PAGE, PAGES_PER_SEQ = 32, 8, 128, 16, 128      # capacity 2048 tokens


def decode_inputs(seed, *, batch=4, q_len=1, lengths=(0, 1000, 1537, 2048), dtype=jnp.bfloat16):
  rng = np.random.default_rng(seed)
  num_pages = batch * PAGES_PER_SEQ + 7
  q = jnp.asarray(rng.standard_normal((batch, HQ, q_len, D)), dtype)
  k = jnp.asarray(rng.standard_normal((HKV, num_pages, PAGE, D)), dtype)
  v = jnp.asarray(rng.standard_normal((HKV, num_pages, PAGE, D)), dtype)
  tables = rng.permutation(num_pages)[:batch * PAGES_PER_SEQ].reshape(batch, PAGES_PER_SEQ)
  return q, k, v, jnp.asarray(tables, jnp.int32), jnp.asarray(lengths[:batch], jnp.int32)


def run(*args, **kw):
  return jax.jit(lambda *a: paged_attention(*a, return_lse=True, **kw))(*args)


def check(out, lse, ref, ref_lse, dtype):
  assert not np.isnan(np.asarray(out, np.float32)).any()
  assert rel_err(out, ref) < tol(dtype), rel_err(out, ref)
  finite = np.isfinite(ref_lse)
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
  assert rel_err(np.asarray(lse)[finite], ref_lse[finite]) < tol(dtype)


@pytest.mark.parametrize("q_len", [1, 8])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_matches_reference(q_len, dtype):
  inputs = decode_inputs(0, q_len=q_len, dtype=dtype)
  check(*run(*inputs, backend="pallas"), *reference(*inputs, return_lse=True), dtype)


def test_auto_picks_the_pallas_kernel():
  inputs = decode_inputs(1)
  auto, _ = run(*inputs)
  pallas, _ = run(*inputs, backend="pallas")
  np.testing.assert_array_equal(np.asarray(auto, np.float32), np.asarray(pallas, np.float32))


@pytest.mark.parametrize("config", [PagedConfig(), PagedConfig(block_kv=32, num_splits=5),
                                    PagedConfig(block_kv=128, num_warps=8, num_stages=2)])
def test_mods_softcap_and_configs(config):
  inputs = decode_inputs(2, q_len=4, lengths=(700, 2048, 0, 33))
  docs = jnp.asarray(np.sort(np.random.default_rng(2).integers(0, 4, (4, 2048)), axis=1),
                     jnp.int32)
  mods = dict(score_mod=compose_score_mods(alibi_mod(num_heads=HQ), document_mask_mod(docs)),
              softcap=20.0)
  q = inputs[0] * 3
  got = run(q, *inputs[1:], backend="pallas", config=config, **mods)
  check(*got, *reference(q, *inputs[1:], return_lse=True, **mods), jnp.bfloat16)


def test_int8_pages():
  q, k, v, tables, lengths = decode_inputs(3, q_len=2)
  (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
  got = run(q, kq, vq, tables, lengths, k_scales=ks, v_scales=vs, backend="pallas")
  want = reference(q, kq, vq, tables, lengths, k_scales=ks, v_scales=vs, return_lse=True)
  check(*got, *want, jnp.bfloat16)


def test_matches_jax_pallas_paged_attention():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged
  q, k, v, tables, lengths = decode_inputs(4, lengths=(1, 1000, 1537, 2048))
  want = jax_paged.paged_attention(q[:, :, 0], k, v, tables, lengths)      # JAX: no scale
  got, _ = run(q, k, v, tables, lengths, backend="pallas", scale=1.0)
  assert rel_err(got[:, :, 0], want) < tol(jnp.bfloat16)


def test_gradients_follow_the_jax_backend():
  q, k, v, tables, lengths = decode_inputs(5, q_len=2, dtype=jnp.float32)
  ct = jnp.asarray(np.random.default_rng(5).standard_normal(q.shape), jnp.float32)
  loss = lambda backend: jax.jit(jax.grad(lambda q, k, v: jnp.sum(paged_attention(
      q, k, v, tables, lengths, backend=backend) * ct), argnums=(0, 1, 2)))
  for g, w in zip(loss("pallas")(q, k, v), loss("jax")(q, k, v)):
    assert np.linalg.norm(np.asarray(w)) > 0
    assert rel_err(g, w) < tol(jnp.float32, grad=True)


def test_decode_from_the_paged_cache_on_gpu():
  from flax import nnx
  from attnax import MultiHeadAttention
  from attnax.kernels import PagedKVCache, causal_mod
  from tests.kernels.paged.test_cache import full_causal_pass, run_requests, sequences
  attn = MultiHeadAttention(nnx.Rngs(0), num_heads=8, num_kv_heads=2, in_features=128,
                            score_mod=causal_mod(), rope=True)
  seqs = sequences(6, (40, 7, 25, 31), features=128)
  cache = PagedKVCache.create(batch=3, num_pages=16, page_size=16, pages_per_sequence=4,
                              num_kv_heads=2, head_dim=16, dtype=jnp.float32)
  got = run_requests(attn, cache, seqs, [8, 3, 8, 5], backend="pallas")
  for y, want in zip(got, full_causal_pass(attn, seqs)):
    assert rel_err(y, want) < tol(jnp.float32)
