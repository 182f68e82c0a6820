"""Tests for attnax.kernels.block_mask: tile classification against the dense boolean mask.

For every mask: a tile is EMPTY iff none of its in-range elements is visible, FULL iff all of its
in-range elements are visible and the tile is not ragged (no position past ``q_len``/``kv_len``),
else PARTIAL. The analytic rules of the built-in masks are exact for single masks (document ids:
when sorted and shared by queries and keys); for AND combinations (and other document ids) ``any``
may over-approximate, so an empty tile may be PARTIAL, but EMPTY and FULL must never be wrong.
The index lists are checked against ``tiles``, and a block-sparse evaluation driven only by the
lists must reproduce the dense mask.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.kernels import BlockMask, create_block_mask
from attnax.kernels import score_mods as sm
from attnax.kernels.block_mask import EMPTY, FULL, PARTIAL

B, H = 2, 3
# (q_len, kv_len, block_q, block_k): ragged tails, Sq != Sk, non-square blocks, exact multiples.
SHAPES = [(50, 70, 16, 32), (37, 23, 8, 8), (64, 64, 16, 16), (20, 45, 32, 16)]


# ----------------------------------------------------------------------------- helpers


class Case(NamedTuple):
  """One create_block_mask call to check. ``lead``: the expected ``(B', H')``, or None."""
  mask_mod: Any
  q_len: int
  kv_len: int
  block_q: int
  block_k: int
  exact: bool = True
  lead: tuple | None = None
  batch: int = B
  heads: int = H


def build_and_dense(cases, lists=True):
  """Every case's BlockMask and dense (B, H, Sq, Sk) mask; two jits in all (CPU compiles dominate
  this file's runtime, so the cases of one test are compiled together).

  With ``lists=False`` only ``tiles`` is computed (the index lists are ``None``): the lists are a
  function of ``tiles`` alone (``BlockMask.from_tiles``), their four sorts dominate compile time,
  and they are checked for every mask kind in ``test_index_lists_for_every_mask_kind``.
  """
  def builds():
    bms = [create_block_mask(c.mask_mod, q_len=c.q_len, kv_len=c.kv_len, block_q=c.block_q,
                             block_k=c.block_k, batch=c.batch, heads=c.heads) for c in cases]
    return bms if lists else [bm.tiles for bm in bms]

  def denses():
    return [jnp.ones((c.batch, c.heads, c.q_len, c.kv_len), bool) if c.mask_mod is None else
            sm.mask_mod_to_boolean_mask(c.mask_mod, c.batch, c.heads, c.q_len, c.kv_len)
            for c in cases]

  bms = jax.tree.map(np.asarray, jax.jit(builds)())
  if not lists:
    bms = [BlockMask(t, *[None] * 8, block_q=c.block_q, block_k=c.block_k, q_len=c.q_len,
                     kv_len=c.kv_len) for t, c in zip(bms, cases)]
  masks = [np.asarray(m) for m in jax.jit(denses)()]
  return bms, masks


def expected_tiles(mask, block_q, block_k):
  """(any, all, ragged) per tile of a dense (B, H, Sq, Sk) mask; `all` over in-range elements."""
  b, h, sq, sk = mask.shape
  nq, nk = -(-sq // block_q), -(-sk // block_k)
  pad = np.zeros((b, h, nq * block_q, nk * block_k), bool)
  pad[:, :, :sq, :sk] = mask
  inr = np.zeros(pad.shape[2:], bool)
  inr[:sq, :sk] = True
  t = pad.reshape(b, h, nq, block_q, nk, block_k)
  r = inr.reshape(nq, block_q, nk, block_k)
  any_ = t.any(axis=(3, 5))
  all_ = (t | ~r).all(axis=(3, 5))
  ragged = ~r.all(axis=(1, 3))
  return any_, all_, ragged


def check_lists(bm: BlockMask):
  """The count/index lists (forward and transposed) agree with ``tiles``."""
  tiles = np.asarray(bm.tiles)
  bp, hp, nq, nk = tiles.shape
  assert bm.tiles.dtype == jnp.int8
  assert set(np.unique(tiles)) <= {EMPTY, PARTIAL, FULL}
  assert bm.kv_counts.shape == bm.full_kv_counts.shape == (bp, hp, nq)
  assert bm.kv_indices.shape == bm.full_kv_indices.shape == (bp, hp, nq, nk)
  assert bm.q_counts.shape == bm.full_q_counts.shape == (bp, hp, nk)
  assert bm.q_indices.shape == bm.full_q_indices.shape == (bp, hp, nk, nq)
  for arr in (bm.kv_counts, bm.kv_indices, bm.full_kv_counts, bm.full_kv_indices, bm.q_counts,
              bm.q_indices, bm.full_q_counts, bm.full_q_indices):
    assert arr.dtype == jnp.int32
  lists = [
      (tiles, PARTIAL, bm.kv_counts, bm.kv_indices),
      (tiles, FULL, bm.full_kv_counts, bm.full_kv_indices),
      (np.swapaxes(tiles, -1, -2), PARTIAL, bm.q_counts, bm.q_indices),
      (np.swapaxes(tiles, -1, -2), FULL, bm.full_q_counts, bm.full_q_indices),
  ]
  for t, state, counts, indices in lists:
    counts, indices = np.asarray(counts), np.asarray(indices)
    n = t.shape[-1]
    for idx in np.ndindex(t.shape[:-1]):
      want = np.flatnonzero(t[idx] == state)
      c = counts[idx]
      assert c == len(want), (state, idx)
      np.testing.assert_array_equal(indices[idx][:c], want)  # ascending, exactly those
      # Padding stays a valid index (it repeats the last listed one), so kernels may prefetch it.
      pad = indices[idx][c:]
      assert ((pad >= 0) & (pad < n)).all()
      if c:
        assert (pad == want[-1]).all()


def sparse_visibility(bm: BlockMask, mask):
  """The visibility a kernel driven by the lists computes: partial tiles apply the mask (and the
  range check), full tiles apply nothing, unlisted tiles are never loaded. Forward lists and
  transposed lists separately; (B, H, Sq, Sk) each."""
  b, h, sq, sk = mask.shape
  bq, bk = bm.block_q, bm.block_k
  out = []
  for transposed in (False, True):
    vis = np.zeros_like(mask)
    for bi in range(b):
      for hi in range(h):
        bb, hh = bm.batch_head_index(bi, hi)
        if not transposed:
          per = [(qb, kb, kind) for qb in range(bm.tiles.shape[2])
                 for kind, counts, idx in ((PARTIAL, bm.kv_counts, bm.kv_indices),
                                           (FULL, bm.full_kv_counts, bm.full_kv_indices))
                 for kb in np.asarray(idx)[bb, hh, qb, :int(counts[bb, hh, qb])]]
        else:
          per = [(qb, kb, kind) for kb in range(bm.tiles.shape[3])
                 for kind, counts, idx in ((PARTIAL, bm.q_counts, bm.q_indices),
                                           (FULL, bm.full_q_counts, bm.full_q_indices))
                 for qb in np.asarray(idx)[bb, hh, kb, :int(counts[bb, hh, kb])]]
        for qb, kb, kind in per:
          qs, ks = slice(qb * bq, (qb + 1) * bq), slice(kb * bk, (kb + 1) * bk)
          vis[bi, hi, qs, ks] = mask[bi, hi, qs, ks] if kind == PARTIAL else True
    out.append(vis)
  return out


def verify(bm: BlockMask, mask, c: Case):
  """Tile states, broadcasting, index lists and list-driven visibility of one case."""
  nq, nk = -(-c.q_len // c.block_q), -(-c.kv_len // c.block_k)
  assert (bm.block_q, bm.block_k, bm.q_len, bm.kv_len) == (c.block_q, c.block_k, c.q_len, c.kv_len)
  if c.lead is not None:
    assert bm.tiles.shape == c.lead + (nq, nk)
  bp, hp = bm.tiles.shape[:2]
  assert bp in (1, c.batch) and hp in (1, c.heads) and bm.tiles.shape[2:] == (nq, nk)
  any_, all_, ragged = expected_tiles(mask, c.block_q, c.block_k)
  # Broadcast the BlockMask to (B, H) through batch_head_index.
  tiles = np.stack([np.stack([np.asarray(bm.tiles)[bm.batch_head_index(b, h)]
                              for h in range(c.heads)]) for b in range(c.batch)])
  full = all_ & ~ragged
  want = np.where(any_, np.where(full, FULL, PARTIAL), EMPTY)
  if c.exact:
    np.testing.assert_array_equal(tiles, want)
  else:
    # EMPTY and FULL must never be wrong; PARTIAL may stand in for an empty tile.
    np.testing.assert_array_equal(tiles == FULL, full)
    assert not (any_ & (tiles == EMPTY)).any(), "a tile with visible elements was marked EMPTY"
    assert ((tiles == want) | ((want == EMPTY) & (tiles == PARTIAL))).all()
  # B'/H' = 1 only when the mask really is independent of the batch row / head.
  if bp == 1:
    assert (mask == mask[:1]).all()
  if hp == 1:
    assert (mask == mask[:, :1]).all()
  if bm.kv_counts is not None:
    check_lists(bm)
    for vis in sparse_visibility(bm, mask):
      np.testing.assert_array_equal(vis, mask)
  else:
    # What a kernel driven by the tile map computes (partial: mask; full: everything).
    t = np.repeat(np.repeat(tiles, c.block_q, 2), c.block_k, 3)[:, :, :c.q_len, :c.kv_len]
    np.testing.assert_array_equal(np.where(t == FULL, True, (t == PARTIAL) & mask), mask)


def check_cases(cases, lists=False):
  bms, masks = build_and_dense(cases, lists)
  for c, bm, mask in zip(cases, bms, masks):
    try:
      verify(bm, mask, c)
    except AssertionError as e:
      raise AssertionError(f"{c}: {e}") from None
  return bms, masks


def _sorted_ids(seed, batch, length, ndocs=4):
  rng = np.random.default_rng(seed)
  return np.sort(rng.integers(0, ndocs, size=(batch, length)), axis=-1).astype(np.int32)


# ----------------------------------------------------------------------------- analytic masks


def test_causal():
  cases = [Case(sm.CausalMask(off if off != "br" else kv - q), q, kv, bq, bk, lead=(1, 1))
           for q, kv, bq, bk in SHAPES for off in (0, "br", -9, 12)]
  check_cases(cases)


def test_sliding_window():
  cases = [Case(sm.SlidingWindowMask(w, off), q, kv, bq, bk, lead=(1, 1))
           for q, kv, bq, bk in SHAPES for w, off in ((1, 0), (5, 0), (17, 3), (40, -4))]
  check_cases(cases)


def test_prefix_lm_scalar_and_per_batch():
  cases = [Case(sm.prefix_lm_mod(p).mask_mod, q, kv, bq, bk, lead=(1, 1))
           for q, kv, bq, bk in SHAPES for p in (0, 9, 33, 100)]
  cases += [Case(sm.prefix_lm_mod(jnp.array([5, 31])).mask_mod, q, kv, bq, bk, lead=(B, 1))
            for q, kv, bq, bk in SHAPES]
  check_cases(cases)


def test_document_sorted_ids_exact():
  cases = []
  for n, (q, _, bq, bk) in enumerate(SHAPES):
    ids = _sorted_ids(n, B, q, ndocs=5)
    # Self-attention over packed (sorted) documents: the range rule is exact.
    cases.append(Case(sm.document_mask_mod(jnp.asarray(ids)).mask_mod, q, q, bq, bk, lead=(B, 1)))
    # Unbatched ids: no batch dependence.
    cases.append(Case(sm.document_mask_mod(jnp.asarray(ids[0])).mask_mod, q, q, bq, bk,
                      lead=(1, 1)))
  check_cases(cases)


def test_document_separate_or_unsorted_ids_sound():
  rng = np.random.default_rng(1)
  cases = []
  for n, (q, kv, bq, bk) in enumerate(SHAPES):
    q_ids, kv_ids = _sorted_ids(2 + n, B, q), _sorted_ids(7 + n, B, kv)
    cases.append(Case(sm.document_mask_mod(jnp.asarray(q_ids), jnp.asarray(kv_ids)).mask_mod,
                      q, kv, bq, bk, exact=False, lead=(B, 1)))
    unsorted = rng.integers(0, 3, size=(B, q)).astype(np.int32)
    cases.append(Case(sm.document_mask_mod(jnp.asarray(unsorted)).mask_mod, q, q, bq, bk,
                      exact=False, lead=(B, 1)))
  check_cases(cases)


# ----------------------------------------------------------------------------- AND and generic


def test_and_combinations():
  cases = []
  for q, kv, bq, bk in SHAPES[:3]:
    doc = sm.DocumentMask(jnp.asarray(_sorted_ids(4, B, q)), jnp.asarray(_sorted_ids(5, B, kv)))
    combos = [
        (sm.and_masks(sm.CausalMask(kv - q), sm.SlidingWindowMask(13, kv - q)), (1, 1)),
        (sm.and_masks(sm.CausalMask(), doc), (B, 1)),
        (sm.and_masks(sm.prefix_lm_mod(jnp.array([3, 20])).mask_mod, sm.SlidingWindowMask(9)),
         (B, 1)),
        # an analytic mask AND a generic lambda that depends on the head
        (sm.and_masks(sm.CausalMask(), lambda b, h, i, j: (j % (h + 2)) != 0), (1, H)),
    ]
    cases += [Case(m, q, kv, bq, bk, exact=False, lead=lead) for m, lead in combos]
  check_cases(cases)


def test_and_of_contradictory_masks_is_never_full():
  """j <= i AND j > i is empty everywhere; diagonal tiles may be PARTIAL, never FULL."""
  contradiction = sm.and_masks(sm.CausalMask(), lambda b, h, i, j: j > i)
  # Causal AND a window with offset -1 is strictly causal (j <= i - 1): diagonal tiles partial.
  strict = sm.and_masks(sm.CausalMask(), sm.SlidingWindowMask(window_size=10**6, offset=-1))
  (bm, bm_strict), (mask, _) = check_cases(
      [Case(contradiction, 40, 40, 8, 8, exact=False, batch=1, heads=1),
       Case(strict, 40, 40, 8, 8, exact=False, batch=1, heads=1)])
  assert not mask.any()
  assert (bm.tiles != FULL).all()
  assert (np.diag(bm_strict.tiles[0, 0]) == PARTIAL).all()


def test_generic_lambdas_are_exact():
  # Arbitrary pattern: a strided "dilated" mask plus a global first key, per head.
  fn = lambda b, h, i, j: ((i - j) % (h + 3) == 0) | (j == 0) | ((i // 10) == (j // 10))
  # depending on both batch and head
  fn2 = lambda b, h, i, j: (j < i + 4 * b - h) & (j >= i - 16)
  # depending on neither: B' = H' = 1
  fn3 = lambda b, h, i, j: (i + j) % 7 < 3
  s0, s1, s2, s3 = SHAPES
  cases = [Case(fn, *s0, lead=(1, H)), Case(fn, *s1, lead=(1, H)), Case(fn2, *s0, lead=(B, H)),
           Case(fn2, *s3, lead=(B, H)), Case(fn3, *s1, lead=(1, 1)), Case(fn3, *s2, lead=(1, 1))]
  check_cases(cases)


def test_generic_special_cases():
  keep = np.random.default_rng(5).random(45) < 0.3
  keep[:16] = False  # a whole empty kv block
  keep_j = jnp.asarray(keep)
  cases = [
      # a captured array, no dependence on q
      Case(lambda b, h, i, j: keep_j[j], 30, 45, 8, 16, lead=(1, 1)),
      # a constant (rank-0) mask
      Case(lambda b, h, i, j: jnp.array(True), 20, 33, 8, 16, lead=(1, 1)),
      # nothing visible
      Case(lambda b, h, i, j: (i < 0) & (j >= 0), 20, 33, 8, 16),
  ]
  bms, _ = check_cases(cases, lists=True)
  bm = bms[2]
  assert (bm.tiles == EMPTY).all()
  assert (bm.kv_counts == 0).all() and (bm.full_kv_counts == 0).all()
  assert (bm.q_counts == 0).all() and (bm.full_q_counts == 0).all()


def test_no_mask():
  bms, _ = check_cases([Case(None, q, kv, bq, bk, lead=(1, 1)) for q, kv, bq, bk in SHAPES])
  for bm, (q, kv, bq, bk) in zip(bms, SHAPES):
    nq, nk = bm.tiles.shape[2:]
    t = bm.tiles[0, 0]
    assert (t[: nq - (q % bq != 0), : nk - (kv % bk != 0)] == FULL).all()
    assert (t != EMPTY).all()


def test_index_lists_for_every_mask_kind():
  """Full BlockMasks (with the forward and transposed lists) for one ragged, Sq != Sk case of
  each kind: lists consistent with tiles, and list-driven visibility equals the dense mask."""
  q, kv, bq, bk = 50, 70, 16, 32
  doc = sm.DocumentMask(jnp.asarray(_sorted_ids(9, B, q)), jnp.asarray(_sorted_ids(10, B, kv)))
  cases = [
      Case(sm.CausalMask(kv - q), q, kv, bq, bk, lead=(1, 1)),
      Case(sm.SlidingWindowMask(20), q, kv, 8, 8, lead=(1, 1)),
      Case(sm.prefix_lm_mod(jnp.array([5, 40])).mask_mod, q, kv, bq, bk, lead=(B, 1)),
      Case(doc, q, kv, bq, bk, exact=False, lead=(B, 1)),
      Case(sm.and_masks(sm.CausalMask(), doc), q, kv, 8, 16, exact=False, lead=(B, 1)),
      Case(lambda b, h, i, j: (j < i + 4 * b - h) & (j >= i - 16), q, kv, 8, 8, lead=(B, H)),
      Case(None, q, kv, bq, bk, lead=(1, 1)),
  ]
  check_cases(cases, lists=True)


def test_block_mask_helpers():
  bm = create_block_mask(sm.CausalMask(), q_len=20, kv_len=20, block_q=8, block_k=8)
  d = np.asarray(bm.to_dense())
  assert d.shape == (1, 1, 20, 20)
  t = np.asarray(bm.tiles)[0, 0]
  np.testing.assert_array_equal(d[0, 0], np.repeat(np.repeat(t, 8, 0), 8, 1)[:20, :20])
  # 3x3 tiles: 6 non-empty (lower triangle incl. diagonal)
  np.testing.assert_allclose(float(bm.density()), 6 / 9)
  assert bm.shape == (1, 1, 3, 3)
  assert bm.batch_head_index(1, 2) == (0, 0)


def test_block_mask_is_a_pytree_and_jits():
  make = lambda ids: create_block_mask(sm.DocumentMask(ids, ids), q_len=40, kv_len=40, block_q=8,
                                       block_k=8)
  traces = []

  @jax.jit
  def f(ids):
    traces.append(1)
    return make(ids)

  bms = [f(jnp.asarray(_sorted_ids(seed, B, 40))) for seed in (6, 11)]
  assert len(traces) == 1
  assert not np.array_equal(np.asarray(bms[0].tiles), np.asarray(bms[1].tiles))
  for bm in bms:
    assert len(jax.tree.leaves(bm)) == 9
    # Static tiling settings ride in the treedef.
    leaves, treedef = jax.tree.flatten(bm)
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert (rebuilt.block_q, rebuilt.block_k, rebuilt.q_len, rebuilt.kv_len) == (8, 8, 40, 40)
  # A BlockMask passes through jit as an argument.
  check_lists(jax.tree.map(np.asarray, jax.jit(lambda bm: bm)(bms[1])))


def test_from_tiles_lists():
  """Random tile maps, incl. all-empty and all-full rows and columns, several (B', H')."""
  rng = np.random.default_rng(7)
  maps = [rng.integers(0, 3, size=s).astype(np.int8)
          for s in ((2, 1, 5, 6), (1, 3, 7, 4), (1, 1, 9, 1))]
  maps[0][0, 0, 2] = EMPTY
  maps[0][1, 0, :, 3] = FULL
  maps[1][0, 1] = PARTIAL
  bms = jax.jit(lambda ts: [BlockMask.from_tiles(t, block_q=4, block_k=4, q_len=4 * t.shape[2],
                                                 kv_len=4 * t.shape[3]) for t in ts])(maps)
  for t, bm in zip(maps, bms):
    bm = jax.tree.map(np.asarray, bm)
    np.testing.assert_array_equal(bm.tiles, t)
    check_lists(bm)


def test_rejects_score_mod():
  with pytest.raises(ValueError, match="mask_mod"):
    create_block_mask(sm.causal_mod(), q_len=16, kv_len=16)


# ----------------------------------------------------------------------------- long sequences


@pytest.mark.parametrize("kind", ["causal", "document"])
def test_long_sequence_never_materialises_the_mask(kind):
  """q_len = kv_len = 131072, block 128: the compiled builder's temporaries are far below the
  131072**2 bytes a dense boolean mask would need."""
  n, blk = 131072, 128
  nb = n // blk
  if kind == "causal":
    f = lambda ids: create_block_mask(sm.CausalMask(), q_len=n, kv_len=n, block_q=blk, block_k=blk)
  else:
    f = lambda ids: create_block_mask(sm.DocumentMask(ids, ids), q_len=n, kv_len=n, block_q=blk,
                                      block_k=blk)
  # 8 documents of random lengths (boundaries inside blocks), sorted ids.
  cuts = np.sort(np.random.default_rng(8).choice(np.arange(1, n), 7, replace=False))
  ids = np.zeros((1, n), np.int32)
  for c in cuts:
    ids[0, c:] += 1
  ids_j = jnp.asarray(ids)
  compiled = jax.jit(f).lower(ids_j).compile()
  mem = compiled.memory_analysis()
  temp = mem.temp_size_in_bytes
  assert temp < n * n // 100, f"temp {temp} bytes"
  assert mem.output_size_in_bytes <= 17 * nb * nb + 64 * nb  # int8 tiles + 4 int32 index lists
  bm = compiled(ids_j)
  tiles = np.asarray(bm.tiles)[0, 0]
  assert tiles.shape == (nb, nb)
  qb = np.arange(nb)[:, None]
  kb = np.arange(nb)[None, :]
  if kind == "causal":
    want = np.where(kb < qb, FULL, np.where(kb == qb, PARTIAL, EMPTY))
  else:
    # Independent truth: blocks share a document iff their id sets intersect; a tile is full iff
    # both blocks hold one and the same document.
    blocks = ids[0].reshape(nb, blk)
    present = np.stack([(blocks == d).any(1) for d in range(8)], axis=1).astype(np.int64)
    any_ = present @ present.T > 0
    single = present.sum(1) == 1
    all_ = single[:, None] & single[None, :] & any_
    want = np.where(any_, np.where(all_, FULL, PARTIAL), EMPTY)
  np.testing.assert_array_equal(tiles, want)
  np.testing.assert_array_equal(np.asarray(bm.kv_counts)[0, 0], (want == PARTIAL).sum(1))
  np.testing.assert_array_equal(np.asarray(bm.full_kv_counts)[0, 0], (want == FULL).sum(1))
  np.testing.assert_array_equal(np.asarray(bm.full_q_counts)[0, 0], (want == FULL).sum(0))


@pytest.mark.parametrize("offsets", [(0, 40, 8), (1, 8, 40), (0, 24, 24)])
def test_shifted_masks_tile_rules_are_exact(offsets):
  """shift_mods: each leaf's tile rule moved by traced offsets (a ring step's absolute
  positions) classifies every tile as the elementwise evaluation of the shifted mask does."""
  rng = np.random.default_rng(sum(offsets))
  ids = jnp.asarray(np.sort(rng.integers(0, 5, (2, 96)), axis=1), jnp.int32)
  lengths = jnp.asarray([50, 70], jnp.int32)
  masks = [sm.CausalMask(), sm.SlidingWindowMask(12), sm.LocalWindowMask(5, 3),
           sm.DocumentMask(ids, ids), sm.PaddingLengthMask(lengths), sm.QueryLengthMask(lengths),
           sm.and_masks(sm.CausalMask(), sm.DocumentMask(ids, ids)),
           sm.or_masks(sm.SlidingWindowMask(4), sm.PaddingLengthMask(lengths))]
  off = jnp.asarray(offsets, jnp.int32)
  b0, q0, k0 = offsets
  for mask in masks:
    _, shifted = sm.shift_mods(None, mask, off, batch=1, heads=1)
    got = create_block_mask(shifted, q_len=40, kv_len=48, block_q=16, block_k=16)
    # The same positions as a plain function (no tile rule: evaluated elementwise).
    plain = lambda b, h, i, j, m=mask: m(b + b0, h, i + q0, j + k0)
    want = create_block_mask(plain, q_len=40, kv_len=48, block_q=16, block_k=16)
    np.testing.assert_array_equal(np.broadcast_to(got.tiles, want.tiles.shape), want.tiles,
                                  err_msg=repr(mask))
