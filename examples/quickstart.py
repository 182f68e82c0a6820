"""attnax quickstart: every kernel on one input, checked against standard_attention and timed.

Runs on a CPU in well under a minute (Pallas kernels run in interpret mode there, so keep --seq
small); on a GPU the same script times the real kernels.

  .venv/bin/python examples/quickstart.py [--seq 256] [--heads 4] [--kv-heads 2] [--dim 64]

Exits 1 if a kernel fails or disagrees with the reference beyond its tolerance.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import attnax
from attnax import kernels
from attnax.attention import is_attention_fn
from attnax.kernels import score_mods

# Kernels that share the AttentionFn signature but not its inputs or its maths.
NOT_COMPARED = {
    "paged_attention": "reads a paged KV cache (k_pages, v_pages, block_tables, lengths)",
    "ring_attention": "needs a device mesh; see tests/ for its multi-device checks",
    "linear_attention": "kernelised attention: different maths, so no softmax reference",
}


def rel_err(x: jax.Array, ref: jax.Array) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def max_err(x: jax.Array, ref: jax.Array) -> float:
  return float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(ref, np.float64))))


def time_ms(fn: Callable[..., Any], *args: Any, budget_s: float = 0.3,
            max_iters: int = 50) -> float:
  """Median wall time of a jitted call after one warm-up (compile) call."""
  jax.block_until_ready(fn(*args))
  times: list[float] = []
  start = time.perf_counter()
  while len(times) < max_iters and (len(times) < 3 or time.perf_counter() - start < budget_s):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
    if times[0] > budget_s:  # slow kernel (interpret mode): one timed call is enough
      break
  return 1e3 * statistics.median(times)


def attention_kernels() -> dict[str, Callable[..., Any]]:
  """Every public ``*_attention`` of :mod:`attnax.kernels` callable as an AttentionFn
  (``fn(q, k, v, score_mod=, mask_mod=, scale=)``, the rule ``MultiHeadAttention`` applies), in
  ``__all__`` order, plus those in ``NOT_COMPARED`` (reported with the reason they are skipped)."""
  return {name: getattr(kernels, name) for name in kernels.__all__
          if name.endswith("_attention") and callable(getattr(kernels, name, None))
          and (name in NOT_COMPARED or is_attention_fn(getattr(kernels, name)))}


def f32_tol() -> float:
  """DESIGN.md section 8: f32 relative error on CPU; tf32 matmuls on a GPU."""
  return 1e-5 if jax.default_backend() == "cpu" else 1e-3


def tolerance(name: str, fn: Callable[..., Any], v: jax.Array) -> tuple[str, float]:
  """Which error a kernel is held to, and its bound (DESIGN.md sections 6 and 8)."""
  if name == "aether_attention":
    # AETHER prunes with a certificate: |out - out_dense| <= 2 * epsilon * max|v|.
    eps = inspect.signature(fn).parameters["epsilon"].default
    return "max", 2 * eps * float(jnp.max(jnp.abs(v)))
  return "rel", f32_tol()


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=4, help="query heads")
  parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--dim", type=int, default=64, help="head dim")
  args = parser.parse_args()

  b, hq, hkv, s, d = args.batch, args.heads, args.kv_heads, args.seq, args.dim
  kq, kk, kv, kx = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(kq, (b, hq, s, d), jnp.float32)
  k = jax.random.normal(kk, (b, hkv, s, d), jnp.float32)
  v = jax.random.normal(kv, (b, hkv, s, d), jnp.float32)
  print(f"attnax {attnax.__version__} | jax {jax.__version__} on {jax.default_backend()} | "
        f"q (B={b}, Hq={hq}, S={s}, D={d}), k/v Hkv={hkv} (GQA), float32")

  failures: list[str] = []
  found = attention_kernels()
  compared = [n for n in found if n not in NOT_COMPARED]  # standard_attention comes first
  causal = score_mods.causal_mod()

  # --- 1. every kernel on the same causal problem ------------------------------------------
  def run(fn, mod):
    return jax.jit(lambda q, k, v: fn(q, k, v, score_mod=mod))

  ref = run(kernels.standard_attention, causal)(q, k, v)
  print("\n1. Causal attention, every kernel vs standard_attention (jitted; ms = median after "
        "warm-up)\n")
  print(f"   {'kernel':<28} {'max err':>9} {'rel err':>9} {'bound':>12} {'ms':>9}  ok")
  for name in compared:
    fn = found[name]
    try:
      jfn = run(fn, causal)
      out = jfn(q, k, v)
      ms = time_ms(jfn, q, k, v)
    except Exception as e:  # a broken kernel is reported, and fails the run
      print(f"   {name:<28} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
      failures.append(name)
      continue
    kind, bound = tolerance(name, fn, v)
    mx, rel = max_err(out, ref), rel_err(out, ref)
    ok = (mx if kind == "max" else rel) <= bound and np.isfinite(mx)
    if not ok:
      failures.append(name)
    print(f"   {name:<28} {mx:9.1e} {rel:9.1e} {kind:>4} {bound:7.0e} {ms:9.2f}  "
          f"{'yes' if ok else 'NO'}")
  for name, why in NOT_COMPARED.items():
    if name in found:
      print(f"   {name:<28} not compared: {why}")
  if "aether_attention" in found and "aether_attention" not in failures:
    *_, stats = found["aether_attention"](q, k, v, score_mod=causal, return_stats=True)
    skipped = 100 * float(stats.skipped_fraction.mean())
    print(f"\n   aether_attention certificate: skipped {skipped:.1f}% of the tiles, skipped "
          f"softmax mass <= {float(stats.mass_bound.max()):.1e} per row "
          "(random Gaussian keys leave little to prune)")

  # An independent check of the reference itself: JAX's own attention (layout (B, S, H, D)).
  t = lambda x: jnp.swapaxes(x, 1, 2)
  jax_ref = t(jax.nn.dot_product_attention(t(q), t(k), t(v), is_causal=True))
  err = rel_err(ref, jax_ref)
  ok = err <= f32_tol()
  print(f"\n   standard_attention vs jax.nn.dot_product_attention(is_causal=True): rel err "
        f"{err:.1e} {'(agree)' if ok else '(DISAGREE)'}")
  if not ok:
    failures.append("standard_attention vs jax.nn.dot_product_attention")

  # --- 2. composed score mods ----------------------------------------------------------------
  window = max(s // 4, 1)
  mod = score_mods.compose_score_mods(score_mods.alibi_mod(num_heads=hq),
                                      score_mods.sliding_window_mod(window_size=window))
  out = run(kernels.standard_attention, mod)(q, k, v)
  # The same bias in JAX's terms: ALiBi as an additive bias, the window as local_window_size.
  pos = jnp.arange(s)
  alibi = score_mods.alibi_slopes(hq)[:, None, None] * (pos[None, :] - pos[:, None])
  jax_out = t(jax.nn.dot_product_attention(t(q), t(k), t(v), bias=alibi[None],
                                           local_window_size=(window - 1, 0)))
  err = rel_err(out, jax_out)
  ok = err <= f32_tol()
  print(f"\n2. compose_score_mods(alibi_mod(num_heads={hq}), sliding_window_mod(window_size="
        f"{window}))\n   standard_attention vs jax.nn.dot_product_attention(bias=alibi, "
        f"local_window_size=({window - 1}, 0)): rel err {err:.1e} "
        f"{'(agree)' if ok else '(DISAGREE)'}")
  if not ok:
    failures.append("composed mod vs jax.nn.dot_product_attention")
  for name in compared[1:]:
    try:
      err = rel_err(run(found[name], mod)(q, k, v), out)
    except Exception as e:
      print(f"   {name:<28} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
      failures.append(f"{name} (composed mod)")
      continue
    kind, bound = tolerance(name, found[name], v)
    ok = err <= (bound if kind == "rel" else 1e-2)  # AETHER: its certificate is checked above
    print(f"   {name:<28} vs standard_attention: rel err {err:.1e} {'(agree)' if ok else '(NO)'}")
    if not ok:
      failures.append(f"{name} (composed mod)")

  # --- 3. the Flax NNX module, with the kernel swapped -----------------------------------------
  if hasattr(attnax, "MultiHeadAttention"):
    from flax import nnx
    features = hq * d
    x = jax.random.normal(kx, (b, s, features), jnp.float32)
    print(f"\n3. attnax.MultiHeadAttention(num_heads={hq}, in_features={features}), same weights, "
          "attention_fn swapped (causal_mod):")
    base = None
    for name in compared:
      try:
        attn = attnax.MultiHeadAttention(nnx.Rngs(0), num_heads=hq, in_features=features,
                                         attention_fn=found[name], score_mod=causal)
        y = nnx.jit(lambda m, x: m(x, deterministic=True))(attn, x)
      except Exception as e:
        print(f"   {name:<28} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
        failures.append(f"MultiHeadAttention({name})")
        continue
      if base is None:
        base = y
        print(f"   {name:<28} out {tuple(y.shape)}")
        continue
      # Through the projections: f32 kernels within 1e-4; AETHER's pruning (certified in
      # section 1) within 1e-2.
      err = rel_err(y, base)
      ok = err <= (1e-2 if name == "aether_attention" else 1e-4)
      print(f"   {name:<28} rel err vs {compared[0]}: {err:.1e} {'(agree)' if ok else '(NO)'}")
      if not ok:
        failures.append(f"MultiHeadAttention({name})")
  else:
    print("\n3. attnax.MultiHeadAttention: not in this checkout yet")

  print()
  if failures:
    print(f"FAILED: {', '.join(failures)}")
    return 1
  print(f"All {len(compared)} kernels agree with standard_attention: {', '.join(compared)}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
