"""Paged attention: decoding over a paged KV cache.

* :func:`paged_attention` (:mod:`~attnax.kernels.paged.api`): the kernel entry point, with a
  pure-JAX backend (:mod:`~attnax.kernels.paged.jax_backend`) and a Pallas backend
  (:mod:`~attnax.kernels.paged.pallas`: Triton lowering, or the interpreter) of one plan
  (:mod:`~attnax.kernels.paged.plan`);
* :class:`PagedKVCache` (:mod:`~attnax.kernels.paged.cache`): the page pool, block tables and
  lengths as arrays, with allocate / append / free, so a decode step is one jitted function.
"""

from attnax.kernels.paged.api import AUTO_ORDER, BACKENDS, not_supported_reasons, paged_attention
from attnax.kernels.paged.cache import PagedKVCache, dequantize_kv, quantize_kv
from attnax.kernels.paged.pallas import PagedConfig, default_config
from attnax.kernels.paged.plan import PagedPlan, check_values, gather_pages

__all__ = ["paged_attention", "PagedKVCache", "PagedConfig", "PagedPlan", "gather_pages",
           "quantize_kv", "dequantize_kv", "default_config", "not_supported_reasons", "BACKENDS",
           "AUTO_ORDER", "check_values"]
