"""Pallas kernels: pallas_flash_attention (a backend-neutral plan, the Triton lowering and its
interpreter) and varlen_attention."""

from attnax.kernels.pallas.api import (
    AUTO_ORDER, BACKENDS, LOWERINGS, not_supported_reasons, pallas_flash_attention,
    pallas_flash_attention_bwd, pallas_flash_attention_fwd,
)
from attnax.kernels.pallas.triton import TritonConfig, default_config
from attnax.kernels.pallas.varlen import varlen_attention
from attnax.kernels.varlen import (
    cu_seqlens_to_doc_ids, pack_sequences, seqlens_to_cu_seqlens, seqlens_to_doc_ids,
    unpack_sequences, varlen_mask_mod,
)

__all__ = [
    "AUTO_ORDER", "BACKENDS", "LOWERINGS", "TritonConfig", "default_config",
    "not_supported_reasons", "pallas_flash_attention", "pallas_flash_attention_fwd",
    "pallas_flash_attention_bwd", "varlen_attention",
    "cu_seqlens_to_doc_ids", "pack_sequences", "seqlens_to_cu_seqlens", "seqlens_to_doc_ids",
    "unpack_sequences", "varlen_mask_mod",
]
