"""attnax: attention kernels for JAX with Pallas GPU kernels and a Flax NNX module."""

from attnax import kernels
from attnax import flash_sparse
from attnax.attention import AttentionType, MultiHeadAttention
from attnax.flax_interop import flax_attention_fn
from attnax.nn import dot_product_attention
from attnax.rope import apply_rope

__all__ = ["kernels", "flash_sparse", "MultiHeadAttention", "AttentionType", "flax_attention_fn",
           "dot_product_attention", "apply_rope"]
__version__ = "0.1.0"
