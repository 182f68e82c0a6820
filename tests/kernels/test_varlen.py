"""cu_seqlens validation of attnax.kernels.varlen: bad offsets raise, naming the argument."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.kernels import pallas_flash_attention
from attnax.kernels.varlen import (cu_seqlens_to_doc_ids, seqlens_to_cu_seqlens,
                                   seqlens_to_doc_ids, varlen_mask_mod)
from tests.helpers import random_qkv

BAD = [
    ([-2, 0, 3], r"no negative entries.*\(3,\) = \[-2, 0, 3\]"),
    ([1, 3, 5], r"must start at 0.*\(3,\) = \[1, 3, 5\]"),
    ([0, 4, 2, 6], r"non-decreasing.*\(4,\) = \[0, 4, 2, 6\].*\[2\] = 2 < .*\[1\] = 4"),
    ([0, 3, 9], r"ends at 9, past the sequence length {len}=7.*\(3,\) = \[0, 3, 9\]"),
]


@pytest.mark.parametrize("cu,match", BAD)
def test_bad_cu_seqlens_raise(cu, match):
  cu = jnp.asarray(cu, jnp.int32)
  with pytest.raises(ValueError, match="cu_seqlens .*" + match.format(len="total_len")):
    cu_seqlens_to_doc_ids(cu, 7)
  with pytest.raises(ValueError, match="cu_seqlens_q .*" + match.format(len="q_len")):
    varlen_mask_mod(cu, q_len=7)
  good = jnp.asarray([0, 2, 7], jnp.int32)
  with pytest.raises(ValueError, match="cu_seqlens_k .*" + match.format(len="kv_len")):
    varlen_mask_mod(good, cu, q_len=7, kv_len=7)


def test_offsets_are_checked_against_their_own_length():
  cu_q, cu_k = jnp.asarray([0, 2, 5]), jnp.asarray([0, 4, 9])
  mask = varlen_mask_mod(cu_q, cu_k, q_len=5, kv_len=9)           # fits exactly
  np.testing.assert_array_equal(mask.q_doc_ids, [[0, 0, 1, 1, 1]])
  np.testing.assert_array_equal(mask.kv_doc_ids, [[0, 0, 0, 0, 1, 1, 1, 1, 1]])
  with pytest.raises(ValueError, match=r"cu_seqlens_k ends at 9.*kv_len=8"):
    varlen_mask_mod(cu_q, cu_k, q_len=5, kv_len=8)
  with pytest.raises(ValueError, match=r"cu_seqlens_q ends at 5.*q_len=4"):
    varlen_mask_mod(cu_q, cu_k, q_len=4, kv_len=9)
  # Without cu_seqlens_k the query offsets are the key offsets too.
  with pytest.raises(ValueError, match=r"cu_seqlens_q ends at 5.*kv_len=4"):
    varlen_mask_mod(cu_q, q_len=5, kv_len=4)
  # Padding past the last offset is fine, and gets ids of no document.
  np.testing.assert_array_equal(cu_seqlens_to_doc_ids(cu_q, 7), [0, 0, 1, 1, 1, 2, 2])


def test_negative_seqlens_raise():
  with pytest.raises(ValueError, match=r"seqlens must be non-negative.*\[2, -1, 3\]"):
    seqlens_to_doc_ids(jnp.asarray([2, -1, 3]))
  np.testing.assert_array_equal(seqlens_to_cu_seqlens(jnp.asarray([2, 0, 3])), [0, 2, 2, 5])


def test_traced_offsets_are_not_checked():
  """Under jit the values are unknown: only shapes and dtypes are checked (documented)."""
  ids = jax.jit(lambda cu: cu_seqlens_to_doc_ids(cu, 4))(jnp.asarray([0, 2, 4]))
  np.testing.assert_array_equal(ids, [0, 0, 1, 1])
  with pytest.raises(ValueError, match="1-D integer"):
    jax.jit(lambda cu: cu_seqlens_to_doc_ids(cu, 4))(jnp.asarray([0.0, 2.0]))


def test_varlen_mask_mod_is_for_one_batch_row():
  cu = jnp.asarray([0, 3, 6])
  for ok in (None, 1):
    assert varlen_mask_mod(cu, q_len=6, batch=ok).q_doc_ids.shape == (1, 6)
  with pytest.raises(ValueError, match=r"cu_seqlens_q \(3,\).*one batch row.*batch=2"):
    varlen_mask_mod(cu, q_len=6, batch=2)


def test_pallas_flash_attention_rejects_cu_seqlens_with_batch_above_one():
  q, k, v = random_qkv(0, batch=2, q_heads=2, kv_heads=1, q_len=16, kv_len=16)
  with pytest.raises(ValueError, match=r"cu_seqlens_q.*batch=2"):
    pallas_flash_attention(q, k, v, cu_seqlens_q=jnp.asarray([0, 7, 16]))
