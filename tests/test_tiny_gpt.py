"""examples/tiny_gpt.py: its loss falls, and kernels give the same training curve."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("tiny_gpt", ROOT / "examples" / "tiny_gpt.py")
tiny_gpt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_gpt)

# A smaller model than the example's default keeps the fast test fast (compile time dominates).
SMALL = dict(d_model=64, num_heads=2, num_kv_heads=1, batch=8, seq_len=32)


def test_loss_falls_in_a_few_dozen_steps():
  result = tiny_gpt.train("standard", steps=40, **SMALL)
  losses = result["losses"]
  vocab = result["tokenizer"].vocab_size
  assert abs(losses[0] - np.log(vocab)) < 1.0        # starts near a uniform guess
  assert np.mean(losses[-5:]) < 0.75 * losses[0]
  assert np.isfinite(result["val_loss"])


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["flash", "memory_efficient"])
def test_loss_curves_of_reference_and_kernel_agree(kernel):
  """Same data, same initialisation: per-step losses agree to f32 rounding over 30 steps.

  Measured: the curves of standard, flash and memory-efficient attention differ by < 2e-7
  (relative) over 40 steps; the bound is DESIGN.md's f32 output tolerance, 1e-5.
  """
  if kernel not in tiny_gpt.attention_kernels():
    pytest.skip(f"{kernel}_attention does not exist yet")
  ref = np.array(tiny_gpt.train("standard", steps=30, **SMALL)["losses"])
  got = np.array(tiny_gpt.train(kernel, steps=30, **SMALL)["losses"])
  assert np.max(np.abs(got - ref) / ref) < 1e-5


@pytest.mark.slow
def test_example_runs_with_default_arguments():
  """The command a user runs: 300 steps of the default model, then a KV-cache sample."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, str(ROOT / "examples" / "tiny_gpt.py"), "--sample", "40"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  line = next(l for l in proc.stdout.splitlines() if l.startswith("train loss"))
  first, last = (float(t) for t in line.split()[2:5:2])
  assert last < 0.5 * first, line
  assert "sample (KV-cache decoding)" in proc.stdout


# ----------------------------------------------------------------------------- learned mod arrays
#
# --learned-alibi / --learned-bias: every block owns an nnx.Param (ALiBi slopes (H,), or a bias
# (H, S, S)) and passes it per call as a score mod, so training differentiates the arrays the mods
# carry. standard_attention and memory_efficient_attention give those arrays their true gradient;
# the block kernels must too (DESIGN.md section 3, "gradients"). A kernel that returned a zero
# gradient for them would still match step 0's loss (the forward is right) and then drift.

# Smaller still than SMALL (head_dim 32 is the Pallas kernel's minimum): the Pallas kernel runs in
# the interpreter on CPU, where one layer and 16-position windows keep a few steps in seconds.
# No validation pass: it would compile the forward once more per kernel.
TINY = dict(SMALL, batch=4, seq_len=16, num_layers=1, val_batches=0)
OPTIONS = {"alibi": dict(learned_alibi=True), "bias": dict(learned_bias=True)}
LOSS_STEPS = 5


def _losses(kernel, option, steps=LOSS_STEPS):
  return np.array(tiny_gpt.train(kernel, steps=steps, **TINY, **OPTIONS[option])["losses"])


def _learned(model, option):
  """The learned arrays of every block, as numpy."""
  name = {"alibi": "slopes", "bias": "bias"}[option]
  return [np.asarray(getattr(block, name)[...]) for block in model.blocks]


@pytest.mark.parametrize("option,kernel", [
    ("alibi", "flash"),
    pytest.param("alibi", "pallas_flash", marks=pytest.mark.slow),
    pytest.param("alibi", "memory_efficient", marks=pytest.mark.slow),
    ("bias", "flash"),
    pytest.param("bias", "pallas_flash", marks=pytest.mark.slow),
    pytest.param("bias", "memory_efficient", marks=pytest.mark.slow),
])
def test_learned_mod_loss_curves_agree_with_standard(option, kernel):
  """Per-step losses with learned slopes/bias: the kernel's curve is the reference's to 1e-5.

  Step 0 checks the forward; the later steps check the gradient of the mod arrays (a zero gradient
  shows up from step 1, at 2e-5 to 1e-3 relative). Measured (CPU, jax 0.11.2, 5 steps of TINY):
  memory_efficient, flash and pallas_flash within 2e-7 of standard.
  """
  ref = _losses("standard", option)
  got = _losses(kernel, option)
  rel = np.abs(got - ref) / ref
  assert np.max(rel) < 1e-5, f"relative difference per step: {rel}"


@pytest.mark.slow
def test_learned_mod_loss_curve_is_deterministic():
  """Same seed, same kernel, both options: the same losses, bit for bit."""
  opts = dict(learned_alibi=True, learned_bias=True)
  first = tiny_gpt.train("standard", steps=3, **TINY, **opts)["losses"]
  again = tiny_gpt.train("standard", steps=3, **TINY, **opts)["losses"]
  assert first == again


@pytest.mark.parametrize("option,kernel", [
    pytest.param("alibi", "standard", marks=pytest.mark.slow),
    pytest.param("alibi", "memory_efficient", marks=pytest.mark.slow),
    pytest.param("alibi", "flash", marks=pytest.mark.slow),
    ("alibi", "pallas_flash"),
    pytest.param("bias", "standard", marks=pytest.mark.slow),
    pytest.param("bias", "memory_efficient", marks=pytest.mark.slow),
    pytest.param("bias", "flash", marks=pytest.mark.slow),
    ("bias", "pallas_flash"),
])
def test_learned_mod_arrays_change_in_training(option, kernel):
  """The slopes/bias move by more than weight decay alone would move them: their gradient is not 0.

  With a zero gradient AdamW's step is the decay alone, ``p * (1 - lr * wd)`` per step (the bias,
  which starts at zero, would not move at all). Entries the causal mask hides (key after query)
  have a true gradient of zero and are not checked.
  """
  steps, lr, wd = 3, 3e-3, 0.01
  result = tiny_gpt.train(kernel, steps=steps, learning_rate=lr, **TINY, **OPTIONS[option])
  model = result["model"]
  heads, s = TINY["num_heads"], TINY["seq_len"]
  if option == "alibi":
    init = [np.asarray(tiny_gpt.alibi_slopes(heads))] * len(model.blocks)
  else:
    init = [np.zeros((heads, s, s), np.float32)] * len(model.blocks)
  visible = np.tril(np.ones((s, s), bool))
  for layer, (p0, p) in enumerate(zip(init, _learned(model, option))):
    moved = np.abs(p - p0 * (1 - lr * wd) ** steps)
    if option == "alibi":
      assert np.all(moved > 1e-4), f"layer {layer}: slopes {p0} -> {p}"        # every head
    else:
      assert np.all(moved[:, ~visible] == 0), f"layer {layer}: a hidden bias entry moved"
      frac = np.mean(moved[:, visible] > 1e-4)
      assert frac > 0.9, f"layer {layer}: only {frac:.0%} of the visible bias entries moved"


def _set_learned(model, seed=1):
  """Random slopes and bias, so the decoding checks below see mods that matter."""
  rng = np.random.default_rng(seed)
  for block in model.blocks:
    block.slopes[...] = jnp.asarray(rng.uniform(0.05, 0.5, block.slopes.shape), jnp.float32)
    block.bias[...] = jnp.asarray(rng.normal(0.0, 1.0, block.bias.shape), jnp.float32)


@pytest.mark.parametrize("kernel", [pytest.param("standard", marks=pytest.mark.slow), "flash",
                                    pytest.param("pallas_flash", marks=pytest.mark.slow)])
def test_kv_cache_decoding_with_learned_mods_matches_the_full_forward(kernel):
  """Decoding sees the slopes and the bias at absolute positions: its logits are the full pass's.

  A 4-token prefill, then one token at a time up to the bias's window, against one causal pass
  over the same tokens.
  """
  s = TINY["seq_len"]
  result = tiny_gpt.train(kernel, steps=1, **TINY, learned_alibi=True, learned_bias=True)
  model, vocab = result["model"], result["tokenizer"].vocab_size
  _set_learned(model)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (1, s)), jnp.int32)
  full = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))

  step = nnx.jit(lambda m, t: m(t, decode=True))
  model.init_cache(1, s)
  parts = [step(model, tokens[:, :4])] + [step(model, tokens[:, i:i + 1]) for i in range(4, s)]
  decoded = np.concatenate([np.asarray(p) for p in parts], axis=1)
  np.testing.assert_allclose(decoded, full, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_generate_with_learned_bias_keeps_the_cache_within_the_window():
  """A sample 3x the bias's window: the cache holds seq_len positions and restarts when full."""
  s = TINY["seq_len"]
  result = tiny_gpt.train("standard", steps=1, **TINY, learned_alibi=True, learned_bias=True)
  model, tok = result["model"], result["tokenizer"]
  assert model.max_positions == s
  text = tiny_gpt.generate(model, tok, "def ", 3 * s)
  assert text.startswith("def ") and len(text) == 4 + 3 * s
  assert all(b.attn.cached_key.shape[2] == s for b in model.blocks)
  again = tiny_gpt.generate(model, tok, "def ", 3 * s)
  assert text == again                                   # the same seed samples the same text


@pytest.mark.slow
def test_example_runs_with_learned_alibi_and_bias():
  """The command line: both flags, a short run, a KV-cache sample longer than --seq-len."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  cmd = [sys.executable, str(ROOT / "examples" / "tiny_gpt.py"), "--learned-alibi",
         "--learned-bias", "--steps", "40", "--seq-len", "32", "--log-every", "10",
         "--sample", "80"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "ALiBi slopes of layer 0" in proc.stdout and "learned bias of layer 0" in proc.stdout
  sample = proc.stdout.split("sample (KV-cache decoding):\n", 1)[1]
  assert sample.startswith("def ") and len(sample) == 4 + 80 + 1, repr(sample)  # prompt, 80, "\n"
