"""Shared helpers for comparing kernels with references (DESIGN.md section 8)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnax.kernels import standard_attention

# ||out - ref|| / ||ref|| bounds by input dtype (CPU); gradients get twice these.
TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1e-2, jnp.dtype(jnp.float16): 2e-3}
# f32 on a GPU runs tf32 matmuls.
GPU_F32_TOL = 1e-3


def tol(dtype, grad: bool = False) -> float:
  t = TOL[jnp.dtype(dtype)]
  if jnp.dtype(dtype) == jnp.float32 and jax.default_backend() == "gpu":
    t = GPU_F32_TOL
  return 2 * t if grad else t


def rel_err(x, ref) -> float:
  x = np.asarray(x, np.float64)
  ref = np.asarray(ref, np.float64)
  denom = np.linalg.norm(ref)
  num = np.linalg.norm(x - ref)
  return float(num / denom) if denom > 0 else float(num)


def random_qkv(seed: int, batch=2, q_heads=4, kv_heads=2, q_len=37, kv_len=45, head_dim=16,
               v_dim=None, dtype=jnp.float32, scale: float = 1.0):
  """Fresh normal q, k, v (different for every seed); ``scale`` stretches the logits.

  Drawn with numpy so that no PRNG kernel is compiled per shape: compile time dominates small CPU
  tests.
  """
  rng = np.random.default_rng(seed)
  v_dim = head_dim if v_dim is None else v_dim
  q = scale * rng.standard_normal((batch, q_heads, q_len, head_dim), np.float32)
  k = rng.standard_normal((batch, kv_heads, kv_len, head_dim), np.float32)
  v = rng.standard_normal((batch, kv_heads, kv_len, v_dim), np.float32)
  return tuple(jnp.asarray(x.astype(jnp.dtype(dtype))) for x in (q, k, v))


def rand(seed: int, shape, dtype=np.float32) -> jax.Array:
  """A fresh standard-normal array (numpy generator)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def reference_attention(q, k, v, **kwargs):
  """``standard_attention`` evaluated in float64 on the (upcast) inputs.

  Mods that carry f32 arrays run in f64 too. Returns numpy float64 results.
  """
  with jax.enable_x64(True):
    up = lambda x: jnp.asarray(np.asarray(x, np.float64))
    out = standard_attention(up(q), up(k), up(v), **kwargs)
    return jax.tree.map(lambda x: np.asarray(x, np.float64), out)


def reference_grads(q, k, v, cotangent, **kwargs):
  """Float64 gradients of ``sum(standard_attention(q, k, v) * cotangent)`` w.r.t. q, k, v."""
  with jax.enable_x64(True):
    up = lambda x: jnp.asarray(np.asarray(x, np.float64))
    ct = up(cotangent)
    f = lambda q, k, v: jnp.sum(standard_attention(q, k, v, **kwargs) * ct)
    grads = jax.grad(f, argnums=(0, 1, 2))(up(q), up(k), up(v))
    return tuple(np.asarray(g, np.float64) for g in grads)


def kernel_grads(kernel, q, k, v, cotangent, **kwargs):
  """Gradients of ``sum(kernel(q, k, v) * cotangent)`` w.r.t. q, k, v (f32 accumulate)."""
  f = lambda q, k, v: jnp.sum(kernel(q, k, v, **kwargs).astype(jnp.float32)
                              * cotangent.astype(jnp.float32))
  return jax.grad(f, argnums=(0, 1, 2))(q, k, v)


def whole_tile_ops(jaxpr, shape) -> int:
  """Equations of ``jaxpr`` with a ``shape`` result (broadcasts and iotas aside), jit calls
  included: a kernel tile's per-element work."""
  n = 0
  for eqn in jaxpr.eqns:
    sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if sub is not None:
      n += whole_tile_ops(sub.jaxpr, shape)
    elif (eqn.primitive.name not in ("broadcast_in_dim", "iota") and eqn.outvars
          and getattr(eqn.outvars[0].aval, "shape", None) == tuple(shape)):
      n += 1
  return n
