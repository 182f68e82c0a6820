"""attnax.kernels.jaxprs: the interpreter the kernels share (operands' loads, lines, Mosaic)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnax.kernels import jaxprs


def _fn(x, y):
  @jax.jit
  def inner(a):
    return jnp.sin(a) * 2.0 + 1

  return inner(x) - jnp.exp(y), (x * y).sum()


def _inputs(seed):
  kx, ky = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, (5, 7)), jax.random.normal(ky, (5, 7))


def test_replay_with_bind_reproduces_the_function():
  x, y = _inputs(0)
  closed = jax.make_jaxpr(_fn)(x, y)
  got = jaxprs.replay(closed.jaxpr, closed.consts, [x, y])
  want = jax.tree.leaves(_fn(x, y))
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)


def test_replay_inlines_jit_calls_and_applies_the_rule_inside_them():
  x, y = _inputs(1)
  closed = jax.make_jaxpr(_fn)(x, y)
  seen = []

  def rule(eqn, ins):
    seen.append(eqn.primitive.name)
    if eqn.primitive.name == "sin":   # inside the jitted helper
      return [lax.cos(*ins)]
    return jaxprs.bind(eqn, ins)

  got = jaxprs.replay(closed.jaxpr, closed.consts, [x, y], rule)
  assert "pjit" not in seen and "jit" not in seen and "sin" in seen
  np.testing.assert_allclose(np.asarray(got[0]),
                             np.asarray(jnp.cos(x) * 2.0 + 1 - jnp.exp(y)), rtol=1e-6, atol=1e-6)


def test_replay_keeps_literal_types():
  # An int8 operand plus a literal: the literal is replayed as int8, not a weak Python int.
  x = jax.random.randint(jax.random.key(2), (4,), -50, 50).astype(jnp.int8)
  closed = jax.make_jaxpr(lambda a: a + 3)(x)
  dtypes = []

  def rule(eqn, ins):
    dtypes.extend(jnp.result_type(v) for v in ins)
    return jaxprs.bind(eqn, ins)

  (got,) = jaxprs.replay(closed.jaxpr, closed.consts, [x], rule)
  assert got.dtype == jnp.int8 and all(d == jnp.int8 for d in dtypes)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(x) + np.int8(3))
