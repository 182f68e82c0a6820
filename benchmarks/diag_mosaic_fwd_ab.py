#!/usr/bin/env python3
"""The Mosaic forward against an earlier version of itself, in one process (H200 diagnosis).

Times, per case, cuDNN, tokamax's Mosaic kernel and forward variants of
``attnax.kernels.pallas.mosaic_gpu`` on the same inputs and the same plan, in rounds (every
variant once per round, so that clock drift falls on all of them alike):

* ``base``: the module at ``benchmarks/_base_mosaic_gpu.py`` when that file exists (an untracked
  copy of an earlier commit's ``mosaic_gpu.py``, made for the run:
  ``git show REV:attnax/kernels/pallas/mosaic_gpu.py > benchmarks/_base_mosaic_gpu.py``);
* ``now``: the module as it is;
* ``noauto``: the module as it is with ``CompilerParams(unsafe_no_auto_barriers=True)`` in the
  forward (a source patch; the library does not ship it).

Prints ms, TFLOP/s, the ratio to cuDNN and to tokamax, the compile time, and the error against
cuDNN.

  PYTHONPATH=$PWD python3 benchmarks/diag_mosaic_fwd_ab.py   # CASES=s4k,s16k-causal ROUNDS=3
"""
import importlib.util, inspect, os, sys, textwrap, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax, jax.numpy as jnp
import bench_attention as ba
from attnax.kernels.pallas import api, mosaic_gpu as mg

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = os.environ.get("CASES", "s4k,s16k,s4k-causal,s16k-causal,s4k-d64,s4k-d256").split(",")
ROUNDS = int(os.environ.get("ROUNDS", "3"))


def variants() -> dict:
  out = {}
  base = os.path.join(HERE, "_base_mosaic_gpu.py")
  if os.path.exists(base):
    spec = importlib.util.spec_from_file_location("_base_mosaic_gpu", base)
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out["base"] = mod.forward
  out["now"] = mg.forward
  src = textwrap.dedent(inspect.getsource(mg.forward))
  old = "compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0)"
  assert src.count(old) == 1
  ns = dict(vars(mg))
  exec(src.replace(old, old[:-1] + ", unsafe_no_auto_barriers=True)"), ns)
  out["noauto"] = ns["forward"]
  return out


def variant_fn(forward, case, inp):
  mod = ba._attnax_mod(case, inp)
  cfg = mg.default_config(case.head_dim, masked=mod is not None)
  opts = {**api._PLAN_DEFAULTS, "backend": "mosaic", "config": cfg, "score_mod": mod}

  def fn(q, k, v):
    _, spec, arrays, qp, kp, vp = api._plan(q, k, v, **opts)
    out, _ = forward(spec, qp, kp, vp, arrays)
    return out[:, :, :spec.plan.q_len, :spec.plan.v_dim]
  return fn


def main():
  cases = ba.CASES
  fwds = variants()
  print("variants:", ", ".join(fwds), flush=True)
  for name in CASES:
    case = cases[name]
    inp = ba.Inputs(case, jnp.bfloat16, {"bhsd", "bshd"})
    fns = {"cudnn": (ba.KERNELS["cudnn"].build(case, inp, True), "bshd"),
           "tokamax": (ba.KERNELS["tokamax-mosaic"].build(case, inp, True), "bshd")}
    for v, fwd in fwds.items():
      fns[v] = (variant_fn(fwd, case, inp), "bhsd")
    jitted, ms, comp, err = {}, {k: [] for k in fns}, {}, {}
    ref = None
    for r in range(ROUNDS):
      for k, (fn, lay) in fns.items():
        try:
          jf = jitted.setdefault(k, jax.jit(lambda q, k, v, ct, fn=fn: fn(q, k, v)))
          t, out0 = ba.time_fn(jf, inp.sets[lay], budget_s=0.3)
        except Exception as e:  # noqa: BLE001
          print(f"{name} {k}: FAIL {ba._short(e, 200)}", flush=True)
          fns[k] = (None, lay)
          continue
        ms[k].append(t.median_s * 1e3)
        if r == 0:
          comp[k] = t.compile_s
          o = ba._to_bhsd(out0, lay)
          if ref is None:
            ref = o
          err[k] = float(ba._errs(o, ref)[0])
      fns = {k: f for k, f in fns.items() if f[0] is not None}
    best = {k: min(v) for k, v in ms.items() if v}
    print(f"### {name}: B={case.batch} H={case.heads} S={case.seq} D={case.head_dim}, "
          f"{case.kind}; best of {ROUNDS} rounds", flush=True)
    for k, t in best.items():
      tf = case.flops("fwd") / (t * 1e-3) / 1e12
      rel = lambda peer: f"{best[peer] / t:.3f}" if peer in best else "n/a"
      print(f"| {k:8s} | {t:.3f} ms | {tf:.0f} TFLOP/s | x cuDNN {rel('cudnn')} | "
            f"x tokamax {rel('tokamax')} | compile {comp.get(k, 0):.1f} s | "
            f"err {err.get(k, 0):.1e} | rounds {' '.join(f'{x:.3f}' for x in ms[k])} |",
            flush=True)


if __name__ == "__main__":
  main()
