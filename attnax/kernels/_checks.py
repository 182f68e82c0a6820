"""Input validation shared by every kernel: ValueErrors at trace time naming arguments and shapes."""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# The kernels written in plain JAX also run float64 (f64 statistics and accumulators); the Pallas
# kernels stop at f32 (GPU matmul units have no f64 path worth a kernel).
F64_KERNELS = ("standard_attention", "memory_efficient_attention", "flash_attention",
               "aether_attention (implementation='flash' or 'reference')", "ring_attention",
               "paged_attention", "linear_attention")


def check_qkv(q: Any, k: Any, v: Any, *, kernel: str = "attention",
              allow_f64: bool = False) -> tuple[int, int, int, int, int, int, int]:
  """Validate ``(B, Hq, Sq, D)``, ``(B, Hkv, Sk, D)``, ``(B, Hkv, Sk, Dv)``.

  Returns ``(B, Hq, Hkv, Sq, Sk, D, Dv)``.
  """
  shapes = f"q {tuple(jnp.shape(q))}, k {tuple(jnp.shape(k))}, v {tuple(jnp.shape(v))}"
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise ValueError(f"{kernel}: {name} must be an array, got {type(x).__name__}")
    if x.ndim != 4:
      raise ValueError(f"{kernel}: {name} must have rank 4 (batch, heads, seq, head_dim); got {shapes}")
    allowed = SUPPORTED_DTYPES + ((jnp.float64,) if allow_f64 else ())
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in allowed]:
      hint = ""
      if jnp.dtype(x.dtype) == jnp.float64:
        hint = (" (float64 runs in the pure-JAX kernels: " + ", ".join(F64_KERNELS) + ")")
      supported = "float32, bfloat16, float16" + (", float64" if allow_f64 else "")
      raise ValueError(f"{kernel}: {name} has unsupported dtype {x.dtype}; "
                       f"supported: {supported}{hint}; got {shapes}")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"{kernel}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}; "
                     f"{shapes}")
  b, hq, sq, d = q.shape
  bk, hkv, sk, dk = k.shape
  bv, hv, skv, dv = v.shape
  if not b == bk == bv:
    raise ValueError(f"{kernel}: batch sizes differ: {shapes}")
  if hkv != hv:
    raise ValueError(f"{kernel}: k and v must have the same number of heads: {shapes}")
  if sk != skv:
    raise ValueError(f"{kernel}: k and v must have the same sequence length: {shapes}")
  if d != dk:
    raise ValueError(f"{kernel}: q and k must have the same head_dim: {shapes}")
  if hkv == 0 or hq % hkv:
    raise ValueError(f"{kernel}: query heads ({hq}) must be a multiple of kv heads ({hkv}): {shapes}")
  if min(b, hq, sq, sk, d, dv) == 0:
    raise ValueError(f"{kernel}: empty dimension (batch, heads, sequence or head_dim of 0): "
                     f"{shapes}")
  return b, hq, hkv, sq, sk, d, dv


def _interval(low: float | None, low_inclusive: bool, high: float | None,
              high_inclusive: bool) -> str:
  """The range text of :func:`static_float`'s messages: `` in [0, 1)``, `` > 0``, or empty."""
  if low is not None and high is not None:
    return (f" in {'[' if low_inclusive else '('}{low:g}, {high:g}"
            f"{']' if high_inclusive else ')'}")
  if low is not None:
    return f" {'>=' if low_inclusive else '>'} {low:g}"
  if high is not None:
    return f" {'<=' if high_inclusive else '<'} {high:g}"
  return ""


def static_float(value: Any, name: str, *, fn: str | None = None, low: float | None = None,
                 low_inclusive: bool = True, high: float | None = None,
                 high_inclusive: bool = True, allow_none: bool = False) -> float | None:
  """``value`` as a Python float, or a ValueError naming ``name`` (after ``fn: `` when given).

  Accepted: a real Python or NumPy scalar (not a bool), or a concrete 0-d integer or floating
  array; it must be finite and within ``low``/``high`` (each bound inclusive unless told
  otherwise; ``None``: unbounded). ``allow_none`` passes ``None`` through. Traced values are
  refused: the value is static configuration (a new value retraces).
  """
  if value is None and allow_none:
    return None
  where = f"{fn}: " if fn else ""
  rng = _interval(low, low_inclusive, high, high_inclusive)
  or_none = " or None" if allow_none else ""
  if isinstance(value, jax.core.Tracer):
    raise ValueError(f"{where}{name} must be a static Python float{rng}{or_none}, got a traced "
                     "value (pass it through functools.partial or mark it static under jit)")
  concrete_scalar = (isinstance(value, (np.ndarray, jax.Array)) and value.ndim == 0
                     and (jnp.issubdtype(value.dtype, jnp.floating)
                          or jnp.issubdtype(value.dtype, jnp.integer)))
  if (isinstance(value, (bool, np.bool_))
      or not (concrete_scalar or isinstance(value, numbers.Real))):
    raise ValueError(f"{where}{name} must be a float{rng}{or_none} (a static Python number), got "
                     f"{type(value).__name__} {value!r}")
  result = float(value)
  if not math.isfinite(result):
    raise ValueError(f"{where}{name} must be finite{' and' + rng if rng else ''}, got {result}")
  below = low is not None and (result < low if low_inclusive else result <= low)
  above = high is not None and (result > high if high_inclusive else result >= high)
  if below or above:
    raise ValueError(f"{where}{name} must be{rng}, got {result}")
  return result


def default_scale(scale: float | None, head_dim: int, *, name: str = "scale",
                  fn: str | None = None) -> float:
  """``scale`` as a float (``None``: ``head_dim ** -0.5``); a ValueError unless static and finite.

  ``name`` and ``fn`` name the argument and the function in the error (see :func:`static_float`).
  """
  if scale is None:
    return head_dim ** -0.5
  return static_float(scale, name, fn=fn)


def static_int(name: str, value: Any) -> int:
  """``value`` as a Python int: a ValueError unless it is a static integer (no truncation).

  Integral floats (``2.0``) are accepted; ``1.5``, bools and tracers are not.
  """
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be a static int, got {value!r}")
  if isinstance(value, jax.core.Tracer):
    raise ValueError(f"{name} must be a static Python int, got a traced value; a position that "
                     f"changes at run time belongs in an array the mod carries (e.g. "
                     f"prefix_lm_mod(lengths) or a mask over positions) rather than here")
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)) and float(value).is_integer():
    return int(value)
  raise ValueError(f"{name} must be a static int, got {type(value).__name__} {value!r}")


def check_positive_int(name: str, value: Any) -> int:
  """``value`` as an int, or a ValueError naming ``name`` unless it is a positive (non-bool) int."""
  if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return int(value)


def check_block(name: str, value: int) -> int:
  """Block and chunk sizes: static positive ints."""
  return check_positive_int(name, value)


def check_dropout(dropout_rate: Any, dropout_rng: Any, *,
                  kernel: str = "attention") -> tuple[float, jax.Array | None]:
  """``(rate, seed)``: attention dropout's static rate and its uint32 ``(2,)`` seed (or None).

  ``dropout_rate`` must be a static Python float in ``[0, 1)``. ``dropout_rng`` is a PRNG key
  (``jax.random.key`` or a legacy ``uint32 (2,)`` ``PRNGKey``) or an integer scalar seed; it may
  be traced, so a new key per step recompiles nothing. The seed words feed
  :func:`attnax.kernels.tiles.dropout_keep`; the same key gives the same mask in every kernel.
  With rate 0 the key is ignored (may be None) and the seed is None.
  """
  rate = static_float(dropout_rate, "dropout_rate", fn=kernel, low=0.0, high=1.0,
                      high_inclusive=False)
  if rate == 0.0:
    return 0.0, None
  if dropout_rng is None:
    raise ValueError(f"{kernel}: dropout_rate={rate} > 0 needs dropout_rng (a jax.random.key or "
                     "an integer seed)")
  if not hasattr(dropout_rng, "dtype"):
    if isinstance(dropout_rng, (int, np.integer)) and not isinstance(dropout_rng, bool):
      dropout_rng = np.uint32(int(dropout_rng) % 2 ** 32)
    else:
      raise ValueError(f"{kernel}: dropout_rng must be a PRNG key or an integer seed, got "
                       f"{type(dropout_rng).__name__}")
  shape, dtype = tuple(jnp.shape(dropout_rng)), dropout_rng.dtype
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    if shape:
      raise ValueError(f"{kernel}: dropout_rng must be a single PRNG key, got keys of shape "
                       f"{shape}")
    return rate, jax.random.bits(dropout_rng, (2,), jnp.uint32)
  if dtype == jnp.uint32 and shape == (2,):      # a legacy raw key, jax.random.PRNGKey(seed)
    return rate, jax.random.bits(dropout_rng, (2,), jnp.uint32)
  if jnp.issubdtype(dtype, jnp.integer) and shape == ():
    seed = jnp.asarray(dropout_rng).astype(jnp.uint32)
    return rate, jnp.stack([seed, jnp.zeros((), jnp.uint32)])
  raise ValueError(f"{kernel}: dropout_rng must be a PRNG key (jax.random.key(...), or a uint32 "
                   f"(2,) PRNGKey) or an integer scalar seed, got {dtype} of shape {shape}")


def check_lse(lse: Any, q: jax.Array) -> None:
  expected = q.shape[:3]
  if tuple(jnp.shape(lse)) != tuple(expected):
    raise ValueError(f"lse must have shape {tuple(expected)} (B, Hq, Sq), got {tuple(jnp.shape(lse))}")


def gpu_reasons(what: str, *, hint: str = "", min_cc: float = 8.0,
                exact_cc: str | None = None) -> list[str]:
  """Why this process cannot run a compiled GPU lowering (empty when it can).

  ``what`` names the lowering; ``hint`` ends the no-GPU reason (what to use instead). A lowering
  needs compute capability ``>= min_cc``, or exactly ``exact_cc`` (``"9.0"``: Hopper-only code).
  """
  platform = jax.default_backend()
  if platform != "gpu":
    return [f"{what} needs a CUDA GPU, but jax.default_backend() is {platform!r}{hint}"]
  cc = getattr(jax.devices()[0], "compute_capability", None)
  if exact_cc is not None:
    if str(cc) != exact_cc:
      return [f"{what} is written for sm{exact_cc.replace('.', '')}; the device has compute "
              f"capability {cc or 'unknown'}"]
    return []
  try:
    if cc is not None and float(cc) < min_cc:
      return [f"{what} needs compute capability >= {min_cc}, device has {cc}"]
  except ValueError:
    pass
  return []


def num_sms(default: int = 132) -> int:
  """The first device's streaming multiprocessors (the H100/H200's 132 when it does not say, as
  when a GPU kernel is lowered for sm90 on a CPU machine): the size of a persistent grid."""
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    return default
  return int(getattr(dev, "core_count", None) or default) if dev.platform == "gpu" else default


def check_lengths(x: Any, batch: int, name: str, fn: str) -> jax.Array | None:
  """Per-sequence lengths: None, or an integer ``(batch,)`` array (int32), >= 0 when concrete; a
  ValueError naming ``fn`` and ``name`` otherwise."""
  if x is None:
    return None
  x = jnp.asarray(x)
  if x.shape != (batch,) or not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{fn}: {name} must be integer lengths, one per sequence, of shape (B,) = "
                     f"({batch},), got {x.dtype}{tuple(x.shape)}")
  if not isinstance(x, jax.core.Tracer) and np.any(np.asarray(x) < 0):
    raise ValueError(f"{fn}: {name} must be >= 0, got {np.asarray(x).tolist()}")
  return x.astype(jnp.int32)
