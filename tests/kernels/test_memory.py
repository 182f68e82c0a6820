"""O(chunk) memory of the pure-JAX kernels: compiled temporaries at S = 16384, without running.

One ``(16384, 16384)`` f32 score matrix is 1 GiB; the chunked / blockwise kernels must need far less
than that, forward and forward + backward. Only lowering and compiling happen here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from attnax.kernels import causal_mod, flash_attention, memory_efficient_attention

S, D = 16384, 64
SCORES_BYTES = S * S * 4          # one f32 score matrix: 1 GiB
LIMIT = SCORES_BYTES // 8


def temp_bytes(fn) -> int:
  x = jax.ShapeDtypeStruct((1, 1, S, D), jnp.float32)
  compiled = jax.jit(fn).lower(x, x, x).compile()
  analysis = compiled.memory_analysis()
  if analysis is None:
    pytest.skip("this backend reports no memory analysis")
  return analysis.temp_size_in_bytes


def forward(kernel, **kw):
  return lambda q, k, v: kernel(q, k, v, **kw)


def forward_backward(kernel, **kw):
  return jax.grad(lambda q, k, v: jnp.sum(kernel(q, k, v, **kw)), argnums=(0, 1, 2))


@pytest.mark.parametrize("kernel", [memory_efficient_attention, flash_attention],
                         ids=["memory_efficient", "flash"])
@pytest.mark.parametrize("mode", [forward, forward_backward], ids=["fwd", "fwd_bwd"])
def test_temp_memory_far_below_scores(kernel, mode):
  used = temp_bytes(mode(kernel))
  print(f"{kernel.__name__} {mode.__name__}: temp {used / 2**20:.1f} MiB")
  assert used < LIMIT, f"{used / 2**20:.1f} MiB >= {LIMIT / 2**20:.0f} MiB"


def test_flash_causal_memory():
  """The BlockMask of a causal mask at S = 16384 (128 x 128 tiles) adds little."""
  used = temp_bytes(forward_backward(flash_attention, score_mod=causal_mod()))
  assert used < LIMIT, f"{used / 2**20:.1f} MiB"
