#!/usr/bin/env python3
"""What gradients of arrays carried by score mods cost: one process, one table.

Rows (per group: dense, then with ``causal_mod()`` composed in front): the group's base (no mod /
causal only), ``additive_bias_mod(bias)`` with bias ``(1, H, S, S)`` and ``alibi_mod(slopes=...)``
with slopes ``(H,)``, each with the gradient w.r.t. q, k, v only (the mod array undifferentiated)
and w.r.t. q, k, v AND the mod array; plus the forward alone for the base, bias and ALiBi rows.
Kernels: ``attnax-pallas`` (``pallas_flash_attention``), ``cudnn`` (``jax.nn.dot_product_attention``
in (B, S, H, D) with ``bias=``; ALiBi as a bias built from the slopes inside the timed function,
causal as ``is_causal=True``) and, on request, ``attnax-flash`` (``flash_attention``).

  python benchmarks/bench_mod_grads.py                        # GPU: bf16, B=4, H=16, S=4096, D=128
  python benchmarks/bench_mod_grads.py --quick                # tiny sizes, runs on CPU (interpret)
  python benchmarks/bench_mod_grads.py --json /tmp/mg.json --deadline-s 540

Conventions follow bench_attention.py (DESIGN.md section 9): FLOPs ``4*B*H*S*S*D``, halved for
causal, x3.5 for fwd+bwd, the same for every row (useful work; the mod-array gradient is not
counted); fwd+bwd is ``jax.vjp`` plus the pullback of a fixed cotangent in one jitted function; the
timing is bench_attention's ``time_fn``. Columns: ``/base`` = t / t(group base row, same kernel and
mode); ``/qkv-only`` = t(mod array differentiated) / t(same mod, q, k, v only) -- the key figure;
``xcuDNN`` = t(cudnn) / t(row), same row and mode (above 1: faster than cuDNN). Before timing,
every row is checked once on a B=1, H<=2, S<=512 copy against ``standard_attention`` in f32:
``err`` is the relative error of the output (fwd) or the max over dq, dk, dv; ``err dmod`` that of
the bias / slopes gradient.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (_HERE, os.path.dirname(_HERE)) if p not in sys.path]
if "--quick" in sys.argv and not os.path.exists("/dev/nvidiactl"):   # CPU: the Pallas
  # interpreter's XLA compiles dominate the run; cheapen them (timings on CPU mean nothing anyway)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                             " --xla_llvm_disable_expensive_passes=true").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from attnax.kernels import flash_attention, pallas_flash_attention, standard_attention  # noqa: E402
from attnax.kernels.score_mods import (  # noqa: E402
    additive_bias_mod, alibi_mod, alibi_slopes, causal_mod, compose_score_mods)

try:
  from bench_attention import time_fn
except Exception:  # noqa: BLE001 -- same protocol, reduced: compile, warm, median of repeats
  def time_fn(fn, argsets, *, budget_s, reps=10, **_):
    out0 = jax.block_until_ready(fn(*argsets[0]))
    jax.block_until_ready(fn(*argsets[0]))
    samples = []
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*argsets[0]))
      samples.append(time.perf_counter() - t0)
    return argparse.Namespace(median_s=statistics.median(samples)), out0



def table_rows():
  """(group, row name, mod kind, mod array differentiated, modes), in table order."""
  both, bwd = ("fwd", "fwd+bwd"), ("fwd+bwd",)
  for group, prefix in (("dense", ""), ("causal", "causal+")):
    yield group, prefix.rstrip("+") or "none", None, False, both
    for kind, grad in (("bias", "dbias"), ("alibi", "dslopes")):
      yield group, prefix + kind, kind, False, both
      yield group, f"{prefix}{kind} +{grad}", kind, True, bwd


def score_mod(kind, causal, arr):
  extra = {None: None, "bias": additive_bias_mod, "alibi": lambda a: alibi_mod(slopes=a)}[kind]
  return compose_score_mods(causal_mod() if causal else None, extra(arr) if extra else None)


def alibi_bias(slopes, s):
  pos = jnp.arange(s, dtype=jnp.float32)
  return (slopes[:, None, None] * (pos[None, :] - pos[:, None]))[None]   # (1, H, S, S)


def make_attend(kernel, kind, causal, backend):
  """(q, k, v, arr) -> out, in the kernel's native layout."""
  if kernel == "cudnn":
    def attend(q, k, v, arr):
      bias = {None: None, "bias": arr,
              "alibi": None if arr is None else alibi_bias(arr, q.shape[1]).astype(q.dtype)}
      return jax.nn.dot_product_attention(q, k, v, bias=bias[kind], is_causal=causal,
                                          implementation="cudnn")
    return attend
  fn = flash_attention if kernel == "attnax-flash" else pallas_flash_attention
  opts = {"backend": backend} if kernel == "attnax-pallas" else {}
  return lambda q, k, v, arr: fn(q, k, v, score_mod=score_mod(kind, causal, arr), **opts)


def make_fn(attend, mode, diff):
  if mode == "fwd":
    return jax.jit(attend)
  if diff:
    return jax.jit(lambda q, k, v, arr, ct: jax.vjp(attend, q, k, v, arr)[1](ct))
  return jax.jit(lambda q, k, v, arr, ct:
                 jax.vjp(lambda q, k, v: attend(q, k, v, arr), q, k, v)[1](ct))


def rel_err(x, ref):
  x, ref = jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32)
  return float(jnp.linalg.norm(x - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30))


def check(fn, kernel, kind, causal, mode, diff, small):
  """Relative errors (out or dq/dk/dv, d mod array) of ``fn`` on ``small`` against f32 reference."""
  q, k, v, arrs, ct = small
  arr = arrs[kind] if kind else None
  def ref_fn(q, k, v, a):
    return standard_attention(q, k, v, score_mod=score_mod(kind, causal, a))
  f32 = lambda x: None if x is None else x.astype(jnp.float32)   # noqa: E731
  args = (f32(q), f32(k), f32(v), f32(arr))
  ref = ref_fn(*args) if mode == "fwd" else jax.vjp(ref_fn, *args)[1](f32(ct))
  t = (lambda x: x.swapaxes(1, 2)) if kernel == "cudnn" else (lambda x: x)   # noqa: E731
  ins = (t(q), t(k), t(v), arr) + (() if mode == "fwd" else (t(ct),))
  got = fn(*ins)
  if mode == "fwd":
    return rel_err(t(got), ref), None
  err = max(rel_err(t(g), r) for g, r in zip(got[:3], ref[:3]))
  return err, (rel_err(got[3], ref[3]) if diff else None)


def fmt(x, spec):
  return "" if x is None else format(x, spec)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="tiny sizes (CPU; Pallas in interpret mode)")
  p.add_argument("--kernels", default="attnax-pallas,cudnn",
                 help="comma list of attnax-pallas, cudnn, attnax-flash")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--bias-dtype", default="float32", help="dtype of the (1, H, S, S) bias table")
  p.add_argument("--shape", default=None, help="B,H,S,D (default 4,16,4096,128; quick 1,2,128,64)")
  p.add_argument("--budget-s", type=float, default=None,
                 help="timing seconds per cell (default 1.5; quick 0.2)")
  p.add_argument("--deadline-s", type=float, default=0,
                 help="start no new cell after this many seconds (0: none)")
  p.add_argument("--json", default=None, help="write the rows and the header as JSON here")
  args = p.parse_args()
  t_start = time.time()
  shape = args.shape or ("1,2,128,64" if args.quick else "4,16,4096,128")
  b, h, s, d = map(int, shape.split(","))
  budget = args.budget_s or (0.2 if args.quick else 1.5)
  dtype, bias_dtype = jnp.dtype(args.dtype), jnp.dtype(args.bias_dtype)
  backend = "interpret" if args.quick or jax.default_backend() != "gpu" else "auto"
  kernels = args.kernels.split(",")

  dev = jax.devices()[0]
  header = {"device": f"{dev.platform}: {getattr(dev, 'device_kind', dev)}",
            "jax": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "python": platform.python_version(), "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "config": f"{dtype.name} B={b} H={h} S={s} D={d}; bias (1,H,S,S) {bias_dtype.name} "
                      f"(cudnn: {dtype.name}); slopes (H,) f32 (alibi_slopes); "
                      f"pallas backend={backend}"}
  for key, val in header.items():
    print(f"{key}: {val}")

  kq, kk, kv, kb, kc = jax.random.split(jax.random.key(0), 5)
  q, k, v, ct = (jax.random.normal(key, (b, h, s, d), jnp.float32).astype(dtype)
                 for key in (kq, kk, kv, kc))
  bias = jax.random.normal(kb, (1, h, s, s), jnp.float32)
  arrs = {"bias": bias.astype(bias_dtype), "alibi": alibi_slopes(h)}
  arrs_cudnn = {"bias": bias.astype(dtype), "alibi": arrs["alibi"]}   # cuDNN: bias in q's dtype
  layouts = {"bhsd": (q, k, v, ct), "bshd": tuple(x.swapaxes(1, 2) for x in (q, k, v, ct))}
  hc, sc = min(h, 2), min(s, 512)
  smalls = {key: (q[:1, :hc, :sc], k[:1, :hc, :sc], v[:1, :hc, :sc],
                  {"bias": a["bias"][:, :hc, :sc, :sc], "alibi": a["alibi"][:hc]}, ct[:1, :hc, :sc])
            for key, a in (("attnax", arrs), ("cudnn", arrs_cudnn))}

  results = []   # one dict per (row, mode, kernel)
  for group, row, kind, diff, modes in table_rows():
    causal = group == "causal"
    flops = 4 * b * h * s * s * d * (0.5 if causal else 1.0)
    for mode in modes:
      for kernel in kernels:
        fn, r = None, {"group": group, "row": row, "mode": mode, "kernel": kernel, "diff": diff,
                       "kind": kind}
        results.append(r)
        if args.deadline_s and time.time() - t_start > args.deadline_s:
          r["na"] = "deadline"
          continue
        t_cell = time.time()
        try:
          fn = make_fn(make_attend(kernel, kind, causal, backend), mode, diff)
          cud = kernel == "cudnn"
          r["err"], r["err_dmod"] = check(fn, kernel, kind, causal, mode, diff,
                                          smalls["cudnn" if cud else "attnax"])
          qq, kk_, vv, cc = layouts["bshd" if cud else "bhsd"]
          arr = (arrs_cudnn if cud else arrs)[kind] if kind else None
          argset = (qq, kk_, vv, arr) + (() if mode == "fwd" else (cc,))
          timing, _ = time_fn(fn, [argset], budget_s=budget)
          r["ms"] = timing.median_s * 1e3
          r["tflops"] = flops * (3.5 if mode == "fwd+bwd" else 1.0) / timing.median_s / 1e12
        except Exception as e:  # noqa: BLE001 -- printed as n/a, the run goes on
          lines = str(e).strip().splitlines()
          r["na"] = f"{type(e).__name__}: {lines[0][:90] if lines else ''}"
        del fn
        print(f"  {group:6s} {row:22s} {mode:7s} {kernel:13s} "
              + (f"{r['ms']:.3f} ms" if "ms" in r else f"n/a ({r['na']})")
              + f"  [{time.time() - t_cell:.1f} s with compile and check]", flush=True)

  def find(**kw):
    hits = [x for x in results if all(x[key] == val for key, val in kw.items()) and "ms" in x]
    return hits[0]["ms"] if hits else None

  for r in results:
    if "ms" not in r:
      continue
    base = find(group=r["group"], kind=None, mode=r["mode"], kernel=r["kernel"])
    r["x_base"] = r["ms"] / base if base and r["kind"] else None
    undiff = find(group=r["group"], row=r["row"].rsplit(" +", 1)[0], mode=r["mode"],
                  kernel=r["kernel"]) if r["diff"] else None
    r["x_qkv_only"] = r["ms"] / undiff if undiff else None
    cud = find(group=r["group"], row=r["row"], mode=r["mode"], kernel="cudnn")
    r["x_cudnn"] = cud / r["ms"] if cud and r["kernel"] != "cudnn" else None

  print("\n| group | row | mode | kernel | ms | TFLOP/s | /base | /qkv-only | xcuDNN | err | "
        "err dmod |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in results:
    head = f"| {r['group']} | {r['row']} | {r['mode']} | {r['kernel']} |"
    if "ms" not in r:
      print(f"{head} n/a ({r['na']}) | | | | | | |")
      continue
    print(f"{head} {r['ms']:.3f} | {r['tflops']:.3g} | {fmt(r['x_base'], '.2f')} | "
          f"{fmt(r['x_qkv_only'], '.2f')} | {fmt(r['x_cudnn'], '.2f')} | {r['err']:.1e} | "
          f"{fmt(r['err_dmod'], '.1e')} |")
  for r in results:
    if r.get("x_qkv_only"):
      print(f"{r['kernel']}, {r['row']}: differentiating the mod array costs "
            f"{r['x_qkv_only']:.2f}x the fwd+bwd with it undifferentiated")
  print(f"total {time.time() - t_start:.1f} s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"header": header, "rows": results}, f, indent=1)


if __name__ == "__main__":
  main()
