"""attnax.kernels.operands.eval_jaxpr: a mod's gathers from ref-backed arrays become point loads."""

import jax
import jax.numpy as jnp
import numpy as np

from attnax.kernels import operands


class _CountingRefArray(operands.RefArray):
  """A RefArray over a plain array that counts point loads and whole-array materialisations."""

  def __init__(self, array):
    super().__init__(array.reshape(-1), array.shape, array.dtype)
    self.point_loads = self.whole_loads = 0

  def read(self, flat):
    self.point_loads += 1
    return super().read(flat)

  def value(self):
    self.whole_loads += 1
    return super().value()


def test_a_gather_inside_a_jitted_helper_stays_a_point_load():
  keys = jax.random.split(jax.random.key(3), 2)
  table = jax.random.normal(keys[0], (4, 16, 16))
  h = jnp.int32(2)
  i = jnp.arange(16)[:, None]
  j = jax.random.randint(keys[1], (1, 16), 0, 16)

  @jax.jit
  def lookup(t, h, i, j):   # a mod's helper: the gather sits inside a jit call
    return t[h, i, j] * 2.0

  closed = jax.make_jaxpr(lambda t, h, i, j: lookup(t, h, i, j) + 1.0)(table, h, i, j)
  ref = _CountingRefArray(table)
  (got,) = operands.eval_jaxpr(closed.jaxpr, closed.consts, ref, h, i, j)
  np.testing.assert_allclose(np.asarray(got), np.asarray(table[h, i, j] * 2.0 + 1.0), rtol=1e-6)
  assert ref.point_loads == 1 and ref.whole_loads == 0
