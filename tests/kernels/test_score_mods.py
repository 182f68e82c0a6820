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
from attnax.kernels import standard_attention
from attnax.kernels.score_mods import (
    MASK_VALUE, additive_bias_mod, alibi_mod, alibi_slopes, causal_mod, compose_score_mods,
    document_mask_mod, mask_mod_to_boolean_mask, mask_mod_to_score_mod, prefix_lm_mod,
    sliding_window_mod,
)
from tests.helpers import rel_err, tol, rand, random_qkv


B, HQ, HKV, SQ, SK, D = 2, 4, 2, 13, 19, 8


# ----------------------------------------------------------------------------- numpy references


def np_attention(q, k, v, mask=None, bias=None, scale=None):
  """Float64 numpy attention. ``mask``/``bias`` broadcast to ``(B, Hq, Sq, Sk)``.

  Returns ``(out (B, Hq, Sq, Dv), lse (B, Hq, Sq))``; a row with no visible key gives 0 / -inf.
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  g = q.shape[1] // k.shape[1]
  k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  s = scale * np.einsum("bhqd,bhkd->bhqk", q, k)
  if bias is not None:
    s = s + np.asarray(bias, np.float64)
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
