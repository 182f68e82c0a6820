#!/usr/bin/env python3
"""Where the int8 paged decode spends its time (H200 diagnosis, not a benchmark table).

The int8 path reads half the bytes of bf16 but streamed at 68% of bf16's rate (BENCHMARKS.md,
fifth session). Suspect: the int8 -> bf16 conversion, which Triton lowers to ``cvt.rn.f32.s8``
(a quarter-rate conversion) per element. This times, at B=32, 16k (Hq=32, Hkv=8, D=128, pages of
16), the kernel with its int8 cast swapped for integer-ALU conversions (the magic-number trick:
``bits(2^23 + 128 + x) - (2^23 + 128)`` is ``x`` exactly, in f32; then a rounding or a truncating
f32 -> bf16), at a few configs, beside bf16 pages. Prints time, KV GB/s, tokens/s, error vs the
pure-JAX backend.

  PYTHONPATH=$PWD python3 benchmarks/diag_paged_int8.py     # VARIANTS=astype,int8dots to pick

Measured 2026-12-03 (BENCHMARKS.md, eighth session): the integer-ALU conversions are no faster
than the cast (1.23-1.24x bf16's tokens/s against 1.28-1.30x), and int8dots reaches 1.60x.
"""
import dataclasses, sys, os
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax, jax.numpy as jnp
from jax import lax
from bench_paged import Point, make_inputs, attnax_fn, rel
from bench_attention import time_fn
from attnax.kernels.paged import pallas as pk

def magic_f32(x, dtype):
  u = x.astype(jnp.int32) + 0x4B000080
  return (lax.bitcast_convert_type(u, jnp.float32) - 8388736.0).astype(dtype)

def magic_trunc(x, dtype):
  if dtype != jnp.bfloat16:
    return magic_f32(x, dtype)
  u = x.astype(jnp.int32) + 0x4B000080
  f = lax.bitcast_convert_type(u, jnp.float32) - 8388736.0
  hi = lax.shift_right_logical(lax.bitcast_convert_type(f, jnp.uint32), jnp.uint32(16))
  return lax.bitcast_convert_type(hi.astype(jnp.uint16), jnp.bfloat16)

def timed(fn, args):
  out = jax.block_until_ready(fn(*args))
  t, _ = time_fn(fn, [args], budget_s=0.3, first_out=out)
  return t.median_s, out

p8, p16 = Point(32, 16384, kv="int8"), Point(32, 16384)
a8, a16 = make_inputs(p8), make_inputs(p16)
ref8 = jax.jit(lambda *a: attnax_fn("jax")(*a))(*a8)
t16, _ = timed(attnax_fn("pallas"), a16)
print(f"bf16 default: {t16*1e3:.3f} ms {p16.kv_bytes/t16/1e9:.0f} GB/s {32/t16:.3g} tok/s", flush=True)
def report(vname, cname, cfg):
  try:
    t, out = timed(attnax_fn("pallas", cfg), a8)
    print(f"int8 {vname:12s} {cname}: {t*1e3:.3f} ms {p8.kv_bytes/t/1e9:.0f} GB/s "
          f"{32/t:.3g} tok/s  x bf16 {t16/t:.2f}  err {rel(out, ref8):.2e}", flush=True)
  except Exception as e:
    print(f"int8 {vname} {cname}: FAIL {str(e).splitlines()[0][:200]}", flush=True)

# Kernel variants by source patch of pk._kernel (diagnosis only; the library keeps its kernel):
#   astype: the kernel as it is; magic_f32 / magic_trunc: the conversions above;
#   int8dots: both matmuls on int8 operands (q and p cast to int8: WRONG numbers), the speed
#     with no conversion at all, an upper bound for any dequantisation scheme;
#   qint8: q quantised per row to int8 (scale max|q| / 127), q k^T as an int8 matmul, V converted
#     (floor(x + 0.5): Pallas Triton has no lowering for round).
import inspect, textwrap
src = textwrap.dedent(inspect.getsource(pk._kernel))
conv = "      k, v = k.astype(compute_dtype), v.astype(compute_dtype)\n"
dot = "    sc = lax.dot_general(q, k, _NT, preferred_element_type=f32) * scale\n"
pv = "    acc = acc * alpha[:, None] + lax.dot(p, v, preferred_element_type=f32)\n"
assert conv in src and dot in src and pv in src
variants = {
  "astype": src,
  "magic_f32": src.replace(conv, "      k, v = magic_f32(k, compute_dtype), magic_f32(v, compute_dtype)\n"),
  "magic_trunc": src.replace(conv, "      k, v = magic_trunc(k, compute_dtype), magic_trunc(v, compute_dtype)\n"),
  "int8dots": src.replace(conv, "").replace(dot,
      "    sc = lax.dot_general(q.astype(jnp.int8), k, _NT, preferred_element_type=jnp.int32).astype(f32) * scale\n"
  ).replace("    p = tiles.low_precision(p, v.dtype)\n", "").replace(pv,
      "    acc = acc * alpha[:, None] + lax.dot((p * 100).astype(jnp.int8), v, preferred_element_type=jnp.int32).astype(f32)\n"),
  "qint8": src.replace("  q = q_ref[...]\n  compute_dtype = q.dtype\n",
      "  q = q_ref[...]\n  compute_dtype = q.dtype\n"
      "  q_scale = jnp.maximum(jnp.max(jnp.abs(q.astype(f32)), axis=1, keepdims=True), 1e-30) / 127.0\n"
      "  q = jnp.floor(q.astype(f32) / q_scale + 0.5).astype(jnp.int8)\n"
  ).replace(conv, "      v = v.astype(compute_dtype)\n").replace(dot,
      "    sc = lax.dot_general(q, k, _NT, preferred_element_type=jnp.int32).astype(f32) * (scale * q_scale)\n"),
}
cfgs = [("bk128 s5", pk.INT8_CONFIG), ("bk128 s4", dataclasses.replace(pk.INT8_CONFIG, num_stages=4)),
        ("bk128 s3", dataclasses.replace(pk.INT8_CONFIG, num_stages=3)),
        ("bk256 s3", dataclasses.replace(pk.INT8_CONFIG, block_kv=256, num_stages=3)),
        ("bk64 s5", dataclasses.replace(pk.INT8_CONFIG, block_kv=64, num_stages=5)),
        ("bk64 s3", dataclasses.replace(pk.INT8_CONFIG, block_kv=64, num_stages=3))]
wanted = os.environ.get("VARIANTS", ",".join(variants)).split(",")
orig = pk._kernel
for vname in wanted:
  ns = dict(pk.__dict__, magic_f32=magic_f32, magic_trunc=magic_trunc)
  exec(variants[vname], ns)
  pk._kernel = ns["_kernel"]
  for cname, cfg in cfgs:
    report(vname, cname, cfg)
pk._kernel = orig
