"""Test configuration: several host devices on CPU (for shard_map/ring tests), GPU marker handling."""

import os

# Must precede the first jax import: lets shard_map tests run on one CPU.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=4").strip()

import jax  # noqa: E402
import pytest  # noqa: E402


# CPU time (CI runs the suite on 2 cores in about 15 minutes): the heaviest variants whose code a
# sibling variant or the conformance suite covers run with -m slow. Measured 2026-12-03: ~290 s of
# the suite's ~2000 CPU seconds.
SLOW_ON_CPU = frozenset({
    "tests/kernels/aether/test_aether.py::test_gradients_equal_dense_when_nothing_pruned[flash]",
    "tests/kernels/aether/test_aether.py::test_threshold_rule_never_nan_on_all_negative_logits",
    "tests/kernels/aether/test_aether.py::test_decisions_carry_no_gradient",
    "tests/kernels/aether/test_aether.py::test_certificate_flash[needle-budget]",
    "tests/kernels/aether/test_aether.py::test_certificate_flash[clustered-budget]",
    "tests/kernels/aether/test_aether.py::test_multi_head_attention_with_aether",
    "tests/kernels/test_memory_efficient.py::test_shapes[mha_ragged-causal_bottom_right]",
    "tests/kernels/test_memory_efficient.py::test_shapes[mqa-causal_bottom_right]",
    "tests/kernels/test_memory_efficient.py::test_mods[additive_bias]",
    "tests/kernels/test_memory_efficient.py::test_mods[compose]",
    "tests/kernels/test_flash.py::test_shapes[mha_ragged-causal_bottom_right]",
    "tests/kernels/test_flash.py::test_mods[additive_bias]",
    "tests/kernels/test_ring.py::test_grads_match_float64_reference[pallas-True-True]",
    "tests/kernels/test_ring.py::test_two_axis_mesh[jax-dp]",
    "tests/kernels/test_ring.py::test_ring_equals_reference_equals_standard[pallas-True-True]",
    "tests/test_tiny_gpt.py::test_learned_mod_loss_curves_agree_with_standard[alibi-flash]",
    "tests/test_attention.py::test_decode_matches_full_causal_pass[aether_attention-causal_alibi_doc]",
    "tests/test_attention.py::test_module_equals_kernel_on_hand_projections[aether_attention]",
    "tests/kernels/test_conformance.py::test_mod_results[ring_mesh-python_state]",
    "tests/kernels/test_memory_efficient.py::test_shapes[mha_ragged-user_mask_mod]",
    "tests/kernels/test_flash.py::test_mods[alibi]",
    "tests/test_tiny_gpt.py::test_learned_mod_arrays_change_in_training[alibi-pallas_flash]",
})


@pytest.hookimpl(tryfirst=True)   # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
  on_gpu = any(d.platform == "gpu" for d in jax.devices())
  skip = pytest.mark.skip(reason="needs a CUDA GPU")
  for item in items:
    if "gpu" in item.keywords and not on_gpu:
      item.add_marker(skip)
    if item.nodeid in SLOW_ON_CPU:
      item.add_marker(pytest.mark.slow)
