"""pallas_flash_attention on CPU (Pallas interpret mode) against the float64 references.

Interpretation is slow to compile, so each test compiles one configuration that exercises several
features at once (mods, ragged lengths, GQA, LSE, gradients). Kernel calls are wrapped in a
top-level ``jax.jit`` with XLA's backend optimisations off: it only shortens compile time.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.kernels import (BlockMask, additive_bias_mod, alibi_mod, causal_mod,
                            compose_score_mods, document_mask_mod, prefix_lm_mod,
                            sliding_window_mod, softcap_mod)
from attnax.kernels import block_mask as bm_lib
from attnax.kernels.pallas import (TritonConfig, cu_seqlens_to_doc_ids, not_supported_reasons,
                                   pack_sequences, pallas_flash_attention,
                                   pallas_flash_attention_bwd, pallas_flash_attention_fwd,
                                   seqlens_to_doc_ids, unpack_sequences, varlen_attention)
from tests.helpers import random_qkv, reference_attention, reference_grads, rel_err, tol

OPTS = {"xla_backend_optimization_level": 0}
f32 = jnp.float32


def run(q, k, v, **kw):
  f = jax.jit(lambda q, k, v: pallas_flash_attention(q, k, v, return_lse=True, **kw),
              compiler_options=OPTS)
  return f(q, k, v)


def run_grads(q, k, v, ct, **kw):
  loss = lambda q, k, v: jnp.sum(pallas_flash_attention(q, k, v, **kw).astype(f32) * ct)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)), compiler_options=OPTS)(q, k, v)


def cotangent(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, f32)


def assert_close(out, lse, ref, ref_lse, dtype):
  out, lse = np.asarray(out, np.float64), np.asarray(lse, np.float64)
  assert not np.isnan(out).any() and not np.isnan(lse).any()
  assert rel_err(out, ref) < tol(dtype), rel_err(out, ref)
  fin = np.isfinite(ref_lse)
  np.testing.assert_array_equal(np.isfinite(lse), fin)
  assert rel_err(np.where(fin, lse, 0), np.where(fin, ref_lse, 0)) < tol(dtype)


def assert_grads(got, want, dtype):
  for name, g, w in zip("qkv", got, want):
    g = np.asarray(g, np.float64)
    assert not np.isnan(g).any(), name
    assert rel_err(g, w) < tol(dtype, grad=True), (name, rel_err(g, w))


def test_dense_ragged_gqa_lse_grads():
  # No mask (the dense walk), ragged Sq != Sk, GQA 4/2, value dim != head dim (both padded).
  q, k, v = random_qkv(0, batch=2, q_heads=4, kv_heads=2, q_len=50, kv_len=70, head_dim=24,
                       v_dim=16)
  out, lse = run(q, k, v)
  assert out.shape == (2, 4, 50, 16) and lse.shape == (2, 4, 50)
  assert_close(out, lse, *reference_attention(q, k, v, return_lse=True), f32)
  ct = cotangent(1, out.shape)
  assert_grads(run_grads(q, k, v, ct), reference_grads(q, k, v, ct), f32)


def test_all_mods_softcap_empty_rows_grads():
  # Every kind of mod at once, fused in-kernel: ALiBi (slopes array), a (B, 1, Sq, Sk) bias table
  # (2-D gather), document ids (q and kv ids differ), a sliding window with offset, a user score
  # mod that is not additive (its derivative enters the backward), a user mask mod (tiles
  # evaluated elementwise) that empties some query rows, and a logit soft-cap.
  q, k, v = random_qkv(2, batch=2, q_heads=4, kv_heads=2, q_len=50, kv_len=70, head_dim=16,
                       scale=3.0)
  rng = np.random.RandomState(0)
  doc_q = jnp.asarray(np.sort(rng.randint(0, 3, (2, 50))))
  doc_k = jnp.asarray(np.sort(rng.randint(0, 3, (2, 70))))
  bias = jax.random.normal(jax.random.key(3), (2, 1, 50, 70))
  user = lambda s, b, h, i, j: 0.75 * s + 0.5 * jnp.sin(s)
  mods = compose_score_mods(alibi_mod(4), additive_bias_mod(bias), user,
                            document_mask_mod(doc_q, doc_k), sliding_window_mod(40, offset=20))
  mask = lambda b, h, i, j: (i < 44) | (h == 0)      # rows 44.. of heads 1-3 see nothing
  cap = 4.0
  capmod = lambda s, b, h, i, j: cap * jnp.tanh(s / cap)
  ref_kw = dict(score_mod=compose_score_mods(capmod, mods), mask_mod=mask)
  out, lse = run(q, k, v, score_mod=mods, mask_mod=mask, softcap=cap)
  ref, ref_lse = reference_attention(q, k, v, return_lse=True, **ref_kw)
  assert np.isinf(ref_lse).sum() >= 2 * 3 * 6
  assert_close(out, lse, ref, ref_lse, f32)
  empty = ~np.isfinite(ref_lse)
  assert np.all(np.asarray(out)[empty] == 0) and np.all(np.asarray(lse)[empty] == -np.inf)
  ct = cotangent(4, out.shape)
  got = run_grads(q, k, v, ct, score_mod=mods, mask_mod=mask, softcap=cap)
  assert_grads(got, reference_grads(q, k, v, ct, **ref_kw), f32)
  assert np.all(np.asarray(got[0])[empty] == 0)


def test_block_mask_skipping_matches_kept_tiles():
  # A caller's BlockMask (as the AETHER planner passes), per query head (H' = Hq) under GQA:
  # EMPTY tiles must be skipped in the forward and both backward passes, so the result is the
  # reference restricted to the kept tiles. Ragged tails make the last row/column partial. Every
  # pass runs finer than the BlockMask tiles (16-row programs, 16-wide chunks of 32x32 tiles).
  bq = bk = 32
  q, k, v = random_qkv(5, batch=1, q_heads=4, kv_heads=2, q_len=64, kv_len=76, head_dim=16)
  nq, nk = 2, 3
  rng = np.random.RandomState(1)
  tiles = rng.choice([bm_lib.EMPTY, bm_lib.PARTIAL, bm_lib.FULL], size=(1, 4, nq, nk),
                     p=[0.4, 0.2, 0.4]).astype(np.int8)
  tiles[0, 3, 0, :] = bm_lib.EMPTY           # q block 0 of head 3 sees nothing
  tiles[0, 0, 1] = bm_lib.FULL               # a full row (its ragged last tile turns partial)
  tiles[0, 1, :, 0] = bm_lib.FULL            # full tiles interleaved with dropped ones
  tiles[0, 1, :, 1] = bm_lib.EMPTY
  block_mask = BlockMask.from_tiles(jnp.asarray(tiles), block_q=bq, block_k=bk, q_len=64,
                                    kv_len=76)
  kept = jnp.asarray(tiles != bm_lib.EMPTY)
  kept_mask = lambda b, h, i, j: kept[0, h, i // bq, j // bk]
  cfg = TritonConfig(bq, bk, fwd_rows=16, fwd_cols=16, dq_rows=16, dq_cols=16, dkv_rows=16,
                    dkv_cols=16)
  out, lse = run(q, k, v, block_mask=block_mask, config=cfg)
  ref, ref_lse = reference_attention(q, k, v, return_lse=True, mask_mod=kept_mask)
  assert_close(out, lse, ref, ref_lse, f32)
  ct = cotangent(6, out.shape)
  got = run_grads(q, k, v, ct, block_mask=block_mask, config=cfg)
  assert_grads(got, reference_grads(q, k, v, ct, mask_mod=kept_mask), f32)
  # FULL tiles skip the elementwise mask: a causal mod under an all-FULL BlockMask is applied only
  # on the ragged (hence partial) last kv column.
  full = BlockMask.from_tiles(jnp.full((1, 1, nq, nk), bm_lib.FULL, jnp.int8), block_q=bq,
                              block_k=bk, q_len=64, kv_len=76)
  out, lse = run(q, k, v, score_mod=causal_mod(), block_mask=full, config=cfg)
  ref, ref_lse = reference_attention(q, k, v, return_lse=True,
                                     mask_mod=lambda b, h, i, j: (j < 2 * bk) | (j <= i))
  assert_close(out, lse, ref, ref_lse, f32)


def test_bf16_causal_bottom_right_grads():
  # Also the dK/dV variant on the untransposed tile.
  q, k, v = random_qkv(7, batch=1, q_heads=2, kv_heads=1, q_len=40, kv_len=72, head_dim=32,
                       dtype=jnp.bfloat16)
  kw = dict(score_mod=causal_mod(72 - 40), config=TritonConfig(32, 32, dkv_transposed=False))
  out, lse = run(q, k, v, **kw)
  assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
  ref_kw = dict(score_mod=kw["score_mod"])
  assert_close(out, lse, *reference_attention(q, k, v, return_lse=True, **ref_kw), jnp.bfloat16)
  ct = cotangent(8, out.shape).astype(jnp.bfloat16)
  assert_grads(run_grads(q, k, v, ct, **kw), reference_grads(q, k, v, ct, **ref_kw),
               jnp.bfloat16)


def test_fwd_bwd_entry_points():
  q, k, v = random_qkv(9, batch=1, q_heads=2, kv_heads=2, q_len=33, kv_len=48, head_dim=16)
  kw = dict(score_mod=causal_mod(15))
  fwd = jax.jit(lambda q, k, v: pallas_flash_attention_fwd(q, k, v, **kw), compiler_options=OPTS)
  out, lse = fwd(q, k, v)
  assert_close(out, lse, *reference_attention(q, k, v, return_lse=True, **kw), f32)
  dout = cotangent(10, out.shape)
  bwd = jax.jit(lambda *a: pallas_flash_attention_bwd(*a, **kw), compiler_options=OPTS)
  assert_grads(bwd(q, k, v, out, lse, dout), reference_grads(q, k, v, dout, **kw), f32)


def test_varlen_matches_per_sequence():
  lens = [20, 35, 9]
  seqs = [random_qkv(20 + i, batch=1, q_heads=2, kv_heads=1, q_len=n, kv_len=n, head_dim=16)
          for i, n in enumerate(lens)]
  q, cu = pack_sequences([s[0] for s in seqs])
  k, _ = pack_sequences([s[1] for s in seqs])
  v, _ = pack_sequences([s[2] for s in seqs])
  np.testing.assert_array_equal(cu, [0, 20, 55, 64])
  f = jax.jit(lambda q, k, v: varlen_attention(q, k, v, cu, score_mod=causal_mod(),
                                               block_q=16, block_k=16), compiler_options=OPTS)
  out = f(q, k, v)
  for (qs, ks, vs), got in zip(seqs, unpack_sequences(out, cu)):
    ref = reference_attention(qs, ks, vs, score_mod=causal_mod())
    assert rel_err(got, ref) < tol(f32)


def test_varlen_helpers():
  np.testing.assert_array_equal(seqlens_to_doc_ids(jnp.array([2, 0, 3])), [0, 0, 2, 2, 2])
  np.testing.assert_array_equal(cu_seqlens_to_doc_ids(jnp.array([0, 2, 5]), 7),
                                [0, 0, 1, 1, 1, 2, 2])
  seqs = [jax.random.normal(jax.random.key(i), (3, n, 4)) for i, n in enumerate([5, 1, 7])]
  packed, cu = pack_sequences(seqs)
  assert packed.shape == (3, 13, 4)
  for a, b in zip(seqs, unpack_sequences(packed, cu)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="differs"):
    pack_sequences([jnp.zeros((3, 2, 4)), jnp.zeros((2, 2, 4))])


def test_block_skipping_schedule_is_sparse():
  # The plan for a sliding window visits only the band: count the tiles the kernels walk.
  from attnax.kernels.pallas import api
  q, k, v = random_qkv(11, batch=1, q_heads=1, kv_heads=1, q_len=512, kv_len=512, head_dim=16)
  _, _, plan, _, _, _ = api._plan(
      q, k, v, score_mod=sliding_window_mod(64), mask_mod=None, scale=None, block_q=32,
      block_k=32, block_mask=None, softcap=None, cu_seqlens_q=None, cu_seqlens_k=None,
      backend="interpret", num_warps=None, num_stages=None, config=None)
  cnt, _, fcnt, _, first, ncontig = (np.asarray(x) for x in plan.lists)
  visited = cnt.sum() + fcnt.sum()
  assert visited <= 16 * 4   # 16 q blocks x (2 full + 2 partial at most) of 256 tiles
  assert np.all(ncontig == fcnt)   # the band's full tiles are walked as one range
  tcnt, _, tfcnt, _, _, _ = (np.asarray(x) for x in plan.tlists)
  assert tcnt.sum() + tfcnt.sum() == visited   # dK/dV walks the same tiles


def test_errors_list_reasons():
  q, k, v = random_qkv(12, batch=1, q_heads=2, kv_heads=2, q_len=8, kv_len=8, head_dim=16)
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
      pallas_flash_attention(q, k, v, backend="triton")
    assert not_supported_reasons("interpret", q, k, v) == []
  with pytest.raises(ValueError, match="(?s)backend 'mosaic' cannot run.*bf16 or f16"):
    pallas_flash_attention(q, k, v, backend="mosaic")   # f32: the reasons, not a crash
  with pytest.raises(ValueError, match="unknown backend"):
    pallas_flash_attention(q, k, v, backend="cuda")
  big = jnp.zeros((1, 1, 8, 288))
  with pytest.raises(ValueError, match="exceeds 256"):
    pallas_flash_attention(big, big, big)
  with pytest.raises(ValueError, match="softcap"):
    pallas_flash_attention(q, k, v, softcap=-1.0)
  with pytest.raises(ValueError, match="multiple of kv heads"):
    pallas_flash_attention(q, k[:, :1].repeat(3, 1), v[:, :1].repeat(3, 1))
  with pytest.raises(ValueError, match="power of two"):
    pallas_flash_attention(q, k, v, block_q=24)
  bad = bm_lib.create_block_mask(None, q_len=64, kv_len=16, block_q=16, block_k=16)
  with pytest.raises(ValueError, match="tiles"):
    pallas_flash_attention(q, k, v, block_mask=bad)


def test_lowers_for_gpu_triton():
  """The Triton lowering (forward, dQ, dK/dV) of several configurations, for an H100, on CPU.

  Exports the jitted gradient for the 'cuda' platform: this runs the whole Pallas -> Triton IR
  lowering (what would fail first on a GPU) without one. Skipped if JAX's internals moved.
  """
  try:
    from jax._src.pallas.triton import gpu_info as gi
    from jax._src.pallas.triton import pallas_call_registration as pcr
    h100 = gi._get_gpu_info_impl(gi.GpuVersion.H100)
  except Exception as e:  # pragma: no cover
    pytest.skip(f"JAX internals changed: {e}")
  from attnax.kernels.pallas import api, triton as tk
  orig = pcr.gpu_info_lib.get_gpu_info
  pcr.gpu_info_lib.get_gpu_info = lambda: h100
  try:
    ids = jnp.repeat(jnp.arange(4), 64)
    bias = jnp.zeros((4, 256, 256))
    cases = [
        dict(),
        dict(score_mod=compose_score_mods(alibi_mod(4), document_mask_mod(ids), causal_mod()),
             softcap=30.0),
        dict(score_mod=prefix_lm_mod(jnp.array([40])), config=TritonConfig(dkv_transposed=False)),
        # Closures over arrays: their gathers become ref loads (operands.eval_jaxpr).
        dict(mask_mod=lambda b, h, i, j: ids[i] == ids[j],
             score_mod=lambda s, b, h, i, j: s + bias[h, i, j]),
    ]
    for d, dtype, kw in [(128, jnp.bfloat16, cases[0]), (64, jnp.float16, cases[1]),
                         (96, jnp.float32, cases[2]), (128, jnp.bfloat16, cases[3])]:
      q = jnp.zeros((1, 4, 256, d), dtype)
      k = v = jnp.zeros((1, 2, 256, d), dtype)
      kw = dict(dict(score_mod=None, mask_mod=None, scale=None, block_q=None, block_k=None,
                     block_mask=None, softcap=None, cu_seqlens_q=None, cu_seqlens_k=None,
                     backend="interpret", num_warps=None, num_stages=None, config=None), **kw)
      lowering, spec, arrays, qp, kp, vp = api._plan(q, k, v, **kw)
      spec = dataclasses.replace(spec, interpret=False)
      gpu = api.LOWERINGS["triton"]
      schedule = dataclasses.replace(arrays, operands=())

      def grads(q, k, v, operands, schedule):
        # Float operands (the bias) are differentiated too, ints (ids) are not.
        floats = [i for i, x in enumerate(operands) if jnp.issubdtype(x.dtype, jnp.floating)]

        def loss(q, k, v, fl):
          ops = list(operands)
          for i, x in zip(floats, fl):
            ops[i] = x
          return jnp.sum(api._attention_vjp(gpu, spec)(q, k, v, tuple(ops),
                                                       schedule)[0].astype(f32))
        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, [operands[i] for i in floats])

      jax.export.export(jax.jit(grads), platforms=["cuda"], disabled_checks=[
          jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
              qp, kp, vp, arrays.operands, schedule)
  finally:
    pcr.gpu_info_lib.get_gpu_info = orig


# ----------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_f16_prefix_lm_window_grads():
  q, k, v = random_qkv(13, batch=2, q_heads=2, kv_heads=2, q_len=45, kv_len=45, head_dim=16,
                       dtype=jnp.float16)
  kw = dict(score_mod=compose_score_mods(prefix_lm_mod(jnp.array([10, 30])),
                                         sliding_window_mod(20)))
  out, lse = run(q, k, v, **kw)
  assert_close(out, lse, *reference_attention(q, k, v, return_lse=True, **kw), jnp.float16)
  ct = cotangent(14, out.shape).astype(jnp.float16)
  assert_grads(run_grads(q, k, v, ct, **kw), reference_grads(q, k, v, ct, **kw), jnp.float16)


@pytest.mark.slow
def test_lse_gradient():
  # d(sum(lse * w))/dq through the kernel's custom_vjp (delta - dlse in the backward).
  q, k, v = random_qkv(15, batch=1, q_heads=2, kv_heads=1, q_len=30, kv_len=40, head_dim=16)
  w = cotangent(16, (1, 2, 30))
  kw = dict(score_mod=causal_mod(10))

  def loss(attn, q, k, v):
    out, lse = attn(q, k, v, return_lse=True, **kw)
    return jnp.sum(lse * w) + jnp.sum(out)

  got = jax.jit(jax.grad(lambda *a: loss(pallas_flash_attention, *a), argnums=(0, 1, 2)),
                compiler_options=OPTS)(q, k, v)
  from attnax.kernels import standard_attention
  with jax.enable_x64(True):
    up = lambda x: jnp.asarray(np.asarray(x, np.float64))
    want = jax.grad(lambda *a: loss(standard_attention, *a), argnums=(0, 1, 2))(up(q), up(k),
                                                                             up(v))
  assert_grads(got, [np.asarray(x) for x in want], f32)


@pytest.mark.slow
def test_block_mask_per_kv_head_and_vmap():
  # H' = Hkv BlockMask (shared by a GQA group), and jax.vmap over a leading axis.
  q, k, v = random_qkv(17, batch=1, q_heads=4, kv_heads=2, q_len=32, kv_len=48, head_dim=16)
  tiles = np.full((1, 2, 2, 3), bm_lib.FULL, np.int8)
  tiles[0, 0, 1, 2] = bm_lib.EMPTY
  tiles[0, 1, 0, 0] = bm_lib.EMPTY
  block_mask = BlockMask.from_tiles(jnp.asarray(tiles), block_q=16, block_k=16, q_len=32,
                                    kv_len=48)
  kept = jnp.asarray(tiles != bm_lib.EMPTY)
  kept_mask = lambda b, h, i, j: kept[0, h // 2, i // 16, j // 16]
  out, lse = run(q, k, v, block_mask=block_mask)
  assert_close(out, lse, *reference_attention(q, k, v, return_lse=True, mask_mod=kept_mask), f32)
  qs = jnp.stack([q, 2 * q])
  outs = jax.vmap(lambda q: pallas_flash_attention(q, k, v, score_mod=causal_mod(16)))(qs)
  for i in range(2):
    ref = reference_attention(qs[i], k, v, score_mod=causal_mod(16))
    assert rel_err(outs[i], ref) < tol(f32)


@pytest.mark.parametrize("mod_loads", ["masked", "clamp"])
def test_mod_loads_match_the_reference(mod_loads):
  # TritonConfig(mod_loads=...): the mods' arrays read by masked loads without the clamp (the
  # default) or by clamped indices (ragged 50 = padded rows and columns read past the tables'
  # ends): out, LSE and q/k/v grads.
  q, k, v = random_qkv(31, batch=2, q_heads=4, kv_heads=2, q_len=50, kv_len=50, head_dim=16)
  rng = np.random.default_rng(32)
  bias = jnp.asarray(rng.standard_normal((2, 1, 50, 50)), f32)
  mod = compose_score_mods(additive_bias_mod(bias), alibi_mod(num_heads=4),
                           document_mask_mod(jnp.asarray(np.arange(50) // 20)))
  kw = dict(score_mod=mod, backend="interpret", config=TritonConfig(block_q=32, block_k=32,
                                                                    mod_loads=mod_loads))
  out, lse = run(q, k, v, **kw)
  ref, ref_lse = reference_attention(q, k, v, score_mod=mod, return_lse=True)
  assert_close(out, lse, ref, ref_lse, f32)
  ct = cotangent(33, out.shape)
  assert_grads(run_grads(q, k, v, ct, **kw), reference_grads(q, k, v, ct, score_mod=mod), f32)
  with pytest.raises(ValueError, match="mod_loads"):
    pallas_flash_attention(q, k, v, backend="interpret", config=TritonConfig(mod_loads="gather"))


@pytest.mark.parametrize("mod_loads", ["masked", "clamp"])
def test_non_unit_derivative_mods_with_arrays_grads(mod_loads):
  # Soft-cap + ALiBi: the backward kernels evaluate the mods under jax.jvp (their derivative is
  # not 1) while reading the slopes: with masked loads that once failed to trace.
  q, k, v = random_qkv(34, batch=1, q_heads=4, kv_heads=2, q_len=40, kv_len=40, head_dim=16)
  mod = compose_score_mods(softcap_mod(4.0), alibi_mod(num_heads=4))
  kw = dict(score_mod=mod, backend="interpret", config=TritonConfig(block_q=16, block_k=16,
                                                                    mod_loads=mod_loads))
  ct = cotangent(35, q.shape)
  assert_grads(run_grads(q, k, v, ct, **kw), reference_grads(q, k, v, ct, score_mod=mod), f32)
