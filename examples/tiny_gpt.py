"""Tiny GPT: a character-level causal language model built on attnax.MultiHeadAttention.

Trains on text that ships with Python (the source of a few pure-Python standard library modules,
about 200k characters; the Zen of Python if sources are missing), on a CPU, in well under a minute,
then samples from it with the KV cache. The attention kernel is one flag; the model does
not change:

  .venv/bin/python examples/tiny_gpt.py                       # standard_attention, 300 steps
  .venv/bin/python examples/tiny_gpt.py --attention flash     # any attnax kernel, by short name
  .venv/bin/python examples/tiny_gpt.py --steps 100 --log-every 10

The model: token embedding (tied with the output layer), ``--layers`` pre-norm blocks of
attnax ``MultiHeadAttention`` (causal, rotary position embedding, grouped-query heads) and a GELU
MLP, then a final RMSNorm. Defaults: 2 layers, 128 features, 4 query heads of 32 dims over 2
key/value heads, 64-character windows, batch 16, AdamW.
"""

from __future__ import annotations

import argparse
import inspect
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from attnax import MultiHeadAttention, kernels
from attnax.attention import is_attention_fn
from attnax.kernels import causal_mod

# Kernels that need a context a language model layer does not have.
NEEDS_CONTEXT = {"paged_attention", "ring_attention", "ring_attention_reference"}


def attention_kernels() -> dict[str, Callable[..., Any]]:
  """Short name (``flash`` for ``flash_attention``) -> kernel, for every usable attnax kernel."""
  found = {}
  for name in kernels.__all__:
    fn = getattr(kernels, name, None)
    if (name.endswith("_attention") and name not in NEEDS_CONTEXT and callable(fn)
        and is_attention_fn(fn)):
      found[name[: -len("_attention")]] = fn
  return found


CORPUS_MODULES = ("textwrap", "shlex", "string", "heapq", "bisect", "fractions", "difflib")


def load_corpus() -> str:
  """The source of a few pure-Python stdlib modules (about 200k characters).

  Falls back to the Zen of Python when sources are not installed.
  """
  import importlib
  parts = []
  for name in CORPUS_MODULES:
    try:
      parts.append(inspect.getsource(importlib.import_module(name)))
    except (OSError, TypeError, ImportError):
      pass
  if parts:
    return "\n".join(parts)
  import codecs
  import this  # noqa: F401  (prints the Zen once)
  return codecs.decode(this.s, "rot13")


class CharTokenizer:
  """Characters of the corpus <-> integer ids."""

  def __init__(self, text: str):
    self.chars = sorted(set(text))
    self.index = {c: i for i, c in enumerate(self.chars)}

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    return np.array([self.index[c] for c in text], np.int32)

  def decode(self, ids) -> str:
    return "".join(self.chars[int(i)] for i in ids)


class Block(nnx.Module):
  """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

  def __init__(self, rngs: nnx.Rngs, *, d_model: int, num_heads: int, num_kv_heads: int,
               attention_fn: Callable[..., Any]):
    self.attn_norm = nnx.RMSNorm(d_model, rngs=rngs)
    self.attn = MultiHeadAttention(rngs, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                   in_features=d_model, attention_fn=attention_fn,
                                   score_mod=causal_mod(), rope=True, use_bias=False)
    self.mlp_norm = nnx.RMSNorm(d_model, rngs=rngs)
    self.up = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
    self.down = nnx.Linear(4 * d_model, d_model, rngs=rngs)

  def __call__(self, x: jax.Array, decode: bool = False) -> jax.Array:
    """``x`` ``(B, S, d_model)`` -> ``(B, S, d_model)``."""
    x = x + self.attn(self.attn_norm(x), decode=decode)
    return x + self.down(jax.nn.gelu(self.up(self.mlp_norm(x))))


class TinyGPT(nnx.Module):
  """Token ids ``(B, S)`` -> next-token logits ``(B, S, vocab_size)``."""

  def __init__(self, rngs: nnx.Rngs, *, vocab_size: int, d_model: int = 128, num_layers: int = 2,
               num_heads: int = 4, num_kv_heads: int = 2,
               attention_fn: Callable[..., Any] = kernels.standard_attention):
    self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
    self.blocks = nnx.List([Block(rngs, d_model=d_model, num_heads=num_heads,
                                  num_kv_heads=num_kv_heads, attention_fn=attention_fn)
                            for _ in range(num_layers)])
    self.norm = nnx.RMSNorm(d_model, rngs=rngs)

  def __call__(self, tokens: jax.Array, decode: bool = False) -> jax.Array:
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x, decode=decode)
    return self.embed.attend(self.norm(x))

  def init_cache(self, batch: int, max_length: int) -> None:
    for block in self.blocks:
      block.attn.init_cache(batch, max_length)


def batches(data: np.ndarray, *, batch: int, seq_len: int, seed: int):
  """Endless random windows: inputs ``(batch, seq_len)`` and next-character targets."""
  rng = np.random.default_rng(seed)
  while True:
    start = rng.integers(0, len(data) - seq_len - 1, size=batch)
    window = np.stack([data[s:s + seq_len + 1] for s in start])
    yield jnp.asarray(window[:, :-1]), jnp.asarray(window[:, 1:])


def loss_fn(model: TinyGPT, x: jax.Array, y: jax.Array) -> jax.Array:
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@nnx.jit
def train_step(model: TinyGPT, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def eval_step(model: TinyGPT, x: jax.Array, y: jax.Array) -> jax.Array:
  return loss_fn(model, x, y)


def train(attention: str = "standard", *, steps: int = 300, seed: int = 0, batch: int = 16,
          seq_len: int = 64, d_model: int = 128, num_layers: int = 2, num_heads: int = 4,
          num_kv_heads: int = 2, learning_rate: float = 3e-3, log_every: int = 0) -> dict:
  """Train a :class:`TinyGPT` with the named kernel; returns the losses and the model.

  Returns:
    ``dict(losses=[per-step train loss], val_loss=float, model=TinyGPT, tokenizer=CharTokenizer,
    seconds=float)``. The data order and the initialisation depend on ``seed`` only, so runs with
    different kernels see the same batches from the same starting point.
  """
  available = attention_kernels()
  if attention not in available:
    raise ValueError(f"--attention {attention!r}: choose one of {sorted(available)}")
  text = load_corpus()
  tok = CharTokenizer(text)
  data = tok.encode(text)
  split = int(0.9 * len(data))
  train_data, val_data = data[:split], data[split:]
  model = TinyGPT(nnx.Rngs(seed), vocab_size=tok.vocab_size, d_model=d_model,
                  num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                  attention_fn=available[attention])
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(learning_rate, weight_decay=0.01))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  losses = []
  start = time.perf_counter()
  for step, (x, y) in zip(range(steps), batches(train_data, batch=batch, seq_len=seq_len,
                                                 seed=seed)):
    losses.append(float(train_step(model, optimizer, x, y)))
    if log_every and (step % log_every == 0 or step == steps - 1):
      print(f"step {step:4d}  loss {losses[-1]:.4f}", flush=True)
  seconds = time.perf_counter() - start
  val = batches(val_data, batch=batch, seq_len=seq_len, seed=seed + 1)
  val_loss = float(np.mean([float(eval_step(model, *next(val))) for _ in range(4)]))
  return dict(losses=losses, val_loss=val_loss, model=model, tokenizer=tok, seconds=seconds)


def generate(model: TinyGPT, tok: CharTokenizer, prompt: str, length: int, *,
             temperature: float = 0.8, seed: int = 0) -> str:
  """Prefill ``prompt`` into the KV cache, then sample ``length`` characters one at a time."""
  ids = jnp.asarray(tok.encode(prompt))[None]
  model.init_cache(1, ids.shape[1] + length)

  @nnx.jit
  def step(model, tokens, key):
    logits = model(tokens, decode=True)[:, -1]
    return jax.random.categorical(key, logits / temperature)[:, None]

  key = jax.random.key(seed)
  nxt, out = step(model, ids, key), []
  for _ in range(length):
    out.append(int(nxt[0, 0]))
    key, sub = jax.random.split(key)
    nxt = step(model, nxt, sub)
  return prompt + tok.decode(out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--attention", default="standard", choices=sorted(attention_kernels()),
                      help="attnax kernel, by short name (default: standard)")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq-len", type=int, default=64)
  parser.add_argument("--d-model", type=int, default=128)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--kv-heads", type=int, default=2)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--log-every", type=int, default=25)
  parser.add_argument("--sample", type=int, default=120, help="characters to sample (0: none)")
  args = parser.parse_args()

  print(f"tiny_gpt: attention={args.attention}_attention, jax {jax.__version__} on "
        f"{jax.default_backend()}", flush=True)
  result = train(args.attention, steps=args.steps, seed=args.seed, batch=args.batch,
                 seq_len=args.seq_len, d_model=args.d_model, num_layers=args.layers,
                 num_heads=args.heads, num_kv_heads=args.kv_heads, learning_rate=args.lr,
                 log_every=args.log_every)
  losses = result["losses"]
  tail = min(10, len(losses))
  first, last = losses[0], float(np.mean(losses[-tail:]))
  print(f"train loss {first:.3f} -> {last:.3f} (mean of the last {tail} steps); "
        f"validation loss {result['val_loss']:.3f}; {result['seconds']:.1f} s for "
        f"{len(losses)} steps", flush=True)
  if args.sample:
    try:
      text = generate(result["model"], result["tokenizer"], "def ", args.sample, seed=args.seed)
      print("sample (KV-cache decoding):\n" + text)
    except ValueError as e:  # a kernel that cannot attend over a cache (e.g. linear attention)
      print(f"no sample: {e}")


if __name__ == "__main__":
  main()
