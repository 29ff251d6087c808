"""Naming the optimizer state of one legacy ``model_optim_rng.pt`` (and its ``distrib_optim.pt``).

A legacy file keys Adam state by integer param ids: positions in that rank's param-group order. megatron-core
0.16.1's ``_get_param_groups`` puts a rank's parameters, in ``named_parameters()`` order, into groups keyed by
their overrides; the standard overrides are ``wd_mult=0`` for biases and 1-D parameters and, with
``--decoupled-lr``, ``max_lr/min_lr`` for embedding and output parameters. torch numbers the params group by
group, so group ``g``'s ``params`` list holds the ids of the rank's parameters of that class, in module order.
The file's groups carry ``wd_mult``/``is_decoupled_lr``, so classes are matched by value, not by position
(older Megatron-LM versions ordered the groups differently).

Three writers: ``FP32Optimizer`` (torch Adam state dict), ``Float16OptimizerWithFloat16Params``
(``optimizer``, ``grad_scaler``, ``fp32_from_fp16_params`` per group) and ``DistributedOptimizer`` (groups
only; tensors in ``distrib_optim.pt``, see ``distopt_layout``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_unicron.ckpt.distopt_layout import BufferParam, buffer_layout, check_world_numel
from megatron_unicron.ckpt.errors import CheckpointError
from megatron_unicron.ckpt.source import OptimizerKind
from megatron_unicron.ckpt.torch_zip import LazyRange, LazyTensor, TorchZipReader

EMBEDDING_OR_OUTPUT = (
    "embedding.word_embeddings.weight",
    "embedding.position_embeddings.weight",
    "output_layer.weight",
)
GROUP_KEYS = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")


def group_class(name: str, ndim: int, decoupled_lr: bool) -> tuple[float, bool]:
    """(wd_mult, is_decoupled_lr) megatron-core's standard overrides give a parameter."""
    wd_mult = 0.0 if name.endswith(".bias") or ndim == 1 else 1.0
    return wd_mult, decoupled_lr and name in EMBEDDING_OR_OUTPUT


def _group_key(group: dict[str, Any], where: str) -> tuple[float, bool]:
    wd = group.get("wd_mult", group.get("pre_wd_mult"))
    if wd is None:
        raise CheckpointError(f"{where}: optimizer param group without wd_mult (unknown Megatron-LM version)")
    lr_mult = group.get("lr_mult", group.get("pre_lr_mult", 1.0))
    if lr_mult != 1.0 or group.get("is_expert_parallel", False):
        raise CheckpointError(
            f"{where}: optimizer groups with lr_mult={lr_mult} or expert parallelism are not supported"
        )
    return float(wd), bool(group.get("is_decoupled_lr", False))


def order_groups(classes: set[tuple[float, bool]]) -> list[tuple[float, bool]]:
    """Group order of megatron-core 0.16.1: overrides sorted, no override first."""

    def override(c: tuple[float, bool]) -> tuple[Any, ...]:
        items: list[tuple[str, Any]] = []
        if c[1]:
            items += [("max_lr", 0), ("min_lr", 0)]
        if c[0] == 0.0:
            items.append(("wd_mult", 0.0))
        return (len(items) > 0, tuple(items))

    return sorted(classes, key=override)


@dataclass
class RankOptimizer:
    """The optimizer state of one (TP, PP) rank, by local parameter name."""

    kind: OptimizerKind
    groups: list[dict[str, Any]]
    step: float
    grad_scaler: dict[str, Any] | None
    states: dict[str, dict[str, LazyTensor | LazyRange]] = field(default_factory=dict)


def _scalar(x: Any) -> float:
    if isinstance(x, LazyTensor):
        x = x.materialize()
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _assign(
    groups: list[dict[str, Any]],
    names: list[str],
    shapes: dict[str, tuple[int, ...]],
    decoupled: bool,
    where: str,
) -> list[list[str]]:
    keys = [_group_key(g, where) for g in groups]
    if len(set(keys)) != len(keys):
        raise CheckpointError(f"{where}: two optimizer param groups with the same overrides {keys}")
    members: list[list[str]] = [[] for _ in groups]
    for n in names:
        cls = group_class(n, len(shapes[n]), decoupled)
        if cls not in keys:
            raise CheckpointError(f"{where}: no optimizer param group for {n} (class {cls}; groups {keys})")
        members[keys.index(cls)].append(n)
    return members


def map_rank_optimizer(
    opt: Any,
    args: Any,
    names: list[str],
    shapes: dict[str, tuple[int, ...]],
    *,
    rank_dir: str,
    first: bool,
    last: bool,
    tied: bool,
    pp: int,
    pp_rank: int,
) -> RankOptimizer | None:
    """Name every optimizer tensor of one legacy rank file (``opt`` = its ``optimizer`` entry).

    None when the optimizer never stepped (no Adam state yet).
    """
    where = os.path.join(rank_dir, "model_optim_rng.pt")
    decoupled = getattr(args, "decoupled_lr", None) is not None
    if isinstance(opt, list):
        raise CheckpointError(f"{where}: chained optimizers (a list of optimizer states) are not supported")
    if not isinstance(opt, dict):
        raise CheckpointError(f"{where}: optimizer entry is a {type(opt).__name__}, not a dict")
    if getattr(args, "use_distributed_optimizer", False):
        return _map_distributed(opt, args, names, shapes, rank_dir, first, last, tied, pp, pp_rank, decoupled)
    kind = OptimizerKind.MIXED if "fp32_from_fp16_params" in opt else OptimizerKind.ADAM
    inner = opt["optimizer"] if kind is OptimizerKind.MIXED else opt
    if not isinstance(inner, dict) or "param_groups" not in inner or "state" not in inner:
        raise CheckpointError(f"{where}: optimizer state lacks param_groups/state (unknown optimizer format)")
    if not inner["state"]:  # saved before the first step: there is no Adam state to convert
        return None
    groups = inner["param_groups"]
    members = _assign(groups, names, shapes, decoupled, where)
    out = RankOptimizer(
        kind,
        [{k: v for k, v in g.items() if k != "params"} for g in groups],
        0.0,
        opt.get("grad_scaler") if kind is OptimizerKind.MIXED else None,
    )
    steps: set[float] = set()
    fp32 = opt.get("fp32_from_fp16_params", [])
    for g, (group, mem) in enumerate(zip(groups, members)):
        ids = list(group["params"])
        if len(ids) != len(mem):
            raise CheckpointError(
                f"{where}: optimizer group {g} has {len(ids)} params but the model's stage has "
                f"{len(mem)} of that class (args inconsistent with the shards?)"
            )
        for j, (pid, name) in enumerate(zip(ids, mem)):
            st = inner["state"].get(pid)
            if not st:
                raise CheckpointError(f"{where}: no Adam state for {name} (never-stepped optimizer?)")
            if "exp_avg" not in st or "exp_avg_sq" not in st:
                raise CheckpointError(f"{where}: state of {name} lacks exp_avg/exp_avg_sq (not Adam)")
            states: dict[str, LazyTensor | LazyRange] = {
                "exp_avg": st["exp_avg"],
                "exp_avg_sq": st["exp_avg_sq"],
            }
            if kind is OptimizerKind.MIXED:
                states["fp32_param"] = fp32[g][j]
            for k, v in states.items():
                if not isinstance(v, LazyTensor) or v.shape != shapes[name]:
                    raise CheckpointError(
                        f"{where}: optimizer {k} of {name} has shape "
                        f"{getattr(v, 'shape', None)}, the parameter {shapes[name]}"
                    )
            out.states[name] = states
            if "step" in st:
                steps.add(_scalar(st["step"]))
    if len(steps) > 1:
        raise CheckpointError(f"{where}: Adam steps differ between parameters {sorted(steps)[:4]}")
    out.step = steps.pop() if steps else 0.0
    return out


def _bucket_size(args: Any, pp_rank: int) -> int | None:
    if not getattr(args, "overlap_grad_reduce", False) or pp_rank > 0:
        return None
    size = getattr(args, "ddp_bucket_size", None)
    return (
        int(size) if size else max(40_000_000, 1_000_000 * int(getattr(args, "data_parallel_size", 1) or 1))
    )


def _map_distributed(
    opt: dict[str, Any],
    args: Any,
    names: list[str],
    shapes: dict[str, tuple[int, ...]],
    rank_dir: str,
    first: bool,
    last: bool,
    tied: bool,
    pp: int,
    pp_rank: int,
    decoupled: bool,
) -> RankOptimizer:
    where = os.path.join(rank_dir, "model_optim_rng.pt")
    inner = opt.get("optimizer")
    if not isinstance(inner, dict) or "param_groups" not in inner:
        raise CheckpointError(f"{where}: distributed-optimizer state lacks param_groups")
    groups = inner["param_groups"]
    _assign(groups, names, shapes, decoupled, where)
    steps = {float(g["step"]) for g in groups if "step" in g}
    if len(steps) > 1:
        raise CheckpointError(f"{where}: Adam steps differ between param groups {sorted(steps)}")
    out = RankOptimizer(
        OptimizerKind.DISTRIBUTED,
        [{k: v for k, v in g.items() if k != "step"} for g in groups],
        steps.pop() if steps else 0.0,
        opt.get("grad_scaler"),
    )
    path = os.path.join(rank_dir, "distrib_optim.pt")
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{rank_dir}: args say use_distributed_optimizer but distrib_optim.pt is missing"
        )
    state = TorchZipReader(path).load()
    if not isinstance(state, dict) or state.get("buckets_coalesced") is not True:
        raise CheckpointError(
            f"{path}: unsupported distributed-optimizer file (not the buckets_coalesced "
            "dp_zero_gather_scatter layout)"
        )
    gbufs = [k for k in state if isinstance(k, int)]
    if gbufs != [0] or not isinstance(state[0], dict) or len(state[0]) != 1:
        raise CheckpointError(
            f"{path}: {len(gbufs)} grad buffers / several dtypes; only one buffer is supported"
        )
    world = next(iter(state[0].values()))
    params = []
    for n in names:
        numel = 1
        for s in shapes[n]:
            numel *= s
        shared = (
            tied
            and pp > 1
            and (
                (first and not last and n == "embedding.word_embeddings.weight")
                or (last and not first and n == "output_layer.weight")
            )
        )
        params.append(BufferParam(n, numel, shared))
    layout = buffer_layout(params, _bucket_size(args, pp_rank))
    check_world_numel(layout, int(world.get("numel_unpadded", -1)), path)
    for key in ("param", "exp_avg", "exp_avg_sq"):
        t = world.get(key)
        if not isinstance(t, LazyTensor) or t.numel != layout.numel_unpadded:
            raise CheckpointError(f"{path}: world tensor {key} missing or of the wrong length")
    for n in names:
        start, end = layout.ranges[n]
        out.states[n] = {
            "fp32_param": LazyRange(world["param"], start, end, shapes[n]),
            "exp_avg": LazyRange(world["exp_avg"], start, end, shapes[n]),
            "exp_avg_sq": LazyRange(world["exp_avg_sq"], start, end, shapes[n]),
        }
    return out
