"""The planner alone: the screen and the chunking never change the plan, eligibility rules, and the
pre-pass never materialises O(Sq * nb) at 1M tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.kernels import causal_mod
from attnax.kernels import score_mods as sm
from attnax.kernels.aether import certify, plan_aether
from attnax.kernels.block_mask import EMPTY, PARTIAL
from tests.kernels.aether.aether_helpers import data_all_negative, data_clustered, data_iid

BLK = dict(block_q=16, block_k=16)


def _plan(q, k, mod=None, **kw):
  score_fn, mask_fn = sm.resolve_mods(mod, None)
  kw = dict(dict(scale=q.shape[-1] ** -0.5, score_fn=score_fn, mask_fn=mask_fn, with_stats=True,
                 **BLK), **kw)
  return jax.jit(lambda q, k: plan_aether(q, k, **kw))(q, k)


@pytest.mark.parametrize("data,setting", [
    ("clustered", dict()), ("clustered", dict(rule="margin")), ("all-negative", dict()),
    ("all-negative", dict(threshold=0.0)), ("iid", dict(epsilon=0.3))])
def test_screen_and_chunking_do_not_change_the_plan(data, setting, monkeypatch):
  q, k, _ = {"clustered": lambda: data_clustered(2, norm=7.0),
             "all-negative": lambda: data_all_negative(2),
             "iid": lambda: data_iid(2)}[data]()
  mod = causal_mod(offset=20)
  ref = _plan(q, k, mod, use_screen=False, **setting)
  got = _plan(q, k, mod, **setting)
  np.testing.assert_array_equal(got.block_mask.tiles, ref.block_mask.tiles)
  np.testing.assert_allclose(got.mass_bound, ref.mass_bound, rtol=1e-5, atol=1e-30)
  # tiny chunks: many lax.map steps plus a ragged tail chunk
  monkeypatch.setattr(certify, "_CHUNK_ELEMS", 2 * q.shape[0] * q.shape[1] * 16 * 7)
  small = _plan(q, k, mod, **setting)
  np.testing.assert_array_equal(small.block_mask.tiles, ref.block_mask.tiles)
  np.testing.assert_allclose(small.mass_bound, ref.mass_bound, rtol=1e-5, atol=1e-30)


def test_partial_tiles_always_run_and_rows_never_empty():
  q, k, _ = data_clustered(4, norm=12.0, q_len=96, kv_len=96)
  mod = causal_mod()
  plan = _plan(q, k, mod, threshold=1e9)        # the absolute rule at its most aggressive
  base = np.asarray(plan.base_tiles)
  tiles = np.asarray(plan.block_mask.tiles)
  assert np.all(tiles[np.broadcast_to(base == PARTIAL, tiles.shape)] == PARTIAL)
  assert np.all((tiles != EMPTY).any(-1))       # every q tile keeps a kv block
  # certified mode on the same data: prunes, keeps the diagonal
  plan = _plan(q, k, mod)
  tiles = np.asarray(plan.block_mask.tiles)
  assert (tiles == EMPTY).sum() > (np.broadcast_to(base, tiles.shape) == EMPTY).sum()
  assert np.all(np.diagonal(tiles, axis1=-2, axis2=-1) == PARTIAL)


def test_gqa_decisions_cover_every_packed_head():
  """Hq=4 over Hkv=1: a tile is skipped for the kv head only if safe for all four query heads;
  make one head look elsewhere and its tiles must stay."""
  q, k, _ = data_clustered(5, norm=10.0, q_heads=4, kv_heads=1, batch=1)
  plan_all = _plan(q, k)
  q2 = q.at[:, 3].set(-q[:, 3])                   # head 3 now attends to no cluster in particular
  plan_mixed = _plan(q2, k)
  sk_all = np.asarray(plan_all.skipped).sum()
  sk_mixed = np.asarray(plan_mixed.skipped).sum()
  assert sk_mixed < sk_all
  assert plan_mixed.block_mask.tiles.shape[1] == 1


def test_margin_delta():
  assert certify.margin_delta(1000, 1e-3) == pytest.approx(np.log(1e6))
  assert certify.margin_delta(10, 0.0) == np.inf


def _max_intermediate(jaxpr) -> int:
  best = 0
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      shape = getattr(v.aval, "shape", ())
      best = max(best, int(np.prod(shape)) if shape else 1)
    for p in eqn.params.values():
      subs = p if isinstance(p, (list, tuple)) else (p,)
      for sub in subs:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          best = max(best, _max_intermediate(sub.jaxpr))
        elif isinstance(sub, jax.extend.core.Jaxpr):
          best = max(best, _max_intermediate(sub))
  return best


def test_prepass_memory_at_one_million_tokens():
  """Traced (not run) at Sq = Sk = 2**20: no intermediate is O(Sq * nb)."""
  s, d, bq = 1 << 20, 64, 128
  q = jax.ShapeDtypeStruct((1, 2, s, d), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 1, s, d), jnp.bfloat16)
  f = lambda q, k: plan_aether(q, k, scale=d ** -0.5, score_fn=None,
                               mask_fn=causal_mod().mask_mod, block_q=bq, block_k=bq,
                               with_stats=True)
  jaxpr = jax.make_jaxpr(f)(q, k)
  nb = s // bq
  biggest = _max_intermediate(jaxpr.jaxpr)
  assert biggest <= max(certify._CHUNK_ELEMS, (s // bq) * nb) * 2, biggest
  assert biggest < 2 * s * nb // 64           # far from Hq * Sq * nb
