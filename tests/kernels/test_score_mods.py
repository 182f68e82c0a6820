"""Tests for attnax.kernels.score_mods: every factory against hand-built numpy masks and biases.

Each factory is checked twice: its mask (``mask_mod_to_boolean_mask``) or its score transform
against a numpy mask/bias written out from DESIGN section 4's table, and ``standard_attention`` with
the mod against an independent float64 numpy attention using that mask/bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.kernels import score_mods as sm
from attnax.kernels import BlockMask, create_block_mask, flash_attention, standard_attention
from attnax.kernels.block_mask import EMPTY, FULL, PARTIAL
from attnax.kernels.score_mods import (
    MASK_VALUE, additive_bias_mod, alibi_mod, alibi_slopes, causal_mod, compose_score_mods,
    document_mask_mod, mask_mod_to_boolean_mask, mask_mod_to_score_mod, prefix_lm_mod,
    sliding_window_mod,
)
from tests.kernels.test_block_mask import expected_tiles
from tests.helpers import rel_err, tol, rand, random_qkv


B, HQ, HKV, SQ, SK, D = 2, 4, 2, 13, 19, 8


# ----------------------------------------------------------------------------- numpy references


def np_attention(q, k, v, mask=None, bias=None, scale=None, softcap=None):
  """Float64 numpy attention. ``mask``/``bias`` broadcast to ``(B, Hq, Sq, Sk)``; ``softcap``
  maps the (biased) scores to ``softcap * tanh(s / softcap)``.

  Returns ``(out (B, Hq, Sq, Dv), lse (B, Hq, Sq))``; a row with no visible key gives 0 / -inf.
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  g = q.shape[1] // k.shape[1]
  k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  s = scale * np.einsum("bhqd,bhkd->bhqk", q, k)
  if bias is not None:
    s = s + np.asarray(bias, np.float64)
  if softcap is not None:
    s = softcap * np.tanh(s / softcap)
  vis = np.ones(s.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), s.shape)
  s = np.where(vis, s, -np.inf)
  m = s.max(-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  p = np.where(vis, np.exp(s - m), 0.0)
  l = p.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bhkd->bhqd", p / np.where(l > 0, l, 1.0), v)
  with np.errstate(divide="ignore"):
    lse = np.where(l[..., 0] > 0, m[..., 0] + np.log(np.where(l[..., 0] > 0, l[..., 0], 1.0)),
                   -np.inf)
  return out, lse


def grid(b=B, h=HQ, sq=SQ, sk=SK):
  """numpy index arrays (B,1,1,1), (1,H,1,1), (1,1,Sq,1), (1,1,1,Sk)."""
  return (np.arange(b).reshape(-1, 1, 1, 1), np.arange(h).reshape(1, -1, 1, 1),
          np.arange(sq).reshape(1, 1, -1, 1), np.arange(sk).reshape(1, 1, 1, -1))


def full(mask, b=B, h=HQ, sq=SQ, sk=SK):
  return np.broadcast_to(mask, (b, h, sq, sk))


def mask_of(score_mod, b=B, h=HQ, sq=SQ, sk=SK):
  """The mask a mask-like score mod carries, materialised as numpy bool (B, H, Sq, Sk)."""
  assert isinstance(score_mod, sm.MaskScoreMod)
  return np.asarray(mask_mod_to_boolean_mask(score_mod.mask_mod, b, h, sq, sk))


def apply_score_mod(score_mod, score, b=B, h=HQ, sq=SQ, sk=SK):
  """Run a score mod on a (B, H, Sq, Sk) score array with the reference kernels' index grid."""
  bi, hi, qi, ki = sm.index_grid(b, h, sq, sk)
  return np.asarray(jnp.broadcast_to(score_mod(jnp.asarray(score, jnp.float32), bi, hi, qi, ki),
                                     (b, h, sq, sk)))


def check_attention(score_mod, mask=None, bias=None, seed=0, sq=SQ, sk=SK, dtype=jnp.float32):
  """standard_attention(score_mod=...) equals numpy attention with the hand-built mask/bias."""
  q, k, v = random_qkv(seed, batch=B, q_heads=HQ, kv_heads=HKV, q_len=sq, kv_len=sk,
                       head_dim=D, dtype=dtype)
  out, lse = standard_attention(q, k, v, score_mod=score_mod, return_lse=True)
  ref_out, ref_lse = np_attention(q, k, v, mask=mask, bias=bias)
  assert out.shape == (B, HQ, sq, D) and lse.shape == (B, HQ, sq)
  assert rel_err(out, ref_out) < tol(dtype)
  fin = np.isfinite(ref_lse)
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), fin)
  assert rel_err(np.asarray(lse)[fin], ref_lse[fin]) < tol(dtype)
  assert not np.isnan(np.asarray(out)).any()
  return out, lse


# ----------------------------------------------------------------------------- causal


@pytest.mark.parametrize("sq,sk,offset", [(SQ, SQ, 0), (SQ, SK, 0), (SQ, SK, SK - SQ),
                                          (SK, SQ, SQ - SK), (SQ, SK, 3)])
def test_causal_mod(sq, sk, offset):
  mod = causal_mod(offset)
  _, _, i, j = grid(sq=sq, sk=sk)
  expected = full(j <= i + offset, sq=sq, sk=sk)
  np.testing.assert_array_equal(mask_of(mod, sq=sq, sk=sk), expected)
  out, lse = check_attention(mod, mask=expected, sq=sq, sk=sk)
  # Rows that see no key (negative offsets) give exactly 0 and -inf.
  empty = ~expected.any(-1)
  assert (np.asarray(out)[empty] == 0).all() and np.isneginf(np.asarray(lse)[empty]).all()


def test_causal_bottom_right_matches_last_rows_of_square():
  """offset = Sk - Sq makes the Sq queries the last Sq rows of an Sk x Sk causal mask."""
  sq, sk = 5, 12
  square = mask_of(causal_mod(), sq=sk, sk=sk)
  br = mask_of(causal_mod(sk - sq), sq=sq, sk=sk)
  np.testing.assert_array_equal(br, square[:, :, sk - sq:])
  assert br[..., -1, :].all()  # the last query sees every key


def test_causal_default_is_top_left():
  np.testing.assert_array_equal(mask_of(causal_mod(), sq=SQ, sk=SK),
                                full(np.tril(np.ones((SQ, SK), bool))))


# ----------------------------------------------------------------------------- sliding window


@pytest.mark.parametrize("window,offset", [(1, 0), (3, 0), (SQ + SK, 0), (4, SK - SQ), (2, -2)])
def test_sliding_window_mod(window, offset):
  mod = sliding_window_mod(window, offset=offset) if offset else sliding_window_mod(window)
  _, _, i, j = grid()
  d = i + offset - j
  expected = full((d >= 0) & (d < window))
  np.testing.assert_array_equal(mask_of(mod), expected)
  check_attention(mod, mask=expected, seed=window)


def test_sliding_window_counts_own_position():
  m = mask_of(sliding_window_mod(4), sq=10, sk=10)[0, 0]
  np.testing.assert_array_equal(m.sum(-1), np.minimum(np.arange(10) + 1, 4))
  assert np.diag(m).all()


def test_sliding_window_huge_window_is_causal():
  np.testing.assert_array_equal(mask_of(sliding_window_mod(10_000)), mask_of(causal_mod()))


@pytest.mark.parametrize("window", [0, -3])
def test_sliding_window_rejects_nonpositive(window):
  with pytest.raises(ValueError, match="window_size"):
    sliding_window_mod(window)


# ----------------------------------------------------------------------------- prefix LM


@pytest.mark.parametrize("prefix", [0, 1, 6, SK + 5])
def test_prefix_lm_scalar(prefix):
  mod = prefix_lm_mod(prefix)
  _, _, i, j = grid()
  expected = full((j < prefix) | (j <= i))
  np.testing.assert_array_equal(mask_of(mod), expected)
  check_attention(mod, mask=expected, seed=prefix)


def test_prefix_lm_per_batch():
  prefix = np.array([3, 11])
  mod = prefix_lm_mod(jnp.asarray(prefix))
  b, _, i, j = grid()
  expected = full((j < prefix[b]) | (j <= i))
  np.testing.assert_array_equal(mask_of(mod), expected)
  assert not (expected[0] == expected[1]).all()  # the rows really differ
  check_attention(mod, mask=expected, seed=7)


def test_prefix_lm_rejects_rank2():
  with pytest.raises(ValueError, match="prefix_length"):
    prefix_lm_mod(jnp.ones((2, 3), jnp.int32))


# ----------------------------------------------------------------------------- document mask


def _ids(seed, batch, length, ndocs=3):
  """Sorted random document ids (B, S), starting at 0."""
  rng = np.random.default_rng(seed)
  cuts = np.sort(rng.integers(0, ndocs, size=(batch, length)), axis=-1)
  return cuts.astype(np.int32)


def test_document_mask_batched_ids():
  ids = _ids(0, B, SQ)
  mod = document_mask_mod(jnp.asarray(ids))
  b, _, i, j = grid(sk=SQ)
  expected = full(ids[b, i] == ids[b, j], sk=SQ)
  np.testing.assert_array_equal(mask_of(mod, sk=SQ), expected)
  assert not (expected[0] == expected[1]).all()
  check_attention(mod, mask=expected, sq=SQ, sk=SQ, seed=1)


def test_document_mask_unbatched_ids():
  ids = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4, 4], np.int32)
  mod = document_mask_mod(jnp.asarray(ids))
  _, _, i, j = grid(sk=SQ)
  expected = full(ids[i] == ids[j], sk=SQ)
  np.testing.assert_array_equal(mask_of(mod, sk=SQ), expected)
  check_attention(mod, mask=expected, sq=SQ, sk=SQ, seed=2)


def test_document_mask_separate_kv_ids_and_unsorted():
  # Sq != Sk, unsorted ids, and a query document (9) that no key has: those rows are empty.
  rng = np.random.default_rng(3)
  q_ids = rng.integers(0, 4, size=(B, SQ)).astype(np.int32)
  q_ids[:, 2] = 9
  kv_ids = rng.integers(0, 4, size=(B, SK)).astype(np.int32)
  mod = document_mask_mod(jnp.asarray(q_ids), jnp.asarray(kv_ids))
  b, _, i, j = grid()
  expected = full(q_ids[b, i] == kv_ids[b, j])
  np.testing.assert_array_equal(mask_of(mod), expected)
  out, lse = check_attention(mod, mask=expected, seed=3)
  assert (np.asarray(out)[:, :, 2] == 0).all() and np.isneginf(np.asarray(lse)[:, :, 2]).all()


def test_document_mask_broadcast_query_batch():
  q_ids = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3], np.int32)  # (Sq,) shared
  kv_ids = _ids(4, B, SK, ndocs=4)                                         # (B, Sk)
  mod = document_mask_mod(jnp.asarray(q_ids), jnp.asarray(kv_ids))
  b, _, i, j = grid()
  expected = full(q_ids[i] == kv_ids[b, j])
  np.testing.assert_array_equal(mask_of(mod), expected)


@pytest.mark.parametrize("ids,kv,match", [
    (np.zeros((2, 3, 4), np.int32), None, "doc_ids"),
    (np.zeros((4,), np.float32), None, "doc_ids"),
    (np.zeros((2, 4), np.int32), np.zeros((3, 5), np.int32), "batch"),
    (np.zeros((2, 4), np.int32), np.zeros((5,), np.float32), "kv_doc_ids"),
])
def test_document_mask_rejects_bad_ids(ids, kv, match):
  with pytest.raises(ValueError, match=match):
    document_mask_mod(ids, kv)


# ----------------------------------------------------------------------------- ALiBi


@pytest.mark.parametrize("n,expected", [
    (1, [2.0 ** -8]),
    (2, [2.0 ** -4, 2.0 ** -8]),
    (4, [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8]),
    (8, [2.0 ** -k for k in range(1, 9)]),
    (16, [2.0 ** (-k / 2) for k in range(1, 17)]),
    # Non-powers of two (the ALiBi paper's rule): slopes of the largest power of two below n,
    # then every other slope of twice that power.
    (6, [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]),
    (12, [2.0 ** -k for k in range(1, 9)] + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5]),
    (3, [2.0 ** -4, 2.0 ** -8, 2.0 ** -2]),
    (5, [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1]),
])
def test_alibi_slopes_paper_values(n, expected):
  s = alibi_slopes(n)
  assert s.shape == (n,) and s.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(s), np.asarray(expected), rtol=1e-6)


def test_alibi_slopes_rejects_zero():
  with pytest.raises(ValueError, match="num_heads"):
    alibi_slopes(0)


def test_alibi_mod_num_heads():
  mod = alibi_mod(num_heads=HQ)
  slopes = np.asarray(alibi_slopes(HQ), np.float64)
  _, h, i, j = grid()
  bias = full(slopes[h] * (j - i))
  score = np.asarray(rand(0, (B, HQ, SQ, SK)))
  np.testing.assert_allclose(apply_score_mod(mod, score), score + bias, rtol=1e-6, atol=1e-6)
  check_attention(mod, bias=bias, seed=4)


def test_alibi_mod_custom_slopes_with_causal():
  slopes = np.array([0.5, -0.25, 1.5, 0.0], np.float32)
  mod = compose_score_mods(alibi_mod(slopes=jnp.asarray(slopes)), causal_mod(SK - SQ))
  _, h, i, j = grid()
  check_attention(mod, mask=full(j <= i + SK - SQ), bias=full(slopes[h] * (j - i)), seed=5)


@pytest.mark.parametrize("kwargs", [dict(), dict(num_heads=4, slopes=np.ones(4)),
                                    dict(slopes=np.ones((2, 2)))])
def test_alibi_mod_bad_arguments(kwargs):
  with pytest.raises(ValueError):
    alibi_mod(**kwargs)


# ----------------------------------------------------------------------------- additive bias


@pytest.mark.parametrize("shape", [(B, HQ, SQ, SK), (1, HQ, SQ, SK), (B, 1, 1, SK), (SQ, SK),
                                   (SK,), (HQ, 1, 1), (B, HQ, SQ, 1), ()])
def test_additive_bias_broadcasting(shape):
  bias = np.asarray(rand(len(shape) + sum(shape), shape))
  mod = additive_bias_mod(jnp.asarray(bias))
  score = np.asarray(rand(1, (B, HQ, SQ, SK)))
  expected = score + np.broadcast_to(bias, (B, HQ, SQ, SK))
  np.testing.assert_allclose(apply_score_mod(mod, score), expected, rtol=1e-6, atol=1e-6)
  check_attention(mod, bias=np.broadcast_to(bias, (B, HQ, SQ, SK)), seed=6)


def test_take_gathers_only_along_the_axes_that_vary():
  """A broadcast axis of a mod's array is read at index 0 without widening the gather: inside a
  kernel's (bq, bk) tile a bias row is one (1, bk) load, not bq * bk of them."""
  bias = rand(3, (B, 1, 1, SK))
  b = jnp.asarray(1)
  h = jnp.arange(HQ)[:, None, None]
  i = jnp.arange(SQ)[None, :, None]
  j = jnp.arange(SK)[None, None, :]
  got = sm.take(bias, b, h, i, j)
  assert got.shape == (1, 1, SK)
  np.testing.assert_array_equal(np.broadcast_to(got, (HQ, SQ, SK)),
                                np.broadcast_to(np.asarray(bias)[1, 0, 0], (HQ, SQ, SK)))


def test_additive_bias_low_precision_bias_is_upcast():
  bias = rand(2, (SQ, SK)).astype(jnp.bfloat16)
  mod = additive_bias_mod(bias)
  out = apply_score_mod(mod, np.zeros((B, HQ, SQ, SK), np.float32))
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, np.broadcast_to(np.asarray(bias, np.float32), out.shape))


def test_additive_bias_rejects_rank5():
  with pytest.raises(ValueError, match="bias"):
    additive_bias_mod(jnp.zeros((1, 1, 1, 2, 2)))


# ----------------------------------------------------------------------------- composition


def _double(score, b, h, q_idx, kv_idx):
  return 2.0 * score


def test_compose_applies_in_order():
  bias = np.asarray(rand(3, (SQ, SK)))
  score = np.asarray(rand(4, (B, HQ, SQ, SK)))
  add = additive_bias_mod(jnp.asarray(bias))
  np.testing.assert_allclose(apply_score_mod(compose_score_mods(_double, add), score),
                             2 * score + bias, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(apply_score_mod(compose_score_mods(add, _double), score),
                             2 * (score + bias), rtol=1e-6, atol=1e-6)


def test_compose_flattens_and_skips_none():
  a, c = alibi_mod(num_heads=HQ), causal_mod()
  d = additive_bias_mod(jnp.ones((SQ, SK)))
  nested = compose_score_mods(compose_score_mods(a, None, c), None, compose_score_mods(d))
  assert isinstance(nested, sm.ComposedScoreMod)
  assert nested.mods == (a, c, d)
  assert compose_score_mods() is None and compose_score_mods(None, None) is None
  assert compose_score_mods(None, c) is c


def test_compose_rejects_mask_signature():
  with pytest.raises(ValueError, match="score_mod"):
    compose_score_mods(lambda b, h, i, j: i >= j)


def test_composed_mods_attention():
  """ALiBi + sliding window + documents + a bias, composed, against one numpy mask and bias."""
  ids = _ids(5, B, SQ)
  bias = np.asarray(rand(5, (B, 1, SQ, SQ)))
  mod = compose_score_mods(alibi_mod(num_heads=HQ), sliding_window_mod(5),
                           document_mask_mod(jnp.asarray(ids)), additive_bias_mod(jnp.asarray(bias)))
  slopes = np.asarray(alibi_slopes(HQ), np.float64)
  b, h, i, j = grid(sk=SQ)
  mask = full(((i - j) >= 0) & ((i - j) < 5) & (ids[b, i] == ids[b, j]), sk=SQ)
  check_attention(mod, mask=mask, bias=full(slopes[h] * (j - i) + bias, sk=SQ), sq=SQ, sk=SQ,
                  seed=8)


# ----------------------------------------------------------------------------- mask conversions


def test_mask_mod_to_score_mod():
  mask_fn = lambda b, h, i, j: ((i + j + h) % 3 != 0) | (b == 1)
  mod = mask_mod_to_score_mod(mask_fn)
  assert isinstance(mod, sm.MaskScoreMod) and mod.mask_mod is mask_fn
  b, h, i, j = grid()
  expected = full(((i + j + h) % 3 != 0) | (b == 1))
  score = np.asarray(rand(6, (B, HQ, SQ, SK)))
  got = apply_score_mod(mod, score)
  np.testing.assert_array_equal(got, np.where(expected, score.astype(np.float32), MASK_VALUE))
  assert np.isfinite(got).all()
  check_attention(mod, mask=expected, seed=9)


def test_mask_mod_to_score_mod_rejects_score_signature():
  with pytest.raises(ValueError, match="mask_mod"):
    mask_mod_to_score_mod(_double)


def test_mask_mod_to_boolean_mask_broadcasts():
  m = mask_mod_to_boolean_mask(lambda b, h, i, j: j <= i, 3, 2, 5, 7)
  assert m.shape == (3, 2, 5, 7) and m.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(m), full(np.tril(np.ones((5, 7), bool)), 3, 2, 5, 7))
  m = mask_mod_to_boolean_mask(lambda b, h, i, j: (b == 1) & (h == 0), 2, 3, 4, 4)
  np.testing.assert_array_equal(np.asarray(m).any(axis=(2, 3)), [[0, 0, 0], [1, 0, 0]])


def test_mask_value_is_finite_large_negative():
  assert np.isfinite(MASK_VALUE) and MASK_VALUE < -1e37
  # and stays finite in f32 after adding a modest bias
  assert np.isfinite(np.float32(MASK_VALUE) + np.float32(-1e30))


# ----------------------------------------------------------------------------- pytrees


def _all_mods():
  ids = jnp.asarray(_ids(0, B, SK))  # one id per key position (queries use the first Sq)
  return {
      "causal": causal_mod(2),
      "window": sliding_window_mod(3, offset=1),
      "prefix": prefix_lm_mod(jnp.array([2, 5])),
      "document": document_mask_mod(ids),
      "document_kv": document_mask_mod(ids[:, :SQ], jnp.asarray(_ids(1, B, SK))),
      "alibi": alibi_mod(num_heads=HQ),
      "bias": additive_bias_mod(jnp.ones((SQ, SK))),
      "composed": compose_score_mods(alibi_mod(num_heads=HQ), causal_mod(),
                                     additive_bias_mod(jnp.ones((SQ, SK)))),
      # (the (B, Sk) boolean form is traced in test_padding_traced_under_jit: x + 1 is not bool)
      "padding": sm.padding_mask_mod(jnp.array([5, 12])),
      "softcap_or": compose_score_mods(sm.softcap_mod(3.0), mask_mod_to_score_mod(
          sm.or_masks(sm.CausalMask(), sm.padding_mask_mod(jnp.array([4, 9])).mask_mod))),
  }


def test_mod_leaves_are_their_arrays():
  mods = _all_mods()
  assert jax.tree.leaves(mods["causal"]) == [] and jax.tree.leaves(mods["window"]) == []
  (p,) = jax.tree.leaves(mods["prefix"])
  np.testing.assert_array_equal(np.asarray(p), [2, 5])
  assert len(jax.tree.leaves(mods["document"])) == 2
  q_ids, kv_ids = jax.tree.leaves(mods["document_kv"])
  assert q_ids.shape == (B, SQ) and kv_ids.shape == (B, SK) and q_ids.dtype == jnp.int32
  (s,) = jax.tree.leaves(mods["alibi"])
  np.testing.assert_array_equal(np.asarray(s), np.asarray(alibi_slopes(HQ)))
  (bias,) = jax.tree.leaves(mods["bias"])
  assert bias.shape == (1, 1, SQ, SK)
  assert [x.shape for x in jax.tree.leaves(mods["composed"])] == [(HQ,), (1, 1, SQ, SK)]
  # Static settings live in the treedef, not the leaves.
  assert (jax.tree.structure(causal_mod(1)) != jax.tree.structure(causal_mod(2)))


@pytest.mark.parametrize("name", list(_all_mods()))
def test_mods_pass_through_jit(name):
  mod = _all_mods()[name]
  q, k, v = random_qkv(10, batch=B, q_heads=HQ, kv_heads=HKV, q_len=SQ, kv_len=SK, head_dim=D)
  traces = []

  @jax.jit
  def f(q, k, v, mod):
    traces.append(1)
    return standard_attention(q, k, v, score_mod=mod)

  eager = standard_attention(q, k, v, score_mod=mod)
  np.testing.assert_allclose(np.asarray(f(q, k, v, mod)), np.asarray(eager), rtol=1e-6, atol=1e-6)
  # New leaf values, same structure: no retrace, and the new values are used.
  new = jax.tree.map(lambda x: x + 1, mod)
  np.testing.assert_allclose(np.asarray(f(q, k, v, new)),
                             np.asarray(standard_attention(q, k, v, score_mod=new)),
                             rtol=1e-6, atol=1e-6)
  assert len(traces) == 1


def test_tree_unflatten_rebuilds_with_new_leaves():
  ids = _ids(0, B, SQ)
  mod = document_mask_mod(jnp.asarray(ids))
  leaves, treedef = jax.tree.flatten(mod)
  new_ids = jnp.asarray(_ids(1, B, SQ))
  rebuilt = jax.tree.unflatten(treedef, [new_ids, new_ids])
  assert type(rebuilt) is type(mod) and isinstance(rebuilt.mask_mod, sm.DocumentMask)
  b, _, i, j = grid(sk=SQ)
  ni = np.asarray(new_ids)
  np.testing.assert_array_equal(mask_of(rebuilt, sk=SQ), full(ni[b, i] == ni[b, j], sk=SQ))

  composed = compose_score_mods(alibi_mod(num_heads=HQ), prefix_lm_mod(jnp.array([1, 2])))
  leaves, treedef = jax.tree.flatten(composed)
  slopes = jnp.array([1.0, 0.5, 0.25, 0.125])
  rebuilt = jax.tree.unflatten(treedef, [slopes, jnp.array([4, 0], jnp.int32)])
  _, h, i, j = grid()
  score = np.zeros((B, HQ, SQ, SK), np.float32)
  b = np.arange(B).reshape(-1, 1, 1, 1)
  expected_mask = full((j < np.array([4, 0])[b]) | (j <= i))
  expected = np.where(expected_mask, np.asarray(slopes)[h] * (j - i), MASK_VALUE)
  np.testing.assert_allclose(apply_score_mod(rebuilt, score), expected, rtol=1e-6)


def test_mod_as_vmap_argument():
  """A mod's leaves can be batched by vmap: one document layout per vmapped call."""
  ids = jnp.stack([jnp.asarray(_ids(s, 1, SQ)) for s in range(3)])  # (3, 1, Sq)
  q, k, v = random_qkv(11, batch=1, q_heads=2, kv_heads=2, q_len=SQ, kv_len=SQ, head_dim=D)
  f = lambda ids: standard_attention(q, k, v, score_mod=document_mask_mod(ids))
  out = jax.vmap(f)(ids)
  for n in range(3):
    np.testing.assert_allclose(np.asarray(out[n]), np.asarray(f(ids[n])), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- split / resolve


def test_split_score_mod_cases():
  a, c = alibi_mod(num_heads=HQ), causal_mod()
  ids = jnp.asarray(_ids(2, B, SQ))
  d = document_mask_mod(ids)
  assert sm.split_score_mod(None) == (None, None)
  assert sm.split_score_mod(_double) == (_double, None)
  assert sm.split_score_mod(a) == (a, None)
  s, m = sm.split_score_mod(c)
  assert s is None and m is c.mask_mod
  s, m = sm.split_score_mod(compose_score_mods(c, d))
  assert s is None and isinstance(m, sm.AndMask) and m.masks == (c.mask_mod, d.mask_mod)
  bias = additive_bias_mod(jnp.ones((SQ, SQ)))
  s, m = sm.split_score_mod(compose_score_mods(a, c, _double, d, bias))
  assert isinstance(s, sm.ComposedScoreMod) and s.mods == (a, _double, bias)
  assert m.masks == (c.mask_mod, d.mask_mod)
  # Nested compositions built by hand still split completely.
  s, m = sm.split_score_mod(sm.ComposedScoreMod((a, sm.ComposedScoreMod((c, _double)))))
  assert s.mods == (a, _double) and m is c.mask_mod


def test_resolve_mods_combines_carried_and_explicit_masks():
  ids = _ids(3, B, SQ)
  extra = lambda b, h, i, j: (h != 1) | (j % 2 == 0)
  score_mod = compose_score_mods(alibi_mod(num_heads=HQ), sliding_window_mod(4),
                                 document_mask_mod(jnp.asarray(ids)))
  s, m = sm.resolve_mods(score_mod, extra)
  assert isinstance(s, sm.AlibiMod)
  assert isinstance(m, sm.AndMask) and len(m.masks) == 3 and m.masks[-1] is extra
  b, h, i, j = grid(sk=SQ)
  expected = full((i - j >= 0) & (i - j < 4) & (ids[b, i] == ids[b, j]) & ((h != 1) | (j % 2 == 0)),
                  sk=SQ)
  np.testing.assert_array_equal(np.asarray(mask_mod_to_boolean_mask(m, B, HQ, SQ, SQ)), expected)
  # The split form gives the same attention as the composed one plus the mask_mod.
  q, k, v = random_qkv(12, batch=B, q_heads=HQ, kv_heads=HKV, q_len=SQ, kv_len=SQ, head_dim=D)
  out = standard_attention(q, k, v, score_mod=score_mod, mask_mod=extra)
  slopes = np.asarray(alibi_slopes(HQ), np.float64)
  ref, _ = np_attention(q, k, v, mask=expected, bias=full(slopes[h] * (j - i), sk=SQ))
  assert rel_err(out, ref) < tol(jnp.float32)


def test_resolve_mods_plain():
  assert sm.resolve_mods(None, None) == (None, None)
  c = causal_mod()
  assert sm.resolve_mods(None, c.mask_mod) == (None, c.mask_mod)
  assert sm.resolve_mods(_double, None) == (_double, None)
  with pytest.raises(ValueError, match="mask_mod"):
    sm.resolve_mods(None, _double)
  with pytest.raises(ValueError, match="score_mod"):
    sm.resolve_mods(c.mask_mod, None)


def test_and_masks_flattens():
  c, w = sm.CausalMask(), sm.SlidingWindowMask(3)
  assert sm.and_masks() is None and sm.and_masks(None) is None and sm.and_masks(None, c) is c
  m = sm.and_masks(sm.and_masks(c, w), None, c)
  assert isinstance(m, sm.AndMask) and m.masks == (c, w, c)


# ----------------------------------------------------------------------------- padding masks


def _valid_rows(kind):
  """(B, Sk) bool key masks: right- and left-padded rows, or a right-padded row and an empty one."""
  valid = np.zeros((B, SK), bool)
  if kind == "right_left":
    valid[0, :11] = True         # right padding: 11 real tokens
    valid[1, SK - 6:] = True     # left padding: the last 6 keys are real
  else:                          # "empty_row": row 1 has no real token
    valid[0, :SK - 4] = True
  return valid


def _expected_tiles(mask, block_q, block_k):
  """Tile states (B, H, nq, nk) of a dense (B, H, Sq, Sk) mask: EMPTY where nothing in range is
  visible, FULL where everything is and the tile is not ragged, else PARTIAL."""
  any_, all_, ragged = expected_tiles(mask, block_q, block_k)
  return np.where(any_, np.where(all_ & ~ragged, FULL, PARTIAL), EMPTY)


def _tiles_bh(bm, batch=B, heads=HQ):
  """A BlockMask's tiles broadcast to (batch, heads, nq, nk) through batch_head_index."""
  t = np.asarray(bm.tiles)
  return np.stack([np.stack([t[bm.batch_head_index(b, h)] for h in range(heads)])
                   for b in range(batch)])


@pytest.mark.parametrize("lengths", [[7, 0], [SK + 3, 16]])
def test_padding_lengths(lengths):
  mod = sm.padding_mask_mod(jnp.asarray(lengths))
  assert isinstance(mod.mask_mod, sm.PaddingLengthMask)
  b, _, _, j = grid()
  expected = full(j < np.asarray(lengths)[b])
  np.testing.assert_array_equal(mask_of(mod), expected)
  out, lse = check_attention(mod, mask=expected, seed=20 + lengths[1])
  empty = ~expected.any(-1)
  assert (np.asarray(out)[empty] == 0).all() and np.isneginf(np.asarray(lse)[empty]).all()
  if lengths[1] == 0:
    assert empty[1].all() and not empty[0].any()


@pytest.mark.parametrize("kind", ["right_left", "empty_row"])
@pytest.mark.parametrize("dtype", [np.bool_, np.int32])
def test_padding_attention_mask(kind, dtype):
  """A Hugging Face style (B, Sk) attention_mask, bool or 0/1 integers, left or right padded."""
  valid = _valid_rows(kind)
  mod = sm.padding_mask_mod(jnp.asarray(valid.astype(dtype)))
  assert isinstance(mod.mask_mod, sm.PaddingMask) and mod.mask_mod.valid.dtype == jnp.bool_
  b, _, _, j = grid()
  expected = full(valid[b, j])
  np.testing.assert_array_equal(mask_of(mod), expected)
  out, lse = check_attention(mod, mask=expected, seed=30)
  if kind == "empty_row":
    assert (np.asarray(out)[1] == 0).all() and np.isneginf(np.asarray(lse)[1]).all()
    assert np.isfinite(np.asarray(lse)[0]).all()


def test_padding_lengths_equal_right_padded_mask():
  lengths = np.array([11, 4])
  valid = np.arange(SK)[None] < lengths[:, None]
  np.testing.assert_array_equal(mask_of(sm.padding_mask_mod(jnp.asarray(lengths))),
                                mask_of(sm.padding_mask_mod(jnp.asarray(valid))))


def test_padding_block_mask_skips_padded_tiles():
  """Both forms: padded key tiles EMPTY, valid tiles FULL, per batch row, as the dense mask says."""
  bq, bk = 4, 4                                  # SQ=13, SK=19: ragged tails on both axes
  left_right = _valid_rows("right_left")
  mods = {
      "lengths": sm.padding_mask_mod(jnp.array([8, 0])).mask_mod,
      "mask": sm.padding_mask_mod(jnp.asarray(left_right)).mask_mod,
      "mask_b1": sm.padding_mask_mod(jnp.asarray(left_right[1:])).mask_mod,
  }
  # Only the tile maps are kept: the index lists follow from them (tested in test_block_mask) and
  # their sorts dominate compile time.
  tiles = jax.jit(lambda ms: {n: create_block_mask(m, q_len=SQ, kv_len=SK, block_q=bq, block_k=bk,
                                                   batch=B).tiles for n, m in ms.items()})(mods)
  bms = {n: BlockMask(t, *[None] * 8, block_q=bq, block_k=bk, q_len=SQ, kv_len=SK)
         for n, t in tiles.items()}
  for name, m in mods.items():
    bm = bms[name]
    lead = 1 if name == "mask_b1" else B
    assert bm.tiles.shape == (lead, 1, -(-SQ // bq), -(-SK // bk)), name
    dense = np.asarray(mask_mod_to_boolean_mask(m, B, HQ, SQ, SK))
    want = _expected_tiles(dense, bq, bk)
    np.testing.assert_array_equal(_tiles_bh(bm), want, err_msg=name)
  # Spelled out for the lengths form: row 0 has 8 real keys = kv blocks 0 and 1 (full), the rest
  # empty; row 1 has none: every tile empty.
  t = np.asarray(bms["lengths"].tiles)[:, 0]
  assert (t[0, :-1, :2] == FULL).all() and (t[0, :, 2:] == EMPTY).all()
  assert (t[1] == EMPTY).all()
  # The mask form, q block 0: row 0 (keys 0..10 real, right padded) -> kv blocks 0, 1 full, 2
  # partial, 3, 4 empty; row 1 (keys 13..18 real, left padded) -> blocks 0..2 empty, 3 partial
  # (keys 12..15), 4 partial (all real, but ragged: keys 16..18 of 16..19).
  t = np.asarray(bms["mask"].tiles)[:, 0, 0]
  np.testing.assert_array_equal(t[0], [FULL, FULL, 1, EMPTY, EMPTY])
  np.testing.assert_array_equal(t[1], [EMPTY, EMPTY, EMPTY, 1, 1])


def test_padding_flash_attention():
  """flash_attention with a (B, Sk) padding mask against the reference: a right-padded row, a
  left-and-right-padded row and an empty row (output 0, lse -inf)."""
  q, k, v = random_qkv(40, batch=3, q_heads=HQ, kv_heads=HKV, q_len=SQ, kv_len=SK, head_dim=D)
  valid = np.zeros((3, SK), bool)
  valid[0, :9] = True
  valid[1, 2:12] = True
  out, lse = jax.jit(lambda q, k, v, mod: flash_attention(
      q, k, v, score_mod=mod, block_q=8, block_k=8, return_lse=True))(
          q, k, v, sm.padding_mask_mod(jnp.asarray(valid)))
  ref_out, ref_lse = np_attention(q, k, v, mask=valid[:, None, None, :])
  assert rel_err(out, ref_out) < tol(jnp.float32)
  fin = np.isfinite(ref_lse)
  assert fin[:2].all() and not fin[2].any()
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), fin)
  assert rel_err(np.asarray(lse)[fin], ref_lse[fin]) < tol(jnp.float32)
  assert (np.asarray(out)[2] == 0).all() and not np.isnan(np.asarray(out)).any()


def test_padding_traced_under_jit():
  """The valid array may be traced (value checks are skipped); new values need no retrace."""
  q, k, v = random_qkv(41, batch=B, q_heads=HQ, kv_heads=HKV, q_len=SQ, kv_len=SK, head_dim=D)
  traces = []

  @jax.jit
  def f(valid):
    traces.append(1)
    return standard_attention(q, k, v, score_mod=sm.padding_mask_mod(valid))

  for kind in ("right_left", "empty_row"):
    valid = _valid_rows(kind).astype(np.int32)
    ref, _ = np_attention(q, k, v, mask=valid[:, None, None, :])
    assert rel_err(f(jnp.asarray(valid)), ref) < tol(jnp.float32)
  assert len(traces) == 1
  (leaf,) = jax.tree.leaves(sm.padding_mask_mod(jnp.array([3, 4])))
  np.testing.assert_array_equal(np.asarray(leaf), [3, 4])


@pytest.mark.parametrize("valid", [
    3,                                         # rank 0
    np.ones((2, 3, 4), np.int32),              # rank 3
    np.ones((2, SK), np.float32),              # float mask
    np.ones((2,), np.float32),                 # float lengths
    np.ones((SK,), bool),                      # a rank-1 boolean mask (needs a batch axis)
    np.array([[0, 1, 2]], np.int32),           # integers other than 0/1
    np.array([5, -1], np.int32),               # negative length
    "abc",
])
def test_padding_rejects_bad_valid(valid):
  with pytest.raises(ValueError, match="valid"):
    sm.padding_mask_mod(valid)


@pytest.mark.parametrize("valid,match", [
    (np.ones((3, SK), bool), "batch"),          # batch 3 for inputs with B=2
    (np.ones((B, SK - 1), bool), "kv_len"),     # does not cover the keys
    (np.ones((3,), np.int32), "batch"),
])
def test_padding_checked_against_inputs(valid, match):
  q, k, v = random_qkv(42, batch=B, q_heads=HQ, kv_heads=HKV, q_len=SQ, kv_len=SK, head_dim=D)
  mod = sm.padding_mask_mod(jnp.asarray(valid))
  with pytest.raises(ValueError, match=match):
    standard_attention(q, k, v, score_mod=mod)
  # also when nested in an OR / AND of masks
  with pytest.raises(ValueError, match=match):
    standard_attention(q, k, v, mask_mod=sm.or_masks(sm.CausalMask(), mod.mask_mod))
  # a longer mask and a batch axis of 1 are fine
  sm.check_mod_shapes(sm.padding_mask_mod(jnp.ones((1, SK + 5), bool)), batch=B, heads=HQ,
                      q_len=SQ, kv_len=SK)


# ----------------------------------------------------------------------------- soft-capping


def test_softcap_mod_formula():
  cap = 5.0
  score = 10 * np.asarray(rand(50, (B, HQ, SQ, SK)))
  got = apply_score_mod(sm.softcap_mod(cap), score)
  np.testing.assert_allclose(got, cap * np.tanh(score / cap), rtol=1e-6, atol=1e-6)
  assert np.abs(got).max() < cap and np.abs(score).max() > cap
  # composed with ALiBi, in either order
  alibi = alibi_mod(num_heads=HQ)
  _, h, i, j = grid()
  bias = full(np.asarray(alibi_slopes(HQ))[h] * (j - i))
  np.testing.assert_allclose(apply_score_mod(compose_score_mods(alibi, sm.softcap_mod(cap)), score),
                             cap * np.tanh((score + bias) / cap), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(apply_score_mod(compose_score_mods(sm.softcap_mod(cap), alibi), score),
                             cap * np.tanh(score / cap) + bias, rtol=1e-5, atol=1e-5)
  assert jax.tree.leaves(sm.softcap_mod(cap)) == []
  assert jax.tree.structure(sm.softcap_mod(2)) != jax.tree.structure(sm.softcap_mod(3))


def test_softcap_mod_attention():
  """softcap + causal vs numpy attention with cap * tanh(s / cap) on large logits."""
  cap = 2.0
  q, k, v = random_qkv(51, batch=B, q_heads=HQ, kv_heads=HKV, q_len=SQ, kv_len=SK, head_dim=D,
                       scale=8.0)
  _, _, i, j = grid()
  mask = full(j <= i + SK - SQ)
  for mod in (compose_score_mods(sm.softcap_mod(cap), causal_mod(SK - SQ)),
              compose_score_mods(causal_mod(SK - SQ), sm.softcap_mod(cap))):
    out, lse = standard_attention(q, k, v, score_mod=mod, return_lse=True)
    ref_out, ref_lse = np_attention(q, k, v, mask=mask, softcap=cap)
    assert rel_err(out, ref_out) < tol(jnp.float32)
    assert rel_err(lse, ref_lse) < tol(jnp.float32)
  # the cap really changed the result
  plain, _ = np_attention(q, k, v, mask=mask)
  assert rel_err(ref_out, plain) > 1e-2


@pytest.mark.parametrize("cap", [0, 0.0, -1.5, float("inf"), float("nan"), True, "30", None,
                                 np.ones(2), jnp.asarray(30.0)])
def test_softcap_rejects_bad_cap(cap):
  with pytest.raises(ValueError, match="cap"):
    sm.softcap_mod(cap)


def test_softcap_accepts_numbers():
  assert sm.softcap_mod(30).cap == 30.0 and isinstance(sm.softcap_mod(30).cap, float)
  assert sm.softcap_mod(np.float32(2.5)).cap == 2.5


# ----------------------------------------------------------------------------- OR of masks


def test_or_masks_flattens():
  c, w = sm.CausalMask(), sm.SlidingWindowMask(3)
  p = sm.PrefixLMMask(jnp.array([2]))
  assert sm.or_masks() is None and sm.or_masks(None) is None and sm.or_masks(None, c) is c
  m = sm.or_masks(sm.or_masks(c, w), None, p)
  assert isinstance(m, sm.OrMask) and m.masks == (c, w, p)
  # AND inside OR (and OR inside AND) are kept as they are
  a = sm.and_masks(c, w)
  m = sm.or_masks(a, p)
  assert m.masks == (a, p)
  assert sm.and_masks(m, c).masks == (m, c)
  assert [x.shape for x in jax.tree.leaves(m)] == [(1,)]


@pytest.mark.parametrize("bad", [causal_mod(), _double, 3])
def test_or_and_masks_reject_non_masks(bad):
  for fn in (sm.or_masks, sm.and_masks):
    with pytest.raises(ValueError, match="mask"):
      fn(sm.CausalMask(), bad)


def _or_cases():
  """(name, OR mask, dense expected (B, Hq, Sq, Sq)) over square Sq x Sq inputs."""
  ids = _ids(60, B, SQ)
  b, h, i, j = grid(sk=SQ)
  causal = j <= i
  return [
      ("causal|prefix", sm.or_masks(sm.CausalMask(), sm.PrefixLMMask(jnp.array([3, 9]))),
       full(causal | (j < np.array([3, 9])[b]), sk=SQ)),
      ("causal|document",
       sm.or_masks(sm.CausalMask(), document_mask_mod(jnp.asarray(ids)).mask_mod),
       full(causal | (ids[b, i] == ids[b, j]), sk=SQ)),
      # no tile rule for the lambda (global first keys, per head): evaluated per tile
      ("window|lambda", sm.or_masks(sm.SlidingWindowMask(2), lambda b, h, i, j: j < h + 1),
       full(((i - j >= 0) & (i - j < 2)) | (j < h + 1), sk=SQ)),
  ]


@pytest.mark.parametrize("case", range(3))
def test_or_masks_attention(case):
  name, m, expected = _or_cases()[case]
  np.testing.assert_array_equal(np.asarray(mask_mod_to_boolean_mask(m, B, HQ, SQ, SQ)), expected,
                                err_msg=name)
  # as a score mod it carries, and as a kernel's mask_mod
  check_attention(mask_mod_to_score_mod(m), mask=expected, sq=SQ, sk=SQ, seed=61 + case)
  q, k, v = random_qkv(64, batch=B, q_heads=HQ, kv_heads=HKV, q_len=SQ, kv_len=SQ, head_dim=D)
  ref, _ = np_attention(q, k, v, mask=expected)
  assert rel_err(standard_attention(q, k, v, mask_mod=m), ref) < tol(jnp.float32)


def test_or_masks_block_mask():
  """Tiles of an OR: EMPTY exactly where the dense OR is empty, FULL only where it is full, and
  FULL wherever one part is full."""
  bq = bk = 4
  cases = _or_cases()
  masks = [m for _, m, _ in cases]
  build = lambda m: create_block_mask(m, q_len=SQ, kv_len=SQ, block_q=bq, block_k=bk, batch=B,
                                      heads=HQ).tiles
  # (closed over, not passed: a lambda inside a mask pytree is a leaf but not an array)
  tiles = jax.jit(lambda: [build(m) for m in masks] + [build(p) for m in masks for p in m.masks])()
  bms = [BlockMask(t, *[None] * 8, block_q=bq, block_k=bk, q_len=SQ, kv_len=SQ) for t in tiles]
  parts = iter(bms[len(masks):])
  for (name, m, expected), bm in zip(cases, bms[:len(masks)]):
    got, want = _tiles_bh(bm), _expected_tiles(expected, bq, bk)
    np.testing.assert_array_equal(got == EMPTY, want == EMPTY, err_msg=name)
    assert not ((got == FULL) & (want != FULL)).any(), name
    for _ in m.masks:
      assert ((_tiles_bh(next(parts)) != FULL) | (got == FULL)).all(), name
  # causal|prefix is exact: the prefix columns and the lower triangle are full
  np.testing.assert_array_equal(_tiles_bh(bms[0]), _expected_tiles(cases[0][2], bq, bk))


def test_mask_results_combine_as_booleans():
  """Mask mods returning integers (0 / nonzero) combine logically, not bitwise."""
  two_if_causal = lambda b, h, i, j: jnp.where(j <= i, 2, 0)
  one_if_even = lambda b, h, i, j: jnp.where(j % 2 == 0, 1, 0)
  _, _, i, j = grid(sk=SQ)
  for combine, op in ((sm.and_masks, np.logical_and), (sm.or_masks, np.logical_or)):
    m = mask_mod_to_boolean_mask(combine(two_if_causal, one_if_even), B, HQ, SQ, SQ)
    assert m.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(m), full(op(j <= i, j % 2 == 0), sk=SQ))


def test_new_names_are_exported():
  import attnax.kernels as K
  for name in ("padding_mask_mod", "softcap_mod", "and_masks", "or_masks"):
    assert name in K.__all__ and name in sm.__all__ and getattr(K, name) is getattr(sm, name)


# ----------------------------------------------------------------------------- mask arrays, windows


def test_array_mask_and_window_names_are_exported():
  import attnax.kernels as K
  for name in ("array_mask_mod", "local_window_mod"):
    assert name in K.__all__ and name in sm.__all__ and getattr(K, name) is getattr(sm, name)


_MASK_SHAPES = [(B, HQ, SQ, SK), (1, HQ, SQ, SK), (B, 1, SQ, SK), (B, HQ, 1, SK), (B, HQ, SQ, 1),
                (1, 1, 1, SK), (1, 1, 1, 1), (SQ, SK), (SK,)]


def _random_mask(seed, shape, p=0.7):
  return np.random.default_rng(seed).random(shape) < p


@pytest.mark.parametrize("shape", _MASK_SHAPES, ids=str)
def test_array_mask_mod_broadcasting(shape):
  """Every broadcast shape of a (B, H, Sq, Sk) boolean mask: the mask it reads and the attention
  with it (rows the mask empties give 0 / -inf)."""
  mask = _random_mask(70 + len(shape), shape)
  mod = sm.array_mask_mod(jnp.asarray(mask))
  assert isinstance(mod.mask_mod, sm.ArrayMask) and mod.mask_mod.mask.ndim == 4
  expected = full(mask)
  np.testing.assert_array_equal(mask_of(mod), expected)
  check_attention(mod, mask=expected, seed=71)


@pytest.mark.parametrize("shape", [(B, HQ, SQ, SK), (1, HQ, 1, SK), (B, 1, SQ, 1), (1, 1, 1, 1),
                                   (B, HQ, SQ + 5, SK + 2)], ids=str)
@pytest.mark.parametrize("block", [(4, 4), (16, 8)])
def test_array_mask_tiles_are_exact(shape, block):
  """Tiles classified from the array (broadcast axes, ragged tails, an array longer than the
  inputs, an all-False row block) are exactly the dense mask's."""
  bq, bk = block
  mask = _random_mask(72, shape, p=0.6)
  if shape[2] > 1 and shape[3] > 1:
    mask[..., :4, :] = False                                   # an empty q block
    mask[..., 4:8, 8:12] = True                                # a full tile (4x4 blocks)
  m = sm.array_mask_mod(jnp.asarray(mask)).mask_mod
  bm = create_block_mask(m, q_len=SQ, kv_len=SK, block_q=bq, block_k=bk, batch=B, heads=HQ)
  dense = np.broadcast_to(mask[..., :SQ, :SK], (B, HQ, SQ, SK))
  np.testing.assert_array_equal(_tiles_bh(bm), _expected_tiles(dense, bq, bk))
  assert bm.tiles.shape[:2] == (shape[0], shape[1])


def test_array_mask_traced_and_rejects():
  q, k, v = random_qkv(73, batch=B, q_heads=HQ, kv_heads=HKV, q_len=SQ, kv_len=SK, head_dim=D)
  mask = _random_mask(74, (B, 1, SQ, SK))
  f = jax.jit(lambda m: flash_attention(q, k, v, score_mod=sm.array_mask_mod(m), block_q=4,
                                        block_k=8))
  ref, _ = np_attention(q, k, v, mask=mask)
  assert rel_err(f(jnp.asarray(mask)), ref) < tol(jnp.float32)
  with pytest.raises(ValueError, match="boolean"):
    sm.array_mask_mod(jnp.ones((SQ, SK), jnp.int32))
  with pytest.raises(ValueError, match="rank"):
    sm.array_mask_mod(jnp.ones((1, 1, 1, SQ, SK), bool))
  with pytest.raises(ValueError, match=r"mask.*\(3, 1, 13, 19\)"):     # batch 3 for B=2
    standard_attention(q, k, v, score_mod=sm.array_mask_mod(jnp.ones((3, 1, SQ, SK), bool)))
  with pytest.raises(ValueError, match=r"mask.*\(1, 1, 13, 7\)"):       # fewer keys than Sk
    standard_attention(q, k, v, score_mod=sm.array_mask_mod(jnp.ones((1, 1, SQ, 7), bool)))


@pytest.mark.parametrize("left,right,offset", [(3, 2, 0), (0, 0, 0), (3, 0, 0), (0, 4, 0),
                                               (2, 5, SK - SQ), (None, 0, 0), (1, None, 0),
                                               (SQ + SK, SQ + SK, 0), (4, 1, -3)])
def test_local_window_mod(left, right, offset):
  """keep -right <= i + offset - j <= left (jax.nn.dot_product_attention's local_window_size)."""
  mod = sm.local_window_mod(left, right, offset=offset)
  _, _, i, j = grid()
  d = i + offset - j
  lo = -np.inf if right is None else -right
  hi = np.inf if left is None else left
  expected = full((d >= lo) & (d <= hi))
  np.testing.assert_array_equal(mask_of(mod), expected)
  check_attention(mod, mask=expected, seed=75)
  for bq, bk in ((4, 4), (8, 16)):
    bm = create_block_mask(mod.mask_mod, q_len=SQ, kv_len=SK, block_q=bq, block_k=bk)
    np.testing.assert_array_equal(_tiles_bh(bm), _expected_tiles(expected, bq, bk))


def test_local_window_special_cases():
  """(w - 1, 0) is sliding_window_mod(w); (None, 0) is causal_mod(); the JAX example (3, 2)."""
  np.testing.assert_array_equal(mask_of(sm.local_window_mod(4, 0)),
                                mask_of(sliding_window_mod(5)))
  np.testing.assert_array_equal(mask_of(sm.local_window_mod(None, 0)), mask_of(causal_mod()))
  # jax.nn.dot_product_attention's docstring: with (3, 2), token 6 attends to 3, 4, 5, 6, 7, 8.
  row = mask_of(sm.local_window_mod(3, 2), sq=10, sk=10)[0, 0, 6]
  np.testing.assert_array_equal(np.flatnonzero(row), [3, 4, 5, 6, 7, 8])
  for bad in (-1, 1.5, True):
    with pytest.raises(ValueError, match="local_window_mod"):
      sm.local_window_mod(bad, 0)
  with pytest.raises(ValueError, match="local_window_mod"):
    sm.local_window_mod(0, -2)


def test_query_length_mask():
  """q_idx < lengths[b]: queries past the length see no key (output 0, lse -inf); exact tiles."""
  lengths = np.array([9, 0])
  m = sm.QueryLengthMask(jnp.asarray(lengths, jnp.int32))
  b, _, i, _ = grid()
  expected = full(i < lengths[b])
  np.testing.assert_array_equal(np.asarray(mask_mod_to_boolean_mask(m, B, HQ, SQ, SK)), expected)
  out, lse = check_attention(mask_mod_to_score_mod(m), mask=expected, seed=76)
  assert (np.asarray(out)[~expected.any(-1)] == 0).all()
  bm = create_block_mask(m, q_len=SQ, kv_len=SK, block_q=4, block_k=4, batch=B)
  np.testing.assert_array_equal(_tiles_bh(bm), _expected_tiles(expected, 4, 4))
  with pytest.raises(ValueError, match="query lengths"):
    standard_attention(*random_qkv(77, batch=B, q_heads=HQ, kv_heads=HKV, q_len=SQ, kv_len=SK,
                                   head_dim=D), mask_mod=sm.QueryLengthMask(jnp.ones(3, jnp.int32)))
