"""attnax.flash_sparse: flash-sparse-attention's function names over attnax's kernels.

The wrappers are checked against attnax's kernels called directly on the same (transposed) inputs,
against a float64 numpy reference of flash-sparse-attention's conventions (its test suite's
``_make_mask``: the window and the causal diagonal aligned to the bottom right; ``(B, S, H, D)``
layout; LSE ``(B, H, Sq)``), and the varlen forms against per-sequence calls.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax import flash_sparse as fs
from attnax.kernels import (causal_mod, flash_attention, gated_mod, local_window_mod,
                            standard_attention)
from tests.helpers import rand, rel_err, tol

B, HQ, HKV, D = 2, 4, 2, 8


def fsa_reference(q, k, v, *, is_causal=False, window_size=(None, None), scale=None, alpha=None,
                  delta=None, is_logsigmoid_gate=True, gate_threshold=None, is_adapt_gate=True):
  """flash-sparse-attention's reference maths in float64 numpy, ``(B, S, H, D)`` layout.

  With ``gate_threshold``: gated_mod's rule (a key is hidden when its gate term is below the
  row's largest visible one plus ``log(min(1, thr * adapt))``, adapt the causal visible fraction).
  Returns ``(out (B, Sq, H, Dv), lse (B, H, Sq))``; a query that sees no key gives 0 / -inf.
  """
  q, k, v = (np.asarray(x, np.float64).transpose(0, 2, 1, 3) for x in (q, k, v))
  sq, sk = q.shape[2], k.shape[2]
  g = q.shape[1] // k.shape[1]
  k, v = np.repeat(k, g, 1), np.repeat(v, g, 1)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  s = scale * np.einsum("bhqd,bhkd->bhqk", q, k)
  term = 0.0
  if alpha is not None:
    x = np.asarray(alpha, np.float64)[..., :, None] * np.repeat(
        np.asarray(delta, np.float64), g, 1)[..., None, :]
    term = scale * (-np.logaddexp(0.0, -x) if is_logsigmoid_gate else x)
    s = s + term
  row, col = np.arange(sq)[:, None], np.arange(sk)[None, :]
  aligned = row + sk - sq
  hidden = np.zeros((sq, sk), bool)
  left, right = window_size
  if left is not None or right is not None:
    left = sk if left is None else left
    right = sk if right is None else right
    hidden |= ~((col >= aligned - left) & (col <= aligned + right))
  if is_causal:
    hidden |= col > aligned
  if gate_threshold is not None:
    best = np.where(hidden, -np.inf, term).max(-1, keepdims=True)
    tau = np.full((sq, 1), float(gate_threshold))
    if is_adapt_gate and is_causal:
      tau = tau * np.clip(aligned[:, :1] + 1, 0, sk) / sk
    with np.errstate(divide="ignore", invalid="ignore"):
      hidden = hidden | (term < best + np.log(np.minimum(tau, 1.0)))
  s = np.where(hidden, -np.inf, s)
  m = s.max(-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  p = np.exp(s - m)
  l = p.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bhkd->bhqd", p / np.where(l > 0, l, 1.0), v)
  with np.errstate(divide="ignore"):
    lse = np.where(l[..., 0] > 0, m[..., 0] + np.log(np.where(l > 0, l, 1.0))[..., 0], -np.inf)
  return out.transpose(0, 2, 1, 3), lse


def bshd(seed, sq, sk):
  return (rand(seed, (B, sq, HQ, D)), rand(seed + 1, (B, sk, HKV, D)),
          rand(seed + 2, (B, sk, HKV, D)))


def check(out, lse, ref_out, ref_lse):
  assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
  assert rel_err(out, ref_out) < tol(jnp.float32)
  finite = np.isfinite(ref_lse)
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
  assert rel_err(np.asarray(lse)[finite], ref_lse[finite]) < tol(jnp.float32)


# ----------------------------------------------------------------------------- conventions

# (sq, sk, is_causal, window_size): Sq < Sk and Sq > Sk (the first rows of a bottom-right causal
# mask then see nothing), two-sided and one-sided windows, windows with causal.
CONVENTIONS = [(13, 19, False, (None, None)), (13, 19, True, (None, None)),
               (19, 13, True, (None, None)), (13, 19, False, (3, 2)), (19, 13, True, (4, None)),
               (13, 19, False, (None, 0)), (13, 19, True, (2, 5))]


@functools.lru_cache(maxsize=None)
def _dense(is_causal, window_size, implementation):
  return jax.jit(lambda q, k, v: fs.flash_dense_attn_func(
      q, k, v, is_causal=is_causal, window_size=window_size, return_lse=True,
      implementation=implementation))


@pytest.mark.parametrize("sq,sk,is_causal,window_size", CONVENTIONS)
def test_dense_layout_causal_and_window_conventions(sq, sk, is_causal, window_size):
  q, k, v = bshd(1, sq, sk)
  out, lse = _dense(is_causal, window_size, "standard")(q, k, v)
  check(out, lse, *fsa_reference(q, k, v, is_causal=is_causal, window_size=window_size))


def test_dense_is_the_kernel_on_transposed_inputs():
  q, k, v = bshd(2, 13, 19)
  t = lambda x: jnp.swapaxes(x, 1, 2)
  out, lse = _dense(True, (4, None), "flash")(q, k, v)
  want, want_lse = jax.jit(lambda q, k, v: flash_attention(
      t(q), t(k), t(v), score_mod=local_window_mod(4, 0, 19 - 13), return_lse=True))(q, k, v)
  np.testing.assert_allclose(out, t(want), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-6, atol=1e-6)
  # implementation=None is attnax's choice for the device (flash on CPU).
  o, l = _dense(True, (4, None), None)(q, k, v)
  assert rel_err(o, out) < tol(jnp.float32) and rel_err(l, lse) < tol(jnp.float32)
  # Any AttentionFn as the implementation; softmax_scale is the kernels' scale.
  o = jax.jit(lambda q, k, v: fs.flash_dense_attn_func(
      q, k, v, softmax_scale=0.3, implementation=standard_attention))(q, k, v)
  assert rel_err(o, fsa_reference(q, k, v, scale=0.3)[0]) < tol(jnp.float32)


# ----------------------------------------------------------------------------- gated


def gates(seed, sq, sk):
  return 2.0 * rand(seed, (B, HQ, sq)), 2.0 * rand(seed + 1, (B, HKV, sk))


@pytest.mark.parametrize("is_logsigmoid_gate", [True, False])
def test_gated_matches_the_reference_maths(is_logsigmoid_gate):
  q, k, v = bshd(3, 13, 19)
  alpha, delta = gates(4, 13, 19)
  out, lse = jax.jit(lambda *a: fs.flash_gated_attn_func(
      *a, is_causal=True, is_logsigmoid_gate=is_logsigmoid_gate, return_lse=True,
      implementation="flash"))(q, k, v, alpha, delta)
  check(out, lse, *fsa_reference(q, k, v, is_causal=True, alpha=alpha, delta=delta,
                                 is_logsigmoid_gate=is_logsigmoid_gate))


@pytest.mark.parametrize("slow_checks", [
    False, pytest.param(True, marks=pytest.mark.slow, id="grads")])
def test_gated_threshold_is_gated_mod_with_the_softmax_scale(slow_checks):
  q, k, v = bshd(5, 13, 19)
  alpha, delta = gates(6, 13, 19)
  t = lambda x: jnp.swapaxes(x, 1, 2)
  kw = dict(softmax_scale=0.4, gate_threshold=0.3, is_adapt_gate=True)

  def wrapper(q, k, v, alpha, delta):
    return fs.flash_gated_attn_func(q, k, v, alpha, delta, is_causal=True, return_lse=True,
                                    implementation="standard", **kw)

  def direct(q, k, v, alpha, delta):
    mod = gated_mod(alpha, delta, gate_scale=0.4, gate_threshold=0.3, is_adapt_gate=True,
                    mask_mod=causal_mod(19 - 13))
    return standard_attention(t(q), t(k), t(v), score_mod=mod, scale=0.4, return_lse=True)

  out, lse = jax.jit(wrapper)(q, k, v, alpha, delta)
  want, want_lse = jax.jit(direct)(q, k, v, alpha, delta)
  np.testing.assert_allclose(out, t(want), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-6, atol=1e-6)
  if not slow_checks:
    return
  # Gradients flow to every input through the wrapper, as through the kernel.
  ct = rand(7, out.shape)
  loss = lambda f: lambda *a: jnp.sum(f(*a)[0] * (ct if f is wrapper else t(ct)))
  g = jax.jit(jax.grad(loss(wrapper), argnums=range(5)))(q, k, v, alpha, delta)
  w = jax.jit(jax.grad(loss(direct), argnums=range(5)))(q, k, v, alpha, delta)
  for name, a, b in zip(("query", "key", "value", "alpha", "delta"), g, w):
    assert rel_err(a, b) < tol(jnp.float32), name


# ----------------------------------------------------------------------------- varlen


LENS_Q, LENS_K = (5, 9, 1, 6), (7, 11, 4, 3)


def packed(seed, pad=3):
  """Packed (T, H, D) inputs of LENS_Q / LENS_K with ``pad`` positions of padding past the end."""
  tq, tk = sum(LENS_Q) + pad, sum(LENS_K) + pad
  cu = lambda lens: jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
  return (rand(seed, (tq, HQ, D)), rand(seed + 1, (tk, HKV, D)), rand(seed + 2, (tk, HKV, D)),
          2.0 * rand(seed + 3, (HQ, tq)), 2.0 * rand(seed + 4, (HKV, tk)), cu(LENS_Q), cu(LENS_K))


@pytest.mark.parametrize("kind,kw", [
    ("dense", dict(is_causal=True)),
    ("dense", dict(window_size=(2, 1), seqused=((4, 9, 0, 6), (7, 5, 4, 3)))),
    ("gated", dict(is_causal=True, gate_threshold=0.2, window_size=(6, None),
                   seqused=((5, 7, 1, 6), (7, 11, 2, 3)))),
], ids=["dense_causal", "dense_window_seqused", "gated_causal_threshold"])
def test_varlen_matches_per_sequence_calls(kind, kw):
  q, k, v, alpha, delta, cu_q, cu_k = packed(8)
  kw = dict(kw)
  seqused = kw.pop("seqused", None)
  used_q, used_k = (LENS_Q, LENS_K) if seqused is None else seqused
  extra = {} if seqused is None else dict(seqused_q=jnp.asarray(used_q, jnp.int32),
                                          seqused_k=jnp.asarray(used_k, jnp.int32))

  def varlen(q, k, v, alpha, delta, cu_q, cu_k):   # cu_seqlens traced
    if kind == "dense":
      return fs.flash_dense_attn_varlen_func(q, k, v, cu_q, cu_k, max(LENS_Q), max(LENS_K),
                                             return_lse=True, implementation="flash", **kw,
                                             **extra)
    return fs.flash_gated_attn_varlen_func(q, k, v, alpha, delta, cu_q, cu_k, max(LENS_Q),
                                           max(LENS_K), return_lse=True, implementation="flash",
                                           **kw, **extra)

  out, lse = jax.jit(varlen)(q, k, v, alpha, delta, cu_q, cu_k)
  assert out.shape == q.shape and lse.shape == (q.shape[0], HQ)
  done = np.zeros(q.shape[0], bool)
  for i in range(len(LENS_Q)):
    qs, ks = int(cu_q[i]), int(cu_k[i])
    nq, nk = used_q[i], used_k[i]
    if nq == 0:
      continue
    one = lambda x, s, n: x[None, s:s + n]
    args = (one(q, qs, nq), one(k, ks, nk), one(v, ks, nk))
    if nk == 0:
      want, want_lse = np.zeros((1, nq, HQ, D)), np.full((1, HQ, nq), -np.inf)
    elif kind == "dense":
      want, want_lse = fsa_reference(*args, **kw)
    else:
      want, want_lse = fsa_reference(*args, alpha=alpha[None, :, qs:qs + nq],
                                     delta=delta[None, :, ks:ks + nk], **kw)
    check(out[qs:qs + nq], lse[qs:qs + nq], np.asarray(want[0]), np.asarray(want_lse[0]).T)
    done[qs:qs + nq] = True
  # Padding (past a sequence's used length or past cu_seqlens_q[-1]) outputs 0, lse -inf.
  assert (np.asarray(out)[~done] == 0).all() and (np.asarray(lse)[~done] == -np.inf).all()


# ----------------------------------------------------------------------------- sparse


def _tsa():
  kernels = pytest.importorskip("attnax.kernels")
  if not hasattr(kernels, "threshold_sparse_attention"):
    pytest.skip("attnax.kernels.threshold_sparse_attention is not there yet")
  return kernels.threshold_sparse_attention


def test_sparse_wrapper_calls_threshold_sparse_attention():
  tsa = _tsa()
  q, k, v = bshd(9, 24, 40)
  t = lambda x: jnp.swapaxes(x, 1, 2)
  # softmax_threshold=None: threshold_sparse_attention's default (head_dim / Sk, as
  # flash-sparse-attention's).
  out, lse = jax.jit(lambda q, k, v: fs.flash_sparse_attn_func(
      q, k, v, is_causal=True, return_lse=True))(q, k, v)
  want, want_lse = jax.jit(lambda q, k, v: tsa(
      t(q), t(k), t(v), score_mod=causal_mod(16), return_lse=True))(q, k, v)
  np.testing.assert_allclose(out, t(want), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_sparse_varlen_wrapper_calls_threshold_sparse_attention():
  tsa = _tsa()
  # The same kernel over the packed sequences (one key range per query).
  pq, pk, pv, _, _, cu_q, cu_k = packed(13)
  out = fs.flash_sparse_attn_varlen_func(pq, pk, pv, cu_q, cu_k, 9, 11, is_causal=True,
                                         softmax_threshold=0.5)
  lo, hi, _ = fs.varlen_key_ranges(cu_q, cu_k, total_q=pq.shape[0], total_k=pk.shape[0],
                                   is_causal=True)
  from attnax.kernels.gated import KeyRangeMask
  want = tsa(pq.swapaxes(0, 1)[None], pk.swapaxes(0, 1)[None], pv.swapaxes(0, 1)[None],
             softmax_threshold=0.5, mask_mod=KeyRangeMask(lo, hi, pk.shape[0]))
  np.testing.assert_allclose(out, want[0].swapaxes(0, 1), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_gated_with_softmax_threshold_is_threshold_sparse_attention_with_the_gate():
  tsa = _tsa()
  q, k, v = bshd(14, 24, 40)
  alpha, delta = gates(15, 24, 40)
  t = lambda x: jnp.swapaxes(x, 1, 2)
  out = fs.flash_gated_attn_func(q, k, v, alpha, delta, is_causal=True, softmax_threshold=0.3,
                                 gate_threshold=0.1)
  mod = gated_mod(alpha, delta, gate_scale=D ** -0.5, gate_threshold=0.1, is_adapt_gate=True,
                  mask_mod=causal_mod(16))
  want = tsa(t(q), t(k), t(v), softmax_threshold=0.3, score_mod=mod)
  np.testing.assert_allclose(out, t(want), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_value_errors_naming_them():
  q, k, v = bshd(10, 13, 19)
  alpha, delta = gates(11, 13, 19)
  with pytest.raises(ValueError, match=r"rank 4.*query \(13, 4, 8\)"):
    fs.flash_dense_attn_func(q[0], k[0], v[0])
  with pytest.raises(ValueError, match="multiple"):
    fs.flash_dense_attn_func(q[:, :, :3], k, v)
  with pytest.raises(ValueError, match=r"alpha.*\(2, 4, 13\).*\(2, 4, 12\)"):
    fs.flash_gated_attn_func(q, k, v, alpha[..., :12], delta)
  with pytest.raises(ValueError, match=r"delta.*\(batch, num_kv_heads, seqlen_k\)"):
    fs.flash_gated_attn_func(q, k, v, alpha, delta[:, :1])
  with pytest.raises(ValueError, match="window_size"):
    fs.flash_dense_attn_func(q, k, v, window_size=(-2, 3))
  with pytest.raises(ValueError, match="window_size"):
    fs.flash_dense_attn_func(q, k, v, window_size=4)
  with pytest.raises(ValueError, match="implementation"):
    fs.flash_dense_attn_func(q, k, v, implementation="cudnn")
  with pytest.raises(ValueError, match="gate_threshold"):
    fs.flash_gated_attn_func(q, k, v, alpha, delta, gate_threshold=-1.0)
  pq, pk, pv, pa, pd, cu_q, cu_k = packed(12)
  with pytest.raises(ValueError, match=r"rank 3"):
    fs.flash_dense_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 11)
  with pytest.raises(ValueError, match="seqused_k"):
    fs.flash_dense_attn_varlen_func(pq, pk, pv, cu_q, cu_k, 9, 11, seqused_k=jnp.ones(3, int))
  with pytest.raises(ValueError, match="seqused_q"):
    fs.flash_dense_attn_varlen_func(pq, pk, pv, cu_q, cu_k, 9, 11,
                                    seqused_q=jnp.asarray([6, 9, 1, 6], jnp.int32))
  with pytest.raises(ValueError, match="max_seqlen_k"):
    fs.flash_dense_attn_varlen_func(pq, pk, pv, cu_q, cu_k, 9, 11.0)
  with pytest.raises(ValueError, match="cu_seqlens_k"):
    fs.flash_dense_attn_varlen_func(pq, pk, pv, cu_q, cu_k[:-1], 9, 11)
  with pytest.raises(ValueError, match=r"alpha.*\(num_heads_q, total_seqlen_q\)"):
    fs.flash_gated_attn_varlen_func(pq, pk, pv, pa.T, pd, cu_q, cu_k, 9, 11)


def _softmax_threshold_calls():
  """Each function taking a softmax_threshold, as ``name -> call(threshold)``."""
  q, k, v = bshd(10, 13, 19)
  alpha, delta = gates(11, 13, 19)
  pq, pk, pv, pa, pd, cu_q, cu_k = packed(12)
  return {
      "flash_sparse_attn_func": lambda t: fs.flash_sparse_attn_func(q, k, v, softmax_threshold=t),
      "flash_gated_attn_func": lambda t: fs.flash_gated_attn_func(
          q, k, v, alpha, delta, softmax_threshold=t),
      "flash_sparse_attn_varlen_func": lambda t: fs.flash_sparse_attn_varlen_func(
          pq, pk, pv, cu_q, cu_k, 9, 11, softmax_threshold=t),
      "flash_gated_attn_varlen_func": lambda t: fs.flash_gated_attn_varlen_func(
          pq, pk, pv, pa, pd, cu_q, cu_k, 9, 11, softmax_threshold=t),
  }


def test_softmax_threshold_is_a_probability():
  """softmax_threshold is a probability relative to the running max: a static float in [0, 1];
  above 1 (and below 0, NaN, bools, strings, traced values) is a ValueError naming the function
  and the argument."""
  for name, call in _softmax_threshold_calls().items():
    with pytest.raises(ValueError, match=rf"{name}: softmax_threshold must be in \[0, 1\], "
                                         r"got 1\.5"):
      call(1.5)
    with pytest.raises(ValueError, match=rf"{name}: softmax_threshold must be in \[0, 1\]"):
      call(-0.1)
    with pytest.raises(ValueError, match=rf"{name}: softmax_threshold must be finite"):
      call(float("nan"))
    for bad in (True, "0.5"):
      with pytest.raises(ValueError, match=rf"{name}: softmax_threshold must be a float"):
        call(bad)
    with pytest.raises(ValueError, match=rf"{name}: softmax_threshold must be a static"):
      jax.jit(call)(0.5)
    for ok in (0.0, 1.0):      # the bounds are thresholds: 0 skips nothing, 1 all but the best
      jax.eval_shape(lambda: call(ok))
