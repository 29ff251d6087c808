"""The DistributedOptimizer's sharded state, described locally: no collective, any layout.

megatron-core can describe a DistributedOptimizer's state in model space only through its
``fully_reshardable`` format, which all-gathers the state over the data-parallel group: impossible after
a failure (the group is broken) and costly every time (each DP rank then holds the unsharded state).
Here each rank describes just what it holds: for every model parameter, the contiguous range of the
parameter's flattened elements that its optimizer shard covers (``param_map[...]["param"]`` of megatron's
grad-buffer range map), expressed in the layout-independent key space of the model's sharded state
dict. A shard is a *flat range* of a box: the elements ``[start, stop)`` of the box in C order.

The Adam moments (and, for fp16/bf16 models, the fp32 main parameters) are moved that way; with fp32
models megatron's main parameters are views of the model parameters, which move with the model.
Only the grad-buffer range maps are read, so megatron's multi-bucket offset error in its own
``fully_reshardable`` description does not apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from megatron_unicron.megatron import optimizer_fixes
from megatron_unicron.transition.transfer_plan import Box

if TYPE_CHECKING:
    from megatron_unicron.megatron.args import MegatronArgs
    from megatron_unicron.megatron.model import ModelBundle


@dataclass(frozen=True)
class FlatMeta:
    """Elements ``[flat[0], flat[1])`` (C order) of one box of a global tensor."""

    key: str
    box: Box
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    flat: tuple[int, int]


@dataclass(frozen=True)
class _ModelPiece:
    key: str
    box: Box
    global_shape: tuple[int, ...]
    offset: int  # of the piece in its parameter's flattened elements
    numel: int


def _distributed_optimizers(optimizer: Any) -> list[Any]:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in inners if isinstance(o, DistributedOptimizer)]


def uses_distributed_optimizer(bundle: ModelBundle) -> bool:
    """Whether the bundle's optimizer is (or chains) megatron's DistributedOptimizer."""
    return bool(_distributed_optimizers(bundle.optimizer))


def _model_pieces(bundle: ModelBundle, args: MegatronArgs) -> dict[int, list[_ModelPiece]]:
    """Each parameter's pieces in the model's sharded description (a SwiGLU fc1 has two), by id."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from megatron_unicron.megatron.state import content_metadata, sharded_box

    sharded = bundle.gpt.sharded_state_dict(metadata=content_metadata(args))
    apply_factories(sharded)
    by_storage: dict[int, list[ShardedTensor]] = {}
    for item in nested_values(sharded):
        if isinstance(item, ShardedTensor):
            by_storage.setdefault(item.data.untyped_storage().data_ptr(), []).append(item)
    pieces: dict[int, list[_ModelPiece]] = {}
    for param in bundle.gpt.parameters():
        found = []
        for item in by_storage.get(param.untyped_storage().data_ptr(), []):
            offset = (item.data.data_ptr() - param.data_ptr()) // param.element_size()
            if not (0 <= offset < param.numel()) or not item.data.is_contiguous():
                continue
            found.append(
                _ModelPiece(item.key, sharded_box(item), tuple(item.global_shape), offset, item.data.numel())
            )
        pieces[id(param)] = sorted(found, key=lambda p: p.offset)
    return pieces


def optimizer_shards(bundle: ModelBundle, args: MegatronArgs) -> tuple[list[FlatMeta], list[torch.Tensor]]:
    """This rank's DistributedOptimizer state as flat ranges of model-space boxes: live views, no copy.

    The keys are ``optimizer.state.<exp_avg|exp_avg_sq|fp32_param>.<model key>``, as megatron names
    them. A never-stepped optimizer is given zero state first (it then serves as the target of a
    transition).
    """
    optimizer_fixes.prime_optimizer_state(bundle.optimizer)
    pieces = _model_pieces(bundle, args)
    metas: list[FlatMeta] = []
    tensors: list[torch.Tensor] = []
    for distopt in _distributed_optimizers(bundle.optimizer):
        inner = distopt.optimizer
        for buffer_ranges in distopt.gbuf_ranges:
            for bucket_ranges in buffer_ranges.values():
                for bucket in bucket_ranges:
                    for param, ranges in bucket["param_map"].items():
                        start, stop = ranges["param"].start, ranges["param"].end
                        group, order = distopt.model_param_group_index_map[param]
                        main = inner.param_groups[group]["params"][order]
                        state = inner.state[main]
                        values = {"exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}
                        if main.data_ptr() != param.data_ptr() + start * param.element_size():
                            values["fp32_param"] = main  # a separate fp32 copy (fp16/bf16 models)
                        for piece in pieces[id(param)]:
                            lo, hi = max(start, piece.offset), min(stop, piece.offset + piece.numel)
                            if lo >= hi:
                                continue
                            for name, tensor in values.items():
                                metas.append(
                                    FlatMeta(
                                        f"optimizer.state.{name}.{piece.key}",
                                        piece.box,
                                        piece.global_shape,
                                        tensor.dtype,
                                        (lo - piece.offset, hi - piece.offset),
                                    )
                                )
                                tensors.append(tensor.detach().view(-1)[lo - start : hi - start])
    return metas, tensors


def adam_step(bundle: ModelBundle) -> float:
    """The number of Adam steps taken (the same for every parameter)."""
    for distopt in _distributed_optimizers(bundle.optimizer):
        for state in distopt.optimizer.state.values():
            step = state.get("step")
            if step is not None:
                return float(step)
    return 0.0


def set_adam_step(bundle: ModelBundle, step: float) -> None:
    """Give every parameter its own ``step`` tensor holding ``step``."""
    for distopt in _distributed_optimizers(bundle.optimizer):
        for state in distopt.optimizer.state.values():
            state["step"] = torch.tensor(float(step))
