"""float64 in every pure-JAX kernel; the Pallas kernels refuse it.

Rows of the conformance table with the ``f64`` flag (standard, memory-efficient, flash, AETHER over
flash, ring reference, ring on a mesh, paged) run float64 inputs (inside ``jax.enable_x64``)
against ``standard_attention`` in float64: outputs and LSEs in float64, with the mods' arrays (a
bias table, ALiBi slopes, document ids), GQA and ragged lengths; gradients of q, k, v and of the
bias table. ``linear_attention`` (not softmax attention) is checked against a float64 quadratic
reference of its own maths.

Tolerance. DESIGN.md section 8 has no float64 row; its f32 bound (1e-5, ~84 machine epsilons of
f32) scaled by the ratio of the epsilons (2^-52 / 2^-23) is 2e-14; we allow 1e-13 (gradients
twice that). A single f32 step anywhere (an f32 accumulator, an f32 cast of the scores) shows as
an error near 1e-7, so these bounds also prove that the computation is float64 throughout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.kernels import (additive_bias_mod, aether_attention, alibi_mod, causal_mod,
                            compose_score_mods, document_mask_mod, linear_attention,
                            pallas_flash_attention, standard_attention)
from attnax.kernels.aether import api as aether_api
from attnax.kernels.aether.certify import tile_mask_mod
from tests.helpers import rel_err
from tests.kernels.conformance import Kernel, jit, reference_kernel, rows

# Compile-heavy on CPU (CI's 2 cores): runs with -m slow and on the GPU machine.
pytestmark = pytest.mark.slow

F64_TOL = 1e-13
B, HQ, HKV, SQ, SK, D = 2, 4, 2, 37, 45, 16


def draw(seed: int, shape) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(shape)


def inputs(row: Kernel, seed: int):
  """float64 q, k, v (call inside ``jax.enable_x64``) at the row's lengths."""
  sq, sk = row.lengths(SQ, SK)
  return tuple(jnp.asarray(draw(seed + i, (B, h, s, D)))
               for i, (h, s) in enumerate(((HQ, sq), (HKV, sk), (HKV, sk))))


def doc_ids(seed: int, length: int) -> jax.Array:
  return jnp.asarray(np.sort(np.random.default_rng(seed).integers(0, 3, (B, length)), -1),
                     jnp.int32)


def make_mod(variant: str, sq: int, sk: int, bias=None):
  if variant == "forward":
    return compose_score_mods(causal_mod(offset=sk - sq), alibi_mod(num_heads=HQ))
  ids = doc_ids(3, max(sq, sk))
  return compose_score_mods(additive_bias_mod(bias), document_mask_mod(ids[:, :sq], ids[:, :sk]))


def check_close(got, want, tolerance, what):
  got = np.asarray(got)
  assert got.dtype == np.float64, f"{what} is {got.dtype}, not float64"
  want = np.asarray(want)
  fin = np.isfinite(want)
  np.testing.assert_array_equal(np.isfinite(got), fin, err_msg=what)
  err = rel_err(got[fin], want[fin])
  assert err < tolerance, f"{what}: relative error {err:.3g} >= {tolerance:.3g}"


# ----------------------------------------------------------------------------- forward, grads


@pytest.mark.parametrize("row,variant", rows("float64", ("forward", "bias_docs"),
                                             needs=("softmax", "f64")))
def test_forward_in_float64(row, variant):
  with jax.enable_x64(True):
    q, k, v = inputs(row, 0)
    sq, sk = q.shape[2], k.shape[2]
    bias = jnp.asarray(draw(9, (1, HQ, sq, sk)))

    def call(fn, q, k, v, bias):
      return fn(q, k, v, score_mod=make_mod(variant, sq, sk, bias), return_lse=row.lse)

    got = jit(functools.partial(call, row.fn))(q, k, v, bias)
    want = jit(functools.partial(call, reference_kernel(row)))(q, k, v, bias)
    got, want = (got, want) if row.lse else ((got,), (want,))
    for name, g, w in zip(("out", "lse"), got, want):
      check_close(g, w, F64_TOL, f"{row.name} {name}")


@pytest.mark.parametrize("row,variant", rows("float64", ("grads",),
                                             needs=("softmax", "grad", "f64")))
def test_gradients_in_float64(row, variant):
  """q, k, v and the bias table the mod carries, cotangents on out and (where there is one) LSE."""
  with jax.enable_x64(True):
    q, k, v = inputs(row, 4)
    sq, sk = q.shape[2], k.shape[2]
    bias = jnp.asarray(draw(10, (1, HQ, sq, sk)))
    ct, ct_lse = jnp.asarray(draw(11, (B, HQ, sq, D))), jnp.asarray(draw(12, (B, HQ, sq)))

    def loss(fn, q, k, v, bias):
      mod = compose_score_mods(causal_mod(offset=sk - sq), additive_bias_mod(bias))
      if not row.lse:
        return jnp.sum(fn(q, k, v, score_mod=mod) * ct)
      out, lse = fn(q, k, v, score_mod=mod, return_lse=True)
      return jnp.sum(out * ct) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * ct_lse)

    grad = lambda fn: jit(jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3)))
    got = grad(row.fn)(q, k, v, bias)
    want = grad(reference_kernel(row))(q, k, v, bias)
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want):
      check_close(g, w, 2 * F64_TOL, f"{row.name} {name}")


# ----------------------------------------------------------------------------- linear attention


def _linear_reference(q, k, v, causal):
  """``phi(q) phi(k)^T v / phi(q) phi(k)^T 1`` with phi = elu + 1, float64 numpy, GQA by repeat."""
  phi = lambda x: np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))
  g = q.shape[1] // k.shape[1]
  k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
  a = np.einsum("bhqf,bhkf->bhqk", phi(q * q.shape[-1] ** -0.5), phi(k))
  if causal:
    a = a * np.tril(np.ones(a.shape[-2:]))
  return np.einsum("bhqk,bhkd->bhqd", a, v) / a.sum(-1, keepdims=True)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_in_float64(causal):
  with jax.enable_x64(True):
    q, k, v = (jnp.asarray(draw(20 + i, (B, h, SK, D))) for i, h in enumerate((HQ, HKV, HKV)))
    out = jax.jit(functools.partial(linear_attention, causal=causal, chunk_size=16))(q, k, v)
    check_close(out, _linear_reference(*map(np.asarray, (q, k, v)), causal), F64_TOL,
                "linear_attention out")
    grads = jax.grad(lambda q: jnp.sum(linear_attention(q, k, v, causal=causal) ** 2))(q)
    assert grads.dtype == jnp.float64


# ----------------------------------------------------------------------------- AETHER pruning


def clustered(seed: int, q_len: int, kv_len: int, block: int, clusters: int = 4,
              norm: float = 10.0):
  """float64 q, k, v (numpy): the keys of kv block ``j`` sit near centre ``j % clusters``, the
  queries of q tile ``t`` near centre ``t % clusters`` (AETHER decides per tile and per kv head),
  so most (q tile, kv block) scores are far below the row maximum."""
  rng = np.random.default_rng(seed)
  c = rng.standard_normal((clusters, D))
  c /= np.linalg.norm(c, axis=-1, keepdims=True)
  kc = (np.arange(kv_len) // block) % clusters
  qc = (np.arange(q_len) // block) % clusters
  k = norm * c[kc][None, None] + 0.05 * rng.standard_normal((B, HKV, kv_len, D))
  q = norm * c[qc][None, None] + 0.05 * rng.standard_normal((B, HQ, q_len, D))
  return q, k, rng.standard_normal((B, HKV, kv_len, D))


@pytest.mark.slow
def test_aether_prunes_in_float64():
  """On clustered keys AETHER skips tiles in float64 too: its output is float64 attention over
  exactly the tiles it kept (1e-13), and within its certificate of dense attention.
  (aether_flash's float64 forward in the default run compiles the same pruned branch.)"""
  eps = 1e-3
  q, k, v = clustered(26, 64, 80, 16)
  with jax.enable_x64(True):
    q, k, v = map(jnp.asarray, (q, k, v))
    out, lse, stats = aether_attention(q, k, v, epsilon=eps, block_q=16, block_k=16,
                                       implementation="flash", return_lse=True,
                                       return_stats=True)
    assert float(jnp.max(stats.skipped_fraction)) > 0
    kept = jax.jit(lambda q, k, v, bm: standard_attention(
        q, k, v, mask_mod=tile_mask_mod(bm, HQ), return_lse=True))(q, k, v, stats.block_mask)
    check_close(out, kept[0], F64_TOL, "aether out")
    check_close(lse, kept[1], F64_TOL, "aether lse")
    dense, dense_lse = jax.jit(functools.partial(standard_attention, return_lse=True))(q, k, v)
    assert float(jnp.max(jnp.abs(out - dense))) <= 2 * eps * float(jnp.max(jnp.abs(v)))
    assert float(jnp.max(dense_lse - lse)) <= eps and float(jnp.min(dense_lse - lse)) >= -1e-12
  # implementation=None picks a kernel that runs float64 (never Pallas, on a GPU neither).
  assert aether_api._kernel(None, jnp.float64)[0] == "flash"


# ----------------------------------------------------------------------------- Pallas refuses


def test_pallas_kernels_refuse_float64():
  """A ValueError naming the argument, the dtype and the kernels that do run float64."""
  with jax.enable_x64(True):
    q, k, v = (jnp.asarray(draw(30 + i, (1, 2, 16, D))) for i in range(3))
    with pytest.raises(ValueError, match="pallas_flash_attention: q has unsupported dtype "
                                         "float64.*flash_attention") as e:
      pallas_flash_attention(q, k, v, backend="interpret")
    assert "(1, 2, 16, 16)" in str(e.value)
    with pytest.raises(ValueError, match="aether_attention: q has dtype float64.*"
                                         "implementation='pallas'"):
      aether_attention(q, k, v, implementation="pallas")
    # f32 inputs are unaffected by x64 mode: f32 statistics, f32 lse.
    out, lse = pallas_flash_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                      v.astype(jnp.float32), backend="interpret",
                                      return_lse=True)
    assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
