"""The runtime patches of megatron-core: every patched symbol still exists, and apply/revert are exact."""

import importlib

import megatron.core  # noqa: F401
import pytest
import torch

from megatron_unicron.megatron import cpu, init, optimizer_fixes, phases, timed_collectives
from megatron_unicron.megatron.patching import check_megatron_core_version

ALL_SITES = cpu.SITES + optimizer_fixes.SITES + init.SITES + phases.SITES + timed_collectives.SITES


@pytest.mark.parametrize("site", ALL_SITES, ids=str)
def test_patched_symbol_still_exists(site):
    assert site.exists(), f"megatron-core moved or renamed {site}: update the patch ({site.reason})"


@pytest.mark.parametrize("name", cpu.PROXIED_MODULES)
def test_proxied_module_still_uses_torch(name):
    module = importlib.import_module(name)
    assert hasattr(module, "torch"), f"{name} no longer imports torch as `torch`: re-measure the CPU patch"


def test_supported_version():
    assert check_megatron_core_version().release[:2] >= (0, 16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU patch is a no-op with CUDA")
def test_apply_and_revert_are_exact():
    import megatron.core.tensor_parallel.random as tp_random
    from megatron.core.pipeline_parallel import schedules

    cpu.revert()
    original_get = tp_random._get_cuda_rng_state
    original_type = torch.Tensor.type
    assert schedules.torch is torch
    cpu.apply()
    try:
        assert schedules.torch is cpu.TORCH_ON_CPU
        assert tp_random._get_cuda_rng_state is not original_get
        # the proxy answers CPU for CUDA requests ...
        assert schedules.torch.zeros([], device="cuda").device.type == "cpu"
        assert schedules.torch.cuda.current_device() == "cpu"
        # ... while the real torch stays untouched for everybody else
        assert torch.zeros(1).type() == "torch.FloatTensor"
    finally:
        restored = cpu.revert()
    assert restored > 0
    assert schedules.torch is torch
    assert tp_random._get_cuda_rng_state is original_get
    assert torch.Tensor.type is original_type
    cpu.apply()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU patch is a no-op with CUDA")
def test_without_the_patch_megatron_hits_cuda():
    """Proves the patch is needed: megatron's RNG tracker asks CUDA for its state."""
    from megatron.core.tensor_parallel import random as tp_random

    cpu.revert()
    try:
        tracker = tp_random.CudaRNGStatesTracker()
        with pytest.raises((AssertionError, RuntimeError)):
            tracker.add("probe", 1)
    finally:
        cpu.apply()
    tracker = tp_random.CudaRNGStatesTracker()
    tracker.add("probe", 1)
    assert tracker.get_states()["probe"].dtype == torch.uint8


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU patch is a no-op with CUDA")
def test_type_check_answer_only_for_megatron_optimizer():
    cpu.apply()
    namespace = {"__name__": "megatron.core.optimizer.fake", "t": torch.zeros(1)}
    exec("answer = t.type()", namespace)  # a caller that looks like megatron's optimizer module
    assert namespace["answer"] == "torch.cuda.FloatTensor"
    assert torch.zeros(1).type() == "torch.FloatTensor"
