"""Tests for attnax.kernels.gated: gated attention (flash-sparse-attention's alpha/delta gates).

The reference is written plainly from flash-sparse-attention's semantics in float64 (its reference
implementation: ``scores = scale * q.k + gate_scale * G(alpha_i * delta_j)``, ``G`` log-sigmoid or
the identity) plus gated_mod's threshold rule stated on the gate's term: key ``j`` is hidden from
row ``i`` iff ``T_ij < max_visible T_i + log(min(1, thr * adapt_i))``. Every kernel is compared
with it on fresh random inputs (GQA, ragged tiles, Sq != Sk), and so are the gradients of q, k, v,
alpha and delta (jax.grad of the float64 reference).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.kernels import (aether_attention, causal_mod, create_block_mask, flash_attention,
                            gated_mod, local_window_mod, memory_efficient_attention,
                            pallas_flash_attention, sliding_window_mod, standard_attention)
from attnax.kernels import gated
from attnax.kernels import score_mods as sm
from attnax.kernels.block_mask import EMPTY, FULL
from attnax.kernels.flash import tile_visits
from tests.helpers import rand, rel_err, tol, random_qkv
from tests.kernels.test_block_mask import expected_tiles

B, HQ, HKV, SQ, SK, D = 2, 4, 2, 21, 29, 8
BLOCK = 8

KERNELS = {
    "standard": standard_attention,
    "memory_efficient": functools.partial(memory_efficient_attention, query_chunk_size=BLOCK,
                                          key_chunk_size=BLOCK),
    "flash": functools.partial(flash_attention, block_q=BLOCK, block_k=BLOCK),
    "pallas_interpret": functools.partial(pallas_flash_attention, backend="interpret",
                                          block_q=16, block_k=16),
    "aether_flash": functools.partial(aether_attention, implementation="flash", epsilon=1e-7,
                                      block_q=16, block_k=16),
}
GRAD_KERNELS = ("standard", "memory_efficient", "flash", "pallas_interpret")


# ----------------------------------------------------------------------------- the reference


def reference(q, k, v, alpha, delta, *, scale=None, gate_scale=1.0, logsigmoid=True,
              gate_threshold=None, adapt=False, causal_offset=None, return_lse=False):
  """Float64 gated attention from the semantics (jnp, differentiable; call under enable_x64).

  ``causal_offset``: keep ``j <= i + offset`` (None: every key). A row that sees no key gives 0.
  """
  q, k, v, alpha, delta = (jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, alpha, delta))
  fn = functools.partial(_reference, scale=scale, gate_scale=gate_scale, logsigmoid=logsigmoid,
                         gate_threshold=gate_threshold, adapt=adapt, causal_offset=causal_offset,
                         return_lse=return_lse)
  return jax.jit(fn)(q, k, v, alpha, delta)


@functools.lru_cache(maxsize=None)
def _jitted(kernel, items):
  fn, kw = KERNELS[kernel], dict(items)
  return jax.jit(lambda q, k, v, a, d: fn(q, k, v, score_mod=gated_mod(a, d, **kw),
                                          return_lse=True))


def attend(kernel, q, k, v, alpha, delta, **mod_kw):
  """``(out, lse)`` of ``kernel`` with ``gated_mod(alpha, delta, **mod_kw)``, jitted with the mod
  built inside (as a model builds it); eager op-by-op dispatch would dominate these CPU tests."""
  return _jitted(kernel, tuple(sorted(mod_kw.items())))(q, k, v, alpha, delta)


def mask_part(alpha, delta, **mod_kw):
  """The mask part of ``gated_mod(alpha, delta, **mod_kw)``."""
  return sm.split_score_mod(gated_mod(alpha, delta, **mod_kw))[1]


def tiles_and_dense(alpha, delta, block, **mod_kw):
  """The BlockMask tiles of the gate's mask part and the mask itself, ``(B, Hq, Sq, Sk)`` bool."""
  def build(a, d):
    mask = mask_part(a, d, **mod_kw)
    sq, sk = a.shape[2], d.shape[2]
    bm = create_block_mask(mask, q_len=sq, kv_len=sk, block_q=block, block_k=block,
                           batch=a.shape[0], heads=a.shape[1])
    return bm.tiles, sm.mask_mod_to_boolean_mask(mask, a.shape[0], a.shape[1], sq, sk)
  return tuple(np.asarray(x) for x in jax.jit(build)(alpha, delta))


def _reference(q, k, v, alpha, delta, *, scale, gate_scale, logsigmoid, gate_threshold, adapt,
               causal_offset, return_lse):
  g = q.shape[1] // k.shape[1]
  sq, sk = q.shape[2], k.shape[2]
  k, v, delta = jnp.repeat(k, g, 1), jnp.repeat(v, g, 1), jnp.repeat(delta, g, 1)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  x = alpha[..., :, None] * delta[..., None, :]
  term = gate_scale * (jax.nn.log_sigmoid(x) if logsigmoid else x)
  s = scale * jnp.einsum("bhqd,bhkd->bhqk", q, k) + term
  i, j = np.arange(sq)[:, None], np.arange(sk)[None, :]
  vis = np.ones((sq, sk), bool) if causal_offset is None else j <= i + causal_offset
  vis = jnp.broadcast_to(vis, s.shape)
  if gate_threshold is not None:
    best = jnp.max(jnp.where(vis, term, -jnp.inf), -1, keepdims=True)
    tau = np.full((sq, 1), gate_threshold)
    if adapt and causal_offset is not None:
      tau = tau * np.clip(np.arange(sq)[:, None] + causal_offset + 1, 0, sk) / sk
    vis = vis & (term >= best + np.log(np.minimum(tau, 1.0)))
  s = jnp.where(vis, s, -jnp.inf)
  m = jnp.max(s, -1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  p = jnp.where(vis, jnp.exp(s - m), 0.0)
  l = p.sum(-1, keepdims=True)
  out = jnp.einsum("bhqk,bhkd->bhqd", p / jnp.where(l > 0, l, 1.0), v)
  lse = jnp.where(l[..., 0] > 0, m[..., 0] + jnp.log(jnp.where(l > 0, l, 1.0))[..., 0], -jnp.inf)
  return (out, lse) if return_lse else out


def inputs(seed, sq=SQ, sk=SK, gate_std=2.0):
  q, k, v = random_qkv(seed, batch=B, q_heads=HQ, kv_heads=HKV, q_len=sq, kv_len=sk,
                       head_dim=D)
  alpha = gate_std * rand(seed + 100, (B, HQ, sq))
  delta = gate_std * rand(seed + 200, (B, HKV, sk))
  return q, k, v, alpha, delta


# Forward cases: (gated_mod options, reference options). Thresholds are relative to the row's
# strongest gate, so 0.05 hides a good share of the keys of these gates (checked below).
CASES = {
    "logsigmoid": (dict(gate_scale=0.5), dict(gate_scale=0.5)),
    "linear_causal": (dict(is_logsigmoid_gate=False, mask_mod=causal_mod(SK - SQ)),
                      dict(logsigmoid=False, causal_offset=SK - SQ)),
    "threshold": (dict(gate_threshold=0.05, gate_scale=2.0), dict(gate_threshold=0.05,
                                                                  gate_scale=2.0)),
    "threshold_causal_adapt": (dict(gate_threshold=0.2, is_adapt_gate=True, gate_scale=2.0,
                                    is_logsigmoid_gate=False, mask_mod=causal_mod(3)),
                               dict(gate_threshold=0.2, adapt=True, gate_scale=2.0,
                                    logsigmoid=False, causal_offset=3)),
}


# The default run: every case on the reference kernel, the richest case (threshold, causal,
# adaptive, linear gate) on every kernel (the gradient test runs flash with the log-sigmoid
# threshold); the rest is -m slow (CPU compile time: Pallas interpret and AETHER compile slowly).
_DEFAULT = {(k, "threshold_causal_adapt") for k in KERNELS}


def _fast(kernel, case):
  return [] if kernel == "standard" or (kernel, case) in _DEFAULT else [pytest.mark.slow]


@pytest.mark.parametrize("kernel,case", [
    pytest.param(kn, cn, marks=_fast(kn, cn), id=f"{kn}-{cn}") for kn in KERNELS for cn in CASES])
def test_forward_every_kernel(kernel, case):
  mod_kw, ref_kw = CASES[case]
  q, k, v, alpha, delta = inputs(1)
  out, lse = attend(kernel, q, k, v, alpha, delta, **mod_kw)
  with jax.enable_x64(True):
    ref, ref_lse = reference(q, k, v, alpha, delta, return_lse=True, **ref_kw)
  assert rel_err(out, ref) < tol(jnp.float32), kernel
  finite = np.isfinite(np.asarray(ref_lse))
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
  assert rel_err(np.asarray(lse)[finite], np.asarray(ref_lse)[finite]) < tol(jnp.float32)


@pytest.mark.parametrize("kernel", [
    pytest.param(kn, marks=[] if kn == "flash" else [pytest.mark.slow]) for kn in GRAD_KERNELS])
def test_grads_q_k_v_alpha_delta(kernel):
  q, k, v, alpha, delta = inputs(3)
  ct = rand(4, (B, HQ, SQ, D))
  mod_kw = dict(gate_threshold=0.2, is_adapt_gate=True, gate_scale=2.0, mask_mod=causal_mod(3))
  ref_kw = dict(gate_threshold=0.2, adapt=True, gate_scale=2.0, causal_offset=3)

  def loss(q, k, v, alpha, delta):
    out, lse = KERNELS[kernel](q, k, v, score_mod=gated_mod(alpha, delta, **mod_kw),
                               return_lse=True)
    return jnp.sum(out * ct) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  grads = jax.jit(jax.grad(loss, argnums=range(5)))(q, k, v, alpha, delta)
  with jax.enable_x64(True):
    up = lambda x: jnp.asarray(np.asarray(x, np.float64))

    def ref_loss(q, k, v, alpha, delta):
      out, lse = _reference(q, k, v, alpha, delta, scale=None, logsigmoid=True,
                            return_lse=True, **ref_kw)
      return jnp.sum(out * up(ct)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    want = jax.jit(jax.grad(ref_loss, argnums=range(5)))(*map(up, (q, k, v, alpha, delta)))
  for name, g, w in zip(("q", "k", "v", "alpha", "delta"), grads, want):
    assert g.shape == w.shape and np.isfinite(np.asarray(g)).all(), name
    assert rel_err(g, w) < tol(jnp.float32, grad=True), name


def test_gqa_delta_per_kv_head():
  # Query heads 2h and 2h+1 read delta[:, h]: a delta that differs per kv head changes exactly
  # the outputs of that head's group.
  q, k, v, alpha, delta = inputs(5)
  base, _ = attend("standard", q, k, v, alpha, delta)
  bumped, _ = attend("standard", q, k, v, alpha, delta.at[:, 1].add(3.0))
  diff = np.abs(np.asarray(bumped - base)).max(axis=(0, 2, 3))
  assert (diff[:2] == 0).all() and (diff[2:] > 1e-3).all()
  # MQA: one kv head for every query head.
  out, _ = attend("standard", q, k[:, :1], v[:, :1], alpha, delta[:, :1])
  with jax.enable_x64(True):
    ref = reference(q, k[:, :1], v[:, :1], alpha, delta[:, :1])
  assert rel_err(out, ref) < tol(jnp.float32)


def test_delta_with_one_gate_row_per_query_head():
  # A delta with Hq heads under GQA (the mod cannot see Hkv): query head h reads delta[:, h],
  # in the Pallas kernel as in the float64 reference, gradients included.
  q, k, v, alpha, _ = inputs(6)
  delta = rand(7, (B, HQ, SK))
  ct = rand(8, (B, HQ, SQ, D))
  loss = lambda kernel: lambda q, a, d: jnp.sum(
      KERNELS[kernel](q, k, v, score_mod=gated_mod(a, d)) * ct)
  got = jax.jit(jax.grad(loss("pallas_interpret"), argnums=(0, 1, 2)))(q, alpha, delta)
  with jax.enable_x64(True):
    up = lambda x: jnp.asarray(np.asarray(x, np.float64))
    # The reference as multi-head attention over K/V repeated per query head (the same function).
    kr, vr = (up(jnp.repeat(x, HQ // HKV, 1)) for x in (k, v))
    ref_loss = lambda q, a, d: jnp.sum(_reference(
        q, kr, vr, a, d, scale=None, gate_scale=1.0, logsigmoid=True, gate_threshold=None,
        adapt=False, causal_offset=None, return_lse=False) * up(ct))
    want = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2)))(up(q), up(alpha), up(delta))
  for g, w in zip(got, want):
    assert rel_err(g, w) < tol(jnp.float32, grad=True)


# ----------------------------------------------------------------------------- tile skipping


def _structured(seed):
  """Gates that close whole kv blocks: alpha > 0, delta very negative on blocks 1 and 3."""
  q, k, v, _, _ = inputs(seed, sq=32, sk=48)
  alpha = 0.5 + jnp.abs(rand(seed + 1, (B, HQ, 32)))
  delta = rand(seed + 2, (B, HKV, 48))
  closed = np.zeros(48, bool)
  closed[8:16] = closed[24:32] = True
  delta = jnp.where(closed, delta - 40.0, delta)
  return q, k, v, alpha, delta


def test_gate_threshold_tiles_are_empty_and_cost_nothing():
  q, k, v, alpha, delta = _structured(6)
  kw = dict(is_logsigmoid_gate=False, gate_threshold=1e-3)
  tiles, _ = tiles_and_dense(alpha, delta, BLOCK, **kw)
  assert tiles.shape == (B, HQ, 4, 6)
  assert (tiles[..., [1, 3]] == EMPTY).all() and (tiles[..., [0, 2, 4, 5]] != EMPTY).all()
  # flash_attention's loops (forward, dQ, dK/dV) visit the non-empty tiles only: 4 of the 6 kv
  # blocks, per batch row and kv head (the union over its query heads).
  visits = jax.jit(lambda q, k, v, a, d: tile_visits(
      q, k, v, score_mod=gated_mod(a, d, **kw), block_q=BLOCK, block_k=BLOCK))(
          q, k, v, alpha, delta)
  n = B * HKV * 4 * 4
  assert {name: int(x) for name, x in visits.items()} == dict(forward=n, dq=n, dkv=n, nonempty=n)
  # The same numbers as the plain float64 reference, which hides the same keys one by one.
  out, _ = attend("flash", q, k, v, alpha, delta, **kw)
  with jax.enable_x64(True):
    ref = reference(q, k, v, alpha, delta, logsigmoid=False, gate_threshold=1e-3)
  assert rel_err(out, ref) < tol(jnp.float32)


def test_gate_tile_rule_is_sound():
  # EMPTY only where every entry is masked, FULL only where every entry is visible, on random
  # gates (both gate kinds, the options of the forward cases) and on the structured ones; ragged
  # tiles. The gate never hides a row's strongest key, so no row is empty.
  cases = [(inputs(7, sq=37, sk=45)[3:], False, 0.2), (inputs(8, sq=37, sk=45)[3:], True, 0.05),
           (_structured(9)[3:], False, 1e-3), (_structured(9)[3:], True, 0.5),
           (_structured(9)[3:], False, 1e-20)]      # a low threshold: open tiles are FULL
  seen = set()
  for n, ((alpha, delta), logsig, thr) in enumerate(cases):
    tiles, dense = tiles_and_dense(alpha, delta, BLOCK, is_logsigmoid_gate=logsig,
                                   gate_threshold=thr, gate_scale=2.0)
    any_, all_, ragged = expected_tiles(dense, BLOCK, BLOCK)
    assert not (any_ & (tiles == EMPTY)).any()
    assert not (~(all_ & ~ragged) & (tiles == FULL)).any()
    assert dense.any(-1).all()
    if n < 2:      # the forward cases' thresholds hide a good share of these gates' keys
      assert 0.2 < 1 - dense.mean() < 0.95
    seen |= set(np.unique(tiles).tolist())
  assert seen == {0, 1, 2}


def test_key_range_mask_tiles_are_sound():
  # Packed-sequence-like ranges (segments of 12 keys; causal inside in batch row 1) with random
  # rows mixed in.
  rng = np.random.default_rng(10)
  i = np.arange(37)
  lo = np.broadcast_to((i // 12) * 12, (2, 37)).copy()
  hi = np.minimum(lo + np.stack([np.full(37, 11), i % 12]), 44)
  noisy = rng.random((2, 37)) < 0.1
  lo[noisy] = rng.integers(0, 40, noisy.sum())
  hi[noisy] = lo[noisy] + rng.integers(-3, 20, noisy.sum())

  def build(lo, hi):
    mask = gated.KeyRangeMask(lo, hi, 45)
    bm = create_block_mask(mask, q_len=37, kv_len=45, block_q=BLOCK, block_k=BLOCK, batch=2)
    return bm.tiles, sm.mask_mod_to_boolean_mask(mask, 2, 1, 37, 45)

  tiles, dense = map(np.asarray, jax.jit(build)(jnp.asarray(lo, jnp.int32),
                                                jnp.asarray(hi, jnp.int32)))
  np.testing.assert_array_equal(dense[:, 0], (np.arange(45) >= lo[..., None])
                                & (np.arange(45) <= hi[..., None]))
  any_, all_, ragged = expected_tiles(dense, BLOCK, BLOCK)
  assert not (any_ & (tiles == EMPTY)).any()
  assert not (~(all_ & ~ragged) & (tiles == FULL)).any()
  assert (tiles == EMPTY).any() and (tiles == FULL).any()


def test_band_ranges_match_the_masks():
  # The visible key range of every row under each band mask is exactly the mask's row.
  for mask in (causal_mod(-4).mask_mod, causal_mod(9).mask_mod, sliding_window_mod(5).mask_mod,
               local_window_mod(3, 2, 1).mask_mod, local_window_mod(None, 0, 2).mask_mod):
    lo, hi, _ = gated.band_key_ranges(mask, 13, 17)
    i, j = np.arange(13)[:, None], np.arange(17)[None, :]
    dense = np.broadcast_to(np.asarray(mask(0, 0, i, j)), (13, 17))   # numpy in, numpy out
    np.testing.assert_array_equal(dense, (j >= lo[:, None]) & (j <= hi[:, None]), str(mask))


def test_row_references_over_key_ranges():
  # The strongest gate of a row is taken over its visible keys: window extremes from a sparse
  # table (any ranges), prefix extremes for causal ranges.
  rng = np.random.default_rng(15)
  x = rng.standard_normal((2, 3, 37)).astype(np.float32)
  lo = rng.integers(0, 37, (2, 20))
  hi = np.minimum(lo + rng.integers(0, 12, (2, 20)), 36)
  got = jax.jit(gated._range_extrema)(x, lo, hi)
  pre = jax.jit(gated._prefix_extrema)(x, hi[:1])
  for b in range(2):
    for i in range(20):
      seg = x[b, :, lo[b, i]:hi[b, i] + 1]
      np.testing.assert_array_equal(np.asarray(got[0])[b, :, i], seg.min(-1))
      np.testing.assert_array_equal(np.asarray(got[1])[b, :, i], seg.max(-1))
      np.testing.assert_array_equal(np.asarray(pre[1])[b, :, i], x[b, :, :hi[0, i] + 1].max(-1))


def test_mosaic_lowering_accepts_the_reads():
  # alpha/limit are read per query row, delta per key column (h // G a scalar): the patterns the
  # Mosaic GPU lowering loads per tile. Checked on CPU from the plan, as test_mosaic_gpu does.
  from attnax.kernels.pallas import mosaic_gpu as mg
  from tests.kernels.pallas.test_mosaic_gpu import _plan, _zeros
  q, k, v = _zeros(s=256)
  alpha, delta = rand(11, (1, 4, 256)), rand(12, (1, 2, 256))
  plans = []

  def build(q, k, v, alpha, delta):   # traced, not run: the plan is static
    mod = gated_mod(alpha, delta, gate_threshold=0.1, is_adapt_gate=True, mask_mod=causal_mod())
    plans.append(_plan(q, k, v, score_mod=mod)[:2])
    # The varlen wrappers' key ranges (lo/hi read per query row).
    lo = jnp.zeros((1, 256), jnp.int32)
    ranges = gated.KeyRangeMask(lo, lo + jnp.arange(256, dtype=jnp.int32), 256)
    plans.append(_plan(q, k, v, score_mod=gated_mod(alpha, delta, gate_threshold=0.1,
                                                     mask_mod=ranges))[:2])
    return 0

  jax.eval_shape(build, q, k, v, alpha, delta)
  for cfg, plan in plans:
    assert mg.plan_reasons(plan, cfg) == []
    assert plan.unit_grad           # the gate only adds: the backward skips the score jvp
  # alpha, delta (score part); alpha, delta, limit (mask part); and the ranges' lo, hi.
  assert [len(plan.mods.meta) for _, plan in plans] == [5, 7]


# ----------------------------------------------------------------------------- edge cases


def test_large_gates_and_empty_rows_are_finite():
  q, k, v, alpha, delta = inputs(13)
  alpha, delta = 300.0 * alpha, 300.0 * delta           # log-sigmoid saturates both ways
  kw = dict(gate_threshold=0.5, mask_mod=causal_mod(-5))     # rows 0-4 see no key

  def loss(q, k, v, alpha, delta):
    return jnp.sum(attend("standard", q, k, v, alpha, delta, **kw)[0] ** 2)

  out, lse = attend("standard", q, k, v, alpha, delta, **kw)
  with jax.enable_x64(True):
    ref = reference(q, k, v, alpha, delta, gate_threshold=0.5, causal_offset=-5)
  assert rel_err(out, ref) < tol(jnp.float32)
  assert (np.asarray(out)[:, :, :5] == 0).all() and (np.asarray(lse)[:, :, :5] == -np.inf).all()
  grads = jax.jit(jax.grad(loss, argnums=range(5)))(q, k, v, alpha, delta)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_bad_shapes_raise_naming_alpha_and_delta():
  q, k, v, alpha, delta = inputs(14)
  with pytest.raises(ValueError, match=r"alpha.*\(2, 4, 20\)"):
    standard_attention(q, k, v, score_mod=gated_mod(alpha[:, :, :20], delta))
  with pytest.raises(ValueError, match=r"delta.*\(2, 2, 28\)"):
    flash_attention(q, k, v, score_mod=gated_mod(alpha, delta[..., :28], gate_threshold=0.1))
  with pytest.raises(ValueError, match="alpha"):
    pallas_flash_attention(q[:, :2], k, v, score_mod=gated_mod(alpha, delta), backend="interpret")
  with pytest.raises(ValueError, match=r"alpha.*rank 3.*\(2, 4, 21, 1\)"):
    gated_mod(alpha[..., None], delta)
  with pytest.raises(ValueError, match=r"multiple.*alpha \(2, 4, 21\), delta \(2, 3, 29\)"):
    gated_mod(alpha, jnp.concatenate([delta, delta[:, :1]], 1))
  with pytest.raises(ValueError, match="batch"):
    gated_mod(alpha[:1], delta)
  with pytest.raises(ValueError, match="gate_threshold"):
    gated_mod(alpha, delta, gate_threshold=0.0)
  with pytest.raises(ValueError, match="gate_scale"):
    gated_mod(alpha, delta, gate_scale=-1.0)
  with pytest.raises(ValueError, match="mask_mod"):
    gated_mod(alpha, delta, gate_threshold=0.1,
              mask_mod=sm.document_mask_mod(jnp.zeros((SK,), jnp.int32)))
  with pytest.raises(ValueError, match="alpha"):
    gated_mod(alpha.astype(jnp.int32), delta)
