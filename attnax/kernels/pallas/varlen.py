"""varlen_attention: packed variable-length sequences through ``pallas_flash_attention``.

The helpers that turn lengths / ``cu_seqlens`` into document ids live in
:mod:`attnax.kernels.varlen`, shared by every kernel.
"""

from __future__ import annotations

from typing import Any

import jax

from attnax.kernels.pallas.api import pallas_flash_attention

__all__ = ["varlen_attention"]


def varlen_attention(q: jax.Array, k: jax.Array, v: jax.Array, cu_seqlens_q: Any,
                     cu_seqlens_k: Any = None, **kwargs: Any) -> Any:
  """Attention over packed sequences: each query attends only within its own sequence.

  ``q`` ``(1, Hq, Tq, D)``, ``k``/``v`` ``(1, Hkv, Tk, D)`` hold the sequences packed along the
  sequence axis (:func:`~attnax.kernels.pack_sequences`); ``cu_seqlens_q``/``cu_seqlens_k`` are their offsets.
  Keyword arguments go to :func:`~attnax.kernels.pallas_flash_attention` (a ``causal_mod()`` there
  is causal within each sequence when the query and key offsets agree).
  """
  return pallas_flash_attention(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                **kwargs)
