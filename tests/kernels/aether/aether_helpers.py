"""Shared helpers for the AETHER tests: float64 probabilities, data generators, kernel runners."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.kernels import score_mods as sm
from attnax.kernels import tiles
from attnax.kernels.aether import aether_attention, tile_mask_mod
from attnax.kernels.aether.geometry import clustered_qkv
from attnax.kernels.gqa import repeat_kv
from tests.helpers import random_qkv, reference_attention


def available(impl: str) -> bool:
  mod = {"flash": "attnax.kernels.flash", "pallas": "attnax.kernels.pallas"}.get(impl)
  if mod is None:
    return True
  try:
    importlib.import_module(mod)
    return True
  except ImportError:
    return False


def impl_param(impl: str):
  return pytest.param(impl, marks=pytest.mark.skipif(not available(impl),
                                                     reason=f"{impl} kernel not importable"))


def dense_probs64(q, k, v, *, score_mod=None, mask_mod=None, scale=None):
  """Float64 softmax probabilities ``(B, Hq, Sq, Sk)`` of the dense modded, masked scores."""
  with jax.enable_x64(True):
    up = lambda x: jnp.asarray(np.asarray(x, np.float64))
    q, k = up(q), up(k)
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    score_fn, mask_fn = sm.resolve_mods(score_mod, mask_mod)
    s = tiles.qk_dot(q, repeat_kv(k, hq // hkv)) * scale
    bi, hi, qi, ki = sm.index_grid(b, hq, sq, sk)
    s, visible = tiles.tile_scores(s, score_fn=score_fn, mask_fn=mask_fn, b=bi, h=hi, q_idx=qi,
                                   kv_idx=ki)
    m = s.max(-1, keepdims=True)
    p = jnp.exp(s - m)
    if visible is not None:
      p = jnp.where(visible, p, 0.0)
    tot = p.sum(-1, keepdims=True)
    p = jnp.where(tot > 0, p / jnp.where(tot > 0, tot, 1.0), 0.0)
    return np.asarray(p, np.float64)


def kept_map(block_mask, batch, q_heads, q_len, kv_len):
  """bool ``(B, Hq, Sq, Sk)``: positions in the tiles a plan keeps."""
  return np.asarray(sm.mask_mod_to_boolean_mask(tile_mask_mod(block_mask, q_heads), batch, q_heads,
                                                q_len, kv_len))


def run_aether(q, k, v, *, score_mod=None, mask_mod=None, **settings):
  """``aether_attention(..., return_lse=True, return_stats=True)`` under jit (mods as constants)."""
  f = jax.jit(functools.partial(aether_attention, score_mod=score_mod, mask_mod=mask_mod,
                                return_lse=True, return_stats=True, **settings))
  return f(q, k, v)


def assert_certificate(q, k, v, out, lse, stats, *, epsilon, score_mod=None, mask_mod=None,
                       check_output=True):
  """The certificate: measured lost mass <= mass_bound <= epsilon, LSE and output bounds.

  Returns the measured lost mass ``(B, Hq, Sq)``.
  """
  b, hq, sq, _ = q.shape
  sk = k.shape[2]
  p = dense_probs64(q, k, v, score_mod=score_mod, mask_mod=mask_mod)
  kept = kept_map(stats.block_mask, b, hq, sq, sk)
  lost = (p * ~kept).sum(-1)
  bound = np.asarray(stats.mass_bound, np.float64)
  assert bound.shape == (b, hq, sq)
  assert np.all(bound >= 0) and np.all(bound <= epsilon * (1 + 1e-6)), bound.max()
  assert np.all(lost <= bound * (1 + 1e-5) + 1e-30), (lost - bound).max()
  assert np.all(lost <= epsilon), lost.max()
  if check_output:
    ro, rl = reference_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, return_lse=True)
    lse = np.asarray(lse, np.float64)
    fin = np.isfinite(rl)
    assert np.array_equal(np.isfinite(lse), fin)
    rnd = 1e-5 * (1.0 + np.abs(rl[fin]))      # the kernel's own f32 rounding
    assert np.all(lse[fin] <= rl[fin] + rnd)
    assert np.all(rl[fin] - lse[fin] <= epsilon + rnd), (rl[fin] - lse[fin]).max()
    vmax = float(np.abs(np.asarray(v, np.float64)).max())
    err = np.abs(np.asarray(out, np.float64) - ro).max()
    assert err <= 2 * epsilon * vmax + 1e-5 * vmax, err
    assert not np.any(np.isnan(np.asarray(out)))
  return lost


# ----------------------------------------------------------------------------- data


def data_iid(seed, **kw):
  kw = dict(dict(batch=2, q_heads=4, kv_heads=2, q_len=70, kv_len=100, head_dim=16), **kw)
  return random_qkv(seed, **kw)


def data_clustered(seed, *, norm=8.0, **kw):
  kw = dict(dict(batch=2, q_heads=4, kv_heads=2, q_len=70, kv_len=100, head_dim=16, block_q=16,
                 block_k=16, num_clusters=4, noise=0.05, norm=norm), **kw)
  return clustered_qkv(jax.random.key(seed), **kw)


def data_all_negative(seed, *, batch=2, q_heads=2, kv_heads=1, q_len=48, kv_len=96, head_dim=16):
  """Every logit is negative and large: keys cluster around directions close to ``c0``, queries
  point at ``-c0``. The pull request's absolute rule drops every block of every row here."""
  kc, kd, kn, kq, kv = jax.random.split(jax.random.key(seed), 5)
  c0 = jax.random.normal(kc, (head_dim,))
  c0 = c0 / jnp.linalg.norm(c0)
  nb = -(-kv_len // 16)
  dirs = c0 + 0.6 * jax.random.normal(kd, (batch, kv_heads, nb, head_dim)) / head_dim ** 0.5
  dirs = dirs / jnp.linalg.norm(dirs, axis=-1, keepdims=True)
  k = 6.0 * jnp.repeat(dirs, 16, axis=2)[:, :, :kv_len]
  k = k + 0.05 * jax.random.normal(kn, k.shape)
  q = -6.0 * c0 + 0.05 * jax.random.normal(kq, (batch, q_heads, q_len, head_dim))
  v = jax.random.normal(kv, (batch, kv_heads, kv_len, head_dim))
  return q, k, v


def data_needle(seed, *, batch=2, q_heads=2, kv_heads=2, q_len=32, kv_len=128, head_dim=16):
  """One needle key per (batch, kv head) among small distractors; every query looks for it.

  The needle's block has a centroid near the distractors' (it is one key in 16) but a large radius:
  a rule that looked at centroids alone would drop it."""
  kk, kp, kq, kv, ku = jax.random.split(jax.random.key(seed), 5)
  u = jax.random.normal(ku, (batch, kv_heads, 1, head_dim))
  u = u / jnp.linalg.norm(u, axis=-1, keepdims=True)
  k = 0.3 * jax.random.normal(kk, (batch, kv_heads, kv_len, head_dim))
  pos = jax.random.randint(kp, (batch, kv_heads), 0, kv_len)
  onehot = (jnp.arange(kv_len)[None, None] == pos[..., None])[..., None]
  k = jnp.where(onehot, 12.0 * u, k)
  g = q_heads // kv_heads
  q = 12.0 * jnp.repeat(u, g, axis=1) + 0.1 * jax.random.normal(kq, (batch, q_heads, q_len,
                                                                     head_dim))
  v = jax.random.normal(kv, (batch, kv_heads, kv_len, head_dim))
  return q, k, v
