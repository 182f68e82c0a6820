"""Triton-lowered Pallas kernels: the flash forward, the dQ pass and the dK/dV pass.

All three kernels walk the same schedule: the BlockMask's lists (full tiles first, without the
elementwise mask; then partial tiles, with it). Empty tiles are in no list, so they are never
loaded. The tile maths is :mod:`attnax.kernels.tiles` (shared with every other kernel); this module
only adds the Pallas plumbing: refs, grids, the index lists and the mod operands.

Tiling. The BlockMask has one tiling, ``(block_q, block_k)`` (the *coarse* tiles). Each kernel may
run finer: a program owns ``rows`` rows of a coarse tile (the grid splits the coarse tile) and
walks the other axis in ``cols``-wide chunks (a static loop inside each coarse tile). The schedule
is therefore the same in the forward and both backward passes, whatever their tile sizes.

Mods that carry arrays: the mod pytrees are flattened; array leaves become whole-array 1-D kernel
operands and are rebuilt inside the kernel as :class:`RefArray` adaptors, which have ``.shape`` and
``__getitem__`` (a flat gather). :func:`attnax.kernels.score_mods.take` works on them unchanged.

The arrays reaching this module are already padded: ``q_pad``/``kv_pad`` are multiples of the
coarse blocks and the head dims are powers of two (zero padding); the true lengths are in the spec.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attnax.kernels import tiles

f32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))   # a @ b.T
_TN = (((0,), (0,)), ((), ()))   # a.T @ b


# ----------------------------------------------------------------------------- mods as operands


@dataclasses.dataclass(frozen=True)
class ModSpec:
  """Static description of the mods: the treedef, static leaves, and each array leaf's meta."""
  treedef: Any
  static_leaves: tuple          # the leaf itself where static, None where an array
  array_meta: tuple             # (shape, dtype name) where an array, None where static

  @property
  def num_arrays(self) -> int:
    return sum(m is not None for m in self.array_meta)


def _is_array_leaf(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic)) or isinstance(x, jax.core.Tracer)


def split_mods(score_fn: Any, mask_fn: Any) -> tuple[ModSpec, tuple[jax.Array, ...]]:
  """Flatten ``(score_fn, mask_fn)``: a hashable :class:`ModSpec` and the 1-D operand arrays."""
  leaves, treedef = jax.tree_util.tree_flatten((score_fn, mask_fn))
  static, meta, arrays = [], [], []
  for leaf in leaves:
    if _is_array_leaf(leaf):
      a = jnp.asarray(leaf)
      dtype = jnp.dtype(a.dtype)
      if dtype == jnp.bool_:
        op = a.astype(jnp.int32)
      elif jnp.issubdtype(dtype, jnp.integer):
        op = a.astype(jnp.int32)
      elif dtype in (jnp.dtype(jnp.float64),):
        op = a.astype(f32)
      else:
        op = a
      static.append(None)
      meta.append((tuple(a.shape), dtype.name))
      arrays.append(op.reshape(-1) if a.ndim else op.reshape(1))
    else:
      static.append(leaf)
      meta.append(None)
  return ModSpec(treedef, tuple(static), tuple(meta)), tuple(arrays)


class RefArray:
  """A mod's array inside a kernel: ``.shape`` and ``[idx]`` gathering from a flat 1-D ref.

  Index arrays broadcast against each other; the flat index is clamped to the array, so a padded
  position (past the true sequence end) reads a valid element (its score is masked or discarded).
  """

  def __init__(self, ref, shape, dtype):
    self.ref, self.shape, self.dtype = ref, tuple(shape), jnp.dtype(dtype)
    self.ndim = len(self.shape)
    self.size = math.prod(self.shape)

  def __getitem__(self, idx):
    if not isinstance(idx, tuple):
      idx = (idx,)
    if len(idx) != self.ndim:
      raise ValueError(f"indexing a mod array of shape {self.shape} with {len(idx)} indices")
    flat, stride = None, 1
    for d in reversed(range(self.ndim)):
      i = jnp.asarray(idx[d], jnp.int32)
      term = i if stride == 1 else i * stride
      flat = term if flat is None else flat + term
      stride *= self.shape[d]
    flat = jnp.clip(flat, 0, self.size - 1)
    val = self.ref[flat]
    if self.dtype == jnp.bool_:
      return val != 0
    return val


def rebuild_mods(ms: ModSpec, refs) -> tuple[Any, Any]:
  it = iter(refs)
  leaves = []
  for static, meta in zip(ms.static_leaves, ms.array_meta):
    if meta is None:
      leaves.append(static)
      continue
    shape, dtype = meta
    ref = next(it)
    if shape == ():
      val = ref[0]
      leaves.append(val != 0 if jnp.dtype(dtype) == jnp.bool_ else val)
    else:
      leaves.append(RefArray(ref, shape, dtype))
  return jax.tree_util.tree_unflatten(ms.treedef, leaves)


# ----------------------------------------------------------------------------- the static spec


@dataclasses.dataclass(frozen=True)
class KernelSpec:
  """Everything static about one call: shapes (padded and true), tiling, launch knobs, mods."""
  batch: int
  q_heads: int
  kv_heads: int
  q_len: int            # true lengths
  kv_len: int
  q_pad: int            # padded lengths (multiples of block_q / block_k)
  kv_pad: int
  head_dim: int         # padded head dims
  v_dim: int
  scale: float
  softcap: float | None
  block_q: int          # BlockMask (coarse) tiling
  block_k: int
  bm_batch: int         # B' of the BlockMask
  bm_heads: int         # H' of the BlockMask (1, kv_heads or q_heads)
  dense: bool           # no mask at all: walk every kv block without index lists
  fwd_rows: int
  fwd_cols: int
  fwd_warps: int
  fwd_stages: int
  dq_rows: int
  dq_cols: int
  dkv_rows: int         # kv rows per dK/dV program
  dkv_cols: int         # q chunk
  dq_warps: int
  dq_stages: int
  dkv_warps: int
  dkv_stages: int
  dkv_transposed: bool
  mods: ModSpec
  unit_grad: bool       # d(modded score)/d(score) == 1 wherever visible: skip the jvp
  interpret: bool

  @property
  def groups(self) -> int:
    return self.q_heads // self.kv_heads

  @property
  def nq(self) -> int:
    return self.q_pad // self.block_q

  @property
  def nk(self) -> int:
    return self.kv_pad // self.block_k

  def bm_index(self, b, h):
    """Row of the BlockMask's leading ``(B', H')`` axes for batch row ``b``, query head ``h``."""
    bb = b if self.bm_batch > 1 else 0
    if self.bm_heads == 1:
      hh = 0
    elif self.bm_heads == self.q_heads:
      hh = h
    else:
      hh = h // self.groups
    return bb * self.bm_heads + hh


# ----------------------------------------------------------------------------- shared tile maths


def _scores(q, k, spec: KernelSpec, score_fn, mask_fn, b, h, q_idx, kv_idx, masked: bool,
            need_grad: bool):
  """Scaled, soft-capped, modded, masked scores of one tile; and d(modded)/d(raw) if needed.

  ``q @ k.T``; called with the operands swapped (``k``, ``q``) and the index vectors swapped in
  orientation it gives the transposed tile (mods are elementwise and broadcast either way).
  """
  s_raw = lax.dot_general(q, k, _NT, preferred_element_type=f32) * spec.scale
  kv_len = spec.kv_len if (masked and spec.kv_len != spec.kv_pad) else None

  def modded(x):
    if spec.softcap is not None:
      x = spec.softcap * jnp.tanh(x / spec.softcap)
    return tiles.tile_scores(x, score_fn=score_fn, mask_fn=mask_fn, b=b, h=h, q_idx=q_idx,
                             kv_idx=kv_idx, kv_len=kv_len, apply_mask=masked)

  if not need_grad or spec.unit_grad:
    s, visible = modded(s_raw)
    return s, visible, None
  # Mods are elementwise: a jvp with tangent 1 is the derivative (softcap's 1 - tanh^2 included).
  s, ds, visible = jax.jvp(modded, (s_raw,), (jnp.ones_like(s_raw),), has_aux=True)
  return s, visible, ds


def _walk(spec: KernelSpec, refs, row, n_other, n_dense, dense_masked_last, dense_masked_all,
          visit, carry):
  """Visit full tiles (unmasked) then partial tiles (masked) of one BlockMask row.

  ``refs`` = (partial counts, partial indices, full counts, full indices, full-list first index,
  length of the full list's contiguous prefix). The contiguous prefix (all full tiles of causal,
  window and document masks) is walked as a range: no index load feeds the tile loads, so Triton
  can pipeline them; the rest of the full list and the partial list are read from the lists.
  """
  if spec.dense:
    body = lambda t, c: visit(t, c, dense_masked_all)
    n_full = n_dense - (1 if dense_masked_last else 0)
    carry = lax.fori_loop(0, n_full, body, carry)
    if dense_masked_last:
      carry = visit(n_dense - 1, carry, True)
    return carry
  cnt_ref, idx_ref, fcnt_ref, fidx_ref, first_ref, ncontig_ref = refs
  base = row * n_other
  n, n1, first = fcnt_ref[row], ncontig_ref[row], first_ref[row]
  carry = lax.fori_loop(0, n1, lambda t, c: visit(first + t, c, False), carry)
  carry = lax.fori_loop(n1, n, lambda t, c: visit(fidx_ref[base + t], c, False), carry)
  n = cnt_ref[row]
  return lax.fori_loop(0, n, lambda t, c: visit(idx_ref[base + t], c, True), carry)


NUM_LISTS = 6


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, *rest, spec):
  list_refs, rest = rest[:NUM_LISTS], rest[NUM_LISTS:]
  leaf_refs, (o_ref, lse_ref) = rest[:-2], rest[-2:]
  i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows, cols = spec.fwd_rows, spec.fwd_cols
  score_fn, mask_fn = rebuild_mods(spec.mods, leaf_refs)
  q_start = i * rows
  q = q_ref[...]
  q_idx = q_start + lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
  m, l = tiles.init_stats((rows,))
  acc = jnp.zeros((rows, spec.v_dim), f32)

  def visit(kv_block, carry, masked):
    acc, m, l = carry
    for c in range(spec.block_k // cols):
      k_start = kv_block * spec.block_k + c * cols
      k = k_ref[pl.ds(k_start, cols), :]
      v = v_ref[pl.ds(k_start, cols), :]
      kv_idx = k_start + lax.broadcasted_iota(jnp.int32, (1, cols), 1)
      s, visible, _ = _scores(q, k, spec, score_fn, mask_fn, b, h, q_idx, kv_idx, masked, False)
      p, alpha, m, l = tiles.online_softmax_step(s, visible, m, l)
      p = p.astype(v.dtype) if jnp.dtype(v.dtype).itemsize < 4 else p
      acc = acc * alpha[:, None] + lax.dot(p, v, preferred_element_type=f32)
    return acc, m, l

  row = spec.bm_index(b, h) * spec.nq + q_start // spec.block_q
  ragged_k = spec.kv_len != spec.kv_pad
  acc, m, l = _walk(spec, list_refs, row, spec.nk, spec.nk, ragged_k, False, visit, (acc, m, l))
  out, lse = tiles.finalize(acc, m, l)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse


def _launch(spec: KernelSpec, warps: int, stages: int):
  return dict(
      interpret=spec.interpret,
      compiler_params=None if spec.interpret else plgpu.CompilerParams(num_warps=warps,
                                                                        num_stages=stages))


def _whole(x):
  """BlockSpec for a whole 1-D operand (index lists, mod arrays)."""
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def forward(spec: KernelSpec, q, k, v, lists, leaves):
  """``(out, lse)`` on padded inputs: out ``(B, Hq, q_pad, v_dim)``, lse f32 ``(B, Hq, q_pad)``."""
  g = spec.groups
  rows = spec.fwd_rows
  grid = (spec.q_pad // rows, spec.batch, spec.q_heads)
  in_specs = [
      pl.BlockSpec((None, None, rows, spec.head_dim), lambda i, b, h: (b, h, i, 0)),
      pl.BlockSpec((None, None, spec.kv_pad, spec.head_dim), lambda i, b, h: (b, h // g, 0, 0)),
      pl.BlockSpec((None, None, spec.kv_pad, spec.v_dim), lambda i, b, h: (b, h // g, 0, 0)),
  ] + [_whole(x) for x in lists] + [_whole(x) for x in leaves]
  out_specs = [
      pl.BlockSpec((None, None, rows, spec.v_dim), lambda i, b, h: (b, h, i, 0)),
      pl.BlockSpec((None, None, rows), lambda i, b, h: (b, h, i)),
  ]
  out_shape = [
      jax.ShapeDtypeStruct((spec.batch, spec.q_heads, spec.q_pad, spec.v_dim), q.dtype),
      jax.ShapeDtypeStruct((spec.batch, spec.q_heads, spec.q_pad), f32),
  ]
  return pl.pallas_call(
      lambda *refs: _fwd_kernel(*refs, spec=spec), grid=grid, in_specs=in_specs,
      out_specs=out_specs, out_shape=out_shape, name="attnax_flash_fwd",
      **_launch(spec, spec.fwd_warps, spec.fwd_stages))(q, k, v, *lists, *leaves)


# ----------------------------------------------------------------------------- backward: dQ


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, spec):
  list_refs, rest = rest[:NUM_LISTS], rest[NUM_LISTS:]
  leaf_refs, dq_ref = rest[:-1], rest[-1]
  i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows, cols = spec.dq_rows, spec.dq_cols
  score_fn, mask_fn = rebuild_mods(spec.mods, leaf_refs)
  q_start = i * rows
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_idx = q_start + lax.broadcasted_iota(jnp.int32, (rows, 1), 0)

  def visit(kv_block, dq, masked):
    for c in range(spec.block_k // cols):
      k_start = kv_block * spec.block_k + c * cols
      k = k_ref[pl.ds(k_start, cols), :]
      v = v_ref[pl.ds(k_start, cols), :]
      kv_idx = k_start + lax.broadcasted_iota(jnp.int32, (1, cols), 1)
      s, visible, dmod = _scores(q, k, spec, score_fn, mask_fn, b, h, q_idx, kv_idx, masked, True)
      p = tiles.probabilities(s, visible, lse)
      dp = lax.dot_general(do, v, _NT, preferred_element_type=f32)
      ds = p * (dp - delta[:, None])
      if dmod is not None:
        ds = ds * dmod
      dq = dq + lax.dot(ds.astype(k.dtype), k, preferred_element_type=f32)
    return dq

  row = spec.bm_index(b, h) * spec.nq + q_start // spec.block_q
  ragged_k = spec.kv_len != spec.kv_pad
  dq = _walk(spec, list_refs, row, spec.nk, spec.nk, ragged_k, False, visit,
             jnp.zeros((rows, spec.head_dim), f32))
  dq_ref[...] = (dq * spec.scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- backward: dK, dV


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, spec):
  list_refs, rest = rest[:NUM_LISTS], rest[NUM_LISTS:]
  leaf_refs, (dk_ref, dv_ref) = rest[:-2], rest[-2:]
  j, b, hk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows, cols = spec.dkv_rows, spec.dkv_cols
  score_fn, mask_fn = rebuild_mods(spec.mods, leaf_refs)
  k_start = j * rows
  k, v = k_ref[...], v_ref[...]
  kv_idx = k_start + lax.broadcasted_iota(jnp.int32, (1, rows), 1)
  kv_col = k_start + lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
  ragged_k = spec.kv_len != spec.kv_pad

  def one_head(g, carry):
    h = hk * spec.groups + g

    def visit(q_block, carry, masked):
      dk, dv = carry
      for c in range(spec.block_q // cols):
        q_start = q_block * spec.block_q + c * cols
        q = q_ref[g, pl.ds(q_start, cols), :]
        do = do_ref[g, pl.ds(q_start, cols), :]
        lse = lse_ref[g, pl.ds(q_start, cols)]
        delta = delta_ref[g, pl.ds(q_start, cols)]
        low = jnp.dtype(do.dtype).itemsize < 4
        if spec.dkv_transposed:
          # Work on the transposed tile (keys x queries), as the Triton tutorial does: every
          # matmul then takes its operands as loaded (no transposes of computed tiles).
          q_idx = q_start + lax.broadcasted_iota(jnp.int32, (1, cols), 1)
          st, visible, dmod = _scores(k, q, spec, score_fn, mask_fn, b, h, q_idx, kv_col, masked,
                                      True)
          # tiles.probabilities, transposed: exp(s - lse) with lse = -inf rows giving 0.
          lse_safe = jnp.where(jnp.isfinite(lse), lse, jnp.inf)
          pt = jnp.exp(st - lse_safe[None, :])
          if visible is not None:
            pt = jnp.where(visible, pt, 0.0)
          dv = dv + lax.dot(pt.astype(do.dtype) if low else pt, do, preferred_element_type=f32)
          dpt = lax.dot_general(v, do, _NT, preferred_element_type=f32)
          dst = pt * (dpt - delta[None, :])
          if dmod is not None:
            dst = dst * dmod
          dk = dk + lax.dot(dst.astype(q.dtype), q, preferred_element_type=f32)
        else:
          q_idx = q_start + lax.broadcasted_iota(jnp.int32, (cols, 1), 0)
          s, visible, dmod = _scores(q, k, spec, score_fn, mask_fn, b, h, q_idx, kv_idx, masked,
                                     True)
          p = tiles.probabilities(s, visible, lse)
          pc = p.astype(do.dtype) if low else p
          dv = dv + lax.dot_general(pc, do, _TN, preferred_element_type=f32)
          dp = lax.dot_general(do, v, _NT, preferred_element_type=f32)
          ds = p * (dp - delta[:, None])
          if dmod is not None:
            ds = ds * dmod
          dk = dk + lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=f32)
      return dk, dv

    row = spec.bm_index(b, h) * spec.nk + k_start // spec.block_k
    return _walk(spec, list_refs, row, spec.nq, spec.nq, False, ragged_k, visit, carry)

  carry = (jnp.zeros((rows, spec.head_dim), f32), jnp.zeros((rows, spec.v_dim), f32))
  if spec.groups == 1:
    dk, dv = one_head(0, carry)
  else:
    dk, dv = lax.fori_loop(0, spec.groups, one_head, carry)
  dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward_dq(spec: KernelSpec, q, k, v, do, lse, delta, lists, leaves):
  """dQ on padded inputs (one program per q tile and query head)."""
  g = spec.groups
  rows = spec.dq_rows
  return pl.pallas_call(
      lambda *refs: _dq_kernel(*refs, spec=spec),
      grid=(spec.q_pad // rows, spec.batch, spec.q_heads),
      in_specs=[
          pl.BlockSpec((None, None, rows, spec.head_dim), lambda i, b, h: (b, h, i, 0)),
          pl.BlockSpec((None, None, spec.kv_pad, spec.head_dim),
                       lambda i, b, h: (b, h // g, 0, 0)),
          pl.BlockSpec((None, None, spec.kv_pad, spec.v_dim), lambda i, b, h: (b, h // g, 0, 0)),
          pl.BlockSpec((None, None, rows, spec.v_dim), lambda i, b, h: (b, h, i, 0)),
          pl.BlockSpec((None, None, rows), lambda i, b, h: (b, h, i)),
          pl.BlockSpec((None, None, rows), lambda i, b, h: (b, h, i)),
      ] + [_whole(x) for x in lists] + [_whole(x) for x in leaves],
      out_specs=pl.BlockSpec((None, None, rows, spec.head_dim), lambda i, b, h: (b, h, i, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), name="attnax_flash_dq",
      **_launch(spec, spec.dq_warps, spec.dq_stages),
  )(q, k, v, do, lse, delta, *lists, *leaves)


def backward_dkv(spec: KernelSpec, q, k, v, do, lse, delta, tlists, leaves):
  """(dK, dV) on padded inputs: one program per kv tile and kv head, looping over its group."""
  g = spec.groups
  rows = spec.dkv_rows
  return pl.pallas_call(
      lambda *refs: _dkv_kernel(*refs, spec=spec),
      grid=(spec.kv_pad // rows, spec.batch, spec.kv_heads),
      in_specs=[
          pl.BlockSpec((None, g, spec.q_pad, spec.head_dim), lambda j, b, h: (b, h, 0, 0)),
          pl.BlockSpec((None, None, rows, spec.head_dim), lambda j, b, h: (b, h, j, 0)),
          pl.BlockSpec((None, None, rows, spec.v_dim), lambda j, b, h: (b, h, j, 0)),
          pl.BlockSpec((None, g, spec.q_pad, spec.v_dim), lambda j, b, h: (b, h, 0, 0)),
          pl.BlockSpec((None, g, spec.q_pad), lambda j, b, h: (b, h, 0)),
          pl.BlockSpec((None, g, spec.q_pad), lambda j, b, h: (b, h, 0)),
      ] + [_whole(x) for x in tlists] + [_whole(x) for x in leaves],
      out_specs=[
          pl.BlockSpec((None, None, rows, spec.head_dim), lambda j, b, h: (b, h, j, 0)),
          pl.BlockSpec((None, None, rows, spec.v_dim), lambda j, b, h: (b, h, j, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      name="attnax_flash_dkv",
      **_launch(spec, spec.dkv_warps, spec.dkv_stages),
  )(q, k, v, do, lse, delta, *tlists, *leaves)


def backward(spec: KernelSpec, q, k, v, do, lse, delta, lists, tlists, leaves):
  """``(dq, dk, dv)`` on padded inputs. ``delta`` is ``rowsum(out * dout) - dlse`` (f32)."""
  dq = backward_dq(spec, q, k, v, do, lse, delta, lists, leaves)
  dk, dv = backward_dkv(spec, q, k, v, do, lse, delta, tlists, leaves)
  return dq, dk, dv
