"""The one channel for the arrays that mods carry: mods -> kernel operands -> mods again.

A mod may carry arrays in two ways, and every kernel accepts both:

* as pytree leaves (every attnax mod: ``document_mask_mod(ids)``, ``alibi_mod(slopes=...)``,
  ``additive_bias_mod(bias)``, and any registered dataclass a user writes);
* as closed-over arrays of a plain function (``lambda b, h, i, j: ids[i] == ids[j]``): arrays or
  tracers of an enclosing ``jit``/``vmap``/``grad``, held in the function's closure cells.

:func:`collect` finds both kinds and returns a hashable :class:`ModOperands` plus the operand arrays. ``ModOperands.rebuild(values)``
gives the mods back with the operands replaced by ``values``: arrays (pure-JAX kernels, custom_vjp
residuals, float operands being differentiated) or :class:`RefArray` views of a Pallas kernel's refs.
Closures are rebuilt by swapping ``values`` into their cells while they run; inside a Pallas kernel
they are traced that way and their jaxpr evaluated by :func:`eval_jaxpr`, where a point gather from
a ref-backed array becomes a load at computed flat indices, which is what Pallas kernels can do.

Floating-point operands are the differentiable ones (bias tables, slopes, gates); integer and bool
operands (ids) get no cotangent. ``ModOperands.float_mask`` says which is which.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attnax.kernels import jaxprs

__all__ = ["ModOperands", "RefArray", "LoadTape", "TapedRefArray", "collect", "eval_jaxpr",
           "is_array", "has_functions", "split_static", "join_static", "primal_values",
           "differentiated", "marked",
           "cotangent_or_none", "operand_cotangents"]


def is_array(x: Any) -> bool:
  """Arrays and tracers (not Python scalars): what becomes an operand."""
  return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.core.Tracer))


def _operand(x: Any) -> jax.Array:
  """A kernel operand: ints and bools as int32, float64 as f32 (kernels run f32 at most)."""
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_ or jnp.issubdtype(x.dtype, jnp.integer):
    return x.astype(jnp.int32)
  if x.dtype == jnp.float64 and not jax.config.jax_enable_x64:
    return x.astype(jnp.float32)
  return x


# ----------------------------------------------------------------------------- refs in kernels


class RefArray:
  """A mod's array inside a Pallas kernel: ``.shape`` and ``[idx]`` gathering from a flat 1-D ref.

  Index arrays broadcast against each other; the flat index is clamped to the array, so a padded
  position (past the true sequence end) reads a valid element (its score is masked or discarded).
  """

  def __init__(self, ref, shape, dtype, masked_load=None):
    self.ref, self.shape, self.dtype = ref, tuple(shape), jnp.dtype(dtype)
    self.ndim = len(self.shape)
    self.size = math.prod(self.shape)
    # ``masked_load(ref, flat, in_range)``: a lowering's load that reads 0 outside the array, so
    # that the flat index needs no clamp (a clamp hides the index's contiguity from Triton).
    self.masked_load = masked_load

  def flat_index(self, idx: Sequence[Any]) -> Any:
    flat, stride = None, 1
    for d in reversed(range(self.ndim)):
      i = jnp.asarray(idx[d], jnp.int32)
      term = i if stride == 1 else i * stride
      flat = term if flat is None else flat + term
      stride *= self.shape[d]
    return flat if self.masked_load is not None else jnp.clip(flat, 0, self.size - 1)

  def read(self, flat: Any) -> Any:
    """The raw values at ``flat`` (clamped or masked, as :meth:`flat_index` left them)."""
    if self.masked_load is None:
      return self.ref[flat]
    return self.masked_load(self.ref, flat, (flat >= 0) & (flat < self.size))

  def load(self, flat: Any) -> Any:
    val = self.read(flat)
    return val != 0 if self.dtype == jnp.bool_ else val

  def __getitem__(self, idx):
    if not isinstance(idx, tuple):
      idx = (idx,)
    if len(idx) != self.ndim:
      raise ValueError(f"indexing a mod array of shape {self.shape} with {len(idx)} indices")
    if self.ndim == 0:
      return self.value()
    return self.load(self.flat_index(idx))

  def value(self) -> Any:
    """The whole array as a value (small arrays; interpret mode)."""
    val = self.ref[...]
    val = val.reshape(self.shape) if self.shape else val.reshape(())
    return val != 0 if self.dtype == jnp.bool_ else val


class LoadTape:
  """The loads of mods' arrays inside a kernel, recorded and then replayed.

  A ref load has no transpose rule, so a kernel cannot take ``jax.vjp`` of a mod through its
  loads. Instead it runs the mod once recording every load (:class:`TapedRefArray`), then runs it
  again under ``jax.vjp`` with the recorded values replayed as inputs: the cotangent of each load
  is what the kernel adds back into the array's gradient at the load's flat indices.
  """

  def __init__(self):
    self.loads: list = []        # (operand index, flat indices, loaded value), in load order
    self._replay: list | None = None

  def record(self):
    self.loads, self._replay = [], None

  def replay(self, values: Sequence[Any]):
    self._replay = list(values)

  def next_value(self):
    return self._replay.pop(0)

  @property
  def replaying(self) -> bool:
    return self._replay is not None


class TapedRefArray(RefArray):
  """A :class:`RefArray` whose loads go through a :class:`LoadTape` (operand ``index``)."""

  def __init__(self, ref, shape, dtype, index: int, tape: LoadTape, masked_load=None):
    super().__init__(ref, shape, dtype, masked_load)
    self.index, self.tape = index, tape

  def load(self, flat: Any) -> Any:
    if self.tape.replaying:
      val = self.tape.next_value()
    else:
      val = self.read(flat)
      self.tape.loads.append((self.index, flat, val))
    return val != 0 if self.dtype == jnp.bool_ else val

  def value(self) -> Any:
    flat = jnp.arange(self.size, dtype=jnp.int32).reshape(self.shape)
    return self.load(flat if self.shape else jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------- jaxpr evaluation


class _UnitAxis:
  """``x[..., None]`` kept unmaterialised: a gather index component (see :func:`eval_jaxpr`)."""

  def __init__(self, x):
    self.components = (x,)


class _Stack:
  """``concatenate([x1[..., None], x2[..., None], ...], -1)`` kept as its components."""

  def __init__(self, components):
    self.components = tuple(components)


class _Point:
  """``dynamic_slice`` of one element (``x[h]`` with a scalar index): the loaded scalar, kept
  unreshaped until a ``squeeze`` takes it back to a scalar (Triton has no scalar reshape)."""

  def __init__(self, value, ndim: int):
    self.value, self.ndim = value, ndim


def _materialise(x: Any) -> Any:
  if isinstance(x, RefArray):
    return x.value()
  if isinstance(x, _Point):
    return jnp.reshape(x.value, (1,) * x.ndim)
  if isinstance(x, _UnitAxis):
    return x.components[0][..., None]
  if isinstance(x, _Stack):
    return jnp.concatenate([c[..., None] for c in x.components], axis=-1)
  return x


def _point_gather(operand: RefArray, indices: Any, dnums, slice_sizes) -> Any | None:
  """``operand[idx]`` for a gather that reads single elements, as a flat ref load (else None)."""
  if (dnums.offset_dims or dnums.operand_batching_dims or any(s != 1 for s in slice_sizes)
      or tuple(sorted(dnums.collapsed_slice_dims)) != tuple(range(operand.ndim))):
    return None
  if isinstance(indices, (_UnitAxis, _Stack)):
    comps = indices.components
  else:
    comps = tuple(indices[..., c] for c in range(indices.shape[-1]))
  idx = [jnp.zeros((), jnp.int32)] * operand.ndim
  for c, dim in enumerate(dnums.start_index_map):
    idx[dim] = comps[c]
  shape = jnp.broadcast_shapes(*(jnp.shape(i) for i in idx))
  return operand.load(jnp.broadcast_to(operand.flat_index(idx), shape))


_SPECIAL = (RefArray, _UnitAxis, _Stack, _Point)


def _ref_rule(eqn, vals: list) -> list:
  """One equation of :func:`eval_jaxpr`: a point gather from a :class:`RefArray` (and the index
  components it is built from) kept as a load; anything else bound to materialised values."""
  name = eqn.primitive.name
  out = None
  if any(isinstance(x, _SPECIAL) for x in vals):
    if name == "gather" and isinstance(vals[0], RefArray):
      out = _point_gather(vals[0], vals[1], eqn.params["dimension_numbers"],
                          eqn.params["slice_sizes"])
    elif (name == "dynamic_slice" and isinstance(vals[0], RefArray)
          and all(n == 1 for n in eqn.params["slice_sizes"])
          and not any(isinstance(x, _SPECIAL) for x in vals[1:])):
      out = _Point(vals[0].load(vals[0].flat_index(vals[1:])), vals[0].ndim)
    elif (name == "squeeze" and isinstance(vals[0], _Point)
          and len(eqn.params["dimensions"]) == vals[0].ndim):
      out = vals[0].value
    elif (name == "concatenate" and eqn.params["dimension"] == len(eqn.outvars[0].aval.shape) - 1
          and all(isinstance(x, (_UnitAxis, _Stack)) for x in vals)):
      out = _Stack([c for x in vals for c in x.components])
  elif (name == "broadcast_in_dim" and eqn.params.get("sharding") is None
        and tuple(eqn.params["shape"]) == tuple(jnp.shape(vals[0])) + (1,)):
    # ``x[..., None]`` of a plain value: possibly a gather index; materialised on first use by
    # anything else. (Its one operand is plain here, so the branch above never sees it.)
    out = _UnitAxis(vals[0])
  if out is not None:
    return [out]
  return jaxprs.bind(eqn, [_materialise(x) for x in vals])


def eval_jaxpr(jaxpr: Any, consts: Sequence[Any], *args: Any) -> list[Any]:
  """Evaluate ``jaxpr`` where constants may be :class:`RefArray`.

  A point gather from a :class:`RefArray` becomes a flat ref load; its index vector is kept as
  components (``x[..., None]`` and their concatenation are never built, since a Triton kernel
  cannot concatenate along a unit axis). Calls (``pjit``, ``closed_call``, ...) are inlined
  (:func:`attnax.kernels.jaxprs.replay`), so a gather inside one is seen; anything else
  materialises the array first.
  """
  return [_materialise(x) for x in jaxprs.replay(jaxpr, consts, args, _ref_rule)]


class _GlobalArray:
  """A module-level array a mod function reads by name (held like a closure cell)."""

  def __init__(self, namespace: dict, name: str):
    self.namespace, self.name = namespace, name

  @property
  def cell_contents(self):
    return self.namespace[self.name]


def _array_cells(fn: Any, seen=None) -> list:
  """Where ``fn`` (and functions it closes over) find arrays: closure cells and module globals."""
  seen = set() if seen is None else seen
  if id(fn) in seen or not callable(fn):
    return []
  seen.add(id(fn))
  fn = getattr(fn, "__func__", fn)
  cells = []
  for cell in getattr(fn, "__closure__", None) or ():
    try:
      val = cell.cell_contents
    except ValueError:   # an empty cell
      continue
    if is_array(val):
      cells.append(cell)
    elif callable(val) and not isinstance(val, type):
      cells.extend(_array_cells(val, seen))
  code, namespace = getattr(fn, "__code__", None), getattr(fn, "__globals__", None)
  if code is not None and namespace is not None:
    cells.extend(_GlobalArray(namespace, n) for n in code.co_names
                 if is_array(namespace.get(n)))
  return cells


class _swapped:
  """Context: the given closure cells hold ``values`` instead of their arrays (module globals are
  left alone: they are concrete, and matched by identity where they must become operands)."""

  def __init__(self, cells, values):
    pairs = [(c, v) for c, v in zip(cells, values) if not isinstance(c, _GlobalArray)]
    self.cells, self.values = [c for c, _ in pairs], [v for _, v in pairs]

  def __enter__(self):
    self.saved = [c.cell_contents for c in self.cells]
    for c, v in zip(self.cells, self.values):
      c.cell_contents = v

  def __exit__(self, *exc):
    for c, v in zip(self.cells, self.saved):
      c.cell_contents = v


class _Closure:
  """A mod function whose closed-over arrays are replaced by ``values`` while it runs."""

  def __init__(self, fn, cells, values):
    self.fn, self.cells, self.values = fn, cells, tuple(values)

  def __call__(self, *args):
    with _swapped(self.cells, self.values):
      return self.fn(*args)


_NONE_TREE = jax.tree_util.tree_structure(None)


class _TracedMod:
  """Mod ``which`` (0: score, 1: mask) of a pair with closures, inside a Pallas kernel.

  The pair is rebuilt on placeholders for *every* operand (pytree leaves and closed-over arrays),
  traced, and its jaxpr evaluated by :func:`eval_jaxpr` on the :class:`RefArray` values, which
  turns gathers into loads: every load then happens at the kernel's trace level (a
  :class:`LoadTape` sees them all; none is a tracer of the inner trace). Swapping cells rather
  than tracing over captured tracers means a closure over a tracer of an enclosing ``grad`` can
  be rebuilt after that trace has ended, in a backward.
  """

  def __init__(self, mods: "ModOperands", values, which: int):
    self.mods, self.values, self.which = mods, tuple(values), which

  def __call__(self, *args):
    def traced(operands, *args):
      return self.mods.rebuild(operands)[self.which](*args)

    placeholders = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in self.values]
    closed = jax.make_jaxpr(traced)(placeholders, *args)
    cell_vals = self.values[self.mods.num_leaves:]
    globals_ = [(c.cell_contents, v) for c, v in zip(self.mods.cells, cell_vals)
                if isinstance(c, _GlobalArray)]
    consts = [next((v for g, v in globals_ if g is c), c) for c in closed.consts]
    return eval_jaxpr(closed.jaxpr, consts, *self.values, *args)[0]


# ----------------------------------------------------------------------------- collect / rebuild


@dataclasses.dataclass(frozen=True, eq=False)
class ModOperands:
  """The static part of a pair of mods ``(score_fn, mask_fn)``.

  Attributes:
    treedef: the pair's pytree structure.
    slots: per leaf, ``None`` for an operand (in order) or the static leaf itself.
    meta: ``(shape, dtype name)`` of every operand (its original dtype: bool stays bool).
    cells: closure cells of the pair's functions that hold arrays (operands after the leaves).
    num_leaves: how many operands are pytree leaves.
  """
  treedef: Any
  slots: tuple
  meta: tuple
  cells: tuple
  num_leaves: int

  def _key(self):
    return (self.treedef, tuple(map(_static_key, self.slots)), self.meta,
            tuple(id(c) for c in self.cells))

  def __hash__(self):
    return hash(self._key())

  def __eq__(self, other):
    return isinstance(other, ModOperands) and self._key() == other._key()

  @property
  def float_mask(self) -> tuple[bool, ...]:
    """Which operands are floating point (differentiable)."""
    return tuple(jnp.issubdtype(jnp.dtype(d), jnp.inexact) for _, d in self.meta)

  def rebuild(self, values: Sequence[Any]) -> tuple[Any, Any]:
    """``(score_fn, mask_fn)`` with the operands replaced by ``values`` (arrays or RefArrays)."""
    values = tuple(x != 0 if d == "bool" and not isinstance(x, RefArray) and x.dtype != jnp.bool_
                   else x for x, (_, d) in zip(values, self.meta))
    if self.cells and any(isinstance(x, RefArray) for x in values):
      absent = [c == _NONE_TREE for c in self.treedef.children()]
      return tuple(None if none else _TracedMod(self, values, n) for n, none in enumerate(absent))
    leaf_vals, cell_vals = values[:self.num_leaves], values[self.num_leaves:]
    it = iter(leaf_vals)
    leaves = [next(it) if s is None else s for s in self.slots]
    score_fn, mask_fn = jax.tree_util.tree_unflatten(self.treedef, leaves)
    if not self.cells:
      return score_fn, mask_fn
    wrap = lambda f: None if f is None else _Closure(f, self.cells, cell_vals)
    return wrap(score_fn), wrap(mask_fn)

  def rebuild_from_refs(self, refs: Sequence[Any], tape: LoadTape | None = None,
                        masked_load=None) -> tuple[Any, Any]:
    """The mods inside a kernel: :class:`RefArray` views of its 1-D operand refs (the layout of
    :meth:`kernel_operands`); with ``tape``, views whose loads it records and replays; with
    ``masked_load`` (see :class:`RefArray`), unclamped indices read through it."""
    if tape is None:
      return self.rebuild([RefArray(r, shape, dtype, masked_load)
                           for r, (shape, dtype) in zip(refs, self.meta)])
    return self.rebuild([TapedRefArray(r, shape, dtype, n, tape, masked_load)
                         for n, (r, (shape, dtype)) in enumerate(zip(refs, self.meta))])

  @staticmethod
  def kernel_operands(operands: Sequence[Any]) -> tuple[jax.Array, ...]:
    """The operands as flat 1-D arrays, as a Pallas kernel takes them."""
    return tuple(jnp.reshape(x, (-1,)) if jnp.ndim(x) else jnp.reshape(x, (1,)) for x in operands)


def _static_key(x):
  try:
    hash(x)
    return x
  except TypeError:
    return ("unhashable", id(x))


def collect(score_fn: Any, mask_fn: Any) -> tuple[ModOperands, tuple[jax.Array, ...]]:
  """The static description of ``(score_fn, mask_fn)`` and their operand arrays.

  Operands are the pytree array leaves in order, then the arrays the functions among the leaves
  close over (read from their closure cells, so a tracer of an enclosing ``jit``/``vmap``/``grad``
  is an operand like any array). Integer and bool operands come back as int32, float64 as f32
  (outside x64).
  """
  leaves, treedef = jax.tree_util.tree_flatten((score_fn, mask_fn))
  is_op = [is_array(x) for x in leaves]
  slots = tuple(None if a else x for x, a in zip(leaves, is_op))
  leaf_ops = [x for x, a in zip(leaves, is_op) if a]
  cells, seen = [], set()
  for x in slots:
    if x is not None and callable(x):
      cells.extend(c for c in _array_cells(x, seen)
                   if all(c.cell_contents is not d.cell_contents for d in cells))
  captured = [c.cell_contents for c in cells]
  meta = tuple((tuple(jnp.shape(x)), jnp.dtype(jnp.asarray(x).dtype).name)
               for x in leaf_ops + captured)
  spec = ModOperands(treedef, slots, meta, tuple(cells), len(leaf_ops))
  return spec, tuple(_operand(x) for x in leaf_ops + captured)


def has_functions(tree: Any) -> bool:
  """Whether a plain function (not a pytree mod) is among the leaves of ``tree``.

  A kernel must not cache its compiled trace by such a function's identity: what it closes over
  (arrays, Python values) may change between calls, so it is traced again at every call.
  """
  return any(callable(x) and not is_array(x) for x in jax.tree_util.tree_leaves(tree))


def split_static(tree: Any) -> tuple[Any, tuple]:
  """``(key, arrays)``: a hashable static key of ``tree`` and its array leaves, for a kernel's own
  compiled cache (``join_static(key, arrays)`` gives the tree back).

  The key is None (trace every call) when the static part is unhashable or holds a plain function
  (a lambda mod): what it closes over is read afresh at every call, never cached with it.
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  is_arr = tuple(is_array(x) for x in leaves)
  static = tuple(None if a else x for x, a in zip(leaves, is_arr))
  arrays = tuple(x for x, a in zip(leaves, is_arr) if a)
  try:
    hash((treedef, static))
  except TypeError:
    return None, arrays
  if has_functions(static):
    return None, arrays
  return (treedef, static, is_arr), arrays


def join_static(key: Any, arrays: Sequence[Any]) -> Any:
  """The inverse of :func:`split_static`."""
  treedef, static, is_arr = key
  it = iter(arrays)
  return jax.tree_util.tree_unflatten(treedef, [next(it) if a else x
                                                for x, a in zip(static, is_arr)])


# ----------------------------------------------------------------------------- custom_vjp plumbing
#
# Kernels' custom_vjps are built with ``symbolic_zeros=True``: the forward rule sees which operands
# carry a tangent, and only those float operands get a cotangent pass in the backward.


def primal_values(primals: Any) -> Any:
  """The plain values of a pytree of ``CustomVJPPrimal`` (what a symbolic-zeros fwd rule gets)."""
  return jax.tree.map(lambda x: x.value, primals)


def differentiated(primals: Sequence[Any], float_mask: Sequence[bool]) -> tuple[tuple, tuple]:
  """``(plain operand values, marks)``: ``marks[i]`` is ``()`` for a float operand being
  differentiated and None otherwise; empty pytrees, so they ride along in the residuals.
  :func:`marked` reads them back."""
  values = tuple(x.value for x in primals)
  marks = tuple(() if f and x.perturbed else None for x, f in zip(primals, float_mask))
  return values, marks


def marked(marks: Sequence[Any]) -> tuple[int, ...]:
  """Indices of the operands :func:`differentiated` marked."""
  return tuple(i for i, m in enumerate(marks) if m is not None)


def cotangent_or_none(ct: Any) -> Any:
  """A symbolic-zero cotangent as None, anything else as is."""
  return None if isinstance(ct, jax.custom_derivatives.SymbolicZero) else ct


def operand_cotangents(values: Sequence[Any], diff: Sequence[int], d_ops: Sequence[Any]) -> tuple:
  """Cotangents for every operand: the computed ones in ``diff`` (in the operand's dtype), None
  (a symbolic zero) for the rest."""
  by_index = dict(zip(diff, d_ops))
  return tuple(by_index[i].astype(x.dtype) if i in by_index else None
               for i, x in enumerate(values))
