"""flash_attention vs the float64 reference, block skipping, and explicit BlockMasks.

The generic checks and mod cases are shared with ``test_memory_efficient.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.kernels import (
    BlockMask, additive_bias_mod, alibi_mod, causal_mod, compose_score_mods, create_block_mask,
    document_mask_mod, flash_attention, sliding_window_mod,
)
from attnax.kernels.block_mask import EMPTY, FULL, PARTIAL
from attnax.kernels.flash import tile_visits
from attnax.kernels import standard_attention
from tests.helpers import random_qkv, reference_attention, reference_grads, rel_err, tol
from tests.kernels.test_memory_efficient import (
    MOD_CASES, SHAPES, _doc_ids, _user_mask, check_against_jax_nn, check_bad_inputs, check_case,
    check_closure_lambda, check_empty_rows, check_jit_vmap, check_lse_grad, run_kernel,
)

# Small blocks so that every test walks several (and ragged) tiles.
KERNEL = functools.partial(flash_attention, block_q=16, block_k=16)


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("mod", sorted(MOD_CASES))
def test_mods(mod):
  """Every mod and composition: output, LSE and gradients (GQA, Sq != Sk, ragged)."""
  b, hq, hkv, sq, sk = SHAPES["gqa"]
  check_case(KERNEL, 0, SHAPES["gqa"], jnp.float32, MOD_CASES[mod](b, hq, sq, sk))


@pytest.mark.parametrize("mod", ["causal_bottom_right", "user_mask_mod", "compose"])
@pytest.mark.parametrize("shape", ["mha_ragged", "mqa"])
def test_shapes(shape, mod):
  b, hq, hkv, sq, sk = SHAPES[shape]
  check_case(KERNEL, 1, SHAPES[shape], jnp.float32, MOD_CASES[mod](b, hq, sq, sk))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("mod", ["none", "compose"])
def test_low_precision(dtype, mod):
  b, hq, hkv, sq, sk = SHAPES["gqa"]
  check_case(KERNEL, 2, SHAPES["gqa"], dtype, MOD_CASES[mod](b, hq, sq, sk))


@pytest.mark.parametrize("blocks", [(128, 128), (8, 32), (40, 11)])
def test_block_sizes(blocks):
  """Blocks larger than the sequence (clipped), unequal blocks, a block that divides Sq exactly."""
  kernel = functools.partial(flash_attention, block_q=blocks[0], block_k=blocks[1])
  b, hq, hkv, sq, sk = SHAPES["gqa"]
  check_case(kernel, 4, SHAPES["gqa"], jnp.float32, MOD_CASES["compose"](b, hq, sq, sk))


def test_large_logits():
  """Logits in the hundreds: the running max keeps exp from overflowing.

  Gradients are checked at logits of a few tens: at hundreds, f32 rounding of the logits alone
  (also in f32 standard_attention) brings the gradient error to about half the tolerance.
  """
  b, hq, hkv, sq, sk = SHAPES["gqa"]
  mods = MOD_CASES["causal"](b, hq, sq, sk)
  check_case(KERNEL, 6, SHAPES["gqa"], jnp.float32, mods, scale=100.0, grads=False)
  check_case(KERNEL, 7, SHAPES["gqa"], jnp.float32, mods, scale=30.0)


def test_lse_grad():
  check_lse_grad(KERNEL)


@pytest.mark.slow   # the conformance suite runs this check on every kernel by default
def test_empty_rows():
  check_empty_rows(KERNEL)


@pytest.mark.slow   # the conformance suite runs this check on every kernel by default
def test_jit_vmap_grad():
  check_jit_vmap(KERNEL)


@pytest.mark.slow   # the conformance suite runs this check on every kernel by default
def test_closure_lambda():
  check_closure_lambda(KERNEL)


def test_against_jax_nn():
  check_against_jax_nn(KERNEL)


def test_bad_inputs():
  check_bad_inputs(KERNEL)
  q, k, v = random_qkv(52, 1, 2, 2, 8, 8)
  for bad in (dict(block_q=0), dict(block_k=-3), dict(block_k=2.5)):
    with pytest.raises(ValueError):
      flash_attention(q, k, v, **bad)


def test_mod_array_gradients():
  """Bias tables and ALiBi slopes get their true gradients (float64 reference); ids get none."""
  q, k, v = random_qkv(71, 1, 2, 2, 20, 24, head_dim=16)
  bias = jax.random.normal(jax.random.key(72), (1, 2, 20, 24))
  slopes = jnp.asarray([0.3, -0.2])
  ids = jnp.asarray(np.arange(24) // 7)

  def loss(kernel, **kw):
    def f(q, bias, slopes):
      mod = compose_score_mods(additive_bias_mod(bias), alibi_mod(slopes=slopes),
                               document_mask_mod(ids[:20], ids))
      return jnp.sum(kernel(q, k, v, score_mod=mod, **kw) ** 2)
    return f

  got = jax.jit(jax.grad(loss(KERNEL, block_q=8, block_k=8), argnums=(0, 1, 2)))(q, bias, slopes)
  with jax.enable_x64(True):
    up = lambda x: jnp.asarray(np.asarray(x, np.float64))
    k, v = up(k), up(v)
    ref = jax.grad(loss(standard_attention), argnums=(0, 1, 2))(up(q), up(bias), up(slopes))
  for g, r in zip(got, ref):
    assert rel_err(g, r) < 2e-5


def test_exported():
  import attnax.kernels as K
  assert K.flash_attention is flash_attention
  assert "flash_attention" in K.__all__


# ----------------------------------------------------------------------------- block skipping


def _visits(q, k, v, **kw):
  return {name: int(x) for name, x in jax.jit(functools.partial(tile_visits, **kw))(
      q, k, v).items()}


def test_skipping_causal_and_window():
  """The loops run exactly once per nonempty tile, forward and both backward passes."""
  q, k, v = random_qkv(81, 2, 4, 2, 64, 64, head_dim=16)
  kw = dict(block_q=16, block_k=16)
  # 4 x 4 tiles: causal keeps the 10 on or below the diagonal.
  assert _visits(q, k, v, score_mod=causal_mod(), **kw) == dict(
      forward=10, dq=10, dkv=10, nonempty=10)
  # A window of 16 keys touches the diagonal tile and the one left of it: 4 + 3 tiles.
  assert _visits(q, k, v, score_mod=sliding_window_mod(16), **kw) == dict(
      forward=7, dq=7, dkv=7, nonempty=7)
  # No mask: all 16 tiles.
  assert _visits(q, k, v, **kw) == dict(forward=16, dq=16, dkv=16, nonempty=16)


def test_skipping_per_batch_and_head():
  """Masks that differ per batch row / head are walked row by row / head by head."""
  q, k, v = random_qkv(82, 2, 4, 2, 64, 64, head_dim=16)
  kw = dict(block_q=16, block_k=16)
  # Batch row 0: one document; row 1: four documents of 16 -> 16 + 4 tiles.
  ids = jnp.stack([jnp.zeros(64, jnp.int32), jnp.arange(64, dtype=jnp.int32) // 16])
  assert _visits(q, k, v, score_mod=document_mask_mod(ids), **kw) == dict(
      forward=20, dq=20, dkv=20, nonempty=20)
  # A per-query-head BlockMask with GQA: kv head 0 packs q heads 0, 1 (the union of their tiles
  # is visited), kv head 1 packs q heads 2, 3.
  tiles = np.zeros((1, 4, 4, 4), np.int8)
  tiles[0, 0, 0, 0] = FULL                      # group 0: tiles (0,0), (1,1) -> 2
  tiles[0, 1, 1, 1] = PARTIAL
  tiles[0, 2, 2, :] = PARTIAL                   # group 1: row 2 (4 tiles) + (3, 0) -> 5
  tiles[0, 3, 3, 0] = FULL
  tiles[0, 3, 2, 1] = FULL
  bm = BlockMask.from_tiles(tiles, block_q=16, block_k=16, q_len=64, kv_len=64)
  assert _visits(q, k, v, block_mask=bm) == dict(forward=7, dq=7, dkv=7, nonempty=7)


# ----------------------------------------------------------------------------- explicit BlockMask


def _tile_reference_mask(tiles, block_q, block_k, heads, groups, inner=None):
  """The reference's view of a BlockMask as a mask mod over query heads ``h``:
  FULL -> visible, PARTIAL -> ``inner`` (the mods' mask), EMPTY -> hidden."""
  t = jnp.asarray(np.asarray(tiles))
  bp, hp = t.shape[:2]

  def mask_mod(b, h, i, j):
    bb = b if bp > 1 else jnp.zeros_like(b)
    hh = jnp.zeros_like(h) if hp == 1 else (h if hp == heads else h // groups)
    st = t[bb, hh, i // block_q, j // block_k]
    part = (st == PARTIAL) if inner is None else (st == PARTIAL) & inner(b, h, i, j)
    return (st == FULL) | part

  return mask_mod


def _random_tiles(seed, lead, sq, sk, block_q, block_k):
  """Random EMPTY / PARTIAL / FULL tiles; a tile that reaches past Sq/Sk is never FULL."""
  nq, nk = -(-sq // block_q), -(-sk // block_k)
  t = np.asarray(jax.random.randint(jax.random.key(seed), lead + (nq, nk), 0, 3), np.int8)
  if sq % block_q:
    t[..., -1, :] = np.minimum(t[..., -1, :], PARTIAL)
  if sk % block_k:
    t[..., :, -1] = np.minimum(t[..., :, -1], PARTIAL)
  return t


@pytest.mark.parametrize("lead", ["1x1", "Bx1", "1xHkv", "1xHq", "BxHq"])
def test_explicit_block_mask(lead):
  """A caller's BlockMask replaces the mask-derived one: its EMPTY tiles are never used (even where
  the mods see keys), FULL tiles skip the mods' mask, PARTIAL tiles apply it."""
  b, hq, hkv, sq, sk = 2, 4, 2, 40, 45
  block_q, block_k = 16, 8
  shape = {"1x1": (1, 1), "Bx1": (b, 1), "1xHkv": (1, hkv), "1xHq": (1, hq), "BxHq": (b, hq)}[lead]
  tiles = _random_tiles(90 + len(lead), shape, sq, sk, block_q, block_k)
  bm = BlockMask.from_tiles(tiles, block_q=block_q, block_k=block_k, q_len=sq, kv_len=sk)
  ref_mask = _tile_reference_mask(tiles, block_q, block_k, hq, hq // hkv, inner=_user_mask)
  q, k, v = random_qkv(91, b, hq, hkv, sq, sk, head_dim=16)
  ct = jax.random.normal(jax.random.key(92), (b, hq, sq, 16))
  score_mod = alibi_mod(num_heads=hq)
  # block_q/block_k passed here are overridden by the BlockMask's.
  kernel = functools.partial(flash_attention, block_mask=bm, block_q=64, block_k=64)
  out, lse, grads = run_kernel(kernel, q, k, v, ct, dict(score_mod=score_mod, mask_mod=_user_mask))
  ref_mods = dict(score_mod=score_mod, mask_mod=ref_mask)
  ref_out, ref_lse = reference_attention(q, k, v, return_lse=True, **ref_mods)
  assert rel_err(out, ref_out) < tol(jnp.float32)
  np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
  fin = np.isfinite(ref_lse)
  assert rel_err(np.asarray(lse)[fin], ref_lse[fin]) < tol(jnp.float32)
  for g, r in zip(grads, reference_grads(q, k, v, ct, **ref_mods)):
    assert np.all(np.isfinite(np.asarray(g)))
    assert rel_err(g, r) < tol(jnp.float32, grad=True)


def test_block_mask_drops_causal_tiles():
  """The AETHER use: a causal BlockMask with some visible tiles dropped gives the reference
  restricted to the kept tiles."""
  b, hq, hkv, sq, sk = 1, 4, 2, 64, 64
  bm = create_block_mask(causal_mod().mask_mod, q_len=sq, kv_len=sk, block_q=16, block_k=16)
  tiles = np.array(bm.tiles)
  tiles[0, 0, 2, 0] = EMPTY      # drop a full tile
  tiles[0, 0, 3, 1] = EMPTY      # and another
  tiles[0, 0, 1, 1] = EMPTY      # and a diagonal (partial) tile
  dropped = BlockMask.from_tiles(tiles, block_q=16, block_k=16, q_len=sq, kv_len=sk)
  keep = jnp.asarray(tiles != EMPTY)
  ref_mods = dict(score_mod=causal_mod(), mask_mod=lambda b, h, i, j: keep[0, 0, i // 16, j // 16])
  q, k, v = random_qkv(93, b, hq, hkv, sq, sk, head_dim=16)
  ct = jax.random.normal(jax.random.key(94), (b, hq, sq, 16))
  kernel = functools.partial(flash_attention, block_mask=dropped)
  out, lse, grads = run_kernel(kernel, q, k, v, ct, dict(score_mod=causal_mod()))
  ref_out = reference_attention(q, k, v, **ref_mods)
  assert rel_err(out, ref_out) < tol(jnp.float32)
  # It really differs from plain causal attention (the dropped tiles mattered).
  assert rel_err(out, reference_attention(q, k, v, score_mod=causal_mod())) > 1e-2
  for g, r in zip(grads, reference_grads(q, k, v, ct, **ref_mods)):
    assert rel_err(g, r) < tol(jnp.float32, grad=True)
  assert _visits(q, k, v, score_mod=causal_mod(), block_mask=dropped) == dict(
      forward=7, dq=7, dkv=7, nonempty=7)


def test_block_mask_bad():
  q, k, v = random_qkv(95, 2, 4, 2, 40, 45, head_dim=16)
  good = create_block_mask(None, q_len=40, kv_len=45, block_q=16, block_k=16)
  with pytest.raises(ValueError, match="block_mask"):
    flash_attention(q[:, :, :32], k, v, block_mask=good)          # built for another Sq
  with pytest.raises(ValueError, match="block_mask"):
    flash_attention(q, k, v, block_mask=np.ones((1, 1, 3, 3)))     # not a BlockMask
  tiles = np.ones((1, 3, 3, 3), np.int8)                            # H' = 3 fits neither
  bad = BlockMask.from_tiles(tiles, block_q=16, block_k=16, q_len=40, kv_len=45)
  with pytest.raises(ValueError, match="block_mask"):
    flash_attention(q, k, v, block_mask=bad)
