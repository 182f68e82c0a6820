"""Attention dropout: every kernel with the ``dropout`` flag against ``standard_attention``.

The keep mask is a pure function of the key and the absolute ``(b, h, q_idx, kv_idx)``
(:func:`attnax.kernels.tiles.dropout_keep`), so a fused kernel must drop exactly the weights the
reference drops with the same key: forward, LSE and gradients are compared with the float64
reference *with the same key* at DESIGN.md's tolerances, and the mask a kernel applied is read
back from its output (``v`` = identity, so ``out`` is the dropped probability matrix) and compared
bit for bit. Rows come from the conformance table (``tests/kernels/conformance.py``, flag
``dropout``): standard, memory-efficient, flash, Pallas interpret (and the Triton lowering with
``-m gpu``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.kernels import (_checks, additive_bias_mod, alibi_mod, causal_mod, compose_score_mods,
                            flash_attention, memory_efficient_attention, pallas_flash_attention,
                            standard_attention, tiles)
from attnax.kernels.pallas import api as pallas_api
from tests.helpers import rand, random_qkv, rel_err, tol
from tests.kernels.conformance import (assert_grads, assert_lse, assert_out, in_float64, jit,
                                       rows)

# Compile-heavy on CPU (CI's 2 cores): runs with -m slow and on the GPU machine.
pytestmark = pytest.mark.slow

f32, bf16 = jnp.float32, jnp.bfloat16
B, HQ, HKV, SQ, SK, D = 2, 4, 2, 37, 45, 16     # GQA, ragged against the rows' blocks of 16
RATE = 0.3
KEY = jax.random.key(7)


def qkv(seed, dtype=f32, sq=SQ, sk=SK, v_dim=None):
  return random_qkv(seed, batch=B, q_heads=HQ, kv_heads=HKV, q_len=sq, kv_len=sk, head_dim=D,
                    v_dim=v_dim, dtype=dtype)


def mods(sq=SQ, sk=SK):
  """A mask (bottom-right causal: some tiles empty, some partial) and a bias on the scores."""
  return compose_score_mods(causal_mod(offset=sk - sq), alibi_mod(num_heads=HQ))


def reference(row, q, k, v):
  """standard_attention with the same dropout key, in float64: ``(out, lse)`` numpy. (Dropout
  rows have no fixed semantics of their own, such as paged decoding's causal mask.)"""
  assert not row.bottom_right_causal
  return in_float64(lambda q, k, v, key: standard_attention(
      q, k, v, return_lse=True, score_mod=mods(), dropout_rate=RATE, dropout_rng=key),
      q, k, v, KEY)


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("row,variant", rows("dropout", ("f32", "bf16"),
                                             needs=("softmax", "dropout")))
def test_forward_matches_reference_with_the_same_key(row, variant):
  """Output and LSE equal standard_attention's with the same key; the LSE is that of the
  undropped softmax."""
  dtype = f32 if variant == "f32" else bf16
  q, k, v = qkv(0, dtype)
  out, lse = jit(lambda q, k, v, key: row.fn(q, k, v, score_mod=mods(), return_lse=True,
                                             dropout_rate=RATE, dropout_rng=key))(q, k, v, KEY)
  assert out.dtype == dtype and lse.dtype == f32
  ref, ref_lse = reference(row, q, k, v)
  assert_out(row, out, ref, v, tol(dtype))
  assert_lse(row, lse, ref_lse, tol(dtype))
  _, undropped_lse = in_float64(lambda q, k, v: standard_attention(
      q, k, v, score_mod=mods(), return_lse=True), q, k, v)
  assert_lse(row, lse, undropped_lse, tol(dtype))
  # Dropping changed the output (by far more than the tolerance).
  no_drop = in_float64(lambda q, k, v: standard_attention(q, k, v, score_mod=mods()), q, k, v)
  assert np.linalg.norm(np.asarray(out, np.float64) - no_drop) > 0.1 * np.linalg.norm(no_drop)


@pytest.mark.parametrize("row,variant", rows("dropout", ("mask",), needs=("softmax", "dropout")))
def test_kernel_applies_exactly_the_reference_mask(row, variant):
  """With ``v`` the identity, ``out[b, h, i, :]`` is row ``i`` of the dropped probabilities:
  the kernel's keep mask (its nonzero entries among the visible ones) equals
  ``tiles.dropout_keep`` bit for bit, and the kept entries are ``p / (1 - rate)``."""
  sk = 32
  q, k, _ = qkv(1, sk=sk)
  v = jnp.broadcast_to(jnp.eye(sk, dtype=f32), (B, HKV, sk, sk))
  mod = causal_mod(offset=sk - SQ)
  out = jit(lambda q, k, v, key: row.fn(q, k, v, score_mod=mod, dropout_rate=RATE,
                                        dropout_rng=key))(q, k, v, KEY)
  out = np.asarray(out, np.float64)
  _, seed = _checks.check_dropout(RATE, KEY)
  bi, hi, qi, ki = (np.arange(n).reshape(s) for n, s in
                    ((B, (-1, 1, 1, 1)), (HQ, (1, -1, 1, 1)), (SQ, (1, 1, -1, 1)),
                     (sk, (1, 1, 1, -1))))
  keep = np.asarray(tiles.dropout_keep(seed, RATE, jnp.asarray(bi, jnp.int32),
                                       jnp.asarray(hi, jnp.int32), jnp.asarray(qi, jnp.int32),
                                       jnp.asarray(ki, jnp.int32)))
  visible = np.broadcast_to(ki <= qi + (sk - SQ), out.shape)
  np.testing.assert_array_equal(out[visible] != 0, keep[visible])
  assert np.all(out[~visible] == 0)
  p = in_float64(lambda q, k, v: standard_attention(q, k, v, score_mod=mod), q, k, v)
  kept = visible & keep
  # The suite's norm-wise check at tol(f32): TF32 tensor cores on the GPU rows, f32 on CPU.
  err = rel_err(out[kept], p[kept] / (1 - RATE))
  assert err < tol(f32), f"{row.name}: kept weights relative error {err:.3g}"


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("row,variant", rows("dropout", ("grads",), needs=("softmax", "dropout")))
def test_gradients_match_reference_with_the_same_mask(row, variant):
  """q, k, v and a bias table the mod carries, with cotangents on out and LSE: the gradient of the
  dropped forward (the backward regenerates the forward's mask)."""
  q, k, v = qkv(2)
  bias = rand(3, (1, HQ, SQ, SK))
  ct, ct_lse = rand(4, (B, HQ, SQ, D)), rand(5, (B, HQ, SQ))

  def loss(fn, q, k, v, bias, key):
    mod = compose_score_mods(mods(), additive_bias_mod(bias))
    out, lse = fn(q, k, v, score_mod=mod, return_lse=True, dropout_rate=RATE, dropout_rng=key)
    return jnp.sum(out.astype(f32) * ct) + jnp.sum(lse * ct_lse)

  grad = lambda fn: jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3))
  got = jit(grad(row.fn))(q, k, v, bias, KEY)
  want = in_float64(grad(standard_attention), q, k, v, bias, KEY)
  assert_grads(row, got, want, ("q", "k", "v", "bias"), tol(f32, grad=True))
  # ... and not the gradient of the undropped forward.
  undropped = in_float64(jax.grad(lambda q, k, v: jnp.sum(standard_attention(
      q, k, v, score_mod=mods()) * ct)), q, k, v)
  assert np.linalg.norm(np.asarray(got[0]) - undropped) > 0.1 * np.linalg.norm(undropped)


# ----------------------------------------------------------------------------- rate 0, keys


@pytest.mark.parametrize("row,variant", rows("dropout", ("rate0",), needs=("softmax", "dropout")))
def test_rate_zero_is_no_dropout(row, variant):
  """dropout_rate=0 (with or without a key) is bit for bit the call without dropout."""
  q, k, v = qkv(6)

  def calls(q, k, v, key):
    run = lambda **kw: row.fn(q, k, v, score_mod=mods(), return_lse=True, **kw)
    return run(), run(dropout_rate=0.0, dropout_rng=key), run(dropout_rate=0.0)

  plain, *zeros = jit(calls)(q, k, v, KEY)
  for zero in zeros:
    for a, b in zip(zero, plain):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_keys_seeds_and_no_recompile():
  """Typed keys, legacy PRNGKeys and integer seeds all work; the key is traced (a new key per step
  reuses the compiled kernel); the same key gives the same output, another key another mask."""
  q, k, v = qkv(8)
  f = jax.jit(lambda q, k, v, key: flash_attention(q, k, v, block_q=16, block_k=16,
                                                   dropout_rate=RATE, dropout_rng=key))
  ref = jax.jit(lambda q, k, v, key: standard_attention(q, k, v, dropout_rate=RATE,
                                                        dropout_rng=key))
  a, a2, b = f(q, k, v, KEY), f(q, k, v, KEY), f(q, k, v, jax.random.key(8))
  assert f._cache_size() == 1
  np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))
  assert not np.allclose(np.asarray(a), np.asarray(b))
  assert np.abs(np.asarray(a) - np.asarray(ref(q, k, v, KEY))).max() < 1e-5
  # An integer seed (traced here) in the kernel and in the reference: the same mask.
  seed = jnp.int32(3)
  assert np.abs(np.asarray(f(q, k, v, seed)) - np.asarray(ref(q, k, v, seed))).max() < 1e-5
  # A legacy raw key is the typed key with the same data; Python and numpy ints are int seeds.
  seed_of = lambda key: np.asarray(_checks.check_dropout(RATE, key)[1])
  raw = jax.random.PRNGKey(3)
  np.testing.assert_array_equal(seed_of(raw), seed_of(jax.random.wrap_key_data(raw)))
  for same in (3, np.int64(3), jnp.uint32(3)):
    np.testing.assert_array_equal(seed_of(same), seed_of(seed))
  assert not np.array_equal(seed_of(3), seed_of(4))


# ----------------------------------------------------------------------------- mask statistics


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keep_mask_statistics(rate):
  """The hash gives independent Bernoulli(1 - rate) draws: the kept fraction, and the joint keep
  rate of neighbours along every index (kv, q, head, batch) and across two keys, are within 5
  standard errors of ``1 - rate`` and ``(1 - rate)^2`` (n = 2^21 draws: a statistical bound)."""
  b, h, s = 4, 8, 256
  idx = lambda n, ax: jnp.arange(n, dtype=jnp.int32).reshape([n if i == ax else 1
                                                             for i in range(4)])
  keep_of = lambda key: np.asarray(tiles.dropout_keep(_checks.check_dropout(rate, key)[1], rate,
                                                      idx(b, 0), idx(h, 1), idx(s, 2),
                                                      idx(s, 3)))
  keep = keep_of(KEY)
  p = 1 - rate
  se = lambda n, x: 5 * np.sqrt(x * (1 - x) / n)
  assert abs(keep.mean() - p) < se(keep.size, p)
  for ax in range(4):
    a = np.take(keep, np.arange(keep.shape[ax] - 1), axis=ax)
    c = np.take(keep, np.arange(1, keep.shape[ax]), axis=ax)
    joint = (a & c).mean()
    assert abs(joint - p * p) < se(a.size, p * p), (ax, joint, p * p)
  other = keep_of(jax.random.key(8))
  assert abs((keep & other).mean() - p * p) < se(keep.size, p * p)
  # Per-row keep counts spread as a binomial (no row-level correlation): variance within 10%.
  counts = keep.sum(-1).ravel()
  assert abs(counts.var() / (s * p * (1 - p)) - 1) < 0.1


# ----------------------------------------------------------------------------- bad arguments


KERNELS = {"flash_attention": functools.partial(flash_attention, block_q=16, block_k=16),
           "memory_efficient_attention": memory_efficient_attention,
           "pallas_flash_attention": functools.partial(pallas_flash_attention,
                                                       backend="interpret"),
           "standard_attention": standard_attention}


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_bad_dropout_arguments(name):
  """ValueErrors naming the argument (and the kernel), raised before anything runs."""
  fn = KERNELS[name]
  q, k, v = qkv(10)
  cases = [
      (dict(dropout_rate=1.0, dropout_rng=KEY), r"dropout_rate must be in \[0, 1\)"),
      (dict(dropout_rate=-0.1, dropout_rng=KEY), r"dropout_rate must be in \[0, 1\)"),
      (dict(dropout_rate="0.1", dropout_rng=KEY), "dropout_rate must be a float"),
      (dict(dropout_rate=True, dropout_rng=KEY), "dropout_rate must be a float"),
      (dict(dropout_rate=0.1), "needs dropout_rng"),
      (dict(dropout_rate=0.1, dropout_rng=jnp.zeros((3,), jnp.uint32)), r"dropout_rng.*\(3,\)"),
      (dict(dropout_rate=0.1, dropout_rng=jnp.zeros((), f32)), "dropout_rng.*float32"),
      (dict(dropout_rate=0.1, dropout_rng=jax.random.split(KEY, 2)), r"single PRNG key.*\(2,\)"),
  ]
  for kw, match in cases:
    with pytest.raises(ValueError, match=match) as e:
      jax.eval_shape(lambda q, k, v: fn(q, k, v, **kw), q, k, v)
    assert name in str(e.value), (kw, str(e.value))
  with pytest.raises(ValueError, match="dropout_rate must be a static"):
    jax.jit(lambda r: fn(q, k, v, dropout_rate=r, dropout_rng=KEY))(0.1)


# ----------------------------------------------------------------------------- Pallas lowerings


def test_pallas_lowering_without_dropout_is_passed_over(monkeypatch):
  """A lowering whose ``supports_dropout`` is False refuses a plan that drops (listing why), and
  ``backend="auto"`` falls through to one that drops; the Mosaic lowering declares none yet."""
  assert not pallas_api.LOWERINGS["mosaic"].supports_dropout
  assert pallas_api.LOWERINGS["triton"].supports_dropout
  nodrop = pallas_api.Lowering("nodrop", interpret=True, supports_dropout=False)
  monkeypatch.setitem(pallas_api.LOWERINGS, "nodrop", nodrop)
  q, k, v = qkv(11, sq=21, sk=29)    # shapes of this test only: no cached compile is reused
  with pytest.raises(ValueError, match="(?s)nodrop.*cannot run.*dropout"):
    pallas_flash_attention(q, k, v, backend="nodrop", dropout_rate=RATE, dropout_rng=KEY)
  monkeypatch.setattr(pallas_api, "AUTO_ORDER", ("nodrop", "interpret"))
  out = pallas_flash_attention(q, k, v, dropout_rate=RATE, dropout_rng=KEY)
  want = standard_attention(q, k, v, dropout_rate=RATE, dropout_rng=KEY)
  assert np.abs(np.asarray(out) - np.asarray(want)).max() < 1e-5


@pytest.mark.slow
def test_pallas_bwd_entry_point_regenerates_the_mask():
  """pallas_flash_attention_fwd / _bwd with the same dropout arguments give the gradients of the
  dropped forward (compared with the float64 reference's)."""
  from attnax.kernels.pallas import pallas_flash_attention_bwd, pallas_flash_attention_fwd
  q, k, v = qkv(12)
  kw = dict(score_mod=mods(), backend="interpret", dropout_rate=RATE, dropout_rng=KEY)
  out, lse = pallas_flash_attention_fwd(q, k, v, **kw)
  ct = rand(13, out.shape)
  got = pallas_flash_attention_bwd(q, k, v, out, lse, ct, **kw)
  want = in_float64(jax.grad(lambda q, k, v, key: jnp.sum(standard_attention(
      q, k, v, score_mod=mods(), dropout_rate=RATE, dropout_rng=key) * ct), argnums=(0, 1, 2)),
      q, k, v, KEY)
  from tests.kernels.conformance import KERNELS as ROWS
  row = next(r for r in ROWS if r.name == "pallas_interpret")
  assert_grads(row, got, want, "qkv", tol(f32, grad=True))


def test_dropout_kernels_lower_for_gpu_triton():
  """The Triton lowering of the dropping forward, dQ and dK/dV kernels (both dK/dV tile
  orientations), for an H100, on CPU: the jitted gradient is exported for 'cuda', which runs the
  whole Pallas -> Triton IR lowering of the uint32 hash (multiplies, xors, logical shifts, the
  unsigned compare) without a GPU. Skipped if JAX's internals moved."""
  import dataclasses
  try:
    from jax._src.pallas.triton import gpu_info as gi
    from jax._src.pallas.triton import pallas_call_registration as pcr
    h100 = gi._get_gpu_info_impl(gi.GpuVersion.H100)
  except Exception as e:  # pragma: no cover
    pytest.skip(f"JAX internals changed: {e}")
  from attnax.kernels.pallas.triton import TritonConfig
  rate, seed = _checks.check_dropout(RATE, KEY)
  orig = pcr.gpu_info_lib.get_gpu_info
  pcr.gpu_info_lib.get_gpu_info = lambda: h100
  try:
    for transposed in (True, False):
      q = jnp.zeros((1, 4, 256, 64), bf16)
      k = v = jnp.zeros((1, 2, 256, 64), bf16)
      lowering, spec, arrays, qp, kp, vp = pallas_api._plan(
          q, k, v, score_mod=mods(256, 256), mask_mod=None, scale=None, block_q=None,
          block_k=None, block_mask=None, softcap=None, cu_seqlens_q=None, cu_seqlens_k=None,
          backend="interpret", num_warps=None, num_stages=None,
          config=TritonConfig(dkv_transposed=transposed), dropout_rate=rate, dropout_seed=seed)
      assert spec.plan.dropout_rate == RATE and arrays.dropout_seed is not None
      spec = dataclasses.replace(spec, interpret=False)
      attn = pallas_api._attention_vjp(pallas_api.LOWERINGS["triton"], spec)
      schedule = dataclasses.replace(arrays, operands=())
      grads = jax.grad(lambda q, k, v, ops, sched: jnp.sum(
          attn(q, k, v, ops, sched)[0].astype(f32)), argnums=(0, 1, 2))
      jax.export.export(jax.jit(grads), platforms=["cuda"], disabled_checks=[
          jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
              qp, kp, vp, arrays.operands, schedule)
  finally:
    pcr.gpu_info_lib.get_gpu_info = orig
