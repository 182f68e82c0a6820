"""examples/tiny_gpt.py: its loss falls, and kernels give the same training curve."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

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
