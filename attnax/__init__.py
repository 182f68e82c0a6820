"""attnax: attention kernels for JAX with Pallas GPU kernels and a Flax NNX module."""

from attnax import kernels

__all__ = ["kernels"]
__version__ = "0.1.0"
