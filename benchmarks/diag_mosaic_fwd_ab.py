#!/usr/bin/env python3
"""The Mosaic kernels against an earlier version of themselves, in one process (H200 diagnosis).

Times, per case, cuDNN, tokamax's Mosaic kernel and variants of
``attnax.kernels.pallas.mosaic_gpu`` on the same inputs and the same plan, in rounds (every
variant once per round, so that clock drift falls on all of them alike):

* ``base``: the module at ``benchmarks/_base_mosaic_gpu.py`` when that file exists (an untracked
  copy of an earlier commit's ``mosaic_gpu.py``, made for the run:
  ``git show REV:attnax/kernels/pallas/mosaic_gpu.py > benchmarks/_base_mosaic_gpu.py``);
* ``now``: the module as it is, with its tuned config;
* the others (:data:`VARIANTS`): source patches of the module (the library does not ship them)
  or config overrides.

``MODE=fwd`` (the default) times the forward; ``MODE=fwd+bwd`` the forward and the backward of
a fixed cotangent (each variant's own ``forward`` and ``backward``; cuDNN and tokamax through
``jax.vjp``), its error the worst of the output's and the gradients' against cuDNN's.

Prints ms, TFLOP/s, the ratio to cuDNN and to tokamax, the compile time, and the error against
cuDNN.

  PYTHONPATH=$PWD python3 benchmarks/diag_mosaic_fwd_ab.py   # CASES=s4k,s16k-causal ROUNDS=3
  # VARIANTS=base,now,noauto,st2,st3,persist,items,contig,nolines,overlap,balanced (default base,now,noauto)
  MODE=fwd+bwd CASES=s4k,s4k-causal,alibi8k VARIANTS=base,now python3 benchmarks/diag_mosaic_fwd_ab.py
"""
import dataclasses, os, sys, types
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax, jax.numpy as jnp
import bench_attention as ba
from attnax.kernels import tiles
from attnax.kernels.pallas import api, mosaic_gpu as mg
from attnax.kernels.pallas.plan import pad_to

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = os.environ.get("CASES", "s4k,s16k,s4k-causal,s16k-causal,s4k-d64,s4k-d256").split(",")
ROUNDS = int(os.environ.get("ROUNDS", "3"))
MODE = os.environ.get("MODE", "fwd")
if MODE not in ("fwd", "fwd+bwd"):
  raise SystemExit(f"MODE must be fwd or fwd+bwd, got {MODE!r}")


NOAUTO = ("compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0)",
          "compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0, "
          "unsafe_no_auto_barriers=True)")
# The full steps' blocks as the contiguous prefix alone (no list loads): right for causal plans,
# whose full tiles are contiguous, and dense ones; a diagnosis of the per-step list loads.
CONTIG = ("    return jnp.where(t < n_contig, start + t, jnp.where(t < n_full, listed_full, "
          "listed_partial))",
          "    return jnp.where(t < n_full, start + t, listed_partial)")
# The mods evaluated on whole index tiles, not on lines (attnax.kernels.pallas.lines).
NOLINES = ("LINED_INDICES = True", "LINED_INDICES = False")
# name -> (module file or None for the module as it is, source patches, MosaicConfig overrides)
VARIANTS = {
    "base": ("_base_mosaic_gpu.py", (), {}),
    "now": (None, (), {}),
    "noauto": (None, (NOAUTO,), {}),
    "st2": (None, (), {"num_stages": 2}),
    "st3": (None, (), {"num_stages": 3}),
    "persist": (None, (), {"persistent": True}),
    "items": (None, (), {"persistent": False}),
    "contig": (None, (CONTIG,), {}),
    "nolines": (None, (NOLINES,), {}),
    # The opt-in forms (MosaicConfig.overlap: Q K_t^T and P V_(t-1) issued together; the
    # persistent grid's balanced walk), timed in the same rounds as the default.
    "overlap": (None, (), {"overlap": True}),
    "balanced": (None, (), {"persistent": True, "balanced_walk": True}),
}
PICK = os.environ.get("VARIANTS", "base,now,noauto").split(",")


def load_variant(name: str):
  """``(forward, config overrides)`` of one variant: a module built from patched source."""
  path, patches, cfg = VARIANTS[name]
  path = os.path.join(HERE, path) if path else mg.__file__
  if not os.path.exists(path):
    return None
  src = open(path).read()
  for old, new in patches:
    assert src.count(old) == 1, (name, old)
    src = src.replace(old, new)
  mod = sys.modules[f"_variant_{name}"] = types.ModuleType(f"_variant_{name}")
  mod.__file__ = mg.__file__   # its tuned-config table
  exec(compile(src, f"<{name}>", "exec"), mod.__dict__)
  return mod, cfg


def variants() -> dict:
  out = {n: load_variant(n) for n in PICK}
  return {n: v for n, v in out.items() if v is not None}


def variant_fn(variant, case, inp):
  """``fn(q, k, v, ct)``: the variant's output (fwd), or its output and q, k, v gradients for
  the cotangent ``ct`` (fwd+bwd)."""
  module, overrides = variant
  mod = ba._attnax_mod(case, inp)
  cfg = mg.default_config(case.head_dim, masked=mod is not None)
  cfg = dataclasses.replace(cfg, **overrides)
  opts = {**api._PLAN_DEFAULTS, "backend": "mosaic", "config": cfg, "score_mod": mod}

  def fn(q, k, v, ct):
    _, spec, arrays, qp, kp, vp = api._plan(q, k, v, **opts)
    plan = spec.plan
    out, lse = module.forward(spec, qp, kp, vp, arrays)
    crop = lambda x, n, d: x[:, :, :n, :d]
    if MODE == "fwd":
      return crop(out, plan.q_len, plan.v_dim)
    do = pad_to(ct.astype(q.dtype), out.shape)
    delta = tiles.backward_delta(out, do)
    dq, dk, dv, _ = module.backward(spec, qp, kp, vp, do, lse, delta, arrays)
    return (crop(out, plan.q_len, plan.v_dim), crop(dq, plan.q_len, plan.head_dim),
            crop(dk, plan.kv_len, plan.head_dim), crop(dv, plan.kv_len, plan.v_dim))
  return fn


def peer_fn(fn):
  """A peer's ``fn(q, k, v)`` as the timed ``fn(q, k, v, ct)`` of the mode."""
  if MODE == "fwd":
    return lambda q, k, v, ct: fn(q, k, v)

  def fb(q, k, v, ct):
    o, pull = jax.vjp(fn, q, k, v)
    return (o,) + tuple(pull(ct))
  return fb


def main():
  cases = ba.CASES
  fwds = variants()
  print("variants:", ", ".join(fwds), flush=True)
  for name in CASES:
    case = cases[name]
    inp = ba.Inputs(case, jnp.bfloat16, {"bhsd", "bshd"})
    fns = {}
    for peer, kernel in (("cudnn", "cudnn"), ("tokamax", "tokamax-mosaic")):
      try:
        fns[peer] = (peer_fn(ba.KERNELS[kernel].build(case, inp, True)), "bshd")
      except ba.Unsupported as e:   # e.g. tokamax has no ALiBi: the ratios say n/a
        print(f"{name} {peer}: not run ({e})", flush=True)
    for v, fwd in fwds.items():
      fns[v] = (variant_fn(fwd, case, inp), "bhsd")
    jitted, ms, comp, err = {}, {k: [] for k in fns}, {}, {}
    ref = None
    for r in range(ROUNDS):
      for k, (fn, lay) in fns.items():
        try:
          jf = jitted.setdefault(k, jax.jit(fn))
          t, out0 = ba.time_fn(jf, inp.sets[lay], budget_s=0.3)
        except Exception as e:  # noqa: BLE001
          print(f"{name} {k}: FAIL {ba._short(e, 200)}", flush=True)
          fns[k] = (None, lay)
          continue
        ms[k].append(t.median_s * 1e3)
        if r == 0:
          comp[k] = t.compile_s
          o = [ba._to_bhsd(x, lay) for x in (out0 if MODE == "fwd+bwd" else (out0,))]
          if ref is None:
            ref = o
          err[k] = max(float(ba._errs(x, w)[0]) for x, w in zip(o, ref))
      fns = {k: f for k, f in fns.items() if f[0] is not None}
    best = {k: min(v) for k, v in ms.items() if v}
    print(f"### {name}: B={case.batch} H={case.heads} S={case.seq} D={case.head_dim}, "
          f"{case.kind}; {MODE}, best of {ROUNDS} rounds", flush=True)
    for k, t in best.items():
      tf = case.flops(MODE) / (t * 1e-3) / 1e12
      rel = lambda peer: f"{best[peer] / t:.3f}" if peer in best else "n/a"
      print(f"| {k:8s} | {t:.3f} ms | {tf:.0f} TFLOP/s | x cuDNN {rel('cudnn')} | "
            f"x tokamax {rel('tokamax')} | compile {comp.get(k, 0):.1f} s | "
            f"err {err.get(k, 0):.1e} | rounds {' '.join(f'{x:.3f}' for x in ms[k])} |",
            flush=True)


if __name__ == "__main__":
  main()
