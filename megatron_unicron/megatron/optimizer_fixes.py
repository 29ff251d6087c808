"""Fixes for megatron-core's DistributedOptimizer on the torch-Adam path (no apex, no transformer-engine).

Without apex or TE (always the case on CPU), megatron-core 0.16 wraps ``torch.optim.Adam``, whose
per-parameter ``step`` tensor the distributed optimizer's checkpoint code does not expect:

(a) ``sharded_state_dict(is_loading=True)`` on a never-stepped optimizer asserts (no ``step`` yet):
    :func:`prime_optimizer_state` allocates zero state and ``step = 0`` first;
(b) loading the ``fully_reshardable`` state copies *every* live key (``step`` included) from the loaded
    tensors, which have no ``step``: ``KeyError: 'step'``. Keys the checkpoint lacks keep their live value;
(c) ``load_state_dict`` gives every parameter the *same* ``step`` tensor; torch Adam increments it in
    place once per parameter, so bias correction is wrong from the second step on while every tensor
    still compares equal (a silent error that only the loss curve shows). Each parameter gets its own copy;
(d) the copy in (b) runs outside ``torch.no_grad()`` on some paths; it runs under it.

Applied only when megatron-core uses torch's Adam (``HAVE_APEX_OR_TE`` is false); revertible.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from megatron_unicron.megatron.patching import PatchSet, PatchSite, check_megatron_core_version

logger = logging.getLogger(__name__)

_OWNER = "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer"
SITES: tuple[PatchSite, ...] = (
    PatchSite(_OWNER, "_set_main_param_and_optimizer_states", "(b) and (d): missing keys, no_grad"),
    PatchSite(_OWNER, "load_state_dict", "(c): one shared Adam step tensor for every parameter"),
    PatchSite("megatron.core.optimizer.distrib_optimizer", "HAVE_APEX_OR_TE", "decides whether to patch"),
)

_PATCHES = PatchSet("megatron_unicron DistributedOptimizer fixes")


def needed() -> bool:
    """Whether megatron-core's distributed optimizer runs on torch's Adam here."""
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def _inner_optimizers(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def prime_optimizer_state(optimizer: Any) -> None:
    """Give a never-stepped megatron optimizer zero Adam state and ``step = 0`` (fix (a))."""
    for wrapped in _inner_optimizers(optimizer):
        inner = wrapped.optimizer
        if getattr(wrapped, "init_state_fn", None) is not None:
            wrapped.init_state_fn(inner, wrapped.config)
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state[param].setdefault("step", torch.tensor(0.0))


def unshare_step_tensors(optimizer: Any) -> None:
    """Give every parameter its own Adam ``step`` tensor (fix (c))."""
    for wrapped in _inner_optimizers(optimizer):
        for state in wrapped.optimizer.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                state["step"] = step.detach().clone()


def apply() -> bool:
    """Install fixes (b)-(d) when megatron uses torch's Adam; returns whether anything was patched."""
    if _PATCHES.applied or not needed():
        return _PATCHES.applied
    check_megatron_core_version()
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original_set = DistributedOptimizer._set_main_param_and_optimizer_states
    original_load = DistributedOptimizer.load_state_dict

    @functools.wraps(original_set)
    def set_main_param_and_optimizer_states(self: Any, model_param: Any, tensors: dict[str, Any]) -> None:
        if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            live = self.optimizer.state[main_param]
            tensors = {**{k: v for k, v in live.items() if k not in tensors}, **tensors}
        with torch.no_grad():
            original_set(self, model_param, tensors)

    @functools.wraps(original_load)
    def load_state_dict(self: Any, state_dict: Any) -> None:
        original_load(self, state_dict)
        unshare_step_tensors(self)

    _PATCHES.replace(
        DistributedOptimizer, "_set_main_param_and_optimizer_states", set_main_param_and_optimizer_states
    )
    _PATCHES.replace(DistributedOptimizer, "load_state_dict", load_state_dict)
    logger.info("DistributedOptimizer fixes for the torch-Adam path applied")
    return True


def revert() -> int:
    """Undo :func:`apply`."""
    return _PATCHES.revert()
