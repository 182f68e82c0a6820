"""paged_attention (pure-JAX backend, the reference path) vs standard_attention on the gathered
contiguous cache with a length mask; the Pallas backend has its own file (test_pallas.py)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.kernels import (additive_bias_mod, alibi_mod, compose_score_mods, document_mask_mod,
                            paged_attention, sliding_window_mod)
from attnax.kernels.paged import check_values, gather_pages
from tests.helpers import reference_attention, rel_err, tol
from tests.kernels.paged.paged_helpers import (NUM_PAGES, PAGE, make_cache, paged, reference,
                                               with_garbage)


# Every (heads, Sq) with the default split; the other splits (one page, three pages) at two of
# them by default, the rest under -m slow (compile time dominates on CPU).
_SPLIT_CASES = [(h, s, None) for h in ((4, 2), (4, 4), (4, 1)) for s in (1, 3)] + [
    pytest.param(h, s, p, marks=[] if (h, s) in (((4, 2), 3), ((4, 1), 1)) else pytest.mark.slow)
    for h in ((4, 2), (4, 4), (4, 1)) for s in (1, 3) for p in (1, 3)]


@pytest.mark.parametrize("heads,q_len,pages_per_split", _SPLIT_CASES)
def test_matches_contiguous_reference(heads, q_len, pages_per_split):
  cache = make_cache(1, q_heads=heads[0], kv_heads=heads[1], q_len=q_len)
  out, lse = paged(*cache, pages_per_split=pages_per_split, return_lse=True)
  ref, ref_lse = reference(*cache, return_lse=True)
  assert out.shape == cache[0].shape and out.dtype == jnp.float32 and lse.shape == out.shape[:3]
  assert rel_err(out, ref) < tol(jnp.float32)
  finite = np.isfinite(ref_lse)
  np.testing.assert_array_equal(np.isfinite(lse), finite)
  assert rel_err(np.asarray(lse)[finite], ref_lse[finite]) < tol(jnp.float32)


def test_empty_sequence_gives_zeros_not_nans():
  # Rows 0 and 1 are empty; unused slots (all of rows 0/1, the tails of rows 2/3) hold NaN.
  cache = with_garbage(make_cache(2, lengths=(0, 0, 2, 5), q_len=2))
  out, lse = paged(*cache, return_lse=True, pages_per_split=3)
  assert np.all(np.isfinite(out))
  assert np.all(np.asarray(out[:2]) == 0) and np.all(np.isneginf(lse[:2]))
  assert np.all(np.isfinite(lse[2:]))
  clean = make_cache(2, lengths=(0, 0, 2, 5), q_len=2)
  assert rel_err(out, reference(*clean)) < tol(jnp.float32)


def test_nan_garbage_past_lengths_contributes_nothing():
  """0 x NaN in p @ V must not leak: slots past lengths (and free pages) are never read."""
  clean = make_cache(9, q_len=2, lengths=(2, 13, 28, 6))
  cache = with_garbage(clean)
  ct = np.random.RandomState(9).randn(*cache[0].shape).astype(np.float32)
  f = lambda q, kp, vp: jnp.sum(paged_attention(q, kp, vp, cache[3], cache[4]) * ct)
  val, (dq, dkp, dvp) = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(*cache[:3])
  assert all(np.all(np.isfinite(g)) for g in (dq, dkp, dvp))
  out = paged(*cache)
  assert np.all(np.isfinite(out))
  assert rel_err(out, reference(*clean)) < tol(jnp.float32)
  assert np.isclose(val, np.sum(np.asarray(out) * ct), rtol=1e-5)
  # Garbage slots get exactly zero gradient.
  assert np.all(np.asarray(dkp)[np.isnan(np.asarray(cache[1]))] == 0)


@pytest.mark.parametrize("mod_name", ["alibi", "document", "window", "softcap"])
def test_mods_on_absolute_positions(mod_name):
  cache = make_cache(3, q_len=3, lengths=(9, 28, 17, 4))
  docs = jnp.asarray(np.sort(np.random.RandomState(3).randint(0, 3, (4, 28)), axis=1), jnp.int32)
  mod, softcap = {
      "alibi": (alibi_mod(num_heads=4), None),
      "document": (compose_score_mods(alibi_mod(num_heads=4), document_mask_mod(docs)), None),
      "window": (sliding_window_mod(5), None),
      "softcap": (alibi_mod(num_heads=4), 2.0),
  }[mod_name]
  q = cache[0] * 4.0                                   # large logits: the soft-cap matters
  cache = (q,) + cache[1:]
  out = paged(*cache, score_mod=mod, softcap=softcap, pages_per_split=2)
  assert rel_err(out, reference(*cache, score_mod=mod, softcap=softcap)) < tol(jnp.float32)


def test_mask_mod_and_value_dim():
  cache = make_cache(4, q_len=2, v_dim=8)
  even = lambda b, h, i, j: (j % 2 == 0) | (h == 0)
  out = paged(*cache, mask_mod=even, scale=0.3)
  sq, ln = 2, np.asarray(cache[4])
  k, v = gather_pages(cache[1], cache[3]), gather_pages(cache[2], cache[3])
  mask = lambda b, h, i, j: (j < ln[b]) & (j <= i + ln[b] - sq) & even(b, h, i, j)
  assert out.shape == (4, 4, 2, 8)
  assert rel_err(out, reference_attention(cache[0], k, v, mask_mod=mask, scale=0.3)) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision(dtype):
  cache = make_cache(5, dtype=dtype, q_len=2)
  out = paged(*cache, pages_per_split=2)
  assert out.dtype == dtype
  assert rel_err(out, reference(*cache)) < tol(dtype)


@pytest.mark.slow        # the conformance suite's "paged" row checks these gradients by default
def test_grad_wrt_query_and_pages():
  cache = make_cache(6, q_len=2, lengths=(3, 28, 11, 0))
  ct = jax.random.normal(jax.random.key(60), cache[0].shape)
  f = lambda q, kp, vp: jnp.sum(paged_attention(q, kp, vp, cache[3], cache[4], pages_per_split=3)
                                * ct)
  dq, dkp, dvp = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(*cache[:3])
  assert all(np.all(np.isfinite(g)) for g in (dq, dkp, dvp))

  sq, ln = 2, np.asarray(cache[4])
  mask = lambda b, h, i, j: (j < ln[b]) & (j <= i + ln[b] - sq)
  with jax.enable_x64(True):
    up = lambda x: jnp.asarray(np.asarray(x, np.float64))
    from attnax.kernels import standard_attention
    g = lambda q, kp, vp: jnp.sum(standard_attention(
        q, gather_pages(kp, cache[3]), gather_pages(vp, cache[3]), mask_mod=mask) * up(ct))
    want = jax.grad(g, argnums=(0, 1, 2))(up(cache[0]), up(cache[1]), up(cache[2]))
    want = [np.asarray(w) for w in want]
  for got, w in zip((dq, dkp, dvp), want):
    assert rel_err(got, w) < tol(jnp.float32, grad=True)


def test_matches_jax_pallas_paged_attention_reference():
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)
      from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged
  except ImportError:
    pytest.skip("jax.experimental.pallas.ops.gpu.paged_attention is not available")
  q, k_pages, v_pages, tables, lengths = make_cache(7, q_heads=8, kv_heads=2,
                                                    lengths=(1, 13, 28, 5))
  k = jnp.swapaxes(gather_pages(k_pages, tables), 1, 2)      # (B, L, Hkv, D): JAX's layout
  v = jnp.swapaxes(gather_pages(v_pages, tables), 1, 2)
  for cap in (None, 3.0):
    want = jax_paged.paged_attention_reference(q[:, :, 0], k, v, lengths, attn_logits_soft_cap=cap)
    got = paged(q, k_pages, v_pages, tables, lengths, scale=1.0, softcap=cap)   # JAX: no scale
    assert rel_err(got[:, :, 0], want) < tol(jnp.float32)


def test_errors():
  q, kp, vp, bt, ln = make_cache(8)
  with pytest.raises(ValueError, match="k_pages must have rank 4"):
    paged_attention(q, kp[0], vp, bt, ln)
  with pytest.raises(ValueError, match="must agree"):
    paged_attention(q, kp, vp[:, :10], bt, ln)
  with pytest.raises(ValueError, match="block_tables"):
    paged_attention(q, kp, vp, bt.astype(jnp.float32), ln)
  with pytest.raises(ValueError, match="lengths"):
    paged_attention(q, kp, vp, bt, ln[:, None])
  with pytest.raises(ValueError, match="batch sizes differ"):
    paged_attention(q, kp, vp, bt[:2], ln[:2])
  with pytest.raises(ValueError, match="head_dim"):
    paged_attention(q[..., :8], kp, vp, bt, ln)
  with pytest.raises(ValueError, match="multiple of kv heads"):
    paged_attention(q[:, :3], kp, vp, bt, ln)
  with pytest.raises(ValueError, match="backend 'triton' is not available"):
    paged_attention(q, kp, vp, bt, ln, backend="triton")
  with pytest.raises(ValueError, match="softcap"):
    paged_attention(q, kp, vp, bt, ln, softcap=-1.0)


def test_bad_lengths_and_block_tables_raise_when_concrete():
  q, kp, vp, bt, ln = make_cache(8, q_len=2, lengths=(0, 13, 28, 5))
  cases = [
      (bt, ln.at[2].set(29), "lengths", r"\[0, 28\].*29.*bad rows \[2\]"),   # capacity 7 * 4
      (bt, ln.at[1].set(-1), "lengths", r"-1.*bad rows \[1\]"),
      (bt.at[1, 0].set(-1), ln, "block_tables", r"\(4, 7\).*\[1, 0\] = -1"),
      (bt.at[2, 6].set(NUM_PAGES), ln, "block_tables",
       rf"\[2, 6\] = {NUM_PAGES}.*{NUM_PAGES} pages"),
  ]
  for tables, lengths, name, detail in cases:
    with pytest.raises(ValueError, match=f"paged_attention: {name}.*{detail}"):
      paged_attention(q, kp, vp, tables, lengths)
  # Entries past the pages a sequence uses are ignored: row 0 is empty, row 3 uses 2 pages.
  check_values(bt.at[0].set(-1).at[3, 2:].set(NUM_PAGES), ln, num_pages=NUM_PAGES, page_size=PAGE)


def test_bad_lengths_and_block_tables_under_jit_give_nan_rows():
  """Traced values cannot raise: a row with a bad length or a bad used page is NaN, not wrong."""
  q, kp, vp, bt, ln = make_cache(10, q_len=2, batch=4, lengths=(2, 13, 28, 5))
  bad_bt = bt.at[1, 3].set(-1).at[3, 5].set(-7)      # row 1 uses slot 3; row 3 (5 tokens) not 5
  bad_ln = ln.at[0].set(-3).at[2].set(40)             # negative; past the capacity
  out, lse = paged(q, kp, vp, bad_bt, bad_ln, return_lse=True)
  nan_rows = [True, True, True, False]
  for b, is_nan in enumerate(nan_rows):
    assert np.all(np.isnan(out[b])) == is_nan and np.all(np.isnan(lse[b])) == is_nan
  assert rel_err(out[3], reference(q, kp, vp, bt, ln)[3]) < tol(jnp.float32)


def test_mod_arrays_must_fit_the_cache():
  q, kp, vp, bt, ln = make_cache(11)                 # B=4, Hq=4, capacity 28
  docs = jnp.zeros((4, 28), jnp.int32)
  cases = [
      (alibi_mod(num_heads=2), r"ALiBi slopes has shape \(2,\).*heads=4"),
      (document_mask_mod(docs[:, :10]), r"doc_ids has shape \(4, 10\).*q_len=28"),
      (document_mask_mod(docs[:2]), r"doc_ids has shape \(2, 28\).*batch=4"),
      (additive_bias_mod(jnp.zeros((4, 4, 10, 28))), r"bias has shape \(4, 4, 10, 28\).*q_len=28"),
  ]
  for mod, match in cases:
    with pytest.raises(ValueError, match="score_mod: " + match):
      paged_attention(q, kp, vp, bt, ln, score_mod=mod)
  with pytest.raises(ValueError, match=r"mask_mod: doc_ids has shape \(4, 10\)"):
    paged_attention(q, kp, vp, bt, ln, mask_mod=document_mask_mod(docs[:, :10]).mask_mod)


def test_rows_shorter_than_the_queries_have_empty_leading_queries():
  """lengths[b] < Sq (a shorter chunk, right-aligned): queries at negative positions see nothing."""
  cache = make_cache(12, q_len=3, lengths=(1, 2, 28, 0))
  out, lse = paged(*cache, return_lse=True)
  ref, ref_lse = reference(*cache, return_lse=True)
  assert np.all(np.asarray(out[0, :, :2]) == 0) and np.all(np.isneginf(lse[0, :, :2]))
  assert np.all(np.asarray(out[1, :, :1]) == 0) and np.all(np.isfinite(lse[1, :, 1:]))
  assert rel_err(out, ref) < tol(jnp.float32)
  finite = np.isfinite(ref_lse)
  np.testing.assert_array_equal(np.isfinite(lse), finite)
  assert rel_err(np.asarray(lse)[finite], ref_lse[finite]) < tol(jnp.float32)


def quantized(cache):
  """The cache's pages as int8 with per-token scales (attnax.kernels.paged.quantize_kv)."""
  from attnax.kernels.paged import quantize_kv
  q, k_pages, v_pages, tables, lengths = cache
  (kq, ks), (vq, vs) = quantize_kv(k_pages), quantize_kv(v_pages)
  return (q, kq, vq, tables, lengths), dict(k_scales=ks, v_scales=vs)


def test_int8_pages_jax_backend():
  cache, scales = quantized(make_cache(13, q_len=2, lengths=(3, 13, 28, 0)))
  q = cache[0].astype(jnp.bfloat16)
  out = paged(q, *cache[1:], **scales, backend="jax")
  assert out.dtype == jnp.bfloat16
  assert rel_err(out, reference(q, *cache[1:], **scales)) < tol(jnp.bfloat16)


def test_int8_errors():
  q, kp, vp, bt, ln = make_cache(14)
  (_, kq, vq, _, _), scales = quantized((q, kp, vp, bt, ln))
  with pytest.raises(ValueError, match="int8 pages need k_scales and v_scales"):
    paged_attention(q, kq, vq, bt, ln)
  with pytest.raises(ValueError, match="both be int8"):
    paged_attention(q, kq, vp, bt, ln, **scales)
  with pytest.raises(ValueError, match="k_scales/v_scales are for int8 pages"):
    paged_attention(q, kp, vp, bt, ln, **scales)
  with pytest.raises(ValueError, match=r"v_scales must be float32 .*\(2, 40, 4\).*\(2, 40\)"):
    paged_attention(q, kq, vq, bt, ln, k_scales=scales["k_scales"],
                    v_scales=scales["v_scales"][:, :, 0])
  with pytest.raises(ValueError, match="k_scales must be float32"):
    paged_attention(q, kq, vq, bt, ln, k_scales=scales["k_scales"].astype(jnp.bfloat16),
                    v_scales=scales["v_scales"])


def test_backend_and_config_errors():
  q, kp, vp, bt, ln = make_cache(15)
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="(?s)backend .pallas. cannot run.*needs a CUDA GPU"):
      paged_attention(q, kp, vp, bt, ln, backend="pallas")
  with pytest.raises(ValueError, match="config must be a PagedConfig"):
    paged_attention(q, kp, vp, bt, ln, backend="interpret", config={"block_kv": 16})
  from attnax.kernels.paged import PagedConfig
  with pytest.raises(ValueError, match="block_kv must be a power of two >= 16, got 24"):
    paged_attention(q, kp, vp, bt, ln, backend="interpret", config=PagedConfig(block_kv=24))
