#!/usr/bin/env python3
"""ALiBi's cost in the Mosaic kernels: the int -> f32 conversion of ``kv_idx - q_idx`` (H200).

``AlibiMod`` converts the relative position of every score with ``astype(float32)`` (one I2F,
a quarter-rate instruction on Hopper, per score and kernel). This times, fwd+bwd and fwd on the
same inputs, in rounds: causal alone; ALiBi + causal as the library has it; and ALiBi + causal
with the conversion done by the magic-number trick (an integer add and a float subtract, full
rate, exact for ``|x| < 2**22``), patched into ``AlibiMod`` for the run (caches cleared).

  PYTHONPATH=$PWD python3 benchmarks/diag_alibi_convert.py   # CASES=alibi8k ROUNDS=3
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax, jax.numpy as jnp
from jax import lax
import numpy as np
import bench_attention as ba
from attnax.kernels import score_mods as sm
from attnax.kernels.pallas import pallas_flash_attention

CASES = os.environ.get("CASES", "alibi8k").split(",")
ROUNDS = int(os.environ.get("ROUNDS", "3"))
LIBRARY_CALL = sm.AlibiMod.__call__


def magic_f32(x):
  """int32 -> float32 for |x| < 2**22: 1.5 * 2**23 + x has the unit in its last place."""
  return lax.bitcast_convert_type(x + jnp.int32(0x4B400000), jnp.float32) - jnp.float32(12582912.0)


def magic_call(self, score, b, h, q_idx, kv_idx):
  return score + sm.take(self.slopes, h) * magic_f32(kv_idx - q_idx)


def build(case, mode, variant):
  mod = sm.causal_mod() if variant == "causal" else sm.compose_score_mods(
      sm.alibi_mod(num_heads=case.heads), sm.causal_mod())
  fn = lambda q, k, v: pallas_flash_attention(q, k, v, backend="mosaic", score_mod=mod)
  if mode == "fwd":
    return jax.jit(lambda q, k, v, ct: fn(q, k, v))
  return jax.jit(lambda q, k, v, ct: jax.vjp(fn, q, k, v)[1](ct))


def main():
  for name in CASES:
    case = ba.CASES[name]
    inp = ba.Inputs(case, jnp.bfloat16, {"bhsd"})
    sets = inp.sets["bhsd"]
    for mode in ("fwd+bwd", "fwd"):
      ms, outs = {}, {}
      for r in range(ROUNDS):
        for variant in ("causal", "alibi", "alibi_magic"):
          sm.AlibiMod.__call__ = magic_call if variant == "alibi_magic" else LIBRARY_CALL
          jax.clear_caches()
          t, out = ba.time_fn(build(case, mode, variant), sets, budget_s=0.3)
          ms.setdefault(variant, []).append(t.median_s * 1e3)
          outs.setdefault(variant, out)
      sm.AlibiMod.__call__ = LIBRARY_CALL
      pairs = zip(jax.tree.leaves(outs["alibi"]), jax.tree.leaves(outs["alibi_magic"]))
      same = all(np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
                 for a, b in pairs)
      print(f"### {name} {mode}: B={case.batch} H={case.heads} S={case.seq}; best of {ROUNDS}; "
            f"magic output equal to the library's bit for bit: {same}", flush=True)
      for v, xs in ms.items():
        print(f"| {v:12s} | {min(xs):.3f} ms | x alibi {min(ms['alibi']) / min(xs):.3f} | "
              f"rounds {' '.join(f'{x:.3f}' for x in xs)} |", flush=True)


if __name__ == "__main__":
  main()
