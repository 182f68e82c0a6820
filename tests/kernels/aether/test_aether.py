"""aether_attention: the certificate holds on adversarial data, gradients are those of the pruned
forward, epsilon=0 is dense attention, the threshold rule never NaNs, stats, errors, jit/modules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.kernels import (
    AetherAttention, aether_attention, additive_bias_mod, alibi_mod, causal_mod,
    compose_score_mods, document_mask_mod, standard_attention,
)
from attnax.kernels import score_mods as sm
from attnax.kernels.aether import plan_aether, tile_mask_mod
from tests.helpers import kernel_grads, reference_attention, reference_grads, rel_err, tol
from tests.kernels.aether.aether_helpers import (
    assert_certificate, available, data_all_negative, data_clustered, data_iid, data_needle,
    impl_param, kept_map, run_aether,
)

EPS = 1e-3
BLK = dict(block_q=16, block_k=16)


def _doc_mod(sq):
  ids = jnp.asarray((np.arange(sq) // 32)[None], jnp.int32)   # documents of 2 blocks
  return document_mask_mod(ids)


# (name, data, score_mod factory (seq len -> mod or None)). Each runs the certificate end to end.
CASES = [
    ("iid", lambda s: data_iid(s), None),
    ("clustered", lambda s: data_clustered(s, norm=10.0), None),
    ("clustered-causal", lambda s: data_clustered(s, norm=10.0, q_len=100), lambda n: causal_mod()),
    ("clustered-alibi", lambda s: data_clustered(s, norm=10.0),
     lambda n: alibi_mod(num_heads=4)),
    ("clustered-documents", lambda s: data_clustered(s, norm=10.0, q_len=100), _doc_mod),
    ("all-negative", lambda s: data_all_negative(s), None),
    ("needle", lambda s: data_needle(s), None),
    ("large-logits", lambda s: data_iid(s, scale=8.0), None),
]


MARGIN = ("clustered-causal", "all-negative", "needle")
PARAMS = [pytest.param(*c, "budget", id=f"{c[0]}-budget") for c in CASES] + [
    pytest.param(*c, "margin", id=f"{c[0]}-margin", marks=pytest.mark.slow)
    for c in CASES if c[0] in MARGIN]


@pytest.mark.parametrize("name,make,mod,rule", PARAMS)
def test_certificate_flash(name, make, mod, rule):
  pytest.importorskip("attnax.kernels.flash")
  q, k, v = make(11)
  score_mod = None if mod is None else mod(q.shape[2])
  # The budget rule (default) runs through the flash kernel; the margin cases, whose kernel path is
  # the same, through the materialised reference (cheaper to compile).
  impl = "flash" if rule == "budget" else "reference"
  out, lse, st = run_aether(q, k, v, score_mod=score_mod, epsilon=EPS, implementation=impl,
                            rule=rule, **BLK)
  assert_certificate(q, k, v, out, lse, st, epsilon=EPS, score_mod=score_mod)
  frac = np.asarray(st.skipped_fraction)
  if name in ("clustered", "clustered-causal", "clustered-alibi"):
    assert frac.mean() > 0.2, frac       # the data is prunable: the test means something
  if name == "needle":
    # the needle's own tile is kept for every row: the output is about the needle's value
    assert np.all(frac < 1.0)


def test_budget_prunes_at_least_margin():
  q, k, v = data_clustered(3, norm=7.0)
  plan = lambda r: jax.jit(lambda q, k: plan_aether(q, k, scale=0.25, score_fn=None, mask_fn=None,
                                                    rule=r, **BLK).block_mask.tiles)(q, k)
  f = {r: np.asarray(plan(r)) for r in ("budget", "margin")}
  assert np.all((f["margin"] == 0) <= (f["budget"] == 0) | (f["margin"] == 0))
  assert (f["budget"] == 0).sum() >= (f["margin"] == 0).sum()


@pytest.mark.parametrize("impl", [impl_param("pallas")])
def test_certificate_pallas(impl):
  """The Pallas kernel (interpreted on CPU) runs the same certified plan."""
  q, k, v = data_clustered(5, norm=10.0, q_len=64, kv_len=80, head_dim=16)
  mod = causal_mod(offset=16)
  out, lse, st = run_aether(q, k, v, score_mod=mod, epsilon=EPS, implementation=impl, **BLK)
  assert np.asarray(st.skipped_fraction).mean() > 0.2
  assert_certificate(q, k, v, out, lse, st, epsilon=EPS, score_mod=mod)
  # and matches dense attention restricted to the kept tiles within the f32 tolerance
  keep = tile_mask_mod(st.block_mask, q.shape[1])
  ro = reference_attention(q, k, v, score_mod=mod, mask_mod=keep)
  assert rel_err(out, ro) <= tol(jnp.float32)


@pytest.mark.parametrize("impl", [pytest.param("reference", marks=pytest.mark.slow),
                                  impl_param("flash")])
def test_additive_bias_and_composition(impl):
  q, k, v = data_clustered(8, norm=10.0)
  bias = 2.0 * jax.random.normal(jax.random.key(1), (1, 4, q.shape[2], k.shape[2]))
  mod = compose_score_mods(additive_bias_mod(bias), causal_mod(offset=30), alibi_mod(num_heads=4))
  out, lse, st = run_aether(q, k, v, score_mod=mod, epsilon=EPS, implementation=impl, **BLK)
  assert np.asarray(st.skipped_fraction).mean() > 0.1
  assert_certificate(q, k, v, out, lse, st, epsilon=EPS, score_mod=mod)


def test_arbitrary_score_mod_is_dense():
  q, k, v = data_clustered(9, norm=10.0)
  mod = lambda s, b, h, i, j: 30.0 * jnp.tanh(s / 30.0)
  out, lse, st = run_aether(q, k, v, score_mod=mod, epsilon=EPS, implementation="reference", **BLK)
  assert float(np.asarray(st.skipped_fraction).max()) == 0.0
  assert float(np.asarray(st.mass_bound).max()) == 0.0
  ro = reference_attention(q, k, v, score_mod=mod)
  assert rel_err(out, ro) <= tol(jnp.float32)


def test_fully_masked_rows_and_mask_mod():
  """A mask_mod (not carried by a score mod) with fully masked rows: 0 output, -inf lse, no NaN."""
  q, k, v = data_clustered(4, norm=10.0)
  mask = lambda b, h, i, j: (i < 60) & (j <= i + 40)
  out, lse, st = run_aether(q, k, v, mask_mod=mask, epsilon=EPS, implementation="reference", **BLK)
  assert_certificate(q, k, v, out, lse, st, epsilon=EPS, mask_mod=mask)
  assert np.all(np.asarray(out)[:, :, 60:] == 0) and np.all(np.isneginf(np.asarray(lse)[:, :, 60:]))


@pytest.mark.parametrize("impl", [pytest.param("reference", marks=pytest.mark.slow),
                                  impl_param("flash")])
def test_epsilon_zero_is_dense(impl):
  q, k, v = data_clustered(2, norm=10.0)
  out, lse, st = run_aether(q, k, v, epsilon=0.0, implementation=impl, score_mod=causal_mod(),
                            **BLK)
  ro, rl = reference_attention(q, k, v, score_mod=causal_mod(), return_lse=True)
  assert rel_err(out, ro) <= tol(jnp.float32)
  assert rel_err(lse, rl) <= tol(jnp.float32)
  assert float(np.asarray(st.skipped_fraction).max()) == 0.0
  assert float(np.asarray(st.mass_bound).max()) == 0.0


def test_threshold_rule_never_nan_on_all_negative_logits():
  """The pull request's rule (skip when the bound is below 0) would empty every row here."""
  q, k, v = data_all_negative(1)
  out, lse, st = run_aether(q, k, v, threshold=0.0, implementation="reference", **BLK)
  s = np.einsum("bhqd,bhkd->bhqk", np.asarray(q), np.repeat(np.asarray(k), 2, axis=1))
  assert s.max() < 0                           # really all negative
  assert not np.any(np.isnan(np.asarray(out))) and np.all(np.isfinite(np.asarray(lse)))
  assert np.asarray(st.skipped_fraction).min() > 0.5   # it pruned (keeping each row's witness)
  kept = kept_map(st.block_mask, *q.shape[:3], k.shape[2])
  assert np.all(kept.any(-1))                  # no row is empty
  b = np.asarray(st.mass_bound)
  assert np.all((b >= 0) & (b <= 1))
  # the threshold mode reports its (uncertified) loss honestly: measured <= reported
  lost = assert_certificate(q, k, v, out, lse, st, epsilon=1.0, check_output=False)
  assert lost.shape == b.shape


def test_threshold_rule_high_threshold_keeps_witness():
  q, k, v = data_iid(4)
  out, lse, st = run_aether(q, k, v, threshold=1e9, implementation="reference", **BLK)
  assert np.all(np.isfinite(np.asarray(out))) and np.all(np.isfinite(np.asarray(lse)))
  kept = kept_map(st.block_mask, *q.shape[:3], k.shape[2])
  assert np.all(kept.any(-1))


# ----------------------------------------------------------------------------- gradients


def _restricted_grads(q, k, v, ct, st, score_mod=None):
  keep = tile_mask_mod(st.block_mask, q.shape[1])
  return reference_grads(q, k, v, ct, score_mod=score_mod, mask_mod=keep)


@pytest.mark.parametrize("impl", [
    pytest.param("reference", marks=pytest.mark.slow), impl_param("flash"),
    pytest.param("pallas", marks=[pytest.mark.slow, pytest.mark.skipif(
        not available("pallas"), reason="pallas kernel not importable")])])
def test_gradients_are_those_of_the_pruned_forward(impl):
  q, k, v = data_clustered(6, norm=6.0, q_len=48, kv_len=96)
  mod = causal_mod(offset=48)
  _, _, st = run_aether(q, k, v, score_mod=mod, epsilon=EPS, implementation=impl, **BLK)
  assert np.asarray(st.skipped_fraction).mean() > 0.1
  ct = jax.random.normal(jax.random.key(0), q.shape[:3] + (v.shape[-1],))
  f = jax.jit(functools.partial(aether_attention, epsilon=EPS, implementation=impl, score_mod=mod,
                                **BLK))
  got = kernel_grads(f, q, k, v, ct)
  want = _restricted_grads(q, k, v, ct, st, score_mod=mod)
  for g, w in zip(got, want):
    assert rel_err(g, w) <= tol(jnp.float32, grad=True)


@pytest.mark.parametrize("impl", [impl_param("flash")])
def test_gradients_equal_dense_when_nothing_pruned(impl):
  q, k, v = data_iid(7)
  _, _, st = run_aether(q, k, v, epsilon=EPS, implementation=impl, **BLK)
  assert float(np.asarray(st.skipped_fraction).max()) == 0.0
  ct = jax.random.normal(jax.random.key(1), q.shape[:3] + (v.shape[-1],))
  f = jax.jit(functools.partial(aether_attention, epsilon=EPS, implementation=impl, **BLK))
  got = kernel_grads(f, q, k, v, ct)
  want = reference_grads(q, k, v, ct)
  for g, w in zip(got, want):
    assert rel_err(g, w) <= tol(jnp.float32, grad=True)


def test_decisions_carry_no_gradient():
  """The plan is under stop_gradient: the gradient w.r.t. q of the planner's bounds is zero."""
  q, k, v = data_clustered(6, norm=6.0, q_len=32, kv_len=48)
  f = lambda q: run_aether(q, k, v, epsilon=EPS, implementation="reference",
                           **BLK)[2].mass_bound.sum()
  g = jax.grad(f)(q)
  assert float(jnp.abs(g).max()) == 0.0


# ----------------------------------------------------------------------------- stats, API


def test_stats_shapes_and_ranges():
  q, k, v = data_clustered(1, norm=10.0)
  out, st = aether_attention(q, k, v, return_stats=True, implementation="reference", **BLK)
  b, hq, sq, _ = q.shape
  assert out.shape == (b, hq, sq, v.shape[-1])
  assert st.skipped_fraction.shape == (b, hq) and st.skipped_fraction.dtype == jnp.float32
  assert st.mass_bound.shape == (b, hq, sq) and st.mass_bound.dtype == jnp.float32
  f = np.asarray(st.skipped_fraction)
  assert np.all((f >= 0) & (f <= 1)) and f.mean() > 0.2
  # GQA: the packed query heads of one kv head share their decisions
  np.testing.assert_array_equal(f[:, 0], f[:, 1])
  assert st.block_mask.tiles.shape[1] == k.shape[1]
  # skipped_fraction agrees with the tile map
  nq, nk = st.block_mask.tiles.shape[2:]
  kept = (np.asarray(st.block_mask.tiles) != 0).sum((-2, -1)) / (nq * nk)
  np.testing.assert_allclose(1 - np.repeat(kept, 2, axis=1), f, rtol=1e-6)
  mb = np.asarray(st.mass_bound)
  assert np.all((mb >= 0) & (mb <= 1e-3))
  # The tuple orders: (out, lse, stats), (out, lse), out
  r = aether_attention(q, k, v, return_lse=True, return_stats=True, implementation="reference",
                       **BLK)
  assert len(r) == 3 and r[1].shape == (b, hq, sq)
  assert len(aether_attention(q, k, v, return_lse=True, implementation="reference", **BLK)) == 2
  assert aether_attention(q, k, v, implementation="reference", **BLK).shape == out.shape


def test_stats_is_a_pytree_under_jit():
  q, k, v = data_clustered(1, norm=10.0, q_len=32, kv_len=32)
  f = jax.jit(lambda q, k, v: aether_attention(q, k, v, return_stats=True,
                                               implementation="reference", **BLK))
  out, st = f(q, k, v)
  assert len(jax.tree.leaves(st)) >= 3


def test_bad_inputs():
  q, k, v = data_iid(0, q_len=16, kv_len=16)
  ok = dict(implementation="reference", **BLK)
  with pytest.raises(ValueError, match="epsilon"):
    aether_attention(q, k, v, epsilon=-1.0, **ok)
  with pytest.raises(ValueError, match="epsilon"):
    aether_attention(q, k, v, epsilon=float("nan"), **ok)
  with pytest.raises(ValueError, match="threshold"):
    aether_attention(q, k, v, threshold=float("nan"), **ok)
  with pytest.raises(ValueError, match="block_q"):
    aether_attention(q, k, v, epsilon=EPS, block_q=0, block_k=16, implementation="reference")
  with pytest.raises(ValueError, match="rule"):
    aether_attention(q, k, v, rule="greedy", **ok)
  with pytest.raises(ValueError, match="implementation"):
    aether_attention(q, k, v, implementation="cuda", **BLK)
  with pytest.raises(ValueError, match="multiple of kv heads"):
    aether_attention(q[:, :3], k, v, **ok)
  with pytest.raises(ValueError, match="rank 4"):
    aether_attention(q[0], k, v, **ok)
  with pytest.raises(ValueError, match="head_dim"):
    aether_attention(q[..., :8], k, v, **ok)
  with pytest.raises(ValueError, match="score_mod"):
    aether_attention(q, k, v, score_mod=lambda s: s, **ok)
  with pytest.raises(ValueError, match="epsilon"):
    AetherAttention(epsilon=-0.5)
  with pytest.raises(ValueError, match="implementation"):
    AetherAttention(implementation="cuda")


def test_aether_attention_module_object():
  q, k, v = data_clustered(3, norm=10.0, q_len=32, kv_len=48)
  attn = AetherAttention(epsilon=1e-4, implementation="reference", **BLK)
  assert hash(attn) == hash(AetherAttention(epsilon=1e-4, implementation="reference", **BLK))
  out = attn(q, k, v, score_mod=causal_mod())
  want = aether_attention(q, k, v, epsilon=1e-4, implementation="reference",
                          score_mod=causal_mod(), **BLK)
  np.testing.assert_array_equal(out, want)
  out2, lse = attn(q, k, v, return_lse=True)
  assert lse.shape == q.shape[:3]

  # hashable: usable as a static argument of jit
  @functools.partial(jax.jit, static_argnums=0)
  def apply(fn, q, k, v):
    return fn(q, k, v, score_mod=causal_mod())

  np.testing.assert_allclose(apply(attn, q, k, v), out, rtol=1e-6, atol=1e-6)
  with_stats = AetherAttention(implementation="reference", return_stats=True, **BLK)
  assert len(with_stats(q, k, v)) == 2


def test_multi_head_attention_with_aether():
  nnx = pytest.importorskip("flax.nnx")
  attnax = pytest.importorskip("attnax")
  mha_cls = getattr(attnax, "MultiHeadAttention", None)
  if mha_cls is None:
    pytest.skip("MultiHeadAttention not available")
  x = jax.random.normal(jax.random.key(0), (2, 40, 32))
  kw = dict(num_heads=4, in_features=32)
  try:
    aeth = mha_cls(nnx.Rngs(0), attention_fn=AetherAttention(implementation="reference", **BLK),
                   **kw)
    dense = mha_cls(nnx.Rngs(0), attention_fn=standard_attention, **kw)
    plain = mha_cls(nnx.Rngs(0), attention_fn=aether_attention, **kw)
  except TypeError as e:
    pytest.skip(f"MultiHeadAttention signature differs: {e}")
  ya = aeth(x, score_mod=causal_mod(), deterministic=True)
  yd = dense(x, score_mod=causal_mod(), deterministic=True)
  # random projections of a small input: nothing is prunable at epsilon=1e-3 -> dense result
  assert rel_err(ya, yd) <= 1e-4
  yp = plain(x, deterministic=True)
  assert yp.shape == (2, 40, 32) and np.all(np.isfinite(np.asarray(yp)))


def test_vmap():
  """Under vmap the screen's lax.cond becomes a select: both branches run, same result."""
  q, k, v = data_clustered(12, norm=10.0, batch=2, q_heads=2, kv_heads=1, q_len=48, kv_len=64)
  f = functools.partial(aether_attention, implementation="reference", **BLK)
  out = jax.vmap(lambda q, k, v: f(q[None], k[None], v[None])[0])(q, k, v)
  np.testing.assert_allclose(out, f(q, k, v), rtol=1e-6, atol=1e-6)
  assert rel_err(out, reference_attention(q, k, v)) <= 2 * EPS
