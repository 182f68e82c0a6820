"""Tests for attnax.kernels.merge: attention over disjoint key sets merges into full attention.

Each part is ``standard_attention(..., return_lse=True)`` over a subset of the keys (selected with
a mask mod, so every part keeps the full key axis, or by slicing the keys); merging the parts must
give the attention over all keys, output and LSE, against the float64 reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.kernels import merge_attentions, standard_attention
from attnax.kernels import score_mods as sm
from attnax.kernels.merge import merge_two, safe_lse
from tests.helpers import reference_attention, rel_err, tol, rand, random_qkv


# One shape for the whole file: eager JAX compiles every primitive once per shape, so reusing the
# shape keeps this file fast on CPU.
B, HQ, HKV, SQ, SK, D = 2, 4, 2, 11, 28, 8
HALVES = [(0, SK // 2), (SK // 2, SK)]


def qkv(seed, dtype=jnp.float32):
  return random_qkv(seed, batch=B, q_heads=HQ, kv_heads=HKV, q_len=SQ, kv_len=SK, head_dim=D,
                    dtype=dtype)


def _parts_by_mask(q, k, v, bounds, **kwargs):
  """standard_attention restricted (by a mask mod) to keys lo <= j < hi, for each (lo, hi)."""
  outs, lses = [], []
  for lo, hi in bounds:
    o, l = standard_attention(q, k, v, return_lse=True,
                              mask_mod=lambda b, h, i, j, lo=lo, hi=hi: (j >= lo) & (j < hi),
                              **kwargs)
    outs.append(o)
    lses.append(l)
  return outs, lses


def _parts_by_slicing(q, k, v, bounds, **kwargs):
  """standard_attention over k[:, :, lo:hi] for consecutive (lo, hi) in bounds."""
  outs, lses = [], []
  for lo, hi in bounds:
    o, l = standard_attention(q, k[:, :, lo:hi], v[:, :, lo:hi], return_lse=True, **kwargs)
    outs.append(o)
    lses.append(l)
  return outs, lses


def test_merge_key_halves_equals_full():
  """Keys split by slicing (how ring attention and split-K see them)."""
  q, k, v = qkv(0)
  outs, lses = _parts_by_slicing(q, k, v, HALVES)
  out, lse = merge_attentions(outs, lses)
  ref_out, ref_lse = reference_attention(q, k, v, return_lse=True)
  assert out.shape == (B, HQ, SQ, D) and out.dtype == q.dtype
  assert lse.shape == (B, HQ, SQ) and lse.dtype == jnp.float32
  assert rel_err(out, ref_out) < tol(jnp.float32)
  assert rel_err(lse, ref_lse) < tol(jnp.float32)


def test_merge_three_contiguous_parts_equals_full():
  q, k, v = qkv(10)
  outs, lses = _parts_by_mask(q, k, v, [(0, 5), (5, 20), (20, SK)])
  out, lse = merge_attentions(outs, lses)
  ref_out, ref_lse = reference_attention(q, k, v, return_lse=True)
  assert rel_err(out, ref_out) < tol(jnp.float32)
  assert rel_err(lse, ref_lse) < tol(jnp.float32)


def test_merge_interleaved_parts_via_mask_mods():
  """Three disjoint, interleaved key sets (j % 3) selected by mask mods, with GQA and ALiBi."""
  q, k, v = qkv(1)
  alibi = sm.alibi_mod(num_heads=HQ)
  outs, lses = [], []
  for r in range(3):
    o, l = standard_attention(q, k, v, score_mod=alibi, return_lse=True,
                              mask_mod=lambda b, h, i, j, r=r: j % 3 == r)
    outs.append(o)
    lses.append(l)
  out, lse = merge_attentions(outs, lses)
  ref_out, ref_lse = reference_attention(q, k, v, score_mod=alibi, return_lse=True)
  assert rel_err(out, ref_out) < tol(jnp.float32)
  assert rel_err(lse, ref_lse) < tol(jnp.float32)


def test_merge_with_fully_masked_parts():
  """Causal attention split into key chunks: rows i < 10 see nothing in [10, 20) (lse -inf there),
  and no row sees anything in [20, Sk) (Sq = 11)."""
  q, k, v = qkv(2)
  causal = sm.causal_mod()
  outs, lses = _parts_by_mask(q, k, v, [(0, 10), (10, 20), (20, SK)], score_mod=causal)
  assert np.isneginf(np.asarray(lses[1])[:, :, :10]).all()
  assert np.isfinite(np.asarray(lses[1])[:, :, 10:]).all()
  assert np.isneginf(np.asarray(lses[2])).all() and (np.asarray(outs[2]) == 0).all()
  out, lse = merge_attentions(outs, lses)
  ref_out, ref_lse = reference_attention(q, k, v, score_mod=causal, return_lse=True)
  assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(lse)).all()
  assert rel_err(out, ref_out) < tol(jnp.float32)
  assert rel_err(lse, ref_lse) < tol(jnp.float32)


def test_merge_all_parts_empty():
  """Rows that no part sees: output 0, lse -inf, no NaN; other rows merge normally."""
  q, k, v = qkv(3)
  # rows i < 3 see nothing anywhere: the union mask is (j < 6) & (i >= 3)
  masks = [lambda b, h, i, j: (j < 3) & (i >= 3), lambda b, h, i, j: (j >= 3) & (j < 6) & (i >= 3)]
  outs, lses = zip(*[standard_attention(q, k, v, mask_mod=m, return_lse=True) for m in masks])
  out, lse = merge_attentions(list(outs), list(lses))
  out, lse = np.asarray(out), np.asarray(lse)
  assert not np.isnan(out).any() and not np.isnan(lse).any()
  assert (out[:, :, :3] == 0).all() and np.isneginf(lse[:, :, :3]).all()
  ref_out, ref_lse = reference_attention(q, k, v, mask_mod=lambda b, h, i, j: (j < 6) & (i >= 3),
                                         return_lse=True)
  assert rel_err(out, ref_out) < tol(jnp.float32)
  np.testing.assert_allclose(lse[:, :, 3:], ref_lse[:, :, 3:], rtol=1e-5)

  # Entirely synthetic: every lse -inf.
  outs = jnp.zeros((3, 1, 2, 4, 5))
  lses = jnp.full((3, 1, 2, 4), -jnp.inf)
  out, lse = merge_attentions(outs, lses)
  assert (np.asarray(out) == 0).all() and np.isneginf(np.asarray(lse)).all()


def test_merge_list_vs_stacked_and_jit():
  q, k, v = qkv(4)
  outs, lses = _parts_by_mask(q, k, v, [(0, 7), (7, 16), (16, SK)])
  a_out, a_lse = merge_attentions(outs, lses)
  b_out, b_lse = merge_attentions(jnp.stack(outs), jnp.stack(lses))
  c_out, c_lse = jax.jit(merge_attentions)(tuple(outs), tuple(lses))
  for o, l in ((b_out, b_lse), (c_out, c_lse)):
    np.testing.assert_allclose(np.asarray(o), np.asarray(a_out), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(l), np.asarray(a_lse), rtol=1e-6, atol=1e-6)


def test_merge_order_independent_and_single_part():
  q, k, v = qkv(5)
  outs, lses = _parts_by_mask(q, k, v, [(0, 9), (9, 18), (18, SK)])
  fwd = merge_attentions(outs, lses)
  rev = merge_attentions(outs[::-1], lses[::-1])
  for x, y in zip(fwd, rev):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
  one = merge_attentions(outs[:1], lses[:1])
  np.testing.assert_allclose(np.asarray(one[0]), np.asarray(outs[0]), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(one[1]), np.asarray(lses[0]))


def test_merge_two_matches_merge_attentions():
  q, k, v = qkv(6)
  (oa, ob), (la, lb) = _parts_by_slicing(q, k, v, HALVES)
  # one row of part b made empty
  lb = lb.at[0, 0, 3].set(-jnp.inf)
  ob = ob.at[0, 0, 3].set(0.0)
  out2, lse2 = merge_two(oa, la, ob, lb)
  out, lse = merge_attentions([oa, ob], [la, lb])
  np.testing.assert_allclose(np.asarray(out2), np.asarray(out), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(lse2), np.asarray(lse), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out)[0, 0, 3], np.asarray(oa)[0, 0, 3], rtol=1e-6)
  # both empty
  inf = jnp.full_like(la, -jnp.inf)
  out2, lse2 = merge_two(jnp.zeros_like(oa), inf, jnp.zeros_like(ob), inf)
  assert (np.asarray(out2) == 0).all() and np.isneginf(np.asarray(lse2)).all()


def test_merge_low_precision_outputs():
  """bf16 partial outputs merge in f32 and come back in bf16 (or out_dtype)."""
  q, k, v = qkv(7, jnp.bfloat16)
  outs, lses = _parts_by_slicing(q, k, v, HALVES)
  out, lse = merge_attentions(outs, lses)
  assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
  ref_out, ref_lse = reference_attention(q, k, v, return_lse=True)
  assert rel_err(out, ref_out) < tol(jnp.bfloat16)
  assert rel_err(lse, ref_lse) < tol(jnp.bfloat16)
  out32, _ = merge_attentions(outs, lses, out_dtype=jnp.float32)
  assert out32.dtype == jnp.float32


def test_merge_gradients_match_full_attention():
  q, k, v = qkv(8)
  ct = rand(9, (B, HQ, SQ, D))

  def merged(q, k, v):
    outs, lses = _parts_by_slicing(q, k, v, HALVES)
    return jnp.sum(merge_attentions(outs, lses)[0] * ct)

  def full(q, k, v):
    return jnp.sum(standard_attention(q, k, v) * ct)

  g1 = jax.jit(jax.grad(merged, argnums=(0, 1, 2)))(q, k, v)
  g2 = jax.jit(jax.grad(full, argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g1, g2):
    assert rel_err(a, b) < tol(jnp.float32, grad=True)


def test_safe_lse():
  m = jnp.array([0.0, 2.0, sm.MASK_VALUE])
  l = jnp.array([1.0, 3.0, 0.0])
  np.testing.assert_allclose(np.asarray(safe_lse(m, l)), [0.0, 2.0 + np.log(3.0), -np.inf])


@pytest.mark.parametrize("outs,lses", [
    (np.zeros((2, 1, 2, 3, 4)), np.zeros((2, 1, 2, 4))),        # S disagrees
    (np.zeros((2, 1, 2, 3, 4)), np.zeros((2, 1, 2, 3, 4))),     # lse has a head_dim axis
    (np.zeros((2, 1, 2, 3)), np.zeros((2, 1, 2, 3))),           # outs lacks head_dim
    (np.zeros((3, 1, 2, 3, 4)), np.zeros((2, 1, 2, 3))),        # part counts differ
])
def test_merge_bad_shapes_raise(outs, lses):
  with pytest.raises(ValueError) as e:
    merge_attentions(jnp.asarray(outs), jnp.asarray(lses))
  assert str(outs.shape) in str(e.value) and str(lses.shape) in str(e.value)


def test_merge_bad_list_shapes_raise():
  with pytest.raises(ValueError):
    merge_attentions([jnp.zeros((1, 2, 3, 4)), jnp.zeros((1, 2, 5, 4))],
                     [jnp.zeros((1, 2, 3)), jnp.zeros((1, 2, 5))])
  with pytest.raises(ValueError):
    merge_attentions([jnp.zeros((1, 2, 3, 4))], [jnp.zeros((1, 2, 4))])
  with pytest.raises(ValueError):
    merge_attentions([], [])


def test_merge_gradients_zero_for_rows_no_part_sees():
  """Rows whose every part has lse -inf: zero (not NaN) gradients to every out and lse, also when
  the merged lse is used downstream; other rows get the softmax weights."""
  rng = np.random.default_rng(12)
  outs = jnp.asarray(rng.standard_normal((3, 1, 2, 4, 5)).astype(np.float32))
  lses = rng.standard_normal((3, 1, 2, 4)).astype(np.float32)
  lses[:, :, :, 1] = -np.inf          # row 1: every part empty
  lses[0, :, :, 2] = -np.inf          # row 2: part 0 empty
  outs = outs.at[:, :, :, 1].set(0.0).at[0, :, :, 2].set(0.0)
  lses = jnp.asarray(lses)
  ct = jnp.asarray(rng.standard_normal((1, 2, 4, 5)).astype(np.float32))

  def loss(outs, lses):
    out, lse = merge_attentions(outs, lses)
    return jnp.sum(out * ct) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  def loss_two(outs, lses):
    out, lse = merge_two(outs[0], lses[0], outs[1], lses[1])
    return jnp.sum(out * ct) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  for f, n in ((loss, 3), (loss_two, 2)):
    g_out, g_lse = jax.grad(f, argnums=(0, 1))(outs, lses)
    g_out, g_lse = np.asarray(g_out), np.asarray(g_lse)
    assert np.isfinite(g_out).all() and np.isfinite(g_lse).all()
    assert (g_out[:, :, :, 1] == 0).all() and (g_lse[:, :, :, 1] == 0).all()
    assert (g_out[0, :, :, 2] == 0).all() and (g_lse[0, :, :, 2] == 0).all()
    # d lse / d lse_i = softmax weight; d out / d out_i = weight * ct (float64 numpy check)
    l64 = np.asarray(lses[:n], np.float64)
    with np.errstate(invalid="ignore"):
      m = l64.max(0)
      w = np.exp(l64 - m)
      w = np.where(np.isfinite(m), w / w.sum(0), 0.0)
    np.testing.assert_allclose(g_out[:n], w[..., None] * np.asarray(ct)[None], rtol=1e-5,
                               atol=1e-6)
    o64 = np.asarray(outs[:n], np.float64)
    out64 = (w[..., None] * o64).sum(0)
    want = w + w * ((o64 - out64[None]) * np.asarray(ct)[None]).sum(-1)
    np.testing.assert_allclose(g_lse[:n], want, rtol=1e-4, atol=1e-6)
