"""Every Triton kernel lowers, on a CPU, to a Triton module that verifies.

Interpret mode runs the kernels' jaxprs, not the Triton IR the GPU compiles, so IR that the GPU
refuses (a select whose branches came out with different element types, seen on the H200 in the
threshold kernel) passes the CPU suite unnoticed. Here each kernel is exported for CUDA (the
lowering needs no GPU once the device checks are told it is an sm90) and each Triton module is
run through MLIR's verifier, forward and backward.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnax.kernels as ak
from attnax.kernels import _checks
from attnax.kernels.pallas import TritonConfig

f32 = jnp.float32


@pytest.fixture
def verified_modules(monkeypatch):
  """``lower(fn, *avals)``: exports ``fn`` for CUDA and returns its Triton modules' verifier
  errors (empty when every module verifies) and how many modules were lowered."""
  from jax._src.pallas.triton import lowering, pallas_call_registration as reg

  monkeypatch.setattr(_checks, "gpu_reasons", lambda *a, **k: [])
  sm90 = types.SimpleNamespace(compute_capability="9.0")
  monkeypatch.setattr(reg, "gpu_info_lib", types.SimpleNamespace(get_gpu_info=lambda: sm90))
  original = lowering.lower_jaxpr_to_triton_module
  seen = []

  def checked(*args, **kwargs):
    result = original(*args, **kwargs)
    try:
      result.module.operation.verify()
      seen.append(None)
    except Exception as e:  # noqa: BLE001 - the verifier's message is the test's output
      seen.append(str(e)[:800])
    return result

  monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", checked)

  def lower(fn, *avals):
    seen.clear()
    jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton"),
        jax.export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2")])(*avals)
    return [e for e in seen if e is not None], len(seen)

  return lower


def _qkv(sq=256, sk=256, hq=2, hkv=2, d=64, dtype=f32):
  return (jax.ShapeDtypeStruct((1, hq, sq, d), dtype), jax.ShapeDtypeStruct((1, hkv, sk, d), dtype),
          jax.ShapeDtypeStruct((1, hkv, sk, d), dtype))


def _fwd_bwd(attn):
  """Output and q/k/v gradients of ``attn(q, k, v)``: the forward and both backward kernels."""
  def fn(q, k, v):
    out, pull = jax.vjp(attn, q, k, v)
    return (out,) + pull(jnp.ones_like(out))
  return fn


def _pallas(**kw):
  return lambda q, k, v: ak.pallas_flash_attention(q, k, v, backend="triton", **kw)



CASES = {
    "dense": (_pallas(), {}),
    "causal_alibi_gqa": (_pallas(score_mod=ak.compose_score_mods(
        ak.causal_mod(), ak.alibi_mod(num_heads=4))), dict(hq=4, hkv=2)),
    "documents_ragged": (_pallas(score_mod=ak.document_mask_mod(jnp.asarray(
        np.repeat(np.arange(3), 70)[None]))), dict(sq=210, sk=210)),
    "softcap_bf16": (_pallas(score_mod=ak.softcap_mod(20.0)), dict(dtype=jnp.bfloat16)),
    "dropout": (lambda q, k, v: ak.pallas_flash_attention(
        q, k, v, backend="triton", dropout_rate=0.1, dropout_rng=jax.random.key(0)), {}),
    "threshold_tile": (lambda q, k, v: ak.threshold_sparse_attention(
        q, k, v, softmax_threshold=1e-2, backend="pallas", interpret=False), {}),
    "threshold_row_causal": (lambda q, k, v: ak.threshold_sparse_attention(
        q, k, v, softmax_threshold=1e-2, rule="row", score_mod=ak.causal_mod(),
        backend="pallas", interpret=False), {}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_modules_verify(verified_modules, name):
  attn, shape = CASES[name]
  errors, lowered = verified_modules(_fwd_bwd(attn), *_qkv(**shape))
  assert lowered >= 3, f"{name}: expected forward, dQ and dK/dV Triton modules, got {lowered}"
  assert not errors, f"{name}: Triton IR the GPU would refuse:\n" + "\n".join(errors)


def test_gated_modules_verify(verified_modules):
  q, k, v = _qkv()
  alpha = jax.ShapeDtypeStruct((1, 2, 256), f32)
  delta = jax.ShapeDtypeStruct((1, 2, 256), f32)

  def fn(q, k, v, alpha, delta):
    attn = lambda q, k, v, a, d: ak.pallas_flash_attention(
        q, k, v, score_mod=ak.gated_mod(a, d), backend="triton")
    out, pull = jax.vjp(attn, q, k, v, alpha, delta)
    return (out,) + pull(jnp.ones_like(out))

  errors, lowered = verified_modules(fn, q, k, v, alpha, delta)
  assert lowered >= 3 and not errors, errors


@pytest.mark.parametrize("mod_loads", ["clamp", "masked"])
def test_mod_array_gradient_modules_verify(verified_modules, mod_loads):
  # The dQ kernel's atomic adds of the bias table's (rows, cols), the slopes' scalar and the
  # gates' row and column cotangents, ragged (210 = 1.6 tiles of 128); with a closure mask beside
  # them (the pair is traced on placeholders: no load may be a tracer of that inner trace, which
  # the GPU's pallas_call refused as captured constants).
  q, k, v = _qkv(sq=210, sk=210)
  ids = jnp.asarray(np.arange(210) // 100, jnp.int32)
  bias = jax.ShapeDtypeStruct((1, 2, 210, 210), f32)
  slopes = jax.ShapeDtypeStruct((2,), f32)
  alpha = jax.ShapeDtypeStruct((1, 2, 210), f32)

  def fn(q, k, v, bias, slopes, alpha):
    def attn(q, k, v, bias, slopes, alpha):
      mod = ak.compose_score_mods(ak.causal_mod(), ak.additive_bias_mod(bias),
                                  ak.alibi_mod(slopes=slopes), ak.gated_mod(alpha, alpha))
      return ak.pallas_flash_attention(q, k, v, score_mod=mod, backend="triton",
                                       mask_mod=lambda b, h, i, j: ids[i] == ids[j],
                                       config=TritonConfig(mod_loads=mod_loads))
    out, pull = jax.vjp(attn, q, k, v, bias, slopes, alpha)
    return (out,) + pull(jnp.ones_like(out))

  errors, lowered = verified_modules(fn, q, k, v, bias, slopes, alpha)
  assert lowered >= 3 and not errors, errors


def test_score_loads_place_each_cotangent_where_it_is_cheapest():
  # bias (q, kv) tiles: atomics per tile; slopes[h]: one sum per program; alpha[b, h, q]: rows
  # summed by the dQ kernel; delta[b, h // g, k]: columns summed by the dK/dV kernel.
  from attnax.kernels import operands as ops_lib
  from attnax.kernels import score_mods as sm
  from attnax.kernels.pallas import triton as tk
  bias, slopes = jnp.zeros((1, 4, 64, 64)), jnp.zeros((4,))
  alpha, delta = jnp.zeros((1, 4, 64)), jnp.zeros((1, 2, 64))
  mod = ak.compose_score_mods(ak.additive_bias_mod(bias), ak.alibi_mod(slopes=slopes),
                              ak.gated_mod(alpha, delta))
  score_fn, mask_fn = sm.resolve_mods(mod, None, batch=1, heads=4, q_len=64, kv_len=64)
  mods, values = ops_lib.collect(score_fn, mask_fn)
  plan = types.SimpleNamespace(mods=mods)
  leaves = ops_lib.ModOperands.kernel_operands(values)
  kinds = {}
  for index, kind, _ in tk.score_loads(plan, leaves, tuple(range(len(values))), 32, 16):
    kinds.setdefault(tuple(values[index].shape), set()).add(kind)
  assert kinds == {(1, 4, 64, 64): {tk.TILE}, (4,): {tk.SCALAR}, (1, 4, 64): {tk.Q_ROWS},
                   (1, 2, 64): {tk.KV_COLS}}, kinds


@pytest.mark.parametrize("quantized", [False, True])
def test_paged_modules_verify(verified_modules, quantized):
  # The paged decode kernel (Triton) and its int8 variant; page 16, 8 pages a sequence, GQA 4/2.
  dtype = jnp.int8 if quantized else jnp.bfloat16
  q = jax.ShapeDtypeStruct((2, 4, 1, 64), jnp.bfloat16)
  pages = jax.ShapeDtypeStruct((2, 32, 16, 64), dtype)
  tables = jax.ShapeDtypeStruct((2, 8), jnp.int32)
  lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
  scales = jax.ShapeDtypeStruct((2, 32, 16), f32)

  def fn(q, k_pages, v_pages, tables, lengths, k_scales, v_scales):
    extra = dict(k_scales=k_scales, v_scales=v_scales) if quantized else {}
    return ak.paged_attention(q, k_pages, v_pages, tables, lengths, backend="pallas", **extra)

  errors, lowered = verified_modules(fn, q, pages, pages, tables, lengths, scales, scales)
  assert lowered >= 1 and not errors, errors


def test_mosaic_plan_with_a_differentiated_bias_runs_mosaic_or_triton_backward(verified_modules):
  # A differentiated bias table on the Mosaic plan: the Mosaic forward (f32 residual output)
  # and backward (the table's cotangent in its dQ kernel) lower no Triton module; with
  # MosaicConfig(bwd="triton") the Triton dQ and dK/dV kernels (with the bias's atomic adds)
  # run that backward, both lowered for an sm90 on a CPU.
  from attnax.kernels.pallas import mosaic_gpu as mg
  bf = jnp.bfloat16
  q = k = v = jax.ShapeDtypeStruct((1, 2, 256, 128), bf)
  bias = jax.ShapeDtypeStruct((1, 2, 256, 256), f32)

  def fn(q, k, v, bias, config=None):
    attn = lambda q, k, v, bias: ak.pallas_flash_attention(
        q, k, v, score_mod=ak.additive_bias_mod(bias), backend="mosaic", config=config)
    out, pull = jax.vjp(attn, q, k, v, bias)
    return (out,) + pull(jnp.ones_like(out))

  triton_bwd = dataclasses.replace(mg.default_config(128, bf, masked=True), bwd="triton")
  for config, modules in ((None, 0), (triton_bwd, 2)):
    errors, lowered = verified_modules(functools.partial(fn, config=config), q, k, v, bias)
    assert lowered == modules and not errors, (config, lowered, errors)
    assert jax.eval_shape(functools.partial(fn, config=config), q, k, v,
                          bias)[-1].shape == (1, 2, 256, 256)
