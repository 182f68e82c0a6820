"""Serve the tiny GPT of examples/tiny_gpt.py from a paged KV cache, with continuous batching.

Requests (prompts cut from the training text, each with its own number of tokens to generate)
share ``--slots`` rows of one :class:`attnax.kernels.PagedKVCache`. Every step is one jitted
function: take pages for the step's tokens (``cache.allocate``), run the model over them (each
layer's ``MultiHeadAttention.decode_paged`` writes its keys/values into the pages and attends with
``paged_attention``), sample the next token of every row. Rows of different lengths decode
together; prompts enter in chunks of ``--chunk`` tokens beside rows that are decoding; when a
request finishes, its pages go back to the pool (``cache.free``) and the next request takes its
row. The pool holds fewer pages than ``slots * pages_per_sequence``: pages are shared by need.

  .venv/bin/python examples/serve_tiny_gpt.py                   # train 200 steps, serve 12 requests
  .venv/bin/python examples/serve_tiny_gpt.py --steps 0         # random weights (no training)
  .venv/bin/python examples/serve_tiny_gpt.py --kv-dtype int8   # int8 pages, per-token scales
  .venv/bin/python examples/serve_tiny_gpt.py --backend interpret   # the Pallas kernel, interpreted

``--backend auto`` runs the Pallas kernel on a GPU and the pure-JAX backend on a CPU. At the end
the script re-scores the first requests with the model's ordinary causal forward pass (no cache)
and prints how far the served logits are from it, then the throughput in tokens/s (compilation
excluded).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_gpt  # noqa: E402  (the model and its training loop)

from attnax.kernels import PagedKVCache  # noqa: E402


def paged_forward(model: tiny_gpt.TinyGPT, tokens: jax.Array, cache: PagedKVCache, backend: str):
  """``TinyGPT.__call__`` over the step's tokens ``(B, S)``, attending through the paged cache:
  ``(logits (B, S, vocab), cache)``. Layer ``i`` of the model is layer ``i`` of the cache."""
  x = model.embed(tokens)
  for i, block in enumerate(model.blocks):
    h, cache = block.attn.decode_paged(block.attn_norm(x), cache, layer=i,
                                       score_mod=block.score_mod(), backend=backend)
    x = x + h
    x = x + block.down(jax.nn.gelu(block.up(block.mlp_norm(x))))
  return model.embed.attend(model.norm(x)), cache


@nnx.jit(static_argnames=("backend",), donate_argnames=("cache",))
def serve_step(model, cache, tokens, num_new, key, temperature, backend="auto"):
  """One step for every row: pages for ``num_new[b]`` tokens, the forward pass, the next token.

  Steps are right-aligned: row ``b``'s ``num_new[b]`` tokens are the last slots of ``tokens``,
  so its newest token's logits are in the last slot (``logits[:, -1]``).
  """
  cache, ok = cache.allocate(num_new)
  logits, cache = paged_forward(model, tokens, cache, backend)
  last = logits[:, -1].astype(jnp.float32)
  sampled = jax.random.categorical(key, last / jnp.maximum(temperature, 1e-6))
  nxt = jnp.where(temperature > 0, sampled, jnp.argmax(last, axis=-1))
  return cache, nxt.astype(jnp.int32), last, ok


@jax.jit
def free_rows(cache: PagedKVCache, rows: jax.Array) -> PagedKVCache:
  return cache.free(rows)


@dataclasses.dataclass
class Request:
  prompt: np.ndarray           # token ids
  max_new: int                 # tokens to generate
  fed: int = 0                 # prompt tokens written to the cache so far
  generated: list = dataclasses.field(default_factory=list)
  logits: list = dataclasses.field(default_factory=list)   # served logits of each generated token

  @property
  def prefilling(self) -> bool:
    return self.fed < len(self.prompt)


def make_requests(data: np.ndarray, n: int, *, min_prompt: int, max_prompt: int, min_new: int,
                  max_new: int, seed: int) -> list[Request]:
  rng = np.random.default_rng(seed)
  min_prompt, min_new = min(min_prompt, max_prompt), min(min_new, max_new)
  reqs = []
  for _ in range(n):
    length = int(rng.integers(min_prompt, max_prompt + 1))
    start = int(rng.integers(0, len(data) - length))
    reqs.append(Request(prompt=data[start:start + length],
                        max_new=int(rng.integers(min_new, max_new + 1))))
  return reqs


def serve(model, requests: list[Request], *, slots: int, page_size: int, num_pages: int,
          pages_per_sequence: int, chunk: int, kv_dtype, temperature: float, seed: int,
          backend: str) -> dict:
  """Continuous batching over ``slots`` rows; returns throughput figures."""
  cfg = model.blocks[0].attn
  cache = PagedKVCache.create(batch=slots, num_pages=num_pages, page_size=page_size,
                              pages_per_sequence=pages_per_sequence,
                              num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                              num_layers=len(model.blocks), dtype=kv_dtype)
  queue = list(range(len(requests)))
  rows: list[int | None] = [None] * slots
  reserved = [0] * slots          # pages each row's request may need (admission control)
  key = jax.random.key(seed)
  seen_shapes, timed_s, timed_new, timed_prefill = set(), 0.0, 0, 0
  steps = peak_rows = 0
  start = time.perf_counter()
  while queue or any(r is not None for r in rows):
    # Admit waiting requests into free rows while the pool can hold all they may need.
    for r in range(slots):
      if rows[r] is None and queue:
        req = requests[queue[0]]
        need = -(-(len(req.prompt) + req.max_new) // page_size)
        if sum(reserved) + need <= num_pages:
          rows[r], reserved[r] = queue.pop(0), need
    active = [r for r in range(slots) if rows[r] is not None]
    peak_rows = max(peak_rows, len(active))
    want = np.zeros(slots, np.int32)
    for r in active:
      req = requests[rows[r]]
      want[r] = min(chunk, len(req.prompt) - req.fed) if req.prefilling else 1
    width = chunk if want.max() > 1 else 1          # two compiled step shapes
    tokens = np.zeros((slots, width), np.int32)
    for r in active:
      req = requests[rows[r]]
      n = int(want[r])
      tokens[r, width - n:] = (req.prompt[req.fed:req.fed + n] if req.prefilling
                               else req.generated[-1:])
    key, sub = jax.random.split(key)
    t0 = time.perf_counter()
    cache, nxt, last, ok = serve_step(model, cache, jnp.asarray(tokens), jnp.asarray(want), sub,
                                      jnp.float32(temperature), backend=backend)
    nxt, last, ok = np.asarray(nxt), np.asarray(last), np.asarray(ok)
    dt = time.perf_counter() - t0
    steps += 1
    if not ok[active].all():
      raise RuntimeError("the page pool ran out (admission control should prevent this)")
    finished = np.zeros(slots, bool)
    new_tokens = prefill_tokens = 0
    for r in active:
      req = requests[rows[r]]
      if req.prefilling:
        req.fed += int(want[r])
        prefill_tokens += int(want[r])
        if req.prefilling:          # more prompt chunks to come: this step's sample is unused
          continue
      req.generated.append(int(nxt[r]))
      req.logits.append(last[r])
      new_tokens += 1
      if len(req.generated) == req.max_new:
        finished[r], rows[r], reserved[r] = True, None, 0
    if width in seen_shapes:        # compiled already: count it in the throughput
      timed_s += dt
      timed_new += new_tokens
      timed_prefill += prefill_tokens
    seen_shapes.add(width)
    if finished.any():
      cache = free_rows(cache, jnp.asarray(finished))
  total_s = time.perf_counter() - start
  assert int(cache.num_free_pages()) == num_pages, "every page returns to the pool"
  return dict(steps=steps, seconds=total_s, timed_s=timed_s, timed_new=timed_new,
              timed_prefill=timed_prefill, peak_rows=peak_rows)


@nnx.jit
def full_logits(model, tokens):
  return model(tokens)


def check_against_full_pass(model, requests: list[Request], count: int) -> float:
  """Largest |served logit - logit of the ordinary causal forward pass| over the first ``count``
  requests, relative to the largest logit."""
  reqs = requests[:count]
  seqs = [np.concatenate([r.prompt, np.asarray(r.generated[:-1], np.int32)]) for r in reqs]
  n = max(len(s) for s in seqs)
  batch = np.stack([np.pad(s, (0, n - len(s))) for s in seqs])    # causal: end padding is inert
  logits = np.asarray(full_logits(model, jnp.asarray(batch)), np.float32)
  worst = 0.0
  for i, r in enumerate(reqs):
    p = len(r.prompt)
    want = logits[i, p - 1:p - 1 + len(r.generated)]
    got = np.stack(r.logits)
    worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
  return worst


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200, help="training steps (0: random weights)")
  parser.add_argument("--d-model", type=int, default=128)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--kv-heads", type=int, default=2)
  parser.add_argument("--seq-len", type=int, default=64, help="training window")
  parser.add_argument("--requests", type=int, default=12)
  parser.add_argument("--slots", type=int, default=4, help="rows of the cache decoded together")
  parser.add_argument("--min-prompt", type=int, default=4)
  parser.add_argument("--max-prompt", type=int, default=40)
  parser.add_argument("--min-new", type=int, default=8)
  parser.add_argument("--max-new", type=int, default=48)
  parser.add_argument("--chunk", type=int, default=16, help="prompt tokens per prefill step")
  parser.add_argument("--page-size", type=int, default=8)
  parser.add_argument("--kv-dtype", default="float32", choices=["float32", "bfloat16", "int8"])
  parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
  parser.add_argument("--backend", default="auto", choices=["auto", "jax", "pallas", "interpret"])
  parser.add_argument("--check", type=int, default=3,
                      help="re-score this many requests with the full causal pass (0: none)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  print(f"serve_tiny_gpt: jax {jax.__version__} on {jax.default_backend()}, paged_attention "
        f"backend={args.backend}, KV {args.kv_dtype}", flush=True)
  result = tiny_gpt.train("standard", steps=args.steps, seed=args.seed, seq_len=args.seq_len,
                          d_model=args.d_model, num_layers=args.layers, num_heads=args.heads,
                          num_kv_heads=args.kv_heads, log_every=0,
                          val_batches=4 if args.steps else 0)
  model, tok = result["model"], result["tokenizer"]
  if args.steps:
    print(f"trained {args.steps} steps: loss {result['losses'][0]:.3f} -> "
          f"{result['losses'][-1]:.3f}", flush=True)
  else:
    print("random weights (--steps 0)", flush=True)

  data = tok.encode(tiny_gpt.load_corpus())
  requests = make_requests(data, args.requests, min_prompt=args.min_prompt,
                           max_prompt=args.max_prompt, min_new=args.min_new,
                           max_new=args.max_new, seed=args.seed)
  longest = max(len(r.prompt) + r.max_new for r in requests)
  pages_per_sequence = -(-longest // args.page_size)
  # A pool smaller than slots * pages_per_sequence: rows share it by need.
  num_pages = max(pages_per_sequence, (3 * args.slots * pages_per_sequence) // 4)
  stats = serve(model, requests, slots=args.slots, page_size=args.page_size,
                num_pages=num_pages, pages_per_sequence=pages_per_sequence, chunk=args.chunk,
                kv_dtype=jnp.dtype(args.kv_dtype), temperature=args.temperature, seed=args.seed,
                backend=args.backend)
  generated = sum(len(r.generated) for r in requests)
  prompt = sum(len(r.prompt) for r in requests)
  print(f"served {len(requests)} requests ({prompt} prompt tokens, {generated} generated) on "
        f"{args.slots} rows, {num_pages} pages of {args.page_size} tokens, in {stats['steps']} "
        f"steps ({stats['peak_rows']} rows at most in one step)", flush=True)
  for r in requests[:3]:
    print(f"  {tok.decode(r.prompt)!r} -> {tok.decode(r.generated)!r}")
  if stats["timed_s"] > 0:
    print(f"throughput: {stats['timed_new'] / stats['timed_s']:.1f} generated tokens/s, "
          f"{(stats['timed_new'] + stats['timed_prefill']) / stats['timed_s']:.1f} tokens/s with "
          f"prefill ({stats['timed_s']:.2f} s of compiled steps; {stats['seconds']:.2f} s in all, "
          "compilation included)", flush=True)
  if args.check:
    err = check_against_full_pass(model, requests, args.check)
    tol = 3e-2 if args.kv_dtype == "int8" else (2e-2 if args.kv_dtype == "bfloat16" else 1e-4)
    verdict = "matches" if err < tol else "DOES NOT MATCH"
    print(f"paged decoding {verdict} the full causal pass: max |logit difference| / max |logit| "
          f"= {err:.2e} over {min(args.check, len(requests))} requests (tolerance {tol:g})",
          flush=True)
    if err >= tol:
      sys.exit(1)


if __name__ == "__main__":
  main()
