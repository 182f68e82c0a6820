"""AETHER: certified geometric block-sparse attention (DESIGN.md section 6).

``compute_block_geometry`` (key-block centroids and radii) -> ``plan_aether`` (certified
BlockMask) -> a dense block-sparse kernel (``pallas_flash_attention`` / ``flash_attention``) with
``block_mask=``.
"""

from attnax.kernels.aether.geometry import (
    block_geometry_pallas, block_geometry_reference, clustered_qkv, compute_block_geometry,
)
from attnax.kernels.aether.certify import (
    AetherPlan, AetherStats, TileMapMask, margin_delta, plan_aether, tile_mask_mod,
)
from attnax.kernels.aether.api import AetherAttention, aether_attention

__all__ = [
    "aether_attention", "AetherAttention", "AetherStats", "AetherPlan", "compute_block_geometry",
    "block_geometry_pallas", "block_geometry_reference", "plan_aether", "tile_mask_mod",
    "TileMapMask", "margin_delta", "clustered_qkv",
]
