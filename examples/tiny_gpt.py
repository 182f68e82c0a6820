"""Tiny GPT: a character-level causal language model built on attnax.MultiHeadAttention.

Trains on text that ships with Python (the source of a few pure-Python standard library modules,
about 200k characters; the Zen of Python if sources are missing), on a CPU, in well under a minute,
then samples from it with the KV cache. The attention kernel is one flag; the model does
not change:

  .venv/bin/python examples/tiny_gpt.py                       # standard_attention, 300 steps
  .venv/bin/python examples/tiny_gpt.py --attention flash     # any attnax kernel, by short name
  .venv/bin/python examples/tiny_gpt.py --steps 100 --log-every 10
  .venv/bin/python examples/tiny_gpt.py --learned-alibi --learned-bias   # learned score-mod arrays

The model: token embedding (tied with the output layer), ``--layers`` pre-norm blocks of
attnax ``MultiHeadAttention`` (causal, rotary position embedding, grouped-query heads) and a GELU
MLP, then a final RMSNorm. Defaults: 2 layers, 128 features, 4 query heads of 32 dims over 2
key/value heads, 64-character windows, batch 16, AdamW.

Two options make the attention learn arrays that score mods carry. Each block owns them as
``nnx.Param`` and passes them per call (``attn(x, score_mod=...)``; the per-call mod applies after
the module's causal mod), so the kernel's backward must give the mod arrays their gradient:

* ``--learned-alibi``: ALiBi slopes ``(heads,)``, initialised to ``alibi_slopes(heads)``, through
  ``alibi_mod(slopes=...)``.
* ``--learned-bias``: a relative-position bias ``(heads, seq_len, seq_len)``, initialised to zeros,
  through ``additive_bias_mod(bias[None])``. It covers positions ``0..seq_len-1`` only, so sampling
  keeps the KV cache within ``seq_len`` positions: when the cache is full, it restarts from the last
  ``seq_len // 2`` characters (see :func:`generate`).

(A mod given to ``MultiHeadAttention``'s constructor would store its arrays as non-trainable
``ModBuffer`` state instead.)
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
from attnax.kernels import additive_bias_mod, alibi_mod, alibi_slopes, causal_mod
from attnax.kernels import compose_score_mods

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
  """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

  ``learned_alibi`` adds trainable ALiBi slopes ``(num_heads,)``; ``learned_bias`` a trainable
  bias ``(num_heads, max_positions, max_positions)`` over absolute (query, key) positions. Both are
  ``nnx.Param`` of the block, passed to the attention per call as score mods.
  """

  def __init__(self, rngs: nnx.Rngs, *, d_model: int, num_heads: int, num_kv_heads: int,
               attention_fn: Callable[..., Any], learned_alibi: bool = False,
               learned_bias: bool = False, max_positions: int | None = None):
    self.attn_norm = nnx.RMSNorm(d_model, rngs=rngs)
    self.attn = MultiHeadAttention(rngs, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                   in_features=d_model, attention_fn=attention_fn,
                                   score_mod=causal_mod(), rope=True, use_bias=False)
    self.mlp_norm = nnx.RMSNorm(d_model, rngs=rngs)
    self.up = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
    self.down = nnx.Linear(4 * d_model, d_model, rngs=rngs)
    # Trainable arrays carried by score mods. They are Params of the block, not constructor mods of
    # the attention (whose arrays would be non-trainable ModBuffer state). Zeros for the bias: the
    # initialisation stays deterministic and draws nothing from rngs, so the other weights start
    # as they do without the option.
    self.slopes = nnx.Param(alibi_slopes(num_heads)) if learned_alibi else None
    if learned_bias:
      if not max_positions:
        raise ValueError("learned_bias needs max_positions (the training window, seq_len)")
      self.bias = nnx.Param(jnp.zeros((num_heads, max_positions, max_positions), jnp.float32))
    else:
      self.bias = None

  def score_mod(self) -> Any:
    """The per-call score mod built from the learned arrays (``None`` without them)."""
    return compose_score_mods(
        None if self.slopes is None else alibi_mod(slopes=self.slopes[...]),
        None if self.bias is None else additive_bias_mod(self.bias[...][None]))

  def __call__(self, x: jax.Array, decode: bool = False) -> jax.Array:
    """``x`` ``(B, S, d_model)`` -> ``(B, S, d_model)``."""
    x = x + self.attn(self.attn_norm(x), score_mod=self.score_mod(), decode=decode)
    return x + self.down(jax.nn.gelu(self.up(self.mlp_norm(x))))


class TinyGPT(nnx.Module):
  """Token ids ``(B, S)`` -> next-token logits ``(B, S, vocab_size)``.

  ``max_positions`` is the most positions the model can attend over (``None``: unlimited); it is
  set, to the training window, only by ``learned_bias``.
  """

  def __init__(self, rngs: nnx.Rngs, *, vocab_size: int, d_model: int = 128, num_layers: int = 2,
               num_heads: int = 4, num_kv_heads: int = 2,
               attention_fn: Callable[..., Any] = kernels.standard_attention,
               learned_alibi: bool = False, learned_bias: bool = False,
               max_positions: int | None = None):
    self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
    self.blocks = nnx.List([Block(rngs, d_model=d_model, num_heads=num_heads,
                                  num_kv_heads=num_kv_heads, attention_fn=attention_fn,
                                  learned_alibi=learned_alibi, learned_bias=learned_bias,
                                  max_positions=max_positions)
                            for _ in range(num_layers)])
    self.norm = nnx.RMSNorm(d_model, rngs=rngs)
    self.max_positions = max_positions if learned_bias else None

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
          num_kv_heads: int = 2, learning_rate: float = 3e-3, log_every: int = 0,
          learned_alibi: bool = False, learned_bias: bool = False, val_batches: int = 4) -> dict:
  """Train a :class:`TinyGPT` with the named kernel; returns the losses and the model.

  ``learned_alibi`` / ``learned_bias``: every block learns ALiBi slopes ``(num_heads,)`` / a bias
  ``(num_heads, seq_len, seq_len)``, passed to its attention as per-call score mods (see
  :class:`Block`). ``val_batches``: validation batches after training (0: none, ``val_loss`` NaN).

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
                  attention_fn=available[attention], learned_alibi=learned_alibi,
                  learned_bias=learned_bias, max_positions=seq_len)
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
  val_loss = (float(np.mean([float(eval_step(model, *next(val))) for _ in range(val_batches)]))
              if val_batches else float("nan"))
  return dict(losses=losses, val_loss=val_loss, model=model, tokenizer=tok, seconds=seconds)


def generate(model: TinyGPT, tok: CharTokenizer, prompt: str, length: int, *,
             temperature: float = 0.8, seed: int = 0, context: int | None = None) -> str:
  """Prefill ``prompt`` into the KV cache, then sample ``length`` characters one at a time.

  ``context``: the most positions the cache holds; default ``model.max_positions`` (the training
  window for a model with a learned bias, whose table covers positions ``0..seq_len-1`` only; no
  limit otherwise: the cache then holds the prompt and the whole sample). With a limit, a full cache
  restarts: the last ``context // 2`` characters are prefilled again at positions ``0..``, so the
  mods and RoPE never see a position past ``context - 1``. A longer prompt keeps its last
  ``context`` characters.
  """
  context = model.max_positions if context is None else int(context)
  ids = [int(i) for i in tok.encode(prompt)]
  if context is None:
    max_length, keep = len(ids) + length, None
  else:
    max_length, keep = context, max(1, context // 2)

  @nnx.jit
  def step(model, tokens, key):
    logits = model(tokens, decode=True)[:, -1]
    return jax.random.categorical(key, logits / temperature)[:, None]

  def prefill(tokens, key):
    model.init_cache(1, max_length)
    return step(model, jnp.asarray(tokens, jnp.int32)[None], key), len(tokens)

  key = jax.random.key(seed)
  (nxt, filled), out = prefill(ids[-max_length:], key), []
  for _ in range(length):
    out.append(int(nxt[0, 0]))
    key, sub = jax.random.split(key)
    if filled == max_length:   # the cache is full (only with a context limit): restart it
      nxt, filled = prefill((ids + out)[-keep:], sub)
    else:
      nxt, filled = step(model, nxt, sub), filled + 1
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
  parser.add_argument("--learned-alibi", action="store_true",
                      help="every layer learns its ALiBi slopes (heads,), passed as alibi_mod")
  parser.add_argument("--learned-bias", action="store_true",
                      help="every layer learns a bias (heads, seq_len, seq_len), passed as "
                           "additive_bias_mod; sampling keeps the cache within seq_len")
  args = parser.parse_args()

  learned = [name for name, on in (("learned ALiBi slopes", args.learned_alibi),
                                   ("learned bias", args.learned_bias)) if on]
  print(f"tiny_gpt: attention={args.attention}_attention"
        f"{''.join(', ' + n for n in learned)}, jax {jax.__version__} on "
        f"{jax.default_backend()}", flush=True)
  result = train(args.attention, steps=args.steps, seed=args.seed, batch=args.batch,
                 seq_len=args.seq_len, d_model=args.d_model, num_layers=args.layers,
                 num_heads=args.heads, num_kv_heads=args.kv_heads, learning_rate=args.lr,
                 log_every=args.log_every, learned_alibi=args.learned_alibi,
                 learned_bias=args.learned_bias)
  losses = result["losses"]
  tail = min(10, len(losses))
  first, last = losses[0], float(np.mean(losses[-tail:]))
  print(f"train loss {first:.3f} -> {last:.3f} (mean of the last {tail} steps); "
        f"validation loss {result['val_loss']:.3f}; {result['seconds']:.1f} s for "
        f"{len(losses)} steps", flush=True)
  block = result["model"].blocks[0]
  if block.slopes is not None:
    fmt = lambda a: "[" + ", ".join(f"{x:.4f}" for x in np.asarray(a)) + "]"
    print(f"ALiBi slopes of layer 0: {fmt(alibi_slopes(args.heads))} -> "
          f"{fmt(block.slopes[...])}", flush=True)
  if block.bias is not None:
    print(f"learned bias of layer 0: max |bias| {float(jnp.abs(block.bias[...]).max()):.4f}",
          flush=True)
  if args.sample:
    try:
      text = generate(result["model"], result["tokenizer"], "def ", args.sample, seed=args.seed)
      print("sample (KV-cache decoding):\n" + text)
    except ValueError as e:  # a kernel that cannot attend over a cache (e.g. linear attention)
      print(f"no sample: {e}")


if __name__ == "__main__":
  main()
