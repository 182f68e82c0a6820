"""attnax.dot_product_attention's own decisions, against jax.nn.dot_product_attention.

Rows that see no key (JAX's mean of V, padded queries 0), the residual (no gradient, key dtype),
each argument as a mod with exact tiles (so block kernels skip), kernel selection and bad inputs.
The peers' test cases, on every kernel, are in ``tests/test_nn_compat.py`` (a few by default,
all under ``-m slow``); the reference kernel runs here by default, the others under ``-m slow``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnax
from attnax.kernels import (BlockMask, create_block_mask, flash_attention, pallas_flash_attention,
                            standard_attention)
from attnax.kernels.block_mask import EMPTY
from attnax.nn import to_mods
from tests.kernels.test_score_mods import _expected_tiles, _tiles_bh
from tests.test_nn_compat import IMPLS, assert_close, rand, sdpa

f32, bf16 = jnp.float32, jnp.bfloat16
jit = jax.jit


@pytest.mark.parametrize("impl", [pytest.param(n, marks=() if n == "standard"
                                               else (pytest.mark.slow,)) for n in IMPLS])
def test_rows_that_see_no_key_match_jax(impl):
  """A row the mask empties, a batch row with key length 0, queries past their length: out,
  residual and the gradients of q, k, v and bias equal jax.nn's (mean of V; 0 for padded queries;
  residual -0.7 * float32 max + log S), f32 on B=2, T=37, S=45, N=4, K=2 (GQA), ragged blocks."""
  b, t, s, n, kh, h = 2, 37, 45, 4, 2, 16
  q, k, v = rand(50, (b, t, n, h)), rand(51, (b, s, kh, h)), rand(52, (b, s, kh, h))
  bias = rand(53, (1, n, t, s))
  mask = np.random.default_rng(54).random((b, 1, t, s)) < 0.8
  mask[0, :, 3] = False                                         # query 3 of row 0: no key
  mask = jnp.asarray(mask)
  kw = dict(is_causal=True, query_seq_lengths=jnp.array([30, t], jnp.int32),
            key_value_seq_lengths=jnp.array([40, 0], jnp.int32))   # row 1 sees no key at all
  ct = rand(55, (b, t, n, h))

  def loss(fn, q, k, v, bias):
    out, res = fn(q, k, v, bias, mask, return_residual=True, **kw)
    return jnp.sum(out * ct) + jnp.sum(res), (out, res)

  def run(fn):
    return jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, bias)

  grads, (out, res) = jit(lambda: run(sdpa(impl)))()
  ref_grads, (ref, ref_res) = jax.jit(lambda: run(jax.nn.dot_product_attention))()
  assert np.all(np.asarray(out)[1] != 0), "key length 0: jax gives the mean of V"
  assert np.all(np.asarray(out)[0, 30:] == 0), "padded queries: jax gives 0"
  assert_close(out, ref, atol=1e-6, rtol=1e-5, impl=impl, v=v)
  assert res.dtype == f32
  assert_close(res, ref_res, atol=1e-5, rtol=1e-6, impl=impl, what="residual")
  for name, g, w in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
    assert_close(g, w, atol=1e-5, rtol=1e-5, impl=impl, what=name)


def test_residual_has_no_gradient_and_jax_dtype():
  """The residual is returned with its gradient stopped (JAX's choice) and in key's dtype;
  the kernels' own return_lse=True keeps the LSE differentiable."""
  q, k, v = (rand(60 + i, (2, 16, 2, 8), bf16) for i in range(3))

  @jax.jit
  def run(q, k, v):
    ours = attnax.dot_product_attention(q, k, v, return_residual=True, implementation="standard")
    ref = jax.nn.dot_product_attention(q, k, v, return_residual=True)
    g = jax.grad(lambda q: jnp.sum(attnax.dot_product_attention(
        q, k, v, return_residual=True, implementation="standard")[1].astype(f32)))(q)
    q4, k4, v4 = (jnp.swapaxes(x, 1, 2).astype(f32) for x in (q, k, v))
    g_kernel = jax.grad(lambda q: jnp.sum(standard_attention(q, k4, v4, return_lse=True)[1]))(q4)
    return ours, ref, g, g_kernel

  (out, res), (ref_out, ref_res), g, g_kernel = run(q, k, v)
  assert res.dtype == bf16 and res.shape == (2, 16, 2)
  assert_close(res, ref_res, atol=1e-2, rtol=1e-2, what="residual")
  assert_close(out, ref_out, atol=1e-2, rtol=1e-2)
  assert not np.asarray(g, np.float32).any()
  assert np.asarray(g_kernel).any()


def test_arguments_become_block_sparse_mods():
  """Mask array, causal, window and lengths become mods whose mask is jax.nn's (its
  _apply_masks, written out in numpy) and whose tiles are exact: block kernels skip the empty
  ones."""
  b, n, t, s = 2, 4, 128, 96
  i, j = np.arange(t).reshape(1, 1, -1, 1), np.arange(s).reshape(1, 1, 1, -1)
  mask = np.random.default_rng(56).random((b, 1, t, s)) < 0.7
  mask[:, :, :, 64:] = False
  lengths = np.array([20, 50])
  bi = np.arange(b).reshape(-1, 1, 1, 1)
  cases = {
      "mask": (dict(mask=jnp.asarray(mask)), mask),
      "causal": (dict(is_causal=True), j <= i),
      "window": (dict(local_window_size=(8, 4)), (i - j <= 8) & (j - i <= 4)),
      "kv_lengths": (dict(key_value_seq_lengths=jnp.asarray(lengths, jnp.int32)),
                     j < lengths[bi]),
      "q_lengths": (dict(query_seq_lengths=jnp.asarray(lengths, jnp.int32)), i < lengths[bi]),
  }
  mods = {name: to_mods((b, n, t, s), **kw)[1] for name, (kw, _) in cases.items()}
  dense, tiles = jax.jit(lambda ms: (
      {k: attnax.kernels.mask_mod_to_boolean_mask(m, b, n, t, s) for k, m in ms.items()},
      {k: create_block_mask(m, q_len=t, kv_len=s, block_q=32, block_k=32, batch=b,
                            heads=n).tiles for k, m in ms.items()}))(mods)
  for name, (_, want) in cases.items():
    want = np.broadcast_to(want, (b, n, t, s))
    np.testing.assert_array_equal(np.asarray(dense[name]), want, err_msg=name)
    bm = BlockMask(tiles[name], *[None] * 8, block_q=32, block_k=32, q_len=t, kv_len=s)
    np.testing.assert_array_equal(_tiles_bh(bm, b, n), _expected_tiles(want, 32, 32),
                                  err_msg=name)
    assert (np.asarray(bm.tiles) == EMPTY).any(), name


def test_implementation_names_and_default():
  from attnax.nn import IMPLEMENTATIONS, resolve_implementation
  q = k = v = jnp.zeros((1, 2, 8, 16))
  assert resolve_implementation("xla", q, k, v) is standard_attention
  for name, kernel in IMPLEMENTATIONS.items():
    assert resolve_implementation(name, q, k, v) is kernel
  want = pallas_flash_attention if jax.default_backend() == "gpu" else flash_attention
  assert resolve_implementation(None, q, k, v) is want
  fn = IMPLS["flash"]
  assert resolve_implementation(fn, q, k, v) is fn
  for bad, match in (("cudnn", "cudnn"), ("fast", "unknown implementation"),
                     (3, "AttentionFn")):
    with pytest.raises(ValueError, match=match):
      resolve_implementation(bad, q, k, v)


def test_bad_inputs_name_arguments_and_shapes():
  q, k, v = rand(80, (2, 8, 4, 16)), rand(81, (2, 10, 2, 16)), rand(82, (2, 10, 2, 16))
  f = attnax.dot_product_attention
  bad = {
      r"query, key and value must have rank 3 or 4.*\(1, 2, 8, 4, 16\)":
          lambda: f(q[None], k[None], v[None]),
      r"rank.*\(8, 4, 16\)": lambda: f(q[0], k, v),
      r"head_dim.*\(2, 10, 2, 8\)": lambda: f(q, k[..., :8], v),
      r"key and value lengths.*\(2, 9, 2, 16\)": lambda: f(q, k, v[:, :9]),
      r"multiple of the key/value heads \(2\).*\(2, 8, 3, 16\)": lambda: f(q[:, :, :3], k, v),
      r"share a dtype": lambda: f(q.astype(bf16), k, v),
      r"floating point": lambda: f(q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32)),
      r"bias of shape \(2, 4, 8, 9\)": lambda: f(q, k, v, bias=jnp.zeros((2, 4, 8, 9))),
      r"mask of shape \(3, 1, 8, 10\)": lambda: f(q, k, v, mask=jnp.ones((3, 1, 8, 10), bool)),
      r"mask must be boolean.*float32": lambda: f(q, k, v, mask=jnp.ones((8, 10))),
      r"query_seq_lengths.*\(B,\) = \(2,\).*\(3,\)":
          lambda: f(q, k, v, query_seq_lengths=jnp.ones(3, jnp.int32)),
      r"key_value_seq_lengths.*float32": lambda: f(q, k, v, key_value_seq_lengths=jnp.ones(2)),
      r"local_window_size": lambda: f(q, k, v, local_window_size=(1, 2, 3)),
      r"local_window_mod: left must be >= 0": lambda: f(q, k, v, local_window_size=-1),
      r"scale must be (a )?finite": lambda: f(q, k, v, scale=float("nan")),
  }
  for match, call in bad.items():
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(call)
