"""A jaxpr's equations emitted again into the current trace, each through a rule.

The kernels trace a mod (or a vjp of one) to a jaxpr and evaluate it on values a primitive
cannot take as they are: ref-backed arrays whose gathers become loads (:mod:`attnax.kernels.operands`),
index tiles kept as lines (:mod:`attnax.kernels.pallas.lines`), or a primitive that a lowering
has no rule for (``add_any`` in Mosaic GPU). :func:`replay` is the one interpreter they share: it
walks the equations, inlines ``jit`` calls (so a rule sees the primitives inside them) and asks
``rule(eqn, ins)`` for every other equation's outputs; :func:`bind` is the rule that changes
nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
from jax.extend import core as jex_core

__all__ = ["bind", "replay"]

# Calls whose body is inlined: a rule then meets the primitives a jitted helper is made of.
_CALLS = ("pjit", "jit", "closed_call", "core_call")


def bind(eqn, ins: Sequence[Any]) -> list:
  """``eqn``'s primitive bound to ``ins`` as traced: its outputs, as a list."""
  with eqn.ctx.manager:
    outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
  return list(outs) if eqn.primitive.multiple_results else [outs]


def replay(jaxpr, consts: Sequence[Any], args: Sequence[Any],
           rule: Callable[[Any, list], list] = bind) -> list:
  """``jaxpr`` (an open jaxpr) evaluated on ``consts`` and ``args`` in the current trace, calls
  inlined; ``rule(eqn, ins)`` gives each other equation's outputs (default: :func:`bind`)."""
  env = dict(zip(jaxpr.constvars, consts, strict=True))
  env.update(zip(jaxpr.invars, args, strict=True))
  # A literal keeps its jaxpr type: a weakly typed Python scalar would not match, say, an int8
  # operand that a rule builds.
  read = lambda v: (np.asarray(v.val, v.aval.dtype) if isinstance(v, jex_core.Literal)
                    else env[v])
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if eqn.primitive.name in _CALLS and sub is not None:
      # A ClosedJaxpr (pjit, closed_call) or an open one (core_call).
      outs = replay(getattr(sub, "jaxpr", sub), getattr(sub, "consts", ()), ins, rule)
    else:
      outs = rule(eqn, ins)
    env.update(zip(eqn.outvars, outs, strict=True))
  return [read(v) for v in jaxpr.outvars]
