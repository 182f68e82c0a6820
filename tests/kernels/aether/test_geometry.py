"""compute_block_geometry: the Pallas kernel (interpreted on CPU) equals the plain-JAX reference and
the definition (float64 numpy), tail blocks use their valid keys only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.kernels import compute_block_geometry
from attnax.kernels.aether.geometry import (
    block_geometry_pallas, block_geometry_reference, block_sizes, clustered_qkv,
)


def _numpy_geometry(k, bs):
  k = np.asarray(k, np.float64)
  b, h, s, d = k.shape
  nb = -(-s // bs)
  mu = np.zeros((b, h, nb, d))
  r = np.zeros((b, h, nb))
  for j in range(nb):
    blk = k[:, :, j * bs:(j + 1) * bs]
    mu[:, :, j] = blk.mean(2)
    r[:, :, j] = np.linalg.norm(blk - mu[:, :, j, None], axis=-1).max(-1)
  return mu, r


@pytest.mark.parametrize("shape,bs", [((2, 3, 45, 16), 8), ((1, 2, 64, 32), 16),
                                      ((1, 1, 7, 8), 16)])
def test_reference_matches_definition(shape, bs):
  k = 3.0 * jax.random.normal(jax.random.key(sum(shape) + bs), shape) + 1.0
  mu, r = block_geometry_reference(k, bs)
  nmu, nr = _numpy_geometry(k, bs)
  assert mu.dtype == jnp.float32 and r.dtype == jnp.float32
  assert mu.shape == nmu.shape and r.shape == nr.shape
  np.testing.assert_allclose(mu, nmu, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(r, nr, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape,bs", [((2, 2, 45, 16), 8), ((1, 3, 64, 32), 16)])
def test_pallas_matches_reference(shape, bs, dtype):
  k = (2.0 * jax.random.normal(jax.random.key(7 + bs), shape) - 0.5).astype(dtype)
  mu_p, r_p = block_geometry_pallas(k, bs, interpret=True)
  mu_r, r_r = block_geometry_reference(k, bs)
  assert mu_p.shape == mu_r.shape and r_p.shape == r_r.shape
  np.testing.assert_allclose(mu_p, mu_r, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(r_p, r_r, rtol=1e-6, atol=1e-6)
  # The explicit-implementation entry point agrees too.
  mu_c, r_c = compute_block_geometry(k, bs, implementation="pallas")
  np.testing.assert_array_equal(mu_c, mu_p)
  np.testing.assert_array_equal(r_c, r_p)


def test_cauchy_schwarz_bound_holds():
  """Every score of a block is below q.mu + |q| r (what the planner relies on)."""
  k = jax.random.normal(jax.random.key(3), (1, 2, 50, 16)) * 2
  q = jax.random.normal(jax.random.key(4), (1, 2, 30, 16)) * 3
  mu, r = compute_block_geometry(k, 8)
  s = np.einsum("bhqd,bhkd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64))
  ub = (np.einsum("bhqd,bhnd->bhqn", np.asarray(q, np.float64), np.asarray(mu, np.float64))
        + np.linalg.norm(np.asarray(q, np.float64), axis=-1)[..., None] * np.asarray(r)[:, :, None])
  ub = np.repeat(ub, 8, axis=-1)[..., :50]
  assert np.all(s <= ub + 1e-4)


def test_block_sizes_and_errors():
  np.testing.assert_array_equal(block_sizes(45, 8), [8, 8, 8, 8, 8, 5])
  k = jnp.ones((1, 1, 8, 4))
  with pytest.raises(ValueError, match="block_size"):
    compute_block_geometry(k, 0)
  with pytest.raises(ValueError, match="rank 4"):
    compute_block_geometry(jnp.ones((8, 4)), 4)
  with pytest.raises(ValueError, match="implementation"):
    compute_block_geometry(k, 4, implementation="cuda")


def test_clustered_generator_shapes():
  q, k, v = clustered_qkv(jax.random.key(0), batch=2, q_heads=4, kv_heads=2, q_len=40, kv_len=70,
                          head_dim=8, block_q=16, block_k=16, num_clusters=3)
  assert q.shape == (2, 4, 40, 8) and k.shape == (2, 2, 70, 8) and v.shape == (2, 2, 70, 8)
  _, r = compute_block_geometry(k, 16)
  assert float(r.max()) < 1.0       # tight clusters: small radii
