"""Tests for attnax.kernels._checks: bad input raises ValueError at trace time, naming the argument
and the shapes (DESIGN section 3), never silently broadcasting.

Checked through ``check_qkv`` directly and through ``standard_attention`` (eagerly and under jit,
where the error must come at trace time). That every kernel raises them (and checks its mods'
arrays against the inputs) is tests/kernels/test_conformance.py::test_bad_inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.kernels import _checks, standard_attention
from attnax.kernels import score_mods as sm
from attnax import kernels
from tests.helpers import random_qkv

f32 = jnp.float32


def arrays(qs, ks, vs, dtypes=(f32, f32, f32)):
  # Zeros are fine here: only shapes and dtypes matter, nothing is computed.
  return tuple(jnp.zeros(s, d) for s, d in zip((qs, ks, vs), dtypes))


def shapes_in(msg, *arrs):
  return all(str(tuple(a.shape)) in msg for a in arrs)


GOOD = ((2, 4, 5, 8), (2, 2, 7, 8), (2, 2, 7, 6))

# (name, q shape, k shape, v shape, argument/topic the message must name)
BAD_SHAPES = [
    ("q rank 3", (2, 5, 8), GOOD[1], GOOD[2], "q"),
    ("k rank 5", GOOD[0], (1, 2, 2, 7, 8), GOOD[2], "k"),
    ("v rank 2", GOOD[0], GOOD[1], (7, 6), "v"),
    ("batch q/k", (3, 4, 5, 8), GOOD[1], GOOD[2], "batch"),
    ("batch v", GOOD[0], GOOD[1], (1, 2, 7, 6), "batch"),
    ("head_dim q/k", (2, 4, 5, 16), GOOD[1], GOOD[2], "head_dim"),
    ("seq k/v", GOOD[0], GOOD[1], (2, 2, 9, 6), "sequence length"),
    ("heads k/v", GOOD[0], GOOD[1], (2, 4, 7, 6), "heads"),
    ("Hq % Hkv", (2, 3, 5, 8), GOOD[1], GOOD[2], "kv heads"),
    ("Hkv > Hq", (2, 2, 5, 8), (2, 4, 7, 8), (2, 4, 7, 6), "kv heads"),
    ("empty seq", (2, 4, 0, 8), GOOD[1], GOOD[2], "empty"),
]


@pytest.mark.parametrize("name,qs,ks,vs,word", BAD_SHAPES, ids=[c[0] for c in BAD_SHAPES])
def test_bad_shapes(name, qs, ks, vs, word):
  q, k, v = arrays(qs, ks, vs)
  with pytest.raises(ValueError) as e:
    _checks.check_qkv(q, k, v, kernel="my_kernel")
  msg = str(e.value)
  assert word in msg and "my_kernel" in msg
  assert shapes_in(msg, q, k, v), msg
  # The same error from a kernel, eagerly and at trace time under jit.
  with pytest.raises(ValueError, match="standard_attention") as e:
    standard_attention(q, k, v)
  assert shapes_in(str(e.value), q, k, v)
  with pytest.raises(ValueError) as e:
    jax.jit(standard_attention).lower(q, k, v)
  assert shapes_in(str(e.value), q, k, v)


@pytest.mark.parametrize("dtypes,bad", [
    ((jnp.int32, jnp.int32, jnp.int32), "q"),
    ((f32, jnp.int8, f32), "k"),
    ((f32, f32, jnp.bool_), "v"),
    ((jnp.float64, jnp.float64, jnp.float64), "q"),
])
def test_unsupported_dtype(dtypes, bad):
  with jax.enable_x64(True):
    q, k, v = arrays(*GOOD, dtypes=dtypes)
    with pytest.raises(ValueError) as e:
      _checks.check_qkv(q, k, v, kernel="my_kernel")
  msg = str(e.value)
  assert f"{bad} has unsupported dtype" in msg and "my_kernel" in msg
  assert shapes_in(msg, q, k, v), msg


def test_float64_allowed_only_for_the_reference():
  with jax.enable_x64(True):
    q, k, v = arrays(*GOOD, dtypes=(jnp.float64,) * 3)
    assert _checks.check_qkv(q, k, v, allow_f64=True) == (2, 4, 2, 5, 7, 8, 6)
    assert standard_attention(q, k, v).dtype == jnp.float64


@pytest.mark.parametrize("dtypes", [(f32, jnp.bfloat16, f32), (jnp.float16, jnp.float16, f32),
                                    (jnp.bfloat16, jnp.float16, jnp.bfloat16)])
def test_mixed_dtypes(dtypes):
  q, k, v = arrays(*GOOD, dtypes=dtypes)
  with pytest.raises(ValueError) as e:
    _checks.check_qkv(q, k, v, kernel="my_kernel")
  msg = str(e.value)
  assert "share a dtype" in msg
  assert all(jnp.dtype(d).name in msg for d in dtypes)
  assert shapes_in(msg, q, k, v), msg
  with pytest.raises(ValueError, match="share a dtype"):
    standard_attention(q, k, v)


def test_not_an_array():
  q, k, v = arrays(*GOOD)
  with pytest.raises(ValueError, match="k must be an array"):
    _checks.check_qkv(q, [[1.0]], v)
  with pytest.raises(ValueError, match="q must be an array"):
    standard_attention(None, k, v)


def test_good_shapes_pass_and_return_sizes():
  q, k, v = arrays(*GOOD)
  assert _checks.check_qkv(q, k, v) == (2, 4, 2, 5, 7, 8, 6)
  for dt in (f32, jnp.bfloat16, jnp.float16):
    q, k, v = arrays(*GOOD, dtypes=(dt,) * 3)
    _checks.check_qkv(q, k, v)
  # MQA and numpy inputs are fine
  q, k, v = arrays((1, 8, 3, 4), (1, 1, 3, 4), (1, 1, 3, 4))
  _checks.check_qkv(np.asarray(q), np.asarray(k), np.asarray(v))


# ----------------------------------------------------------------------------- mods


def _score3(score, b, h):
  return score


def _mask5(score, b, h, i, j):
  return j <= i


class NotAMod:
  pass


@pytest.mark.parametrize("kwargs,name", [
    (dict(score_mod=_score3), "score_mod"),
    (dict(score_mod=lambda b, h, i, j: i >= j), "score_mod"),   # a mask mod passed as score_mod
    (dict(mask_mod=_mask5), "mask_mod"),
    (dict(mask_mod=lambda b, h, i: True), "mask_mod"),
    (dict(score_mod=NotAMod()), "score_mod"),
    (dict(mask_mod=sm.causal_mod()), "mask_mod"),               # a score mod passed as mask_mod
])
def test_bad_mod_signature(kwargs, name):
  q, k, v = arrays(*GOOD)
  with pytest.raises(ValueError) as e:
    standard_attention(q, k, v, **kwargs)
  msg = str(e.value)
  assert name in msg
  if "callable" not in msg:
    assert ("(score, b, h, q_idx, kv_idx)" if name == "score_mod" else "(b, h, q_idx, kv_idx)") in msg
  with pytest.raises(ValueError, match=name):
    jax.jit(lambda q, k, v: standard_attention(q, k, v, **kwargs)).lower(q, k, v)


def test_good_mod_signatures_pass():
  q, k, v = arrays(*GOOD)
  for score_mod in (None, sm.causal_mod(), lambda *a: a[0], lambda s, b, h, i, j, extra=1: s):
    sm.check_mod(score_mod, 5, "score_mod")
  for mask_mod in (None, sm.CausalMask(), lambda b, h, i, j: i >= j, lambda *args: True):
    sm.check_mod(mask_mod, 4, "mask_mod")
  standard_attention(q, k, v, score_mod=lambda *a: a[0], mask_mod=lambda *a: True)


# ----------------------------------------------------------------------------- scale, blocks, lse


def test_default_scale():
  assert _checks.default_scale(None, 64) == 64 ** -0.5
  assert _checks.default_scale(0.5, 64) == 0.5
  assert _checks.default_scale(np.float32(0.25), 64) == 0.25
  with pytest.raises(ValueError, match="scale"):
    jax.jit(lambda s: _checks.default_scale(s, 4))(0.5)
  with pytest.raises(ValueError, match="scale"):
    _checks.default_scale("abc", 4)


def test_static_float():
  sf = _checks.static_float
  assert sf(0.5, "x") == 0.5 and type(sf(np.float32(0.25), "x")) is float
  assert sf(2, "x") == 2.0 and sf(jnp.asarray(0.5), "x") == 0.5 and sf(np.asarray(3), "x") == 3.0
  assert sf(None, "x", allow_none=True) is None
  assert sf(0.0, "x", low=0.0) == 0.0 and sf(1.0, "x", high=1.0) == 1.0
  cases = [
      (dict(value=None), r"^x must be a float \(a static Python number\), got NoneType None$"),
      (dict(value=True, fn="f"), r"^f: x must be a float .*got bool True"),
      (dict(value="0.5"), r"x must be a float .*got str '0.5'"),
      (dict(value=np.array([0.5])), r"x must be a float .*got ndarray"),
      (dict(value=np.bool_(True)), r"x must be a float"),
      (dict(value=float("nan"), fn="f"), r"^f: x must be finite, got nan$"),
      (dict(value=float("inf"), low=0.0), r"^x must be finite and >= 0, got inf$"),
      (dict(value=0.0, low=0.0, low_inclusive=False), r"^x must be > 0, got 0\.0$"),
      (dict(value=1.0, low=0.0, high=1.0, high_inclusive=False), r"^x must be in \[0, 1\), got 1"),
      (dict(value=1.5, low=0.0, high=1.0, fn="f"), r"^f: x must be in \[0, 1\], got 1\.5$"),
      (dict(value=-2.0, high=-3.0), r"^x must be <= -3, got -2\.0$"),
  ]
  for kw, match in cases:
    with pytest.raises(ValueError, match=match):
      sf(kw.pop("value"), "x", **kw)
  with pytest.raises(ValueError, match=r"^f: x must be a static Python float or None, got a traced"):
    jax.jit(lambda t: sf(t, "x", fn="f", allow_none=True))(0.5)


def test_default_scale_names_the_argument():
  with pytest.raises(ValueError, match=r"^g: softmax_scale must be finite, got inf$"):
    _checks.default_scale(float("inf"), 4, name="softmax_scale", fn="g")
  with pytest.raises(ValueError, match=r"^scale must be a float"):
    _checks.default_scale(False, 4)


@pytest.mark.parametrize("value", [0, -1, 2.5, "8", None, True])
def test_check_block_rejects(value):
  with pytest.raises(ValueError, match="block_q"):
    _checks.check_block("block_q", value)


def test_check_block_accepts():
  assert _checks.check_block("block_q", 64) == 64


def test_check_lse():
  q = jnp.zeros((2, 4, 5, 8))
  _checks.check_lse(jnp.zeros((2, 4, 5)), q)
  for bad in ((2, 4, 5, 1), (2, 4, 6), (4, 5)):
    with pytest.raises(ValueError, match="lse") as e:
      _checks.check_lse(jnp.zeros(bad), q)
    assert str(bad) in str(e.value) and str((2, 4, 5)) in str(e.value)


# ----------------------------------------------------------------------------- mod arrays vs inputs


def _qkv_for(b=2, hq=4, hkv=2, sq=5, sk=7):
  return arrays((b, hq, sq, 8), (b, hkv, sk, 8), (b, hkv, sk, 8))


@pytest.mark.parametrize("mod,what", [
    (sm.document_mask_mod(jnp.zeros((2, 4), jnp.int32)), "doc_ids"),            # Sq = 5 > 4
    (sm.document_mask_mod(jnp.zeros((5,), jnp.int32), jnp.zeros((6,), jnp.int32)), "kv_doc_ids"),
    (sm.document_mask_mod(jnp.zeros((3, 9), jnp.int32)), "doc_ids"),            # batch 3 != 2
    (sm.alibi_mod(num_heads=2), "ALiBi slopes"),                                 # Hq = 4
    (sm.alibi_mod(slopes=jnp.ones(8)), "ALiBi slopes"),
    (sm.prefix_lm_mod(jnp.array([1, 2, 3])), "prefix_length"),
    (sm.additive_bias_mod(jnp.zeros((4, 7))), "bias"),                           # Sq = 5 > 4
    (sm.additive_bias_mod(jnp.zeros((2, 2, 5, 7))), "bias"),                     # heads 2 != 4
    (sm.additive_bias_mod(jnp.zeros((3, 1, 1, 7))), "bias"),
    # nested inside a composition
    (sm.compose_score_mods(sm.causal_mod(), sm.alibi_mod(num_heads=3)), "ALiBi slopes"),
])
def test_mod_arrays_must_fit_the_inputs(mod, what):
  """Mods index their arrays with clamping gathers: a mismatch must raise, not be misread."""
  q, k, v = _qkv_for()
  with pytest.raises(ValueError) as e:
    standard_attention(q, k, v, score_mod=mod)
  msg = str(e.value)
  assert "score_mod" in msg and what in msg and "q_len=5" in msg and "kv_len=7" in msg
  leaves = [x for x in jax.tree.leaves(mod) if x.ndim]
  assert any(str(tuple(x.shape)) in msg for x in leaves), msg
  with pytest.raises(ValueError, match=what):
    jax.jit(lambda q, k, v: standard_attention(q, k, v, score_mod=mod)).lower(q, k, v)


def test_mask_mod_arrays_checked_too():
  q, k, v = _qkv_for()
  with pytest.raises(ValueError, match="mask_mod: doc_ids"):
    standard_attention(q, k, v, mask_mod=sm.DocumentMask(jnp.zeros((1, 3), jnp.int32),
                                                         jnp.zeros((1, 7), jnp.int32)))
  from attnax.kernels import create_block_mask
  with pytest.raises(ValueError, match="kv_doc_ids"):
    create_block_mask(sm.DocumentMask(jnp.zeros((1, 16), jnp.int32), jnp.zeros((1, 10), jnp.int32)),
                      q_len=16, kv_len=16, block_q=8, block_k=8)


@pytest.mark.parametrize("mod", [
    sm.document_mask_mod(jnp.zeros((9,), jnp.int32)),               # longer than Sq, Sk: fine
    sm.document_mask_mod(jnp.zeros((1, 5), jnp.int32), jnp.zeros((2, 7), jnp.int32)),
    sm.alibi_mod(num_heads=4), sm.alibi_mod(slopes=jnp.ones(1)),
    sm.prefix_lm_mod(3), sm.prefix_lm_mod(jnp.array([1, 2])),
    sm.additive_bias_mod(jnp.zeros((5, 7))), sm.additive_bias_mod(jnp.zeros((2, 4, 1, 7))),
    sm.additive_bias_mod(jnp.zeros((16, 16))),                       # a table for longer inputs
    lambda s, b, h, i, j: s,                                         # user functions: not inspected
])
def test_mod_arrays_that_fit(mod):
  q, k, v = _qkv_for()
  sm.check_mod_shapes(mod, batch=2, heads=4, q_len=5, kv_len=7)
  out = standard_attention(q, k, v, score_mod=mod)
  assert out.shape == (2, 4, 5, 8)


# ----------------------------------------------------------------------------- options and sizes


def _bad_calls():
  q, k, v = random_qkv(60, batch=1, q_heads=2, kv_heads=1, q_len=20, kv_len=20, head_dim=16)
  key = jax.random.key(0)
  return {
      "causal_mod float offset": (lambda: sm.causal_mod(1.5), "offset"),
      "causal_mod bool offset": (lambda: sm.causal_mod(True), "offset"),
      "causal_mod traced offset": (lambda: jax.jit(sm.causal_mod)(3), "traced"),
      "window float": (lambda: sm.sliding_window_mod(2.7), "window_size"),
      "block_q 0": (lambda: kernels.create_block_mask(None, q_len=16, kv_len=16, block_q=0),
                    "block_q"),
      "block_k bool": (lambda: kernels.create_block_mask(None, q_len=16, kv_len=16,
                                                         block_k=True), "block_k"),
      "q_len float": (lambda: kernels.create_block_mask(None, q_len=16.5, kv_len=16), "q_len"),
      "empty batch": (lambda: standard_attention(q[:0], k[:0], v[:0]), "empty"),
      "empty heads": (lambda: standard_attention(q[:, :0], k, v), "empty"),
      "scale nan": (lambda: standard_attention(q, k, v, scale=float("nan")), "scale"),
      "scale bool": (lambda: kernels.flash_attention(q, k, v, scale=True), "scale"),
      "pallas list input": (lambda: kernels.pallas_flash_attention(q.tolist(), k, v),
                            "q must be an array"),
      "pallas float64 numpy": (lambda: kernels.pallas_flash_attention(
          np.asarray(q, np.float64), k, v), "q has unsupported dtype float64"),
      "pallas num_warps 0": (lambda: kernels.pallas_flash_attention(q, k, v, num_warps=0),
                             "num_warps must be a positive int"),
      "softcap inf": (lambda: kernels.pallas_flash_attention(q, k, v, softcap=float("inf")),
                      "cap must be finite"),
      "favor negative scale": (lambda: kernels.linear_attention(
          q, k, v, feature_map="softmax", key=key, scale=-1.0), "scale"),
      "traced dropout_rate": (lambda: jax.jit(lambda r: standard_attention(
          q, k, v, dropout_rate=r, dropout_rng=key))(0.1), "dropout_rate"),
      "aether epsilon=0 and threshold": (lambda: kernels.aether_attention(
          q, k, v, epsilon=0, threshold=1.0), "epsilon"),
  }


@pytest.mark.parametrize("case", sorted(_bad_calls()))
def test_options_and_sizes_raise(case):
  call, word = _bad_calls()[case]
  with pytest.raises(ValueError, match=word):
    call()


def test_huge_offsets_and_blocks_are_clipped():
  """causal_mod(2**31 - 1) sees every key (no int32 overflow); a block larger than the sequence is
  one tile."""
  q, k, v = random_qkv(61, batch=1, q_heads=2, kv_heads=1, q_len=20, kv_len=24, head_dim=16)
  ref = standard_attention(q, k, v)
  for kernel in (standard_attention, kernels.flash_attention):
    out = kernel(q, k, v, score_mod=sm.causal_mod(2 ** 31 - 1))
    assert float(jnp.max(jnp.abs(out - ref))) == 0.0
  out = kernels.aether_attention(q, k, v, block_k=2 ** 40, implementation="flash")
  assert float(jnp.max(jnp.abs(out - ref))) < 1e-5
