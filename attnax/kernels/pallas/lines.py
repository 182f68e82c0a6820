"""A register tile's index arithmetic kept as lines: one value per row, one per column.

A mod sees ``q_idx`` and ``kv_idx`` as whole ``(rows, cols)`` tiles, but inside a kernel each is a
start plus an iota along one axis, and what a mod reads per position (document ids, a bias row)
is a line too: one value per row or per column, broadcast. Evaluated as written,
``score + slopes[h] * (kv_idx - q_idx)`` costs per score an integer add for each index, a
subtract, a conversion, a multiply and an add; kept as lines until it meets the scores it costs
two adds per score, and the rest once per row and column. A causal mask's ``kv_idx <= q_idx``
becomes one compare per score.

:func:`lined` traces a function of the tile to a jaxpr and evaluates it with :class:`Lines`
values, ``const + row[:, None] + col[None, :]``, wherever the primitives allow; everything else
(and every output) is materialised into the tile and bound as traced, so any mod stays correct.
Integer arithmetic is exact in any grouping (two's complement wraps alike), and bounded integers
(positions) convert to float term by term exactly. Float terms are regrouped only when they are
such images of positions times scalars (ALiBi's ``slope * (kv_idx - q_idx)``): the constant
carries the tile's offset, the lines stay tile-local, so the regrouped sum rounds within a few
ulps of ``|bias| + slope * tile size``. Other floats keep the traced order of operations, so they
are bit-exact.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

from attnax.kernels.jaxprs import bind, replay

__all__ = ["Lines", "position", "lined", "materialize"]


@dataclasses.dataclass(frozen=True)
class Lines:
  """``const + lines[0][:, None] + lines[1][None, :]`` over a ``shape`` tile (absent terms None).

  ``bound``: for integers, a bound on the magnitude of every term and partial sum (None:
  unknown); for floats, not None when every term is a converted bounded integer times scalars
  (then terms may be regrouped).
  """
  shape: tuple
  dtype: Any
  const: Any
  lines: tuple
  bound: int | None

  @property
  def terms(self) -> int:
    return (self.const is not None) + sum(line is not None for line in self.lines)

  @property
  def axes(self) -> tuple:
    return tuple(a for a, line in enumerate(self.lines) if line is not None)

  @property
  def integer(self) -> bool:
    return jnp.issubdtype(self.dtype, jnp.integer)


def position(start: Any, iota: jax.Array, axis: int, shape: tuple, length: int) -> Lines:
  """``start + iota`` along ``axis`` of a ``shape`` tile (``iota`` 1-D int32), every value below
  ``length`` (so each of the two terms is too: their bound is ``2 * length``)."""
  lines = (iota, None) if axis == 0 else (None, iota)
  return Lines(tuple(shape), jnp.dtype(jnp.int32), start, lines, 2 * int(length))


def _folded(x: Lines) -> tuple:
  """``(row line, column line, constant)`` with the constant added into a line where there is
  one (once per row or column, not per element)."""
  l0, l1 = x.lines
  c = x.const
  if c is not None and l0 is not None:
    l0, c = _cast(l0 + c, x.dtype), None
  elif c is not None and l1 is not None:
    l1, c = _cast(l1 + c, x.dtype), None
  return l0, l1, c


def materialize(x: Lines) -> jax.Array:
  """The tile itself: one op per element where both lines are present."""
  l0, l1, c = _folded(x)
  out = None
  for axis, line in enumerate((l0, l1)):
    if line is not None:
      tile = lax.broadcast_in_dim(line, x.shape, (axis,))
      out = tile if out is None else out + tile
  if out is None:
    out = lax.broadcast_in_dim(jnp.asarray(c, x.dtype), x.shape, ())
  return out


# ----------------------------------------------------------------------------- the rules


def _cast(term, dtype):
  return None if term is None else jnp.asarray(term).astype(dtype)


def _is_scalar(v) -> bool:
  return not isinstance(v, Lines) and np.ndim(v) == 0


def _literal_bound(v) -> int | None:
  """|v| for a concrete integer (a traced scalar may be anything: None)."""
  if isinstance(v, jax.core.Tracer):
    return None
  try:
    val = np.asarray(v)
  except Exception:
    return None
  return abs(int(val)) if val.dtype.kind in "iub" and val.ndim == 0 else None


def _as_lines(v, shape, dtype) -> Lines:
  """A scalar operand as a constant-only Lines (a float scalar may be regrouped: bound 0)."""
  dtype = jnp.dtype(dtype)
  bound = _literal_bound(v) if jnp.issubdtype(dtype, jnp.integer) else 0
  return Lines(shape, dtype, v, (None, None), bound)


def _termwise(op, a, b):
  """``op`` of two optional terms; an absent term is a zero."""
  if b is None:
    return a
  if a is None:
    return b if op == "add" else -b
  return a + b if op == "add" else a - b


def _on_line(prim, params, values, shape, dtype) -> Lines | None:
  """An elementwise primitive applied once per row or column: when every operand is a scalar or
  a single line on one axis, the op the tile would apply per element (bit-exact)."""
  axis, terms = None, []
  for v in values:
    if isinstance(v, Lines):
      if len(v.axes) > 1 or (v.terms > 1 and not v.integer and v.bound is None):
        return None
      if not v.axes:
        terms.append(v.const)
        continue
      (a,) = v.axes
      if axis is not None and axis != a:
        return None
      axis = a
      # A constant folds into the line (exact for integers; regroupable floats may round).
      line = v.lines[a]
      terms.append(line if v.const is None else _cast(line + v.const, v.dtype))
    elif _is_scalar(v):
      terms.append(v)
    else:
      return None
  if axis is None or jnp.dtype(dtype) == jnp.bool_:
    return None   # scalars only (left to the traced program), or booleans (see _compare)
  n = shape[axis]
  terms = [t if np.ndim(t) == 1 else
           lax.broadcast_in_dim(jnp.asarray(t, getattr(t, "dtype", None)), (n,), ())
           for t in terms]
  out = prim.bind(*terms, **params)
  lines = (out, None) if axis == 0 else (None, out)
  return Lines(shape, jnp.dtype(dtype), None, lines, None)


def _linear(name, prim, params, a: Lines, b: Lines, dtype) -> Lines | None:
  """``a + b`` or ``a - b``: termwise for integers (exact in any grouping) and for regroupable
  floats; other floats only on one line (the traced op)."""
  dtype = jnp.dtype(dtype)
  integer = jnp.issubdtype(dtype, jnp.integer)
  if not integer and (a.bound is None or b.bound is None):
    return _on_line(prim, params, [a, b], a.shape, dtype)
  const = _cast(_termwise(name, a.const, b.const), dtype)
  lines = tuple(_cast(_termwise(name, la, lb), dtype) for la, lb in zip(a.lines, b.lines))
  bound = None if a.bound is None or b.bound is None else a.bound + b.bound
  return Lines(a.shape, dtype, const, lines, bound)


def _scale(prim, params, a: Lines, k, dtype) -> Lines | None:
  """``a * k`` for a scalar ``k``, distributed over the terms: integers always (modular), floats
  when regroupable; otherwise only on one line."""
  dtype = jnp.dtype(dtype)
  integer = jnp.issubdtype(dtype, jnp.integer)
  if not integer and a.bound is None:
    return _on_line(prim, params, [a, k], a.shape, dtype)
  kk = jnp.asarray(k, dtype)
  const = None if a.const is None else _cast(jnp.asarray(a.const, dtype) * kk, dtype)
  lines = tuple(None if l is None else _cast(l.astype(dtype) * kk, dtype) for l in a.lines)
  if integer:
    kb = _literal_bound(k)
    bound = None if a.bound is None or kb is None else a.bound * kb
  else:
    bound = a.bound   # (float: regroupable)
  return Lines(a.shape, dtype, const, lines, bound)


def _convert(prim, params, a: Lines, dtype) -> Lines | None:
  src, dtype = a.dtype, jnp.dtype(dtype)
  termwise = lambda bound: Lines(a.shape, dtype, _cast(a.const, dtype),
                                 tuple(_cast(l, dtype) for l in a.lines), bound)
  int_src, int_dst = jnp.issubdtype(src, jnp.integer), jnp.issubdtype(dtype, jnp.integer)
  if int_src and jnp.issubdtype(dtype, jnp.floating) and a.bound is not None and (
      a.bound < (1 << 24)):
    return termwise(a.bound)   # every term and partial sum converts exactly
  if int_src and int_dst and dtype.itemsize <= src.itemsize:
    return termwise(a.bound if dtype.itemsize == src.itemsize else None)   # modular sums
  if src == dtype:
    return a
  return _on_line(prim, params, [a], a.shape, dtype)


_COMPARE = {"eq", "ne", "lt", "le", "gt", "ge"}
# Elementwise primitives run on a line when their operands lie on one axis (bit-exact).
_ON_LINE = {"and", "or", "xor", "not", "select_n", "max", "min", "abs", "sign", "div", "rem",
            "floor", "ceil", "round", "exp", "exp2", "log", "tanh", "logistic", "integer_pow",
            "pow", "sqrt", "rsqrt", "shift_left", "shift_right_arithmetic",
            "shift_right_logical"}


def _compare(name, prim, params, a, b, shape):
  """``a OP b`` with at least one Lines operand, as a tile (None: materialise the operands).

  (Booleans are never kept as lines: a broadcast boolean line does not lower on every path.)
  """
  la = a if isinstance(a, Lines) else _as_lines(a, shape, jnp.asarray(a).dtype)
  lb = b if isinstance(b, Lines) else _as_lines(b, shape, jnp.asarray(b).dtype)
  dtype = la.dtype
  bounded = la.bound is not None and lb.bound is not None and la.bound + lb.bound < (1 << 31)
  if not (jnp.issubdtype(dtype, jnp.integer) and la.terms + lb.terms > 2 and (
      name in ("eq", "ne") or bounded)):
    return None
  # a OP b <=> (a - b) OP 0: exact for eq/ne (subtraction is a bijection mod 2**32) and for
  # bounded values (no wrap). As (const + row) OP (-col): one compare per element.
  l0, l1, _ = _folded(_linear("sub", None, None, la, lb, dtype))
  if l0 is None and l1 is None:
    return None
  left = (lax.broadcast_in_dim(l0, shape, (0,)) if l0 is not None
          else lax.broadcast_in_dim(jnp.zeros((), dtype), shape, ()))
  right = (lax.broadcast_in_dim(-l1, shape, (1,)) if l1 is not None
           else lax.broadcast_in_dim(jnp.zeros((), dtype), shape, ()))
  return prim.bind(left, right, **params)


def _lines_rule(eqn, ins, shape) -> list:
  """One equation with :class:`Lines` values: kept as lines where a rule allows, else bound to
  the materialised tiles."""
  name, prim = eqn.primitive.name, eqn.primitive
  params = prim.get_bind_params(eqn.params)
  out_aval = eqn.outvars[0].aval if eqn.outvars else None
  has_lines = any(isinstance(v, Lines) for v in ins)
  result = None
  if (name == "broadcast_in_dim" and not has_lines and np.ndim(ins[0]) <= 1
      and tuple(eqn.params["shape"]) == shape):
    # A line (or a scalar) spread over the tile: kept as what it is.
    x = ins[0]
    if np.ndim(x) == 0:
      result = _as_lines(x, shape, out_aval.dtype)
    else:
      (axis,) = eqn.params["broadcast_dimensions"]
      lines = (x, None) if axis == 0 else (None, x)
      result = Lines(shape, jnp.dtype(x.dtype), None, lines, None)
  elif has_lines and all(isinstance(v, Lines) or np.ndim(v) == 0 for v in ins):
    dtype = jnp.dtype(out_aval.dtype)
    if name in ("add", "sub"):
      a, b = (v if isinstance(v, Lines) else _as_lines(v, shape, getattr(v, "dtype", dtype))
              for v in ins)
      result = _linear(name, prim, params, a, b, dtype)
    elif name == "neg":   # exact termwise
      (a,) = ins
      result = Lines(shape, dtype, None if a.const is None else -a.const,
                     tuple(None if l is None else -l for l in a.lines), a.bound)
    elif name == "mul":
      a, b = ins
      if _is_scalar(a):
        a, b = b, a
      if _is_scalar(b):
        result = _scale(prim, params, a, b, dtype)
      else:
        result = _on_line(prim, params, ins, shape, dtype)
    elif name == "convert_element_type":
      result = _convert(prim, params, ins[0], dtype)
    elif name in _COMPARE:
      result = _compare(name, prim, params, ins[0], ins[1], shape)
    elif name in _ON_LINE:
      result = _on_line(prim, params, ins, shape, dtype)
  if result is None:
    return bind(eqn, [materialize(v) if isinstance(v, Lines) else v for v in ins])
  return [result]


def lined(fn: Callable, shape: tuple, index_args: dict) -> Callable:
  """``fn`` evaluated with its positional arguments ``index_args`` (argument number ->
  :class:`Lines`, or a function making one, called only if ``fn`` reads that argument) kept as
  lines. They are traced as ``shape`` int32 tiles, so ``fn`` sees what it would see without
  this; its outputs are tiles."""
  def run(*args):
    idx = sorted(index_args)
    dyn = [i for i in range(len(args)) if i not in index_args]

    def flat_fn(*vals):
      full = list(args)
      for i, v in zip(idx + dyn, vals):
        full[i] = v
      return fn(*full)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(
        *[jax.ShapeDtypeStruct(shape, jnp.int32) for _ in idx], *[args[i] for i in dyn])
    jaxpr = closed.jaxpr
    read = {v for eqn in jaxpr.eqns for v in eqn.invars if not isinstance(v, jex_core.Literal)}
    read |= {v for v in jaxpr.outvars if not isinstance(v, jex_core.Literal)}
    leaves = []
    for i, var in zip(idx, jaxpr.invars):
      make = index_args[i]
      leaves.append(None if var not in read else make() if callable(make) else make)
    leaves += jax.tree.leaves([args[i] for i in dyn])
    outs = replay(jaxpr, closed.consts, leaves,
                  functools.partial(_lines_rule, shape=tuple(shape)))
    outs = [materialize(o) if isinstance(o, Lines) else o for o in outs]
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return run
