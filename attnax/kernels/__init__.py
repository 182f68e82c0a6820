"""attnax kernels: every attention kernel behind the :class:`AttentionFn` protocol, and the mods.

Each kernel takes ``(B, Hq, Sq, D)`` queries and ``(B, Hkv, Sk, D)`` keys/values and has the
signature ``kernel(q, k, v, *, score_mod=None, mask_mod=None, scale=None, return_lse=False, ...)``.
"""

from attnax.kernels.protocols import AttentionFn, MaskMod, ScoreMod
from attnax.kernels.score_mods import (
    additive_bias_mod, alibi_mod, alibi_slopes, and_masks, array_mask_mod, causal_mod,
    compose_score_mods, document_mask_mod, local_window_mod, mask_mod_to_boolean_mask,
    mask_mod_to_score_mod, or_masks, padding_mask_mod, prefix_lm_mod, sliding_window_mod,
    softcap_mod,
)
from attnax.kernels.block_mask import BlockMask, create_block_mask
from attnax.kernels.merge import merge_attentions
from attnax.kernels import score_mods
from attnax.kernels.gated import gated_mod
# Pure-JAX kernels.
from attnax.kernels.reference import standard_attention
from attnax.kernels.memory_efficient import memory_efficient_attention
from attnax.kernels.flash import flash_attention
# Pallas kernels and varlen helpers.
from attnax.kernels.pallas import (
    cu_seqlens_to_doc_ids, pack_sequences, pallas_flash_attention, pallas_flash_attention_bwd,
    pallas_flash_attention_fwd, seqlens_to_cu_seqlens, seqlens_to_doc_ids, unpack_sequences,
    varlen_attention,
)
# AETHER: a planner over the block-sparse kernels.
from attnax.kernels.aether import AetherAttention, aether_attention, compute_block_geometry
# Threshold-sparse attention (flash-sparse-attention's softmax_threshold).
from attnax.kernels.threshold import ThresholdStats, threshold_sparse_attention
# Linear, ring and paged attention.
from attnax.kernels.linear import favor_projection, linear_attention
from attnax.kernels.ring import (
    from_zigzag, ring_attention, ring_attention_reference, to_zigzag, zigzag_indices,
)
from attnax.kernels.paged import PagedKVCache, paged_attention

__all__ = [
    # protocols
    "AttentionFn", "ScoreMod", "MaskMod",
    # kernels
    "standard_attention", "memory_efficient_attention", "flash_attention",
    "pallas_flash_attention", "pallas_flash_attention_fwd", "pallas_flash_attention_bwd",
    "aether_attention", "AetherAttention", "compute_block_geometry",
    "threshold_sparse_attention", "ThresholdStats",
    "linear_attention", "favor_projection", "ring_attention", "ring_attention_reference",
    "paged_attention", "PagedKVCache",
    # varlen and ring layout helpers
    "varlen_attention", "pack_sequences", "unpack_sequences", "seqlens_to_doc_ids",
    "cu_seqlens_to_doc_ids", "seqlens_to_cu_seqlens", "to_zigzag", "from_zigzag",
    "zigzag_indices",
    # block sparsity and partial results
    "BlockMask", "create_block_mask", "merge_attentions",
    # score mods
    "causal_mod", "sliding_window_mod", "local_window_mod", "alibi_mod", "alibi_slopes",
    "prefix_lm_mod", "document_mask_mod", "padding_mask_mod", "array_mask_mod",
    "additive_bias_mod", "softcap_mod", "gated_mod",
    "compose_score_mods", "and_masks", "or_masks", "mask_mod_to_score_mod",
    "mask_mod_to_boolean_mask", "score_mods",
]
