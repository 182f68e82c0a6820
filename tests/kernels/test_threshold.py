"""threshold_sparse_attention: the sparse forward and its gradient against float64 references.

The reference of a sparse forward is dense attention in float64 with the recorded skipped tiles
masked out (``stats.keep_mask_mod()``); its gradient is ``jax.grad`` of that reference with the
decisions held fixed. The decisions themselves are checked against a numpy walk of the documented
rule, and the flash and Pallas (interpreted) kernels must make the same ones.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.kernels import (additive_bias_mod, and_masks, causal_mod, standard_attention,
                            threshold_sparse_attention)
from attnax.kernels import threshold as th
from attnax.kernels import tiles
from tests.helpers import rand, random_qkv, reference_attention, rel_err, tol

B, HQ, HKV, SQ, SK, D, BLK = 1, 4, 2, 40, 56, 16, 16   # ragged: 40 = 2.5 tiles, 56 = 3.5 tiles


def clustered(seed: int, batch=B, q_heads=HQ, kv_heads=HKV, q_len=SQ, kv_len=SK, d=D, run=BLK,
              norm=6.0):
  """Keys in runs of ``run`` positions around random centroids of norm ``norm``; each run of
  queries points at one random centroid (their logits there are about ``norm**2 / sqrt(d)``)."""
  rng = np.random.default_rng(seed)
  g = q_heads // kv_heads
  n_runs = -(-kv_len // run)
  mu = rng.standard_normal((batch, kv_heads, n_runs, d))
  mu = norm * mu / np.linalg.norm(mu, axis=-1, keepdims=True)
  k = np.repeat(mu, run, axis=2)[:, :, :kv_len] + 0.25 * rng.standard_normal(
      (batch, kv_heads, kv_len, d))
  target = rng.integers(0, n_runs, (batch, q_heads, -(-q_len // run)))
  mu_q = np.repeat(mu, g, axis=1)
  qc = np.take_along_axis(mu_q, target[..., None], axis=2)
  q = np.repeat(qc, run, axis=2)[:, :, :q_len] + 0.5 * rng.standard_normal(
      (batch, q_heads, q_len, d))
  v = rng.standard_normal((batch, kv_heads, kv_len, d))
  return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


def sparse_reference(q, k, v, stats, *, score_mod=None, mask_mod=None):
  """Float64 dense attention over the tiles the forward kept: ``(out, lse)`` numpy."""
  keep = stats.keep_mask_mod()
  mm = keep if mask_mod is None else and_masks(mask_mod, keep)
  with jax.enable_x64(True):
    up = lambda x: jnp.asarray(np.asarray(x, np.float64))
    f = jax.jit(lambda q, k, v: standard_attention(q, k, v, score_mod=score_mod, mask_mod=mm,
                                                   return_lse=True))
    return tuple(np.asarray(x, np.float64) for x in f(up(q), up(k), up(v)))


def sparse_reference_grads(q, k, v, stats, ct, *, bias=None, mask_mod=None):
  """Float64 ``grad sum(out * ct)`` w.r.t. q, k, v (and ``bias``) with the decisions fixed."""
  keep = stats.keep_mask_mod()
  mm = keep if mask_mod is None else and_masks(mask_mod, keep)
  with jax.enable_x64(True):
    up = lambda x: jnp.asarray(np.asarray(x, np.float64))

    def f(q, k, v, *bias):
      sm = None if not bias else additive_bias_mod(bias[0])
      return jnp.sum(standard_attention(q, k, v, score_mod=sm, mask_mod=mm) * up(ct))

    args = (up(q), up(k), up(v)) + (() if bias is None else (up(bias),))
    grads = jax.jit(jax.grad(f, argnums=tuple(range(len(args)))))(*args)
    return tuple(np.asarray(g, np.float64) for g in grads)


def run(q, k, v, **kw):
  """``(out, lse, stats)`` of threshold_sparse_attention, compiled once (``kw`` static)."""
  f = lambda q, k, v: threshold_sparse_attention(q, k, v, return_lse=True, return_stats=True,
                                                 block_q=BLK, block_k=BLK, **kw)
  return jax.jit(f)(q, k, v)


def run_grad(q, k, v, ct, bias=None, **kw):
  """``(grads, (out, lse, stats))``: gradients of ``sum(out * ct)`` w.r.t. q, k, v (and the
  additive ``bias``) and the forward's results, from one compiled forward + backward."""
  def loss(q, k, v, *bias):
    mod = additive_bias_mod(bias[0]) if bias else kw.get("score_mod")
    opts = {n: x for n, x in kw.items() if n != "score_mod"}
    out, lse, stats = threshold_sparse_attention(
        q, k, v, return_lse=True, return_stats=True, block_q=BLK, block_k=BLK, score_mod=mod,
        **opts)
    return jnp.sum(out.astype(jnp.float32) * ct), (out, lse, stats)

  args = (q, k, v) + (() if bias is None else (bias,))
  return jax.jit(jax.grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)


def walk_rule(q, k, *, threshold, rule, block_q, block_k, mask=None):
  """The documented rule in numpy (float64), tile by tile in ascending kv order (no mask, or a
  mask whose visited tiles are all partial/full in ascending order: here, causal).

  Returns ``(decisions, margins)``: int8 codes and ``|gap - log t|`` per tile (decisions within
  rounding of the boundary may legitimately differ).
  """
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  b, hq, sq, d = q.shape
  g = hq // k.shape[1]
  sk = k.shape[2]
  s = np.einsum("bhqd,bhkd->bhqk", q, np.repeat(k, g, axis=1)) * d ** -0.5
  if mask is not None:
    s = np.where(mask, s, tiles.MASK_VALUE)
  nq, nk = -(-sq // block_q), -(-sk // block_k)
  log_t = math.log(threshold) if threshold > 0 else -math.inf
  dec = np.zeros((b, hq, nq, nk), np.int8)
  margin = np.full((b, hq, nq, nk), np.inf)
  for bi in range(b):
    for h in range(hq):
      for qt in range(nq):
        rows = slice(qt * block_q, min(sq, (qt + 1) * block_q))
        tile_m, m = tiles.MASK_VALUE, np.full(rows.stop - rows.start, tiles.MASK_VALUE)
        for kt in range(nk):
          blk = s[bi, h, rows, kt * block_k:(kt + 1) * block_k]
          if mask is not None and not mask[bi, h, rows, kt * block_k:(kt + 1) * block_k].any():
            continue   # an empty tile is never visited
          row_max = blk.max(-1)
          gap = row_max.max() - tile_m if rule == "tile" else (row_max - m).max()
          skip = gap < log_t
          margin[bi, h, qt, kt] = abs(gap - log_t)
          dec[bi, h, qt, kt] = tiles.TILE_SKIPPED if skip else tiles.TILE_KEPT
          if not skip:
            tile_m, m = max(tile_m, row_max.max()), np.maximum(m, row_max)
  return dec, margin


# ----------------------------------------------------------------------------- forward (flash)


@pytest.mark.parametrize("rule, causal", [("tile", False), ("row", True)])
def test_forward_matches_sparse_reference(rule, causal):
  q, k, v = clustered(0)
  mod = causal_mod(offset=SK - SQ) if causal else None
  # The default threshold (head_dim / Sk) on the first case.
  thr = 0.05 if causal else None
  out, lse, stats = run(q, k, v, softmax_threshold=thr, rule=rule, score_mod=mod,
                        backend="flash")
  assert stats.softmax_threshold == (0.05 if causal else D / SK)
  ref_out, ref_lse = sparse_reference(q, k, v, stats, score_mod=mod)
  assert rel_err(out, ref_out) < tol(jnp.float32)
  assert rel_err(lse, ref_lse) < tol(jnp.float32)
  assert stats.decisions.shape == (B, HQ, 3, 4) and stats.skipped_fraction.shape == (B, HQ)
  assert float(stats.skipped_fraction.mean()) > 0   # clustered keys: tiles are skipped
  if causal:   # tiles above the diagonal are never visited
    assert int(stats.decisions[0, 0, 0, 3]) == th.TILE_UNVISITED


@pytest.mark.parametrize("rule", ["tile", "row"])
def test_decisions_follow_the_documented_rule(rule):
  q, k, v = clustered(1)
  _, _, stats = run(q, k, v, softmax_threshold=0.1, rule=rule, backend="flash")
  want, margin = walk_rule(q, k, threshold=0.1, rule=rule, block_q=BLK, block_k=BLK)
  got = np.asarray(stats.decisions)
  assert ((got == want) | (margin < 1e-4)).all()
  assert (want == th.TILE_SKIPPED).any() and (want == th.TILE_KEPT).any()


@pytest.mark.slow
def test_causal_decisions_follow_the_rule():
  q, k, v = clustered(2, q_len=SK)
  mask = np.tril(np.ones((SK, SK), bool))[None, None]
  _, _, stats = run(q, k, v, softmax_threshold=0.1, score_mod=causal_mod(), backend="flash")
  want, margin = walk_rule(q, k, threshold=0.1, rule="tile", block_q=BLK, block_k=BLK,
                           mask=np.broadcast_to(mask, (B, HQ, SK, SK)))
  assert ((np.asarray(stats.decisions) == want) | (margin < 1e-4)).all()


@pytest.mark.parametrize("backend", ["flash", "pallas"])
def test_threshold_zero_is_dense_attention(backend):
  q, k, v = random_qkv(3, batch=B, q_heads=HQ, kv_heads=HKV, q_len=SQ, kv_len=SK, head_dim=D,
                       scale=3.0)
  kw = {"interpret": True} if backend == "pallas" else {}
  out, lse, stats = run(q, k, v, softmax_threshold=0.0, backend=backend, **kw)
  ref_out, ref_lse = reference_attention(q, k, v, return_lse=True)
  assert rel_err(out, ref_out) < tol(jnp.float32)
  assert rel_err(lse, ref_lse) < tol(jnp.float32)
  assert float(stats.skipped_fraction.max()) == 0.0
  assert (np.asarray(stats.decisions) == th.TILE_KEPT).all()


def test_default_threshold_is_head_dim_over_kv_len():
  assert th.default_softmax_threshold(16, 64) == 0.25
  assert th.default_softmax_threshold(128, 64) == 1.0   # capped: Sk < head_dim


@pytest.mark.slow
def test_float64_flash_matches_reference():
  q, k, v = (x.astype(np.float64) for x in map(np.asarray, clustered(5)))
  with jax.enable_x64(True):
    q, k, v = map(jnp.asarray, (q, k, v))
    out, lse, stats = run(q, k, v, softmax_threshold=0.05, backend="flash")
    assert out.dtype == jnp.float64
    ref_out, ref_lse = sparse_reference(q, k, v, stats)
  assert rel_err(out, ref_out) < 1e-12 and rel_err(lse, ref_lse) < 1e-12


def test_rows_without_visible_keys_and_all_skipped_rows_are_zero_not_nan():
  # Query 3 sees no key at all; under the tile rule, rows whose scores are far below another
  # row's in the same tile lose every later tile (the rule's hazard): still no NaN.
  q, k, v = clustered(6)
  q = q.at[:, :, 1].multiply(0.01)
  mask = lambda b, h, i, j: i != 3
  ct = rand(24, (B, HQ, SQ, D))
  grads, (out, lse, stats) = run_grad(q, k, v, ct, softmax_threshold=0.5, mask_mod=mask,
                                      backend="flash")
  ref_out, ref_lse = sparse_reference(q, k, v, stats, mask_mod=mask)
  assert np.isfinite(np.asarray(out)).all() and not np.isnan(np.asarray(lse)).any()
  assert float(jnp.abs(out[:, :, 3]).max()) == 0.0 and bool((lse[:, :, 3] == -jnp.inf).all())
  assert rel_err(out, ref_out) < tol(jnp.float32)
  want = sparse_reference_grads(q, k, v, stats, ct, mask_mod=mask)
  for name, g, w in zip("qkv", grads, want):
    assert np.isfinite(np.asarray(g)).all() and rel_err(g, w) < tol(jnp.float32, grad=True), name
  assert float(jnp.abs(grads[0][:, :, 3]).max()) == 0.0


# ----------------------------------------------------------------------------- gradients (flash)


@pytest.mark.parametrize("rule", ["tile", pytest.param("row", marks=pytest.mark.slow)])
def test_flash_gradients_are_those_of_the_sparse_forward(rule):
  q, k, v = clustered(7)
  bias = rand(8, (1, HQ, SQ, SK))
  ct = rand(9, (B, HQ, SQ, D))
  grads, (_, _, stats) = run_grad(q, k, v, ct, bias, softmax_threshold=0.05, rule=rule,
                                  backend="flash")
  assert float(stats.skipped_fraction.mean()) > 0
  want = sparse_reference_grads(q, k, v, stats, ct, bias=bias)
  for name, g, w in zip("q k v bias".split(), grads, want):
    assert rel_err(g, w) < tol(jnp.float32, grad=True), name
  # Not the dense gradient: the skipped tiles matter.
  dense = sparse_reference_grads(q, k, v, th._stats(jnp.ones_like(stats.decisions), BLK, BLK, 0.0),
                                 ct, bias=bias)
  assert rel_err(grads[0], dense[0]) > 10 * tol(jnp.float32, grad=True)


def test_vmap():
  q, k, v = clustered(10)
  q2, k2, v2 = clustered(11)
  f = lambda q, k, v: threshold_sparse_attention(q, k, v, softmax_threshold=0.05, block_q=BLK,
                                                 block_k=BLK, backend="flash")
  one = jax.jit(f)
  both = jax.jit(jax.vmap(f))(*(jnp.stack(p) for p in ((q, q2), (k, k2), (v, v2))))
  assert rel_err(both[0], one(q, k, v)) < 1e-6 and rel_err(both[1], one(q2, k2, v2)) < 1e-6


# ----------------------------------------------------------------------------- Pallas (interpret)


def test_pallas_makes_the_flash_decisions_and_gradients():
  q, k, v = clustered(11)
  bias = rand(12, (1, HQ, SQ, SK))
  ct = rand(13, (B, HQ, SQ, D))
  mod = additive_bias_mod(bias)
  kw = dict(softmax_threshold=0.05, score_mod=mod)
  out_f, lse_f, st_f = run(q, k, v, backend="flash", **kw)
  grads, (out_p, lse_p, st_p) = run_grad(q, k, v, ct, bias, softmax_threshold=0.05,
                                         backend="pallas", interpret=True)
  assert (np.asarray(st_f.decisions) == np.asarray(st_p.decisions)).all()
  assert float(st_p.skipped_fraction.mean()) > 0
  ref_out, ref_lse = sparse_reference(q, k, v, st_p, score_mod=mod)
  assert rel_err(out_p, ref_out) < tol(jnp.float32)
  assert rel_err(lse_p, ref_lse) < tol(jnp.float32)
  want = sparse_reference_grads(q, k, v, st_p, ct, bias=bias)
  for name, g, w in zip("q k v bias".split(), grads, want):
    assert rel_err(g, w) < tol(jnp.float32, grad=True), name


def test_mosaic_lowering_refuses_threshold_plans():
  from attnax.kernels.pallas import api
  from attnax.kernels.pallas.plan import build_plan
  q, k, v = random_qkv(14, batch=1, q_heads=2, kv_heads=2, q_len=32, kv_len=32, head_dim=16)
  plan = build_plan(q, k, v, score_mod=None, mask_mod=None, scale=None, block_q=None,
                    block_k=None, block_mask=None, softcap=None, cu_seqlens_q=None,
                    cu_seqlens_k=None, default_block_q=32, default_block_k=32,
                    softmax_threshold=0.1)[0]
  assert api._threshold_reasons(api.LOWERINGS["mosaic"], plan)
  assert not api._threshold_reasons(api.LOWERINGS["triton"], plan)
  assert not api._threshold_reasons(api.LOWERINGS["interpret"], plan)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.1", True, np.array([0.1])])
def test_bad_threshold_raises(bad):
  q, k, v = random_qkv(15, batch=1, q_heads=2, kv_heads=1, q_len=16, kv_len=16, head_dim=16)
  with pytest.raises(ValueError, match="softmax_threshold"):
    threshold_sparse_attention(q, k, v, softmax_threshold=bad)


@pytest.mark.parametrize("bad, match", [
    (1.5, r"threshold_sparse_attention: softmax_threshold must be in \[0, 1\], got 1\.5"),
    (1.0 + 1e-9, r"softmax_threshold must be in \[0, 1\]"),
    (float("inf"), r"softmax_threshold must be finite"),
    (True, r"softmax_threshold must be a float"),
])
def test_threshold_above_one_raises_naming_it(bad, match):
  q, k, v = random_qkv(15, batch=1, q_heads=2, kv_heads=1, q_len=16, kv_len=16, head_dim=16)
  with pytest.raises(ValueError, match=match):
    threshold_sparse_attention(q, k, v, softmax_threshold=bad)
  jax.eval_shape(lambda: threshold_sparse_attention(q, k, v, softmax_threshold=1.0))   # bound ok


def test_traced_threshold_raises():
  q, k, v = random_qkv(16, batch=1, q_heads=2, kv_heads=1, q_len=16, kv_len=16, head_dim=16)
  with pytest.raises(ValueError, match="softmax_threshold"):
    jax.jit(lambda t: threshold_sparse_attention(q, k, v, softmax_threshold=t))(0.1)


@pytest.mark.parametrize("kw, match", [
    (dict(rule="rows"), "rule"), (dict(backend="mosaic"), "backend"),
    (dict(backend="flash", interpret=True), "interpret"), (dict(block_q=0), "block_q"),
])
def test_bad_options_raise(kw, match):
  q, k, v = random_qkv(17, batch=1, q_heads=2, kv_heads=1, q_len=16, kv_len=16, head_dim=16)
  with pytest.raises(ValueError, match=match):
    threshold_sparse_attention(q, k, v, **kw)


def test_bad_shapes_raise():
  q, k, v = random_qkv(18, batch=1, q_heads=3, kv_heads=2, q_len=16, kv_len=16, head_dim=16)
  with pytest.raises(ValueError, match="multiple of kv heads"):
    threshold_sparse_attention(q, k, v)


# ----------------------------------------------------------------------------- slow


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["tile", "row"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_causal_gqa_sweep(rule, dtype):
  q, k, v = clustered(19, q_heads=4, kv_heads=1, q_len=50, kv_len=70)
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  mod = causal_mod(offset=70 - 50)
  ct = rand(20, (B, 4, 50, D))
  kw = dict(softmax_threshold=0.05, rule=rule, score_mod=mod)
  out_f, _, st_f = run(q, k, v, backend="flash", **kw)
  grads, (out_p, lse_p, st_p) = run_grad(q, k, v, ct, backend="pallas", interpret=True, **kw)
  agree = np.mean(np.asarray(st_f.decisions) == np.asarray(st_p.decisions))
  assert agree == 1.0 if dtype == jnp.float32 else agree > 0.95
  ref_out, ref_lse = sparse_reference(q, k, v, st_p, score_mod=mod)
  assert rel_err(out_p, ref_out) < tol(dtype)
  assert rel_err(lse_p, ref_lse) < tol(jnp.float32 if dtype == jnp.float32 else dtype)
  want = sparse_reference_grads(q, k, v, st_p, ct, mask_mod=mod.mask_mod)
  for name, g, w in zip("qkv", grads, want):
    assert rel_err(g, w) < tol(dtype, grad=True), name


@pytest.mark.slow
def test_pallas_default_tiling_and_iid_inputs():
  q, k, v = random_qkv(21, batch=2, q_heads=2, kv_heads=2, q_len=96, kv_len=128, head_dim=32)
  out, lse, stats = threshold_sparse_attention(q, k, v, return_lse=True, return_stats=True,
                                               backend="pallas", interpret=True)
  assert (stats.block_q, stats.block_k) == (32, 32)
  ref_out, ref_lse = sparse_reference(q, k, v, stats)
  assert rel_err(out, ref_out) < tol(jnp.float32) and rel_err(lse, ref_lse) < tol(jnp.float32)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gpu_triton_sparse_forward_and_gradients(dtype):
  """The compiled Triton kernel: forward and gradients against the float64 reference of its own
  decisions; decisions against the flash kernel's (rounding may flip a tile at the boundary)."""
  q, k, v = clustered(22, batch=2, q_heads=8, kv_heads=2, q_len=1000, kv_len=1200, d=64, run=128,
                      norm=12.0)
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  ct = rand(23, (2, 8, 1000, 64))
  kw = dict(softmax_threshold=0.01, block_q=128, block_k=128, score_mod=causal_mod(offset=200))
  out, lse, stats = threshold_sparse_attention(q, k, v, return_lse=True, return_stats=True,
                                               backend="pallas", interpret=False, **kw)
  _, _, st_f = threshold_sparse_attention(q, k, v, return_lse=True, return_stats=True,
                                          backend="flash", **kw)
  assert np.mean(np.asarray(stats.decisions) == np.asarray(st_f.decisions)) > 0.99
  assert float(stats.skipped_fraction.mean()) > 0
  ref_out, ref_lse = sparse_reference(q, k, v, stats, score_mod=kw["score_mod"])
  assert rel_err(out, ref_out) < tol(dtype)
  f = lambda q, k, v: jnp.sum(threshold_sparse_attention(
      q, k, v, backend="pallas", interpret=False, **kw).astype(jnp.float32) * ct)
  grads = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
  want = sparse_reference_grads(q, k, v, stats, ct, mask_mod=kw["score_mod"].mask_mod)
  for name, g, w in zip("qkv", grads, want):
    assert rel_err(g, w) < tol(dtype, grad=True), name
