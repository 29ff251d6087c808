"""The non-tensor optimizer state a target checkpoint needs, in the shape megatron-core 0.16.1 expects.

Param groups keep the source's values (lr, betas, eps, weight decay, wd_mult, max/min lr, ...) and are
ordered as ``_get_param_groups`` orders them; the shared Adam step becomes each format's step field. The
structures, as ``optimizer.state_dict()`` / ``sharded_state_dict()`` produce them:

* legacy, FP32Optimizer: torch Adam's ``{'state': {id: {'step', 'exp_avg', 'exp_avg_sq'}}, 'param_groups'}``;
* legacy, Float16Optimizer: ``{'optimizer': <that>, 'fp32_from_fp16_params': [[...] per group],
  'grad_scaler'}``;
* legacy, DistributedOptimizer: ``{'optimizer': {'param_groups': [... 'step' ...]}}`` + ``distrib_optim.pt``;
* torch_dist common: the same with tensors removed, ``{'state': {'common_step': step}}`` for the first two and
  ``'param_state_sharding_type': 'fully_reshardable'`` for the distributed optimizer.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_unicron.ckpt.errors import CheckpointError
from megatron_unicron.ckpt.legacy_optim import group_class, order_groups
from megatron_unicron.ckpt.source import OptimizerKind, OptimizerMeta


def group_of(meta: OptimizerMeta, cls: tuple[float, bool]) -> dict[str, Any]:
    """The source param group (without params/step) of class ``(wd_mult, is_decoupled_lr)``."""
    for g in meta.param_groups:
        if (float(g.get("wd_mult", g.get("pre_wd_mult", 1.0))), bool(g.get("is_decoupled_lr", False))) == cls:
            return {k: v for k, v in g.items() if k not in ("params", "step")}
    raise CheckpointError(f"the source optimizer has no param group for class {cls}")


def ordered_classes(meta: OptimizerMeta) -> list[tuple[float, bool]]:
    """All param-group classes of the source, in megatron-core's group order."""
    classes = {
        (float(g.get("wd_mult", g.get("pre_wd_mult", 1.0))), bool(g.get("is_decoupled_lr", False)))
        for g in meta.param_groups
    }
    return order_groups(classes)


def assign_ids(
    meta: OptimizerMeta, names: list[str], shapes: dict[str, tuple[int, ...]], decoupled: bool
) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Groups (in order) and each group's member names (in module order) for one rank's parameters."""
    classes = ordered_classes(meta)
    members: list[list[str]] = [[] for _ in classes]
    for n in names:
        cls = group_class(n, len(shapes[n]), decoupled)
        if cls not in classes:
            raise CheckpointError(f"parameter {n} needs optimizer group {cls} the source does not have")
        members[classes.index(cls)].append(n)
    return [group_of(meta, c) for c in classes], members


def step_tensor(meta: OptimizerMeta) -> torch.Tensor:
    """torch Adam's per-parameter ``step`` value."""
    return torch.tensor(float(meta.step if meta.step is not None else 0.0), dtype=torch.float32)


def dist_common_optimizer(meta: OptimizerMeta, kind: OptimizerKind) -> dict[str, Any]:
    """The ``optimizer`` entry of a torch_dist ``common.pt`` for the target optimizer kind."""
    groups = [group_of(meta, c) for c in ordered_classes(meta)]
    if kind is OptimizerKind.DISTRIBUTED:
        out: dict[str, Any] = {
            "optimizer": {"param_groups": [dict(g, step=float(meta.step or 0.0)) for g in groups]},
            "param_state_sharding_type": "fully_reshardable",
        }
    elif kind is OptimizerKind.MIXED:
        out = {"optimizer": {"state": {"common_step": step_tensor(meta)}, "param_groups": groups}}
    else:
        out = {"state": {"common_step": step_tensor(meta)}, "param_groups": groups}
    if meta.grad_scaler is not None and kind is not OptimizerKind.ADAM:
        out["grad_scaler"] = meta.grad_scaler
    return out


def content_metadata(kind: OptimizerKind | None) -> dict[str, Any]:
    """``content_metadata`` of a torch_dist checkpoint (how Megatron-LM builds the sharded state dict)."""
    md: dict[str, Any] = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if kind is OptimizerKind.DISTRIBUTED:
        md["distrib_optim_sharding_type"] = "fully_reshardable"
        md["distrib_optim_fully_reshardable_mem_efficient"] = False
    return md
