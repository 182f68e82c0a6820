"""AETHER on the GPU: Triton-lowered geometry kernel, certified plan through the Pallas kernels
(forward and backward), bf16, long sequences (run with ``pytest -m gpu`` on the accelerator)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.kernels import causal_mod
from attnax.kernels.aether import aether_attention, tile_mask_mod
from attnax.kernels.aether.geometry import block_geometry_pallas, block_geometry_reference
from attnax.kernels.aether.geometry import clustered_qkv
from tests.helpers import kernel_grads, reference_attention, reference_grads, rel_err, tol
from tests.kernels.aether.aether_helpers import dense_probs64, kept_map

pytestmark = pytest.mark.gpu
EPS = 1e-3


@pytest.mark.parametrize("shape", [(2, 4, 4096 + 37, 128), (1, 2, 2048, 64)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_geometry_triton_matches_reference(shape, dtype):
  k = (2.0 * jax.random.normal(jax.random.key(0), shape) + 0.3).astype(dtype)
  mu_p, r_p = block_geometry_pallas(k, 128, interpret=False)
  mu_r, r_r = block_geometry_reference(k, 128)
  np.testing.assert_allclose(mu_p, mu_r, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(r_p, r_r, rtol=1e-5, atol=1e-5)


def _check(q, k, v, out, lse, st, *, mod, dtype):
  b, hq, sq, _ = q.shape
  p = dense_probs64(q, k, v, score_mod=mod)
  kept = kept_map(st.block_mask, b, hq, sq, k.shape[2])
  lost = (p * ~kept).sum(-1)
  bound = np.asarray(st.mass_bound, np.float64)
  assert np.all(lost <= bound * (1 + 1e-5) + 1e-30) and np.all(bound <= EPS * (1 + 1e-6))
  ro, rl = reference_attention(q, k, v, score_mod=mod, return_lse=True)
  vmax = float(np.abs(np.asarray(v, np.float32)).max())
  err = np.abs(np.asarray(out, np.float64) - ro).max()
  rnd = 2e-2 if dtype == jnp.bfloat16 else 2e-3     # the kernel's own rounding (bf16 / tf32)
  assert err <= 2 * EPS * vmax + rnd * vmax, err
  assert np.all(rl - np.asarray(lse) <= EPS + rnd * (1 + np.abs(rl)))
  keep = tile_mask_mod(st.block_mask, hq)
  assert rel_err(out, reference_attention(q, k, v, score_mod=mod, mask_mod=keep)) <= tol(dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_certificate_pallas_gpu(causal, dtype):
  q, k, v = clustered_qkv(jax.random.key(1), batch=1, q_heads=4, kv_heads=2, q_len=2048,
                          kv_len=2048 + 64, head_dim=128, num_clusters=8, dtype=dtype)
  mod = causal_mod(offset=64) if causal else None
  f = jax.jit(functools.partial(aether_attention, score_mod=mod, epsilon=EPS, return_lse=True,
                                return_stats=True, implementation="pallas"))
  out, lse, st = f(q, k, v)
  assert float(np.asarray(st.skipped_fraction).mean()) > 0.5
  _check(q, k, v, out, lse, st, mod=mod, dtype=dtype)


def test_gradients_pallas_gpu():
  q, k, v = clustered_qkv(jax.random.key(2), batch=1, q_heads=4, kv_heads=2, q_len=1024,
                          kv_len=1024, head_dim=64, num_clusters=4, norm=6.0, dtype=jnp.bfloat16)
  mod = causal_mod()
  f = jax.jit(functools.partial(aether_attention, score_mod=mod, epsilon=EPS,
                                implementation="pallas"))
  st = jax.jit(functools.partial(aether_attention, score_mod=mod, epsilon=EPS, return_stats=True,
                                 implementation="pallas"))(q, k, v)[1]
  ct = jax.random.normal(jax.random.key(3), q.shape).astype(jnp.bfloat16)
  got = kernel_grads(f, q, k, v, ct)
  want = reference_grads(q, k, v, ct, score_mod=mod, mask_mod=tile_mask_mod(st.block_mask, 4))
  for g, w in zip(got, want):
    assert rel_err(g, w) <= tol(jnp.bfloat16, grad=True)


def test_long_sequence_plan_runs():
  """128k tokens: the chunked pre-pass fits, the clustered data is mostly pruned, no NaN."""
  q, k, v = clustered_qkv(jax.random.key(4), batch=1, q_heads=2, kv_heads=2, q_len=131072,
                          kv_len=131072, head_dim=128, num_clusters=64, dtype=jnp.bfloat16)
  out, st = jax.jit(functools.partial(aether_attention, epsilon=EPS, return_stats=True))(q, k, v)
  assert float(np.asarray(st.skipped_fraction).mean()) > 0.9
  assert float(np.asarray(st.mass_bound).max()) <= EPS
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
