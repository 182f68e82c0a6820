"""PagedKVCache (allocate / append / free) and MultiHeadAttention.decode_paged: decoding from the
paged cache equals the full causal pass, with rows of different lengths decoding together and a
freed row's pages going to a new sequence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnax import MultiHeadAttention
from attnax.kernels import PagedKVCache, alibi_mod, causal_mod, compose_score_mods
from attnax.kernels.paged import dequantize_kv, quantize_kv
from tests.helpers import rel_err, tol


def small_cache(**kw):
  args = dict(batch=3, num_pages=10, page_size=4, pages_per_sequence=4, num_kv_heads=2,
              head_dim=8, dtype=jnp.float32)
  return PagedKVCache.create(**{**args, **kw})


def test_allocate_append_free():
  cache = small_cache()
  step = jax.jit(lambda c, n: c.allocate(n))
  cache, ok = step(cache, jnp.array([5, 0, 9]))
  assert ok.tolist() == [True, True, True] and cache.lengths.tolist() == [5, 0, 9]
  assert cache.pending.tolist() == [5, 0, 9] and int(cache.num_free_pages()) == 10 - 2 - 3
  held = [np.asarray(cache.block_tables[b, :n]) for b, n in ((0, 2), (2, 3))]
  used = np.concatenate(held)
  assert len(set(used.tolist())) == 5 and not np.asarray(cache.is_free)[used].any()

  # Right-aligned writes: of the S = 9 slots of a row, its last pending[b] are written.
  rng = np.random.default_rng(0)
  k = jnp.asarray(rng.standard_normal((3, 2, 9, 8)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((3, 2, 9, 8)), jnp.float32)
  cache = jax.jit(lambda c, k, v: c.append(0, k, v))(cache, k, v)
  ck, cv = cache.contiguous(0)
  np.testing.assert_array_equal(ck[0, :, :5], k[0, :, 4:])
  np.testing.assert_array_equal(cv[2, :, :9], v[2, :, :])

  # Past the capacity (16 tokens) or past the pool: nothing granted, nothing changed.
  cache2, ok = step(cache, jnp.array([12, 0, 1]))
  assert ok.tolist() == [False, True, True]
  assert cache2.lengths.tolist() == [5, 0, 10] and cache2.pending.tolist() == [0, 0, 1]
  cache2, ok = step(cache, jnp.array([0, 16, 0]))      # needs 4 pages; 5 are free
  assert ok.tolist() == [True, True, True] and int(cache2.num_free_pages()) == 1
  cache3, ok = step(cache2, jnp.array([4, 0, 4]))      # rows 0 and 2 need a page each; 1 is free
  assert ok.tolist() == [True, True, False] and int(cache3.num_free_pages()) == 0
  assert cache3.lengths.tolist() == [9, 16, 9]

  # Freeing returns exactly the row's pages; a new sequence in that row takes pages again.
  freed = jax.jit(lambda c: c.free(jnp.array([False, True, False])))(cache2)
  assert freed.lengths.tolist() == [5, 0, 9] and int(freed.num_free_pages()) == 5
  again, ok = step(freed, jnp.array([0, 7, 0]))
  assert ok.all() and set(np.asarray(again.block_tables[1, :2]).tolist()) <= set(
      np.flatnonzero(np.asarray(freed.is_free)).tolist())
  assert int(freed.free(np.array([0, 2])).num_free_pages()) == 10


def test_quantize_kv():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 5, 16)) * 3, jnp.float32)
  x = x.at[0, 0].set(0.0)
  q, s = quantize_kv(x)
  assert q.dtype == jnp.int8 and s.shape == (3, 5) and s[0, 0] == 1.0
  err = np.abs(np.asarray(dequantize_kv(q, s)) - np.asarray(x))
  assert np.all(err <= np.asarray(s)[..., None] / 2 + 1e-6)
  _, s_nan = quantize_kv(x.at[1, 2, 3].set(jnp.nan))
  assert np.isnan(s_nan[1, 2]) and np.isfinite(np.delete(np.asarray(s_nan).ravel(), 7)).all()


def make_module(seed=0):
  return MultiHeadAttention(nnx.Rngs(seed), num_heads=4, num_kv_heads=2, in_features=32,
                            score_mod=compose_score_mods(causal_mod(), alibi_mod(num_heads=4)),
                            rope=True, qk_norm=True)


@nnx.jit(static_argnames=("backend",))
def decode_step(attn, cache, x, num_new, backend="auto"):
  cache, ok = cache.allocate(num_new)
  out, cache = attn.decode_paged(x, cache, backend=backend)
  return out, cache, ok


CHUNK = 8       # prompt chunk slots of a step (prompts here are at most this long)


def run_requests(attn, cache, seqs, prompts, backend="auto"):
  """Serve ``seqs`` (each (T, F)) in cache rows: prompt chunks, then one token per step; a
  finished row is freed and the next sequence starts there. Returns each sequence's outputs."""
  b = cache.batch
  queue = list(range(len(seqs)))
  row_seq, done, outs = [None] * b, [0] * b, {i: [] for i in range(len(seqs))}
  while queue or any(r is not None for r in row_seq):
    for r in range(b):
      if row_seq[r] is None and queue:
        row_seq[r], done[r] = queue.pop(0), 0
    want = [0 if s is None else (prompts[s] if done[r] == 0 else 1)
            for r, s in enumerate(row_seq)]
    steps = CHUNK if max(want) > 1 else 1      # two step shapes: prompt chunks, single tokens
    x = np.zeros((b, steps, seqs[0].shape[-1]), np.float32)
    for r, s in enumerate(row_seq):
      if s is not None:
        x[r, steps - want[r]:] = seqs[s][done[r]:done[r] + want[r]]
    out, cache, ok = decode_step(attn, cache, jnp.asarray(x), jnp.asarray(want), backend=backend)
    assert bool(ok.all())
    finished = np.zeros(b, bool)
    for r, s in enumerate(row_seq):
      if s is None:
        continue
      outs[s].append(np.asarray(out[r, steps - want[r]:]))
      done[r] += want[r]
      if done[r] == len(seqs[s]):
        finished[r], row_seq[r] = True, None
    if finished.any():
      cache = cache.free(jnp.asarray(finished))
  assert int(cache.num_free_pages()) == cache.num_pages     # every page came back
  return [np.concatenate(outs[i]) for i in range(len(seqs))]


def sequences(seed, lengths, features=32):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal((n, features)).astype(np.float32) for n in lengths]


@nnx.jit
def full_pass(attn, x):
  return attn(x)


def full_causal_pass(attn, seqs):
  """The module's ordinary causal forward over every whole sequence (one batch, zero-padded at
  the end: causal, so the padding changes no earlier position)."""
  n = max(len(x) for x in seqs)
  batch = np.stack([np.pad(x, ((0, n - len(x)), (0, 0))) for x in seqs])
  out = np.asarray(full_pass(attn, jnp.asarray(batch)))
  return [out[i, :len(x)] for i, x in enumerate(seqs)]


@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
def test_decode_matches_full_causal_pass(dtype):
  attn = make_module()
  seqs = sequences(2, (9, 4, 12, 6, 7))              # 5 requests over 3 rows
  prompts = [5, 1, 3, 6, 2]
  cache = small_cache(num_kv_heads=2, head_dim=8, num_pages=9, dtype=dtype)
  got = run_requests(attn, cache, seqs, prompts)
  for y, want in zip(got, full_causal_pass(attn, seqs)):
    assert rel_err(y, want) < tol(dtype)


def test_int8_cache_decode_within_quantisation_error():
  attn = make_module(1)
  seqs = sequences(3, (10, 7, 5))
  cache = small_cache(num_pages=8, dtype=jnp.int8)
  got = run_requests(attn, cache, seqs, [4, 2, 5])
  for y, want in zip(got, full_causal_pass(attn, seqs)):
    # int8 rounds each cached entry by at most max|row| / 254: about 1% on the output.
    assert rel_err(y, want) < 3e-2


@pytest.mark.slow
def test_decode_with_the_pallas_kernel_interpreted():
  attn = make_module(2)
  seqs = sequences(4, (6, 5))
  cache = small_cache(batch=2, num_pages=6)
  got = run_requests(attn, cache, seqs, [3, 5], backend="interpret")
  for y, want in zip(got, full_causal_pass(attn, seqs)):
    assert rel_err(y, want) < tol(jnp.float32)


def test_errors():
  with pytest.raises(ValueError, match="num_pages must be a positive int"):
    small_cache(num_pages=0)
  with pytest.raises(ValueError, match="dtype must be a float dtype or int8"):
    small_cache(dtype=jnp.int32)
  cache = small_cache()
  with pytest.raises(ValueError, match=r"k must be \(batch, num_kv_heads, S, dim\) = \(3, 2, S, 8\)"):
    cache.append(0, jnp.zeros((3, 1, 2, 8)), jnp.zeros((3, 2, 2, 8)))
  with pytest.raises(ValueError, match="layer 1 out of range for 1 layers"):
    cache.append(1, jnp.zeros((3, 2, 2, 8)), jnp.zeros((3, 2, 2, 8)))
  with pytest.raises(ValueError, match=r"a row mask must have shape \(3,\)"):
    cache.free(jnp.array([True, False]))
  attn = make_module()
  with pytest.raises(ValueError, match=r"inputs must have shape \(batch=3, S, in_features=32\)"):
    attn.decode_paged(jnp.zeros((2, 1, 32)), cache)
  with pytest.raises(ValueError, match="layer 2 out of range for a cache of 1 layers"):
    attn.decode_paged(jnp.zeros((3, 1, 32)), cache, layer=2)
  with pytest.raises(ValueError, match="but the module has 2 kv heads of 8"):
    attn.decode_paged(jnp.zeros((3, 1, 32)), small_cache(head_dim=16))
