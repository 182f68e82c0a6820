#!/usr/bin/env python3
"""attnax attention benchmark: every kernel and its peers, side by side, in one process.

DESIGN.md section 9. For each case (shape, mask) and each mode (``fwd``, ``fwd+bwd``) every selected
kernel is compiled, run once to check its output against the case's reference, then timed; one
table per case gives the median time, TFLOP/s and the ratio to cuDNN measured in the same run.

  python benchmarks/bench_attention.py                       # default cases (main, masks)
  python benchmarks/bench_attention.py --cases s4k,s4k-causal --kernels cudnn,xla,mha,tokamax
  python benchmarks/bench_attention.py --quick               # tiny sizes, runs on CPU
  python benchmarks/bench_attention.py --list                # cases, groups and kernels

Rules (also in benchmarks/README.md):

* FLOPs: ``4 * B * Hq * D * pairs`` for the forward, where ``pairs`` is ``Sq * Sk`` for dense
  attention, ``Sq * Sk / 2`` for causal (the usual convention), and the exact number of visible
  (query, key) pairs for sliding windows and packed documents. The backward counts 2.5 times the
  forward, so ``fwd+bwd`` counts 3.5 times the forward. Every row of a case uses the case's FLOPs
  (useful work), whatever the kernel computes: a kernel that computes masked-out tiles shows lower
  TFLOP/s.
* ``xcuDNN`` is ``t(cudnn row) / t(row)`` in the same run and mode: above 1 is faster than cuDNN.
* ``fwd+bwd`` times ``jax.vjp`` of the kernel followed by the pullback of a fixed random cotangent
  ``ct`` -- the gradient of ``sum(out * ct)`` with respect to q, k and v -- in one jitted function.
* Each kernel is timed in its native layout: attnax kernels take ``(B, H, S, D)``, the peers
  ``(B, S, H, D)``; inputs are generated once per case in both layouts, outside the timed region.
* Timing: one call to compile (plus one untimed warm call when that took less than the cell's
  budget), one timed call to size the loop, then repeats of ``inner``
  back-to-back asynchronous calls closed by ``block_until_ready``; the table gives the median over
  repeats of the time per call. When one input set is smaller than twice the L2 cache, several
  copies are rotated so consecutive calls do not hit in L2.
* A failure (unsupported case, out of memory, missing package or kernel) is printed as
  ``n/a (reason)`` in its cell; the run goes on.
* ``flex`` is PyTorch FlexAttention (``torch.compile(flex_attention)``, its own
  ``create_block_mask``) on the same inputs when torch imports; its recompile limits are raised and
  it compiles once per case and mode (see "FlexAttention" in README.md).
* ``--out PATH`` writes ``PATH.json`` (records carry each case's shape and mask kind) and
  ``PATH.md``; ``plot_bench.py`` (or ``--plot DIR``) draws TFLOP/s against S per mask kind from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from typing import Any, Callable

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
# tokamax imports xprof.cli.tools for its own profiling helpers only; a real xprof wins if present.
sys.path.append(os.path.join(_HERE, "xprof_stub"))
warnings.filterwarnings("ignore", category=DeprecationWarning)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

L2_BYTES = 50 * 2**20          # H100 50 MB, H200 60 MB: rotate inputs smaller than 2x this
BWD_FLOP_FACTOR = 2.5          # backward = 2.5 x forward; fwd+bwd = 3.5 x forward
MODES = ("fwd", "fwd+bwd")


class Unsupported(Exception):
  """A kernel cannot run a case (printed as n/a with the reason)."""


# ============================================================================ cases


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  batch: int
  heads: int
  seq: int
  head_dim: int = 128
  causal: bool = False
  window: int | None = None         # causal sliding window: keep 0 <= i - j < window
  docs: int | None = None           # number of equal documents packed into seq (causal in each)
  alibi: bool = False               # ALiBi (the paper's per-head slopes) on top of causal
  prefix: int | None = None         # prefix LM: keys < prefix visible to all queries, causal after
  aether: str | None = None         # "iid" or "clustered": an AETHER case
  kernels: tuple[str, ...] = ()     # default kernels, run in this order
  modes: tuple[str, ...] = MODES
  cluster_len: int = 512            # clustered keys: keys per cluster (contiguous)
  note: str = ""

  @property
  def kind(self) -> str:
    if self.aether:
      return f"AETHER, {self.aether} keys"
    if self.window:
      return f"causal window {self.window}"
    if self.docs:
      return f"{self.docs} causal documents of {self.seq // self.docs}"
    if self.alibi:
      return "ALiBi + causal"
    if self.prefix:
      return f"prefix LM, prefix {self.prefix}"
    return "causal" if self.causal else "dense"

  @property
  def mask_kind(self) -> str:
    """The family the plots group by: dense, causal, window, documents, alibi, prefix, aether-*."""
    if self.aether:
      return f"aether-{self.aether}"
    if self.window:
      return "window"
    if self.docs:
      return "documents"
    if self.alibi:
      return "alibi"
    if self.prefix:
      return "prefix"
    return "causal" if self.causal else "dense"

  @property
  def is_causal(self) -> bool:
    """Whether the case's mask is causal (or a causal one plus more: window, documents, ALiBi)."""
    return self.causal or bool(self.window or self.docs or self.alibi)

  def meta(self) -> dict:
    """The case's shape and mask, stored with every JSON record (the plots read them)."""
    return {"batch": self.batch, "heads": self.heads, "seq": self.seq, "head_dim": self.head_dim,
            "mask": self.mask_kind, "kind": self.kind, "window": self.window, "docs": self.docs,
            "prefix": self.prefix, "pairs": self.pairs()}

  def pairs(self) -> float:
    """Visible (query, key) pairs per (batch, head) used for the FLOP count."""
    s = self.seq
    if self.window:
      w = min(self.window, s)
      return w * (w + 1) / 2 + (s - w) * w
    if self.docs:
      ln = s // self.docs
      return self.docs * ln * (ln + 1) / 2
    if self.prefix:     # queries < P see the P prefix keys; query i >= P sees i + 1 keys
      p = min(self.prefix, s)
      return p * p + (s * (s + 1) - p * (p + 1)) / 2
    return s * s / 2 if self.is_causal else float(s * s)

  def flops(self, mode: str) -> float:
    f = 4.0 * self.batch * self.heads * self.head_dim * self.pairs()
    return f * (1.0 + BWD_FLOP_FACTOR) if mode == "fwd+bwd" else f


PEERS = ("cudnn", "xla", "mha", "tokamax-mosaic", "tokamax-triton", "flex")
# pallas_flash_attention by lowering: mosaic (sm90), triton, and auto (what a user gets by default).
PALLAS_ATTNAX = ("attnax-mosaic", "attnax-triton", "attnax-pallas")
# Dense attnax kernels; the first that ran is the AETHER cases' xdense baseline.
DENSE_ATTNAX = PALLAS_ATTNAX + ("attnax-flash",)
MAIN_KERNELS = PEERS + DENSE_ATTNAX
MASK_KERNELS = ("cudnn", "cudnn-mask", "xla", "mha", "tokamax-mosaic", "tokamax-triton",
                "flex") + DENSE_ATTNAX
# ALiBi: cuDNN plain causal is the baseline (another function); FlexAttention is the peer to beat.
ALIBI_KERNELS = ("cudnn", "flex") + DENSE_ATTNAX
PREFIX_KERNELS = ("cudnn", "cudnn-mask", "xla", "flex") + DENSE_ATTNAX
AETHER_KERNELS = ("attnax-mosaic", "attnax-pallas", "attnax-flash", "cudnn", "aether")


def _main_case(s: int, causal: bool, head_dim: int = 128, batch: int | None = None) -> Case:
  tag = f"s{s // 1024}k" + ("" if head_dim == 128 else f"-d{head_dim}") + ("-causal" if causal else "")
  return Case(tag, batch=batch or max(1, 16384 // s), heads=16, seq=s, head_dim=head_dim,
              causal=causal, kernels=MAIN_KERNELS)


def _curve_cases() -> list[Case]:
  """More sequence lengths per mask kind, so that the plots have curves (the "curves" group)."""
  out = []
  for s in (1024, 2048, 8192):
    out += [_main_case(s, False), _main_case(s, True)]
  for s in (8192, 16384):
    tag = f"{s // 1024}k"
    out += [Case(f"window{tag}", batch=32768 // s, heads=16, seq=s, window=1024,
                 kernels=MASK_KERNELS),
            Case(f"docs{tag}", batch=32768 // s, heads=16, seq=s, docs=s // 4096,
                 kernels=MASK_KERNELS)]
  for s in (2048, 4096, 16384):
    out.append(Case(f"alibi{s // 1024}k", batch=max(1, 16384 // s), heads=16, seq=s, alibi=True,
                    kernels=ALIBI_KERNELS))
  return out


def _aether_case(s: int, tag: str, keys: str) -> Case:
  small = s <= 32768
  return Case(f"aether-{tag}-{keys}", batch=max(1, 16384 // s), heads=16 if small else 8, seq=s,
              aether=keys,
              kernels=AETHER_KERNELS if s <= 131072 else ("attnax-pallas", "aether"),
              modes=MODES if s <= 131072 else ("fwd",),
              note="" if s <= 131072 else "fwd only by default: dense fwd+bwd at 1M costs minutes")


CASES: dict[str, Case] = {c.name: c for c in [
    _main_case(4096, False), _main_case(4096, True),
    _main_case(16384, False), _main_case(16384, True),
    Case("window32k", batch=1, heads=16, seq=32768, window=1024, kernels=MASK_KERNELS,
         note="cudnn/xla/tokamax: native window; cudnn-mask: the same window as a dense mask"),
    Case("docs32k", batch=1, heads=16, seq=32768, docs=8, kernels=MASK_KERNELS,
         note="cudnn: dense causal over all 32768 (no document mask; the baseline to beat); "
              "cudnn-mask: documents as a dense mask; mha: segment_ids; tokamax: k_start mask"),
    Case("alibi8k", batch=2, heads=16, seq=8192, alibi=True, kernels=ALIBI_KERNELS,
         note="alibi_mod + causal_mod; flex: ALiBi score_mod + causal block mask; cudnn: plain "
              "causal (no ALiBi; the baseline, a different function)"),
    Case("prefix8k", batch=2, heads=16, seq=8192, prefix=2048, kernels=PREFIX_KERNELS,
         note="prefix_lm_mod(prefix); cudnn: plain causal (the baseline, a different function); "
              "cudnn-mask, xla: the prefix-LM mask as a dense boolean mask"),
    _main_case(4096, False, 64), _main_case(4096, True, 64),
    _main_case(4096, False, 256), _main_case(4096, True, 256),
    Case("s1m-causal", batch=1, heads=8, seq=1 << 20, causal=True, kernels=("attnax-pallas",),
         note="attnax only; add attnax-flash with --kernels attnax-pallas,attnax-flash (pure JAX: "
              "minutes per call at this size)"),
] + [_aether_case(s, tag, keys)
     for s, tag in ((4096, "4k"), (32768, "32k"), (131072, "128k"), (1 << 20, "1m"))
     for keys in ("iid", "clustered")] + _curve_cases()}

GROUPS: dict[str, tuple[str, ...]] = {
    "main": ("s4k", "s4k-causal", "s16k", "s16k-causal"),
    "masks": ("window32k", "docs32k", "alibi8k", "prefix8k"),
    "dims": ("s4k-d64", "s4k-d64-causal", "s4k-d256", "s4k-d256-causal"),
    # The cells of issue 10's targets (mosaic forward against cuDNN, tokamax and FlexAttention).
    "targets": ("s4k", "s4k-causal", "s16k", "s16k-causal", "window32k", "docs32k", "alibi8k",
                "s4k-d64", "s4k-d64-causal", "s4k-d256", "s4k-d256-causal"),
    "curves": tuple(c.name for c in _curve_cases()),
    "long": ("s1m-causal",),
    "aether": tuple(n for n in CASES if n.startswith("aether-")),
    "aether-small": ("aether-4k-iid", "aether-4k-clustered", "aether-32k-iid",
                     "aether-32k-clustered"),
}
GROUPS["all"] = (GROUPS["main"] + GROUPS["masks"] + GROUPS["dims"] + GROUPS["curves"]
                 + GROUPS["long"] + GROUPS["aether"])
DEFAULT_CASES = "main,masks"


def quick_case(c: Case) -> Case:
  """The same case at a size that runs in seconds on a CPU."""
  if c.aether:
    s = {4096: 256, 32768: 512, 131072: 1024}.get(c.seq, 2048)
    return dataclasses.replace(c, batch=1, heads=2, seq=s, head_dim=64, cluster_len=64)
  if c.window:
    return dataclasses.replace(c, batch=1, heads=2, seq=512, head_dim=64, window=64)
  if c.docs:
    return dataclasses.replace(c, batch=1, heads=2, seq=512, head_dim=64, docs=4)
  if c.seq >= 1 << 20:
    return dataclasses.replace(c, batch=1, heads=2, seq=1024, head_dim=64)
  if c.prefix:
    return dataclasses.replace(c, batch=2, heads=2, seq=256, head_dim=64, prefix=64)
  # The head-dim variants keep their D (their point); the others run at D=64.
  return dataclasses.replace(c, batch=2, heads=2, seq=256 if c.seq <= 4096 else 512,
                             head_dim=64 if c.head_dim == 128 else c.head_dim)


# ============================================================================ inputs


def clustered_qkv(key, b: int, h: int, s: int, d: int, *, cluster_len: int = 512,
                  norm: float = 20.0, key_noise: float = 0.25, query_noise: float = 0.5):
  """Clustered keys and queries near some centroids (f32, ``(B, H, S, D)``); see README.md.

  Keys come in contiguous runs of ``cluster_len`` positions; the keys of run ``c`` are
  ``mu_c + key_noise * N(0, I)`` where ``mu_c`` is a random direction of norm ``norm`` (independent
  per batch row and head). Queries come in contiguous runs of ``cluster_len`` too; every query of a
  run targets one cluster ``t`` drawn uniformly at random: ``q = norm * mu_t / |mu_t| +
  query_noise * N(0, I)``. With ``D = 128`` and the default scale ``D ** -0.5`` a query's logits
  are about 35 on its own cluster and about N(0, 3) elsewhere, so nearly all of its softmax mass
  lies in one cluster. Values are N(0, 1).
  """
  n_runs = -(-s // cluster_len)
  kc, kq, kt, kkn, kqn, kv = jax.random.split(key, 6)
  mu = jax.random.normal(kc, (b, h, n_runs, d), jnp.float32)
  mu = norm * mu / jnp.linalg.norm(mu, axis=-1, keepdims=True)
  k = jnp.repeat(mu, cluster_len, axis=2)[:, :, :s]
  k = k + key_noise * jax.random.normal(kkn, (b, h, s, d), jnp.float32)
  target = jax.random.randint(kt, (b, h, n_runs), 0, n_runs)
  qc = jnp.take_along_axis(mu, target[..., None], axis=2)
  q = jnp.repeat(qc, cluster_len, axis=2)[:, :, :s]
  q = q + query_noise * jax.random.normal(kqn, (b, h, s, d), jnp.float32)
  v = jax.random.normal(kv, (b, h, s, d), jnp.float32)
  return q, k, v


def doc_ids(case: Case) -> jax.Array:
  ln = case.seq // case.docs
  return jnp.broadcast_to(jnp.arange(case.seq, dtype=jnp.int32) // ln, (case.batch, case.seq))


class Inputs:
  """Per-case inputs: ``n_rot`` copies in each layout that some selected kernel uses."""

  def __init__(self, case: Case, dtype, layouts: set[str], seed: int = 0):
    self.case = case
    b, h, s, d = case.batch, case.heads, case.seq, case.head_dim
    set_bytes = 4 * b * h * s * d * jnp.dtype(dtype).itemsize     # q, k, v, ct
    self.n_rot = 1 if set_bytes >= 2 * L2_BYTES else min(8, math.ceil(2 * L2_BYTES / set_bytes))
    self.sets: dict[str, list[tuple[jax.Array, ...]]] = {lay: [] for lay in layouts}
    key = jax.random.PRNGKey(seed)
    for r in range(self.n_rot):
      key, kg, kct = jax.random.split(key, 3)
      if case.aether == "clustered":
        q, k, v = clustered_qkv(kg, b, h, s, d, cluster_len=case.cluster_len)
      else:
        kq, kk, kv = jax.random.split(kg, 3)
        q, k, v = (jax.random.normal(x, (b, h, s, d), jnp.float32) for x in (kq, kk, kv))
      ct = jax.random.normal(kct, (b, h, s, d), jnp.float32)
      bhsd = tuple(x.astype(dtype) for x in (q, k, v, ct))
      del q, k, v, ct
      for lay in layouts:
        xs = bhsd if lay == "bhsd" else tuple(jnp.swapaxes(x, 1, 2) for x in bhsd)
        self.sets[lay].append(jax.block_until_ready(xs))
      del bhsd
    self.aux: dict[str, Any] = {}
    if case.docs:
      self.aux["doc_ids"] = doc_ids(case)
    self._dense_mask = None

  def dense_mask(self) -> jax.Array:
    """The case's mask as booleans ``(1, 1, S, S)`` (window, document, prefix cases); built once."""
    if self._dense_mask is None:
      c = self.case
      i = jnp.arange(c.seq, dtype=jnp.int32)[:, None]
      j = jnp.arange(c.seq, dtype=jnp.int32)[None, :]
      if c.window:
        m = (i - j >= 0) & (i - j < c.window)
      elif c.docs:
        ln = c.seq // c.docs
        m = (j <= i) & (i // ln == j // ln)
      elif c.prefix:
        m = (j <= i) | (j < c.prefix)
      else:
        raise Unsupported("no mask in this case")
      self._dense_mask = jax.block_until_ready(m[None, None])
    return self._dense_mask

  def max_abs_v(self) -> float:
    lay = next(iter(self.sets))
    return float(jnp.max(jnp.abs(self.sets[lay][0][2].astype(jnp.float32))))


# ============================================================================ kernels
#
# A builder takes (case, inputs, on_gpu) and returns fn(q, k, v) in its layout, or raises
# Unsupported. `exact` says whether the row computes the case's function (its output is checked
# against the reference); `layout` is the kernel's native layout. An `engine="torch"` kernel
# (FlexAttention) is built and timed by the torch path instead (`flex_cell`).


@dataclasses.dataclass(frozen=True)
class Kernel:
  name: str
  layout: str                                   # "bhsd" (attnax) or "bshd" (peers)
  build: Callable[..., Callable]
  desc: str
  gpu_only: bool = False
  exact: Callable[[Case], bool] = lambda case: True
  engine: str = "jax"                           # "jax", or "torch" (timed by flex_cell)


def _attnax(name: str):
  import attnax.kernels as ak
  fn = getattr(ak, name, None)
  if fn is None:
    raise Unsupported(f"attnax.kernels.{name} not present yet")
  return fn


def _attnax_mod(case: Case, inp: Inputs):
  from attnax.kernels import score_mods as sm
  if case.window:
    return sm.sliding_window_mod(case.window)
  if case.docs:
    return sm.compose_score_mods(sm.causal_mod(), sm.document_mask_mod(inp.aux["doc_ids"]))
  if case.alibi:
    return sm.compose_score_mods(sm.alibi_mod(num_heads=case.heads), sm.causal_mod())
  if case.prefix:
    return sm.prefix_lm_mod(case.prefix)
  return sm.causal_mod() if case.causal else None


def build_attnax(name: str, **options):
  """``attnax.kernels.<name>`` with the case's mods; ``options`` (e.g. ``backend=``) passed on."""
  def build(case, inp, on_gpu):
    kern = _attnax(name)
    mod = _attnax_mod(case, inp)
    kw = dict(options) if mod is None else dict(options, score_mod=mod)
    return lambda q, k, v: kern(q, k, v, **kw)
  return build


def build_mosaic(bwd: str = "auto", deterministic: bool = True, persistent: bool | None = None,
                 shared_probs: bool = False, overlap: bool = False, balanced_walk: bool = False):
  """The Mosaic lowering with its tuned config and the backward on ``bwd`` (mosaic | triton);
  ``deterministic=False``: the Mosaic backward's dQ by reductions in the dK/dV kernel instead of
  its dQ pass; ``persistent``: MosaicConfig.persistent (``None``: as the config says);
  ``shared_probs``: MosaicConfig.bwd_shared_probs (above D=128); ``overlap``:
  MosaicConfig.overlap (the forward's intra-warpgroup overlap); ``balanced_walk``:
  MosaicConfig.balanced_walk (with ``persistent=True``: masked plans' snake walk)."""
  def build(case, inp, on_gpu):
    from attnax.kernels.pallas import mosaic_gpu as mg
    kern = _attnax("pallas_flash_attention")
    mod = _attnax_mod(case, inp)
    cfg = mg.default_config(case.head_dim, masked=mod is not None)   # as backend="mosaic" picks
    cfg = dataclasses.replace(cfg, bwd=bwd, deterministic=deterministic,
                              bwd_shared_probs=shared_probs, overlap=overlap,
                              balanced_walk=balanced_walk)
    if persistent is not None:
      cfg = dataclasses.replace(cfg, persistent=persistent)
    kw = dict(backend="mosaic", config=cfg)
    if mod is not None:
      kw["score_mod"] = mod
    return lambda q, k, v: kern(q, k, v, **kw)
  return build


def build_aether(case, inp, on_gpu, epsilon=1e-3):
  kern = _attnax("aether_attention")
  if not case.aether:
    raise Unsupported("AETHER runs in the aether-* cases")
  mod = _attnax_mod(case, inp)
  kw = {} if mod is None else {"score_mod": mod}
  return lambda q, k, v: kern(q, k, v, epsilon=epsilon, **kw)


def _window(case):
  return None if not case.window else (case.window - 1, 0)


def build_jax_nn(impl: str, dense_mask: bool = False):
  def build(case, inp, on_gpu):
    if impl == "cudnn" and not on_gpu:
      raise Unsupported("needs a GPU")
    dpa = functools.partial(jax.nn.dot_product_attention, implementation=impl)
    if dense_mask:
      if not (case.window or case.docs or case.prefix):
        raise Unsupported("dense-mask variant is for the window, document and prefix cases")
      mask = inp.dense_mask()
      return lambda q, k, v: dpa(q, k, v, mask=mask)
    if case.docs or case.alibi or case.prefix:
      if impl == "cudnn":   # the baseline: plain causal (documents: over the whole packed sequence)
        return lambda q, k, v: dpa(q, k, v, is_causal=True)
      if case.alibi:
        raise Unsupported("no ALiBi here (a dense bias would be another kernel)")
      mask = inp.dense_mask()
      return lambda q, k, v: dpa(q, k, v, mask=mask)
    win = _window(case)
    causal = case.causal or bool(case.window)
    return lambda q, k, v: dpa(q, k, v, is_causal=causal, local_window_size=win)
  return build


def build_mha(case, inp, on_gpu):
  from jax.experimental.pallas.ops.gpu import attention as pl_attn
  if case.window:
    raise Unsupported("no window support")
  if case.alibi or case.prefix:
    raise Unsupported("no ALiBi or prefix-LM support")
  if case.seq % 128 and case.seq > 128:
    raise Unsupported("seq must be a multiple of 128")
  scale = case.head_dim ** -0.5
  seg = inp.aux.get("doc_ids")
  causal = case.causal or bool(case.docs)
  # Default BlockSizes (fwd 128x128, bwd 32x32), as the op ships; interpret mode off the GPU.
  return lambda q, k, v: pl_attn.mha(q, k, v, seg, sm_scale=scale, causal=causal,
                                     interpret=not on_gpu)


def build_tokamax(impl: str):
  def build(case, inp, on_gpu):
    if not on_gpu:
      raise Unsupported("needs a GPU")
    try:
      import tokamax
    except Exception as e:  # noqa: BLE001
      raise Unsupported(f"tokamax not importable: {type(e).__name__}: {e}") from None
    if case.alibi or case.prefix:
      raise Unsupported("no ALiBi or prefix-LM mask in this benchmark's tokamax rows")
    if case.docs:
      # tokamax's own way to say "packed causal documents": per-query first visible key.
      from tokamax._src.ops.attention import api as tk_api
      from tokamax._src.ops.attention import base as tk_base
      ln = case.seq // case.docs
      k_start = (jnp.arange(case.seq, dtype=jnp.int32) // ln) * ln
      mask = tk_base.Mask(k_start=k_start, is_causal=True)
      op = tk_api.IMPLEMENTATIONS["mosaic_gpu" if impl == "mosaic" else impl]
      scale = case.head_dim ** -0.5
      return lambda q, k, v: op(q, k, v, bias=None, mask=mask, logits_scale=scale,
                                precision=None, logits_soft_cap=None, q_sharding=None)
    win = _window(case)
    causal = case.causal or bool(case.window)
    return lambda q, k, v: tokamax.dot_product_attention(
        q, k, v, is_causal=causal, local_window_size=win, implementation=impl)
  return build


# ============================================================================ FlexAttention (torch)
#
# PyTorch's FlexAttention as a peer, in the same process as the JAX kernels: the case's q, k, v, ct
# (the bhsd sets, FlexAttention's layout) are copied once into torch tensors through DLPack, outside
# timing; the case's mask is FlexAttention's own `create_block_mask`, its mods FlexAttention
# `score_mod`s. torch._dynamo recompiles flex_attention for every new mask, score_mod or shape and,
# past its recompile limit (8), silently runs an unfused path that materialises the scores (30-40x
# slower): the limits are raised and the compile cache is reset once per case, so each case compiles
# exactly once per mode (fwd under no_grad, fwd+bwd with grad), with dynamic shapes off.

_FLEX_STATE: dict[str, Any] = {}
DYNAMO_LIMIT = 1000


def _torch_flex():
  """``(torch, torch.nn.attention.flex_attention)`` or Unsupported with the reason."""
  try:
    import torch
  except Exception as e:  # noqa: BLE001
    raise Unsupported(f"torch not importable: {type(e).__name__}: {e}") from None
  try:
    from torch.nn.attention import flex_attention as fa
  except Exception as e:  # noqa: BLE001
    raise Unsupported(f"no FlexAttention in torch {torch.__version__}: {e}") from None
  return torch, fa


def raise_dynamo_limits(torch, limit: int = DYNAMO_LIMIT) -> dict[str, int]:
  """Raise every recompile limit this torch has (names changed across versions); returns them."""
  cfg = torch._dynamo.config
  done = {}
  for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
               "accumulated_cache_size_limit"):
    if hasattr(cfg, name):
      try:
        setattr(cfg, name, max(int(getattr(cfg, name)), limit))
        done[name] = int(getattr(cfg, name))
      except Exception:  # noqa: BLE001  (an alias a version refuses to set)
        pass
  return done


def to_torch(torch, x, device):
  """A torch copy of a JAX array on ``device`` (DLPack; a host copy if DLPack refuses)."""
  x = jax.block_until_ready(x)
  try:
    t = torch.from_dlpack(x)
  except Exception:  # noqa: BLE001
    a = np.asarray(jax.device_get(x))
    if a.dtype == jnp.bfloat16:     # numpy knows bf16 only through ml_dtypes: move the bits
      t = torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
    else:
      t = torch.from_numpy(a.copy())
  # An own copy: autograd leaves that share nothing with JAX's immutable buffers.
  return t.to(device).clone()


def to_jax(torch, t):
  """A JAX array holding a torch tensor's values (DLPack; through the host if DLPack refuses)."""
  t = t.detach().contiguous()
  if t.is_cuda:
    torch.cuda.synchronize()
  try:
    return jax.block_until_ready(jnp.array(jnp.from_dlpack(t), copy=True))
  except Exception:  # noqa: BLE001
    return jnp.asarray(t.float().cpu().numpy())


def flex_mods(torch, case: Case, inp: "Inputs", device):
  """``(mask_mod or None, score_mod or None)``: the case's mask and mods in FlexAttention's terms."""
  mask_mod = None
  if case.window:
    w = case.window

    def mask_mod(b, h, q_idx, kv_idx):
      return (q_idx >= kv_idx) & (q_idx - kv_idx < w)
  elif case.docs:
    ids = to_torch(torch, inp.aux["doc_ids"], device)        # (B, S) int32

    def mask_mod(b, h, q_idx, kv_idx):
      return (q_idx >= kv_idx) & (ids[b, q_idx] == ids[b, kv_idx])
  elif case.prefix:
    p = case.prefix

    def mask_mod(b, h, q_idx, kv_idx):
      return (q_idx >= kv_idx) | (kv_idx < p)
  elif case.is_causal:
    def mask_mod(b, h, q_idx, kv_idx):
      return q_idx >= kv_idx
  score_mod = None
  if case.alibi:
    from attnax.kernels.score_mods import alibi_slopes
    slopes = to_torch(torch, alibi_slopes(case.heads), device)  # f32 (H,): attnax's slopes

    def score_mod(score, b, h, q_idx, kv_idx):
      return score + slopes[h] * (kv_idx - q_idx)
  return mask_mod, score_mod


def flex_setup(case: Case, inp: "Inputs", on_gpu: bool) -> dict:
  """The case's compiled flex_attention, block mask, mods and torch inputs (built once per case)."""
  st = _FLEX_STATE.get("case")
  if st is not None and st["inp"] is inp:
    if "error" in st:
      raise Unsupported(st["error"])
    return st
  flex_release()
  torch, fa = _torch_flex()
  if on_gpu and not torch.cuda.is_available():
    raise Unsupported("torch sees no CUDA device")
  device = "cuda" if on_gpu else "cpu"
  st = {"inp": inp, "torch": torch}
  _FLEX_STATE["case"] = st
  try:
    st["limits"] = raise_dynamo_limits(torch)
    torch._dynamo.reset()     # a fresh compile cache per case: no stale guards, one compile per mode
    mask_mod, score_mod = flex_mods(torch, case, inp, device)
    t0 = time.perf_counter()
    block_mask = None
    if mask_mod is not None:
      # _compile fuses the mask evaluation: eager materialises int64 (S, S) index grids (8 GB at 32k).
      block_mask = fa.create_block_mask(mask_mod, case.batch if case.docs else None, None,
                                        case.seq, case.seq, device=device,
                                        _compile=case.seq >= 16384)
    st["block_mask_s"] = time.perf_counter() - t0
    compiled = torch.compile(fa.flex_attention, dynamic=False)
    sets = [tuple(to_torch(torch, x, device) for x in xs) for xs in inp.sets["bhsd"]]
    grad_sets = [tuple(x.detach().requires_grad_(True) for x in xs[:3]) + (xs[3],) for xs in sets]
  except Unsupported as e:
    st["error"] = str(e)
    raise
  except Exception as e:  # noqa: BLE001
    st["error"] = _short(e)
    raise

  def fwd(q, k, v, ct):
    with torch.no_grad():
      return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)

  def fwd_bwd(q, k, v, ct):
    out = compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)
    # The pullback of ct (as out.backward(ct)), without accumulating into .grad between calls.
    return (out,) + tuple(torch.autograd.grad(out, (q, k, v), ct))

  st.update(device=device, fwd=fwd, fwd_bwd=fwd_bwd, sets=sets, grad_sets=grad_sets)
  return st


def flex_release():
  """Drop the last case's torch state and return its memory to the device."""
  st = _FLEX_STATE.pop("case", None)
  if st is None:
    return
  torch = st["torch"]
  st.clear()
  gc.collect()
  try:
    torch._dynamo.reset()
    if torch.cuda.is_available():
      torch.cuda.empty_cache()
  except Exception:  # noqa: BLE001
    pass


def time_torch(torch, fn, argsets, *, budget_s: float, target_rep_s: float = 0.025,
               max_reps: int = 30) -> tuple["Timing", Any]:
  """:func:`time_fn` for torch: the same protocol; each repeat is timed by CUDA events on a GPU."""
  if not argsets[0][0].is_cuda:
    return time_fn(fn, argsets, budget_s=budget_s, target_rep_s=target_rep_s, max_reps=max_reps,
                   sync=lambda out: out)

  def cuda_clock():
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()

    def stop():
      end.record()
      end.synchronize()
      return start.elapsed_time(end) / 1e3
    return stop

  return time_fn(fn, argsets, budget_s=budget_s, target_rep_s=target_rep_s, max_reps=max_reps,
                 sync=lambda out: (torch.cuda.synchronize(), out)[1], clock=cuda_clock)


def flex_cell(case: Case, inp: "Inputs", on_gpu: bool, mode: str, budget_s: float):
  """Time FlexAttention on the case: ``(timing, outputs as JAX arrays in bhsd)``."""
  st = flex_setup(case, inp, on_gpu)
  torch = st["torch"]
  if st["device"] == "cpu" and mode != "fwd":
    raise Unsupported("FlexAttention has no backward on CPU")
  if mode == "fwd":
    timing, out0 = time_torch(torch, st["fwd"], st["sets"], budget_s=budget_s)
    return timing, to_jax(torch, out0)
  timing, out0 = time_torch(torch, st["fwd_bwd"], st["grad_sets"], budget_s=budget_s)
  return timing, tuple(to_jax(torch, t) for t in out0)


def _flex_build(case, inp, on_gpu):
  raise Unsupported("FlexAttention is timed by flex_cell")  # never called: engine="torch"


# The Mosaic lowering's other forms: (row suffix, build_mosaic options, what the row runs).
MOSAIC_VARIANTS = (
    ("tbwd", dict(bwd="triton"), "the Triton backward (MosaicConfig.bwd)"),
    ("fused", dict(bwd="mosaic", deterministic=False),
     "MosaicConfig(deterministic=False): dQ by TMA reductions in the dK/dV kernel"),
    ("sharedp", dict(shared_probs=True),
     "MosaicConfig(bwd_shared_probs=True): above D=128, S^T computed once in the dK/dV kernel"),
    ("overlap", dict(overlap=True),
     "MosaicConfig(overlap=True): Q K_t^T and P V_(t-1) issued together, the softmax under "
     "that P V"),
    ("balanced", dict(persistent=True, balanced_walk=True),
     "MosaicConfig(persistent=True, balanced_walk=True): masked plans walked longest row first "
     "in a snake order"),
    ("items", dict(persistent=False),
     "MosaicConfig(persistent=False): one program per work item"),
    ("persistent", dict(persistent=True), "MosaicConfig(persistent=True)"),
)

KERNELS: dict[str, Kernel] = {k.name: k for k in [
    Kernel("cudnn", "bshd", build_jax_nn("cudnn"),
           'jax.nn.dot_product_attention(implementation="cudnn")', gpu_only=True,
           exact=lambda c: not (c.docs or c.alibi or c.prefix)),
    Kernel("cudnn-mask", "bshd", build_jax_nn("cudnn", dense_mask=True),
           "cuDNN with the case's mask as a dense boolean mask", gpu_only=True),
    Kernel("xla", "bshd", build_jax_nn("xla"), 'jax.nn.dot_product_attention(implementation="xla")'),
    Kernel("mha", "bshd", build_mha, "jax.experimental.pallas.ops.gpu.attention.mha"),
    Kernel("tokamax-mosaic", "bshd", build_tokamax("mosaic"),
           'tokamax.dot_product_attention(implementation="mosaic")', gpu_only=True),
    Kernel("tokamax-triton", "bshd", build_tokamax("triton"),
           'tokamax.dot_product_attention(implementation="triton")', gpu_only=True),
    Kernel("flex", "bhsd", _flex_build,
           "torch.compile(flex_attention) with its create_block_mask (torch, same inputs)",
           engine="torch"),
    Kernel("attnax-mosaic", "bhsd", build_attnax("pallas_flash_attention", backend="mosaic"),
           'attnax.kernels.pallas_flash_attention(backend="mosaic")', gpu_only=True),
    *(Kernel(f"attnax-mosaic-{suffix}", "bhsd", build_mosaic(**options),
             f'pallas_flash_attention(backend="mosaic"), {note}', gpu_only=True)
      for suffix, options, note in MOSAIC_VARIANTS),
    Kernel("attnax-triton", "bhsd", build_attnax("pallas_flash_attention", backend="triton"),
           'attnax.kernels.pallas_flash_attention(backend="triton")', gpu_only=True),
    Kernel("attnax-pallas", "bhsd", build_attnax("pallas_flash_attention"),
           'attnax.kernels.pallas_flash_attention (backend="auto")'),
    Kernel("attnax-flash", "bhsd", build_attnax("flash_attention"),
           "attnax.kernels.flash_attention (pure JAX)"),
    Kernel("attnax-memeff", "bhsd", build_attnax("memory_efficient_attention"),
           "attnax.kernels.memory_efficient_attention (pure JAX)"),
    Kernel("attnax-standard", "bhsd", build_attnax("standard_attention"),
           "attnax.kernels.standard_attention (materialised reference)"),
    Kernel("aether", "bhsd", build_aether, "attnax.kernels.aether_attention(epsilon=...)"),
]}
KERNEL_GROUPS = {
    "peers": PEERS + ("cudnn-mask",),
    "tokamax": ("tokamax-mosaic", "tokamax-triton"),
    "pallas": PALLAS_ATTNAX,
    "attnax": PALLAS_ATTNAX + ("attnax-flash", "attnax-memeff", "attnax-standard", "aether"),
    # What issue 10's targets compare: the mosaic lowering, its Triton sibling and the peers to beat.
    "targets": ("cudnn", "tokamax-mosaic", "flex", "attnax-mosaic", "attnax-mosaic-tbwd",
                "attnax-triton"),
}


# ============================================================================ timing


@dataclasses.dataclass
class Timing:
  median_s: float
  min_s: float
  samples: int
  calls: int
  compile_s: float


def _wall_clock():
  t0 = time.perf_counter()
  return lambda: time.perf_counter() - t0


def time_fn(fn, argsets, *, budget_s: float, target_rep_s: float = 0.025, max_reps: int = 30,
            first_out=None, sync=jax.block_until_ready, clock=_wall_clock) -> tuple[Timing, Any]:
  """Median seconds per call of ``fn(*argsets[i])``; returns (timing, output of the first call).

  ``sync(out)`` waits for a call's output; ``clock()`` starts a timer and returns its stop
  function (seconds): wall clock for JAX, CUDA events for torch (:func:`time_torch`).
  """
  n = len(argsets)
  t0 = time.perf_counter()
  out0 = sync(fn(*argsets[0])) if first_out is None else first_out
  compile_s = time.perf_counter() - t0
  if compile_s < budget_s:     # cheap kernels: one more untimed warm call (lazy init, autotuning)
    sync(fn(*argsets[1 % n]))
  t0 = time.perf_counter()
  sync(fn(*argsets[0]))
  t1 = time.perf_counter() - t0
  samples = [t1]
  calls = 1
  if t1 < budget_s / 2:
    inner = max(1, min(200, int(target_rep_s / max(t1, 1e-7))))
    reps = max(3, min(max_reps, int(budget_s / (inner * t1))))
    samples = []
    for r in range(reps):
      stop = clock()
      out = None
      for i in range(inner):
        out = fn(*argsets[(r * inner + i) % n])
      sync(out)
      samples.append(stop() / inner)
      calls += inner
    del out
  return Timing(statistics.median(samples), min(samples), len(samples), calls, compile_s), out0


# ============================================================================ running


def _short(e: BaseException, n: int = 70) -> str:
  msg = str(e).strip().splitlines()
  first = msg[0] if msg else ""
  if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
    return "OOM"
  if isinstance(e, Unsupported):
    return first[:n]
  if isinstance(e, NotImplementedError):
    return ("unsupported: " + first)[:n]
  return f"{type(e).__name__}: {first}"[:n]


def _to_bhsd(x, layout):
  return x if layout == "bhsd" else jnp.swapaxes(x, 1, 2)


@jax.jit
def _errs(x, ref):
  x = x.astype(jnp.float32)
  ref = ref.astype(jnp.float32)
  d = x - ref
  return jnp.linalg.norm(d) / jnp.maximum(jnp.linalg.norm(ref), 1e-30), jnp.max(jnp.abs(d))


def _get_stat(stats, name):
  if stats is None:
    return None
  if isinstance(stats, dict):
    return stats.get(name)
  return getattr(stats, name, None)


class Runner:

  def __init__(self, args):
    self.args = args
    self.on_gpu = jax.default_backend() == "gpu"
    self.dtype = jnp.dtype(args.dtype)
    self.t_start = time.time()
    self.records: list[dict] = []
    self.cases: dict[str, dict] = {}
    self.md: list[str] = []
    self.torch_version: str | None = None

  def out(self, line: str = ""):
    print(line, flush=True)
    self.md.append(line)

  def past_deadline(self) -> bool:
    return self.args.deadline_s > 0 and time.time() - self.t_start > self.args.deadline_s

  # ------------------------------------------------------------------ one case

  def run_case(self, case: Case, kernel_names: list[str], modes: list[str]):
    args = self.args
    t_case = time.time()
    self.out(f"### {case.name}: B={case.batch} H={case.heads} S={case.seq} D={case.head_dim} "
             f"{jnp.dtype(self.dtype).name}, {case.kind}")
    if case.note:
      self.out(f"_{case.note}_")
    self.out(f"fwd FLOPs {case.flops('fwd'):.3e} (visible pairs per head {case.pairs():.4g})")
    self.out()
    layouts = {KERNELS[k].layout for k in kernel_names}
    try:
      inp = Inputs(case, self.dtype, layouts, seed=args.seed)
    except Exception as e:  # noqa: BLE001
      self.out(f"inputs: n/a ({_short(e)})")
      traceback.print_exc()
      return
    cells: dict[tuple[str, str], dict] = {}
    notes: list[str] = []
    ref: dict[str, Any] = {}       # reference outputs in bhsd: "out", "grads"
    ref_name: dict[str, str] = {}
    aether_stats: dict[str, Any] = {}

    for kname in kernel_names:
      kern = KERNELS[kname]
      for mode in modes:
        cell = {"case": case.name, "kernel": kname, "mode": mode}
        cells[(kname, mode)] = cell
        if self.past_deadline():
          cell["na"] = "deadline"
          continue
        est = self._estimate(cells.get((kname, "fwd")), mode)
        if est is not None and args.deadline_s > 0 and \
            time.time() - self.t_start + est > args.deadline_s:
          cell["na"] = f"would pass the deadline (about {est:.0f} s)"
          self._progress(case, cell)
          continue
        try:
          if kern.gpu_only and not self.on_gpu:
            raise Unsupported("needs a GPU")
          epsilon = args.epsilon
          budget = args.budget_s
          if kern.engine == "torch":
            timing, out0 = flex_cell(case, inp, self.on_gpu, mode, budget)
          else:
            if kname == "aether":
              fn = build_aether(case, inp, self.on_gpu, epsilon=epsilon)
            else:
              fn = kern.build(case, inp, self.on_gpu)
            if mode == "fwd":
              jf = jax.jit(lambda q, k, v, ct, fn=fn: fn(q, k, v))
            else:
              def fb(q, k, v, ct, fn=fn):
                o, pull = jax.vjp(fn, q, k, v)
                return (o,) + tuple(pull(ct))
              jf = jax.jit(fb)
            argsets = inp.sets[kern.layout]
            timing, out0 = time_fn(jf, argsets, budget_s=budget)
          cell["ms"] = timing.median_s * 1e3
          cell["min_ms"] = timing.min_s * 1e3
          cell["samples"] = timing.samples
          cell["calls"] = timing.calls
          cell["compile_s"] = timing.compile_s
          cell["tflops"] = case.flops(mode) / timing.median_s / 1e12
          # Correctness against the case's reference (first exact kernel that ran).
          if kern.exact(case):
            o = _to_bhsd(out0 if mode == "fwd" else out0[0], kern.layout)
            grads = None if mode == "fwd" else tuple(_to_bhsd(g, kern.layout) for g in out0[1:])
            if "out" not in ref and kname != "aether":
              ref["out"], ref_name["out"] = o, kname
            elif "out" in ref and ref_name["out"] != kname:
              cell["err"] = float(_errs(o, ref["out"])[0])
            if grads is not None:
              if "grads" not in ref and kname != "aether":
                ref["grads"], ref_name["grads"] = grads, kname
              elif "grads" in ref and ref_name["grads"] != kname:
                cell["gerr"] = max(float(_errs(g, r)[0]) for g, r in zip(grads, ref["grads"]))
            del o, grads
          del out0
        except Exception as e:  # noqa: BLE001
          cell["na"] = _short(e)
          cell["error"] = f"{type(e).__name__}: {e}"[:2000]
          if not isinstance(e, Unsupported):
            notes.append(f"{kname} {mode}: {type(e).__name__}: {str(e).strip()[:300]}")
            if args.verbose:
              traceback.print_exc()
        finally:
          gc.collect()
        self._progress(case, cell)

    if case.aether and "aether" in kernel_names and not self.past_deadline():
      aether_stats = self._aether_stats(case, inp, ref, ref_name)
    ref.clear()
    flex_release()
    self._table(case, kernel_names, modes, cells, ref_name, notes, aether_stats)
    meta = case.meta()
    for cell in cells.values():
      self.records.append({**cell, **meta})
    self.cases[case.name] = meta
    self.out(f"(case done in {time.time() - t_case:.0f} s)")
    self.out()
    del inp
    gc.collect()

  def _estimate(self, fwd_cell, mode):
    """Rough seconds for a fwd+bwd cell from the same kernel's fwd cell (compile + 3 calls)."""
    if mode != "fwd+bwd" or not fwd_cell or "ms" not in fwd_cell:
      return None
    call = (1 + BWD_FLOP_FACTOR) * fwd_cell["ms"] / 1e3
    return 2 * fwd_cell["compile_s"] + 3 * call

  def _progress(self, case, cell):
    if "na" in cell:
      msg = f"n/a ({cell['na']})"
    else:
      msg = (f"{cell['ms']:.3f} ms  {cell['tflops']:.1f} TFLOP/s  "
             f"(compile+first {cell['compile_s']:.1f} s, {cell['samples']} samples)")
    print(f"  [{time.time() - self.t_start:6.0f}s] {case.name} {cell['kernel']} {cell['mode']}: "
          f"{msg}", file=sys.stderr, flush=True)

  def _aether_stats(self, case, inp, ref, ref_name):
    """One untimed call with return_stats=True: skipped fraction, mass bound, error vs dense."""
    res: dict[str, Any] = {"epsilon": self.args.epsilon}
    try:
      kern = _attnax("aether_attention")
      q, k, v, _ = inp.sets["bhsd"][0]
      mod = _attnax_mod(case, inp)
      kw = {} if mod is None else {"score_mod": mod}
      eps = self.args.epsilon
      call = lambda q, k, v: kern(q, k, v, epsilon=eps, return_stats=True, **kw)
      try:
        r = jax.jit(call)(q, k, v)
      except TypeError:     # a stats record that is not a pytree: call it eagerly
        r = call(q, k, v)
      o, stats = r[0], r[-1]
      sk = _get_stat(stats, "skipped_fraction")
      if sk is not None:
        sk = np.asarray(jax.device_get(sk), np.float64)
        res.update(skipped_mean=float(sk.mean()), skipped_min=float(sk.min()),
                   skipped_max=float(sk.max()))
      mb = _get_stat(stats, "mass_bound")
      if mb is not None:
        res["mass_bound_max"] = float(jnp.max(mb))
      vmax = inp.max_abs_v()
      res["bound_abs"] = 2 * eps * vmax
      if "out" in ref:
        rel, mx = _errs(o, ref["out"])
        res.update(err_rel=float(rel), err_max_abs=float(mx), ref=ref_name["out"])
    except Exception as e:  # noqa: BLE001
      res["na"] = _short(e)
      res["error"] = f"{type(e).__name__}: {e}"[:2000]
    return res

  # ------------------------------------------------------------------ printing

  def _table(self, case, kernel_names, modes, cells, ref_name, notes, aether_stats):
    hdr = ["kernel"]
    for m in modes:
      hdr += [f"{m} ms", f"{m} TFLOP/s", f"{m} xcuDNN"]
    hdr += ["err out", "err grad"]
    dense_t = {m: None for m in modes}
    for dn in DENSE_ATTNAX:
      for m in modes:
        c = cells.get((dn, m))
        if dense_t[m] is None and c is not None and "ms" in c:
          dense_t[m] = (dn, c["ms"])
    if case.aether:
      hdr += ["xdense"]
    rows = []
    for kname in kernel_names:
      row = [kname]
      exact = KERNELS[kname].exact(case)
      for m in modes:
        c = cells[(kname, m)]
        base = cells.get(("cudnn", m), {})
        if "na" in c:
          row += [f"n/a ({c['na']})", "", ""]
          continue
        ratio = base["ms"] / c["ms"] if "ms" in base else None
        c["ratio_cudnn"] = ratio
        tf = c["tflops"]
        row += [f"{c['ms']:.3f}", f"{tf:.1f}" if tf >= 10 else f"{tf:.3g}",
                "—" if ratio is None else f"{ratio:.2f}"]
      errs = [cells[(kname, m)].get("err") for m in modes if cells[(kname, m)].get("err") is not None]
      gerrs = [cells[(kname, m)].get("gerr") for m in modes
               if cells[(kname, m)].get("gerr") is not None]
      if not exact:
        row += ["(other fn)", "(other fn)"]
      else:
        is_ref = ref_name.get("out") == kname
        row += ["ref" if is_ref else (f"{max(errs):.1e}" if errs else ""),
                "ref" if ref_name.get("grads") == kname else
                (f"{max(gerrs):.1e}" if gerrs else "")]
      if case.aether:
        sp = []
        for m in modes:
          c = cells[(kname, m)]
          if dense_t[m] and "ms" in c:
            sp.append(f"{dense_t[m][1] / c['ms']:.2f}")
          else:
            sp.append("—")
        row.append(" / ".join(sp))
      rows.append(row)
    self.out("| " + " | ".join(hdr) + " |")
    self.out("|" + "|".join(["---"] * len(hdr)) + "|")
    for row in rows:
      self.out("| " + " | ".join(row) + " |")
    self.out()
    if ref_name:
      self.out(f"err: ||out - ref|| / ||ref|| in f32 (grad: max over dq, dk, dv); reference: "
               f"{ref_name.get('out', '—')} (out), {ref_name.get('grads', '—')} (grads).")
    if case.aether:
      dn = ", ".join(f"{m}: {dense_t[m][0]}" for m in modes if dense_t[m])
      self.out(f"xdense: t(dense attnax kernel) / t(row), per mode ({dn or 'no dense kernel ran'}).")
      self.out()
      a = aether_stats
      if not a:
        self.out("AETHER stats: not run (aether kernel not selected or deadline).")
      elif "na" in a:
        self.out(f"AETHER stats: n/a ({a['na']})")
      else:
        def f(key, fmt="{:.3g}"):
          return fmt.format(a[key]) if a.get(key) is not None else "—"
        self.out(f"AETHER (epsilon={a['epsilon']:g}): skipped_fraction mean {f('skipped_mean')} "
                 f"(min {f('skipped_min')}, max {f('skipped_max')}); certified mass bound "
                 f"(max over rows) {f('mass_bound_max')}; error vs {a.get('ref', '—')}: "
                 f"rel {f('err_rel')}, max-abs {f('err_max_abs')} (certified max-abs "
                 f"2*eps*max|v| = {f('bound_abs')}; bf16 rounding of both kernels adds "
                 f"about 1e-2 max-abs).")
      self.records.append({"case": case.name, "kernel": "aether", "mode": "stats", **a})
    if notes:
      self.out("failures:")
      for n in notes:
        self.out(f"- {n}")
    self.out()

  # ------------------------------------------------------------------ header / files

  def header(self, case_names, kernel_names, modes):
    dev = jax.devices()[0]
    self.out(f"# attnax attention benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}")
    self.out()
    self.out(f"- device: {dev.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s))")
    vers = [f"python {platform.python_version()}", f"jax {jax.__version__}"]
    try:
      import jaxlib
      vers.append(f"jaxlib {jaxlib.__version__}")
    except Exception:  # noqa: BLE001
      pass
    try:
      import importlib.metadata as md
      vers.append(f"tokamax {md.version('tokamax')}")
    except Exception:  # noqa: BLE001
      vers.append("tokamax absent")
    if "flex" in kernel_names:
      try:
        import torch
        vers.append(f"torch {torch.__version__}")
        self.torch_version = torch.__version__
      except Exception as e:  # noqa: BLE001
        vers.append(f"torch not importable ({type(e).__name__})")
    self.out("- versions: " + ", ".join(vers))
    self.out(f"- command: {' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:])}")
    self.out(f"- cases: {', '.join(case_names)}; kernels: {', '.join(kernel_names)}; "
             f"modes: {', '.join(modes)}; dtype {self.args.dtype}")
    self.out("- FLOPs: fwd 4*B*H*D*pairs, pairs = S*S dense, S*S/2 causal, exact visible pairs "
             f"for windows/documents; fwd+bwd = {1 + BWD_FLOP_FACTOR}x fwd. Median time per call.")
    self.out()

  def write(self, path):
    if not path:
      return
    base, ext = os.path.splitext(path)
    if ext not in (".json", ".md"):
      base, ext = path, ""
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
            "jax": jax.__version__, "torch": self.torch_version, "argv": sys.argv,
            "l2_bytes": L2_BYTES,
            "bwd_flop_factor": BWD_FLOP_FACTOR}
    d = os.path.dirname(os.path.abspath(base))
    os.makedirs(d, exist_ok=True)
    with open(base + ".json", "w") as f:
      json.dump({"meta": meta, "cases": self.cases, "results": self.records}, f, indent=1,
                default=str)
    with open(base + ".md", "w") as f:
      f.write("\n".join(self.md) + "\n")


def applies(kname: str, case: Case) -> bool:
  """Whether a kernel named in --kernels but not in a case's list is worth adding to it."""
  if kname == "aether":
    return bool(case.aether)
  if kname == "cudnn-mask":
    return bool(case.window or case.docs or case.prefix)
  return True


def _expand(spec: str, groups: dict, known: dict, what: str) -> list[str]:
  out: list[str] = []
  for tok in [t.strip() for t in spec.split(",") if t.strip()]:
    names = groups.get(tok, (tok,))
    for n in names:
      if n not in known:
        raise SystemExit(f"unknown {what} {n!r}; --list shows them")
      if n not in out:
        out.append(n)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cases", default=DEFAULT_CASES,
                 help=f"comma list of cases or groups ({', '.join(GROUPS)}); default {DEFAULT_CASES}")
  p.add_argument("--kernels", default="",
                 help="comma list of kernels or groups (peers, tokamax, attnax): keeps only these "
                      "among each case's kernels; a kernel not in a case's default list is added "
                      "to it (e.g. attnax-memeff)")
  p.add_argument("--modes", default=",".join(MODES), help="fwd, fwd+bwd, or both (default)")
  p.add_argument("--quick", action="store_true",
                 help="tiny sizes and short timing (runs on CPU; GPU-only peers print n/a)")
  p.add_argument("--out", default="", help="write PATH.json and PATH.md (tables)")
  p.add_argument("--plot", default="", metavar="DIR",
                 help="at the end, PNGs of TFLOP/s against S per mask kind in DIR (matplotlib; "
                      "the same as plot_bench.py on the JSON; without --out the JSON goes to "
                      "DIR/bench.json)")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
  p.add_argument("--epsilon", type=float, default=1e-3, help="AETHER certified epsilon")
  p.add_argument("--budget-s", type=float, default=None,
                 help="timing seconds per cell after compile (default 1.5, --quick 0.2)")
  p.add_argument("--deadline-s", type=float, default=0,
                 help="start no new cell after this many seconds (0: none); cells left print n/a")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--list", action="store_true", help="list cases, groups and kernels")
  p.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
  args = p.parse_args(argv)
  if args.budget_s is None:
    args.budget_s = 0.2 if args.quick else 1.5

  if args.list:
    print("cases:")
    for c in CASES.values():
      print(f"  {c.name:22s} B={c.batch} H={c.heads} S={c.seq} D={c.head_dim} {c.kind}; "
            f"kernels {','.join(c.kernels)}; modes {','.join(c.modes)}")
    print("case groups:")
    for g, names in GROUPS.items():
      print(f"  {g:14s} {','.join(names)}")
    print("kernels:")
    for k in KERNELS.values():
      print(f"  {k.name:16s} [{k.layout}] {k.desc}")
    print("kernel groups:")
    for g, names in KERNEL_GROUPS.items():
      print(f"  {g:10s} {','.join(names)}")
    return 0

  case_names = _expand(args.cases, GROUPS, CASES, "case")
  kfilter = _expand(args.kernels, KERNEL_GROUPS, KERNELS, "kernel") if args.kernels else None
  modes = [m for m in (t.strip() for t in args.modes.split(",")) if m]
  for m in modes:
    if m not in MODES:
      raise SystemExit(f"unknown mode {m!r}; use fwd, fwd+bwd")

  runner = Runner(args)
  all_kernels: list[str] = []
  plan = []
  for name in case_names:
    case = CASES[name]
    if args.quick:
      case = quick_case(case)
    ks = list(case.kernels)
    if kfilter is not None:
      extra = [k for k in kfilter if k not in ks and applies(k, case)]
      ks = [k for k in ks if k in kfilter] + extra
    if args.quick and "attnax-standard" not in ks and (kfilter is None or
                                                       "attnax-standard" in kfilter):
      ks.append("attnax-standard")   # always one attnax kernel to exercise on CPU
    ms = [m for m in modes if m in case.modes]
    plan.append((case, ks, ms))
    all_kernels += [k for k in ks if k not in all_kernels]
  runner.header(case_names, all_kernels, modes)
  for case, ks, ms in plan:
    if not ks or not ms:
      runner.out(f"### {case.name}: nothing selected (kernels {ks}, modes {ms})\n")
      continue
    runner.run_case(case, ks, ms)
    runner.write(args.out)     # after every case: a timeout still leaves the tables done so far
  runner.write(args.out)
  if args.plot:
    make_plots(runner, args)
  return 0


def make_plots(runner: "Runner", args) -> None:
  """``--plot DIR``: the PNGs of plot_bench.py for this run's JSON; a missing matplotlib is a note."""
  if args.out:
    base, ext = os.path.splitext(args.out)
    path = (base if ext in (".json", ".md") else args.out) + ".json"
  else:
    path = os.path.join(args.plot, "bench.json")
    runner.write(path)
  try:
    import importlib.util
    spec = importlib.util.spec_from_file_location("plot_bench", os.path.join(_HERE, "plot_bench.py"))
    plot_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_bench)
    for png in plot_bench.plot([path], args.plot):
      print(f"plot: {png}", file=sys.stderr)
  except ImportError as e:
    print(f"--plot: no plots ({e}); make them elsewhere with benchmarks/plot_bench.py {path} "
          f"--out DIR", file=sys.stderr)
  except Exception as e:  # noqa: BLE001  (plots never fail the benchmark)
    print(f"--plot failed: {type(e).__name__}: {e}", file=sys.stderr)


if __name__ == "__main__":
  sys.exit(main())
