"""The lined evaluation of mods (attnax.kernels.pallas.lines) against evaluating them on tiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from attnax.kernels import score_mods as sm
from attnax.kernels.pallas import lines
from tests.helpers import whole_tile_ops

ROWS, COLS = 16, 32


def _tiles(q_start, k_start, transposed=False):
  """The index tiles and their lines, queries x keys (or keys x queries)."""
  shape = (COLS, ROWS) if transposed else (ROWS, COLS)
  qa = int(transposed)
  q_tile = q_start + lax.broadcasted_iota(jnp.int32, shape, qa)
  k_tile = k_start + lax.broadcasted_iota(jnp.int32, shape, 1 - qa)
  q_line = lambda: lines.position(jnp.int32(q_start), jnp.arange(shape[qa], dtype=jnp.int32),
                                  qa, shape, 4096)
  k_line = lambda: lines.position(jnp.int32(k_start), jnp.arange(shape[1 - qa], dtype=jnp.int32),
                                  1 - qa, shape, 4096)
  return shape, q_tile, k_tile, q_line, k_line


def _both(fn, q_start, k_start, transposed=False, seed=0):
  shape, q_tile, k_tile, q_line, k_line = _tiles(q_start, k_start, transposed)
  s = jax.random.normal(jax.random.key(seed), shape, jnp.float32) * 4
  want = fn(s, q_tile, k_tile)
  got = lines.lined(fn, shape, {1: q_line, 2: k_line})(s, q_tile, k_tile)
  return want, got, s, q_tile, k_tile


def _tile_ops(fn, *args) -> int:
  """The per-score work of ``fn`` on a tile: its whole-tile ops (broadcasts and iotas aside)."""
  return whole_tile_ops(jax.make_jaxpr(fn)(*args).jaxpr, args[0].shape)


rng = np.random.default_rng(0)
DOCS_Q = jnp.asarray(np.sort(rng.integers(0, 5, 4096)), jnp.int32)[None]
DOCS_K = jnp.asarray(np.sort(rng.integers(0, 5, 4096)), jnp.int32)[None]

MASKS = {
    "causal": sm.CausalMask(0),
    "causal_offset": sm.CausalMask(37),
    "window": sm.SlidingWindowMask(9, 3),
    "local": sm.LocalWindowMask(5, 7, 2),
    "prefix": sm.PrefixLMMask(jnp.asarray([21], jnp.int32)),
    "documents": sm.DocumentMask(DOCS_Q, DOCS_K),
    "kv_lengths": sm.PaddingLengthMask(jnp.asarray([50], jnp.int32)),
    "q_lengths": sm.QueryLengthMask(jnp.asarray([70], jnp.int32)),
    "and": sm.AndMask((sm.CausalMask(0), sm.SlidingWindowMask(13, 0))),
    "or": sm.OrMask((sm.CausalMask(0), sm.PrefixLMMask(jnp.asarray([8], jnp.int32)))),
    "block_diagonal": lambda b, h, q, k: (q // 8) == (k // 8),
    "strided": lambda b, h, q, k: ((q - k) % 3 == 0) | (jnp.abs(q - k) < 2),
}
SCORES = {
    "alibi": sm.alibi_mod(8),
    "alibi_softcap": sm.compose_score_mods(sm.alibi_mod(8), sm.softcap_mod(7.0)),
    "softcap": sm.softcap_mod(5.0),
    "relative": lambda s, b, h, q, k: s - 0.05 * jnp.abs(q - k).astype(jnp.float32),
    "position_scale": lambda s, b, h, q, k: s * (1.0 + 1e-3 * (k * 2 - q).astype(jnp.float32)),
    "masked_alibi": lambda s, b, h, q, k: jnp.where(k <= q, sm.alibi_mod(8)(s, b, h, q, k),
                                                    -1e30),
}


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("name", sorted(MASKS))
def test_mask_mods_on_lines_equal_the_tile_evaluation(name, transposed):
  mask = MASKS[name]
  fn = lambda s, q, k: jnp.where(jnp.asarray(mask(0, 0, q, k), bool), s, -jnp.inf)
  for q_start, k_start in ((0, 0), (48, 16), (1200, 1232), (4000, 64)):
    want, got, *_ = _both(fn, q_start, k_start, transposed)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("name", sorted(SCORES))
def test_score_mods_on_lines_match_the_tile_evaluation(name, transposed):
  mod = SCORES[name]
  fn = lambda s, q, k: mod(s, 0, 5, q, k)
  for seed, (q_start, k_start) in enumerate(((0, 0), (48, 16), (3000, 64), (64, 3000))):
    want, got, *_ = _both(fn, q_start, k_start, transposed, seed)
    want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
    # Regrouped position sums round within a few ulps of |bias| + slope * tile size.
    tol = 4 * np.finfo(np.float32).eps * (np.abs(want) + 0.5 * (ROWS + COLS) + 1)
    assert np.all(np.abs(got - want) <= tol), float(np.max(np.abs(got - want) - tol))


def test_alibi_and_causal_cost_fewer_whole_tile_ops():
  shape, q_tile, k_tile, q_line, k_line = _tiles(96, 32)
  s = jnp.zeros(shape, jnp.float32)
  alibi = sm.alibi_mod(8)

  def direct(s, q0, k0):   # as a kernel evaluates it: the index tiles made from the starts
    q = q0 + lax.broadcasted_iota(jnp.int32, shape, 0)
    k = k0 + lax.broadcasted_iota(jnp.int32, shape, 1)
    s = alibi(s, 0, 3, q, k)
    return jnp.where(k <= q, s, -jnp.inf)

  def on_lines(s, q0, k0):
    q_tile = k_tile = jnp.zeros(shape, jnp.int32)   # (only traced: the lines stand for them)
    q = lambda: lines.position(q0, jnp.arange(shape[0], dtype=jnp.int32), 0, shape, 4096)
    k = lambda: lines.position(k0, jnp.arange(shape[1], dtype=jnp.int32), 1, shape, 4096)
    body = lambda s, q, k: jnp.where(k <= q, alibi(s, 0, 3, q, k), -jnp.inf)
    return lines.lined(body, shape, {1: q, 2: k})(s, q_tile, k_tile)

  args = (s, jnp.int32(96), jnp.int32(32))
  np.testing.assert_allclose(on_lines(*args), direct(*args), rtol=1e-6, atol=1e-5)
  # direct: 2 index adds, sub, convert, mul, add, compare, select = 8 per score;
  # lined: the two adds of the bias lines, the compare, the select.
  assert _tile_ops(direct, *args) == 8
  assert _tile_ops(on_lines, *args) == 4


def test_unbounded_loaded_lines_keep_the_traced_comparison():
  # Values near the int32 limit: rearranging a < b as a - b < 0 would wrap; loaded lines carry no
  # bound, so the comparison is made on the tiles as traced.
  big = jnp.asarray([[2**31 - 5, -2**31 + 3, 7, -9] * 1024], jnp.int32)
  fn = lambda s, q, k: jnp.where(sm.take(big, 0, q) + 1 < sm.take(big, 0, k) - 1, s, 0.0)
  for start in (0, 4):
    want, got, *_ = _both(fn, start, start + 1)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_unread_index_arguments_are_never_made():
  made = []

  def q_line():
    made.append("q")
    return _tiles(0, 0)[3]()

  shape, q_tile, k_tile, _, k_line = _tiles(0, 0)
  s = jnp.ones(shape, jnp.float32)
  out = lines.lined(lambda s, q, k: jnp.where(k < 20, s, 0.0), shape, {1: q_line, 2: k_line})(
      s, q_tile, k_tile)
  np.testing.assert_array_equal(out, jnp.where(k_tile < 20, s, 0.0))
  assert made == []


def test_loaded_lines_keep_their_dtype_and_order():
  # What the kernel's mod arrays return: a line of values broadcast over the tile (an int8 line
  # times a literal, a bf16 line plus one): evaluated on the line, with the literals in the lines'
  # types, bit-exact.
  codes = jnp.asarray(np.arange(COLS) % 100 - 50, jnp.int8)
  bias = jnp.asarray(np.linspace(-1, 1, ROWS), jnp.bfloat16)

  def fn(s, q, k):
    c = lax.broadcast_in_dim(codes, s.shape, (1,))
    b = lax.broadcast_in_dim(bias, s.shape, (0,))
    return jnp.where(k <= q + 40, s + (c * 2).astype(jnp.float32) + (b + 1).astype(jnp.float32),
                     -jnp.inf)

  for start in (0, 96):
    want, got, s, *_ = _both(fn, start, start + 32)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  shape = (ROWS, COLS)
  q = lambda: lines.position(jnp.int32(0), jnp.arange(ROWS, dtype=jnp.int32), 0, shape, 4096)
  k = lambda: lines.position(jnp.int32(32), jnp.arange(COLS, dtype=jnp.int32), 1, shape, 4096)
  zeros = jnp.zeros(shape, jnp.int32)
  # As written: 9 whole-tile ops (add, compare, multiply, 2 conversions, bf16 add, 2 adds,
  # select); on lines the multiply, the bf16 add, both conversions and the index add run per row
  # or column: 4 (compare, 2 adds, select).
  assert _tile_ops(fn, s, zeros, zeros) == 9
  assert _tile_ops(lambda s, a, b: lines.lined(fn, shape, {1: q, 2: k})(s, a, b),
                   s, zeros, zeros) == 4
