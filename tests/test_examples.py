"""The examples run end to end, as a user runs them (a subprocess of this interpreter)."""

import importlib.util
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_runs_and_every_kernel_agrees():
  # --seq 128 keeps Pallas interpret mode cheap on CPU; the default (256) is what the README runs.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the user's single CPU device
  proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--seq", "128"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out
  assert "FAILED" not in out and "DISAGREE" not in out, out
  last = proc.stdout.strip().splitlines()[-1]
  assert last.startswith("All ") and "agree with standard_attention" in last, out
  # Every public *_attention kernel (bar the ones the script says it cannot compare) took part.
  spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
  quickstart = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(quickstart)
  expected = [n for n in quickstart.attention_kernels() if n not in quickstart.NOT_COMPARED]
  assert last.split(": ", 1)[1].split(", ") == expected, out


def test_serve_tiny_gpt_continuous_batching_matches_the_full_pass():
  # Tiny sizes, random weights: more requests than rows (so finished rows' pages are reused),
  # prompts longer than one prefill chunk; the script re-scores requests with the full pass.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  cmd = [sys.executable, str(ROOT / "examples" / "serve_tiny_gpt.py"), "--steps", "0",
         "--requests", "5", "--slots", "2", "--max-prompt", "20", "--chunk", "8", "--max-new", "8",
         "--d-model", "32", "--layers", "1", "--check", "5"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out
  assert "served 5 requests" in out and "generated tokens/s" in out, out
  assert "paged decoding matches the full causal pass" in out, out


def test_gated_attention_example_agrees_and_skips_tiles():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, str(ROOT / "examples" / "gated_attention.py"),
                         "--seq", "128"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out
  assert proc.stdout.strip().splitlines()[-1] == "gated attention: kernels agree", out


def test_ring_attention_example_agrees_on_emulated_devices():
  # 4 emulated CPU devices (the script asks for them itself), zig-zag, documents + ALiBi, grads.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  cmd = [sys.executable, str(ROOT / "examples" / "ring_attention.py"), "--devices", "4",
         "--seq", "64"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out
  assert "ring over 4 x" in out and "agrees with standard_attention" in out, out
