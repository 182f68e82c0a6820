"""Key-block geometry for AETHER: the centroid and radius of every block of keys.

For key block ``b`` (keys ``block_size * b`` up to the next block or the end of the sequence),
``mu_b`` is the mean of its keys and ``r_b = max ||k - mu_b||`` over the same keys. A ragged tail
block uses its valid keys only. Cauchy-Schwarz then bounds every score of the block:
``q . k <= q . mu_b + ||q|| r_b``; the bound holds for *any* centre, so the rounding of ``mu_b``
itself costs nothing as long as ``r_b`` is measured from the rounded centre (it is).

Two implementations compute the same numbers in f32:

- ``"xla"``: plain JAX (the reference, and the fast path on CPU).
- ``"pallas"``: one Pallas program per ``(batch * kv head, block)``; interpreted on CPU.

Also here: :func:`clustered_qkv`, the clustered-keys generator used by the tests, the example and
the benchmark (the data on which geometric pruning can certify large savings).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from attnax.kernels import _checks

__all__ = ["compute_block_geometry", "block_geometry_reference", "block_geometry_pallas",
           "block_sizes", "clustered_qkv"]

f32 = jnp.float32


def _check_k(k, block_size):
  if not hasattr(k, "shape") or jnp.ndim(k) != 4:
    raise ValueError("compute_block_geometry: k must have rank 4 (batch, kv_heads, seq, "
                     f"head_dim), got shape {tuple(jnp.shape(k))}")
  _checks.check_positive_int("compute_block_geometry: block_size", block_size)
  if min(k.shape) == 0:
    raise ValueError(f"compute_block_geometry: empty dimension in k {tuple(k.shape)}")


def block_sizes(seq_len: int, block_size: int) -> jax.Array:
  """Valid keys per block, int32 ``(nb,)``, ``nb = ceil(seq_len / block_size)``."""
  nb = -(-seq_len // block_size)
  lo = jnp.arange(nb, dtype=jnp.int32) * block_size
  return jnp.minimum(block_size, seq_len - lo).astype(jnp.int32)


def block_geometry_reference(k: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
  """Plain-JAX block geometry.

  Args:
    k: keys ``(B, Hkv, Sk, D)``, any float dtype.
    block_size: keys per block.

  Returns:
    ``(centroids, radii)``: f32 ``(B, Hkv, nb, D)`` and f32 ``(B, Hkv, nb)``,
    ``nb = ceil(Sk / block_size)``.
  """
  _check_k(k, block_size)
  b, h, s, d = k.shape
  nb = -(-s // block_size)
  x = jnp.pad(k.astype(f32), ((0, 0), (0, 0), (0, nb * block_size - s), (0, 0)))
  x = x.reshape(b, h, nb, block_size, d)
  valid = (jnp.arange(nb * block_size) < s).reshape(nb, block_size, 1)
  x = jnp.where(valid, x, 0.0)
  cnt = block_sizes(s, block_size).astype(f32)
  mu = x.sum(axis=3) / cnt[:, None]
  diff = jnp.where(valid, x - mu[:, :, :, None, :], 0.0)
  r = jnp.sqrt(jnp.max(jnp.sum(diff * diff, axis=-1), axis=-1))
  return mu, r


def _geometry_kernel(k_ref, mu_ref, r_ref, *, block_size: int, seq_len: int):
  """One key block: ``k_ref`` ``(block_size, D)`` -> ``mu_ref`` ``(1, D)``, ``r_ref`` ``(1, 1)``."""
  j = pl.program_id(1)
  x = k_ref[...].astype(f32)
  pos = j * block_size + jax.lax.broadcasted_iota(jnp.int32, (block_size, 1), 0)
  valid = pos < seq_len
  cnt = jnp.minimum(block_size, seq_len - j * block_size).astype(f32)
  x = jnp.where(valid, x, 0.0)
  mu = jnp.sum(x, axis=0, keepdims=True) / cnt
  diff = jnp.where(valid, x - mu, 0.0)
  d2 = jnp.sum(diff * diff, axis=1, keepdims=True)
  r_ref[...] = jnp.sqrt(jnp.max(d2, axis=0, keepdims=True))
  mu_ref[...] = mu


@functools.partial(jax.jit, static_argnames=("block_size", "interpret"))
def block_geometry_pallas(k: jax.Array, block_size: int, *, interpret: bool | None = None
                          ) -> tuple[jax.Array, jax.Array]:
  """Pallas block geometry (same contract as :func:`block_geometry_reference`).

  A grid of ``(B * Hkv, nb)`` programs, each reading one ``(block_size, D)`` tile of keys. The
  sequence is zero-padded to whole blocks; padded keys are masked by position inside the kernel.
  ``interpret=None`` interprets everywhere except on a GPU.
  """
  _check_k(k, block_size)
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  b, h, s, d = k.shape
  nb = -(-s // block_size)
  kk = k.reshape(b * h, s, d)
  if nb * block_size != s:
    kk = jnp.pad(kk, ((0, 0), (0, nb * block_size - s), (0, 0)))
  kernel = functools.partial(_geometry_kernel, block_size=block_size, seq_len=s)
  mu, r = pl.pallas_call(
      kernel,
      grid=(b * h, nb),
      in_specs=[pl.BlockSpec((None, block_size, d), lambda i, j: (i, j, 0))],
      out_specs=[pl.BlockSpec((None, 1, d), lambda i, j: (i, j, 0)),
                 pl.BlockSpec((None, 1, 1), lambda i, j: (i, j, 0))],
      out_shape=[jax.ShapeDtypeStruct((b * h, nb, d), f32),
                 jax.ShapeDtypeStruct((b * h, nb, 1), f32)],
      interpret=interpret,
      name="aether_block_geometry",
  )(kk)
  return mu.reshape(b, h, nb, d), r.reshape(b, h, nb)


def _pow2(n: int) -> bool:
  return n > 0 and (n & (n - 1)) == 0


def compute_block_geometry(k: jax.Array, block_size: int, *, implementation: str | None = None
                           ) -> tuple[jax.Array, jax.Array]:
  """Centroid and radius of every block of ``block_size`` keys (DESIGN.md section 6).

  Args:
    k: keys ``(B, Hkv, Sk, D)`` (f32, bf16 or f16; computed in f32).
    block_size: keys per block (the kv tile of the attention kernel).
    implementation: ``"pallas"`` (the Pallas kernel; interpreted on CPU), ``"xla"`` (plain JAX), or
      ``None``: Pallas on a GPU when the tile shape suits it (powers of two), plain JAX otherwise.

  Returns:
    ``(centroids, radii)``: f32 ``(B, Hkv, nb, D)`` and f32 ``(B, Hkv, nb)`` with
    ``nb = ceil(Sk / block_size)``; a ragged tail block uses its valid keys only.
  """
  _check_k(k, block_size)
  if implementation is None:
    on_gpu = jax.default_backend() == "gpu"
    implementation = "pallas" if on_gpu and _pow2(block_size) and _pow2(k.shape[-1]) else "xla"
  if implementation == "pallas":
    return block_geometry_pallas(k, block_size)
  if implementation == "xla":
    return block_geometry_reference(k, block_size)
  raise ValueError(f"compute_block_geometry: implementation must be 'pallas', 'xla' or None, "
                   f"got {implementation!r}")


def clustered_qkv(key: jax.Array, *, batch: int = 1, q_heads: int = 1, kv_heads: int = 1,
                  q_len: int = 1024, kv_len: int = 1024, head_dim: int = 64, block_q: int = 128,
                  block_k: int = 128, num_clusters: int = 16, norm: float = 15.0,
                  noise: float = 0.05, dtype=jnp.float32):
  """Clustered keys: the data on which certified geometric pruning pays off.

  Generator: ``num_clusters`` random unit directions ``c``. Key block ``b`` belongs to cluster
  ``b % num_clusters``, its keys are ``norm * c + noise * N(0, I)``; query block ``t`` looks for
  cluster ``hash(t)``, its queries are ``norm * c + noise * N(0, I)``. Values are ``N(0, I)``.
  With the default ``scale = D ** -0.5`` the matching cluster's logits exceed the others' by about
  ``norm**2 / sqrt(D)``, so every key block of another cluster can be skipped with a tiny
  certified loss.

  Returns:
    ``q (B, Hq, Sq, D)``, ``k (B, Hkv, Sk, D)``, ``v (B, Hkv, Sk, D)`` in ``dtype``.
  """
  kc, kq, kk, kv, kt = jax.random.split(key, 5)
  c = jax.random.normal(kc, (batch, kv_heads, num_clusters, head_dim), f32)
  c = c / jnp.linalg.norm(c, axis=-1, keepdims=True)
  kcl = (jnp.arange(kv_len) // block_k) % num_clusters
  nq = -(-q_len // block_q)
  qcl = jax.random.randint(kt, (nq,), 0, num_clusters)[jnp.arange(q_len) // block_q]
  k = norm * c[:, :, kcl] + noise * jax.random.normal(kk, (batch, kv_heads, kv_len, head_dim), f32)
  g = q_heads // kv_heads
  qc = jnp.repeat(c, g, axis=1)[:, :, qcl]
  q = norm * qc + noise * jax.random.normal(kq, (batch, q_heads, q_len, head_dim), f32)
  v = jax.random.normal(kv, (batch, kv_heads, kv_len, head_dim), f32)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)
