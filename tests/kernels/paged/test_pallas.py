"""The Pallas paged kernel in the interpreter (``backend="interpret"``) against float64
standard_attention over the gathered cache: GQA, ragged and zero lengths, rows shorter than the
queries, Sq > 1, mods (pytree arrays and closures) on absolute positions, soft-cap, bf16 and int8
pages; garbage (NaN) in every slot the kernel must not read; gradients (by the pure-JAX VJP)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.kernels import (alibi_mod, compose_score_mods, document_mask_mod, paged_attention,
                            sliding_window_mod, standard_attention)
from attnax.kernels.paged import PagedConfig, gather_pages, quantize_kv
from tests.helpers import rel_err, tol
from tests.kernels.paged.paged_helpers import make_cache, paged, reference, with_garbage

# Compile-heavy on CPU (CI's 2 cores): runs with -m slow and on the GPU machine.
pytestmark = pytest.mark.slow

INTERPRET = dict(backend="interpret")


def assert_matches(out, lse, ref, ref_lse, dtype=jnp.float32):
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  assert rel_err(out, ref) < tol(dtype)
  finite = np.isfinite(ref_lse)
  np.testing.assert_array_equal(np.isfinite(lse), finite)
  assert np.all(np.asarray(lse)[~finite] == -np.inf)
  assert rel_err(np.asarray(lse)[finite], ref_lse[finite]) < tol(dtype)


@pytest.mark.parametrize("heads,q_len,lengths,split", [
    ((4, 2), 1, (0, 13, 28, 5), None),        # GQA 2, decoding, an empty row
    ((4, 1), 3, (1, 13, 28, 2), 2),           # MQA, Sq=3, rows shorter than Sq, 4 splits
    ((4, 4), 2, (0, 7, 28, 17), 1),           # MHA, one page per split
])
def test_matches_reference(heads, q_len, lengths, split):
  clean = make_cache(20, q_heads=heads[0], kv_heads=heads[1], q_len=q_len, lengths=lengths)
  cache = with_garbage(clean)          # NaN past every length and in the free pages
  out, lse = paged(*cache, return_lse=True, pages_per_split=split, **INTERPRET)
  assert out.shape == cache[0].shape and out.dtype == jnp.float32 and lse.shape == out.shape[:3]
  assert_matches(out, lse, *reference(*clean, return_lse=True))
  assert np.all(np.asarray(out)[np.asarray(clean[4]) == 0] == 0)


def _mods(name):
  docs = jnp.asarray(np.sort(np.random.RandomState(21).randint(0, 3, (4, 28)), axis=1), jnp.int32)
  if name == "alibi_documents":
    return dict(score_mod=compose_score_mods(alibi_mod(num_heads=4), document_mask_mod(docs)))
  if name == "window_softcap":
    return dict(score_mod=sliding_window_mod(6), softcap=2.0)
  if name == "closure_mask":        # a plain function closing over an array: an operand too
    return dict(mask_mod=lambda b, h, i, j: (docs[b, j] != 1) | (h == 0))
  raise ValueError(name)


@pytest.mark.parametrize("name", ["alibi_documents", "window_softcap",
                                  pytest.param("closure_mask", marks=pytest.mark.slow)])
def test_mods_on_absolute_positions(name):
  cache = make_cache(22, q_len=3, lengths=(9, 28, 17, 4))
  cache = (cache[0] * 4.0,) + cache[1:]               # large logits: the soft-cap matters
  mods = _mods(name)
  out, lse = paged(*cache, return_lse=True, **mods, **INTERPRET)
  assert_matches(out, lse, *reference(*cache, return_lse=True, **mods))


def test_low_precision_pages():
  cache = make_cache(23, q_len=2, dtype=jnp.bfloat16, lengths=(28, 3, 0, 19))
  out = paged(*cache, config=PagedConfig(block_kv=16, num_splits=3), **INTERPRET)
  assert out.dtype == jnp.bfloat16
  assert rel_err(out, reference(*cache)) < tol(jnp.bfloat16)


def test_int8_pages_within_quantisation_error():
  q, k_pages, v_pages, tables, lengths = make_cache(24, q_len=2, lengths=(3, 13, 28, 0))
  (kq, ks), (vq, vs) = quantize_kv(k_pages), quantize_kv(v_pages)
  q = q.astype(jnp.bfloat16)
  out = paged(q, kq, vq, tables, lengths, k_scales=ks, v_scales=vs, **INTERPRET)
  # Against the dequantised cache: the kernel's maths exactly, bf16 rounding only.
  exact = reference(q, kq, vq, tables, lengths, k_scales=ks, v_scales=vs)
  assert rel_err(out, exact) < tol(jnp.bfloat16)
  # Against the unquantised cache: int8 rounds each entry by at most max|row| / 254 (0.4% of the
  # row's largest entry, about 1% relative for Gaussian rows), which moves the output by ~1%.
  assert rel_err(out, reference(q, k_pages, v_pages, tables, lengths)) < 3e-2


def test_bad_rows_under_jit_are_nan():
  q, kp, vp, bt, ln = make_cache(25, q_len=2, lengths=(2, 13, 28, 5))
  bad_bt = bt.at[1, 3].set(-1).at[3, 5].set(-7)      # row 1 uses slot 3; row 3 (5 tokens) not 5
  bad_ln = ln.at[0].set(-3).at[2].set(40)
  out, lse = paged(q, kp, vp, bad_bt, bad_ln, return_lse=True, **INTERPRET)
  for b, is_nan in enumerate([True, True, True, False]):
    assert np.all(np.isnan(out[b])) == is_nan and np.all(np.isnan(lse[b])) == is_nan
  assert rel_err(out[3], reference(q, kp, vp, bt, ln)[3]) < tol(jnp.float32)


@pytest.mark.slow        # the conformance suite's paged_interpret row checks grads by default
def test_gradients_are_those_of_the_reference():
  """Differentiating the Pallas backend runs the pure-JAX VJP: true gradients for q, the pages and
  a mod's float array (ALiBi slopes), never zeros."""
  q, kp, vp, bt, ln = make_cache(26, q_len=2, lengths=(3, 28, 11, 0))
  slopes = jnp.asarray(np.random.RandomState(26).rand(4), jnp.float32)
  ct = jnp.asarray(np.random.RandomState(27).randn(*q.shape), jnp.float32)

  def loss(q, kp, vp, slopes):
    out = paged_attention(q, kp, vp, bt, ln, score_mod=alibi_mod(slopes=slopes), **INTERPRET)
    return jnp.sum(out * ct)

  got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, kp, vp, slopes)
  sq, lv = q.shape[2], np.asarray(ln)
  mask = lambda b, h, i, j: (j < lv[b]) & (j <= i + lv[b] - sq)
  with jax.enable_x64(True):
    up = lambda x: jnp.asarray(np.asarray(x, np.float64))

    def ref_loss(q, kp, vp, slopes):
      shift = jnp.asarray(lv - sq)
      mod = lambda s, b, h, i, j: s + slopes[h] * (j - (i + shift[b]))
      out = standard_attention(q, gather_pages(kp, bt), gather_pages(vp, bt), score_mod=mod,
                               mask_mod=mask)
      return jnp.sum(out * up(ct))

    want = jax.grad(ref_loss, argnums=(0, 1, 2, 3))(up(q), up(kp), up(vp), up(slopes))
  for g, w in zip(got, want):
    assert np.all(np.isfinite(g)) and np.linalg.norm(np.asarray(g)) > 0
    assert rel_err(g, w) < tol(jnp.float32, grad=True)
