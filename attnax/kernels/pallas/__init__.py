"""Pallas kernels: pallas_flash_attention (Triton lowering; interpreted on CPU) and varlen helpers."""

from attnax.kernels.pallas.api import (
    BACKENDS, FlashConfig, default_config, not_supported_reasons, pallas_flash_attention,
    pallas_flash_attention_bwd, pallas_flash_attention_fwd,
)
from attnax.kernels.pallas.varlen import (
    cu_seqlens_to_doc_ids, pack_sequences, seqlens_to_cu_seqlens, seqlens_to_doc_ids,
    unpack_sequences, varlen_attention, varlen_mask_mod,
)

__all__ = [
    "BACKENDS", "FlashConfig", "default_config", "not_supported_reasons",
    "pallas_flash_attention", "pallas_flash_attention_fwd", "pallas_flash_attention_bwd",
    "cu_seqlens_to_doc_ids", "pack_sequences", "seqlens_to_cu_seqlens", "seqlens_to_doc_ids",
    "unpack_sequences", "varlen_attention", "varlen_mask_mod",
]
