"""Layout-independent model and optimizer state, through megatron-core's sharded state dicts.

``capture`` copies everything a rank holds (every local shard, all replicas, so any holder can serve a
dead peer) into CPU memory without communicating: it works after a failure, when the old process
groups are broken. ``prepare_targets`` describes what the current (new) layout needs on this rank;
``load_targets`` loads the filled targets into the model and optimizer the way
``dist_checkpointing.load`` would. Between the two, the transition moves slices (see
``megatron_unicron.transition``).

Traps handled here (measured on megatron-core 0.16):

* the model's sharded tensors alias live parameters and the optimizer's alias live Adam state: capture
  clones them before anything is rebuilt;
* names are not keys: layernorms have transformer-engine names, layers are stacked along a prepended
  axis, SwiGLU's fc1 is a factory, the tied output layer re-uses the embedding key as a replica. Only
  megatron's own pre/post-processing (``save_preprocess``/``load_preprocess``/``apply_factory_merges``)
  is used, never parameter names;
* the embedding allows a global-shape mismatch (vocabulary padding depends on TP): boxes are clipped to
  the captured global shape and padding rows beyond it stay zero;
* a never-stepped DistributedOptimizer cannot describe its state for loading until it has some
  (``optimizer_fixes.prime_optimizer_state``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from megatron_unicron.megatron import optimizer_fixes
from megatron_unicron.transition.transfer_plan import Box

if TYPE_CHECKING:
    from megatron_unicron.megatron.args import MegatronArgs
    from megatron_unicron.megatron.model import ModelBundle


def content_metadata(args: MegatronArgs) -> dict[str, Any]:
    """How model and optimizer describe their state (no process groups: capture must not communicate)."""
    metadata: dict[str, Any] = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if args.use_distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = "fully_reshardable"
    return metadata


def sharded_box(sharded_tensor: Any) -> Box:
    """The box a megatron ``ShardedTensor`` covers in its global tensor (prepended axes have length 1)."""
    lengths = (1,) * sharded_tensor.prepend_axis_num + tuple(sharded_tensor.local_shape)
    return tuple((start, start + length) for start, length in zip(sharded_tensor.global_offset, lengths))


@dataclass(frozen=True)
class ShardMeta:
    """What a shard is, without its data (sent to every rank before planning)."""

    key: str
    box: Box
    global_shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class CapturedState:
    """CPU copies of every shard, object and common value a rank held in its layout."""

    metas: list[ShardMeta]
    tensors: list[torch.Tensor]  # shaped as their boxes
    objects: dict[tuple[str, tuple[int, ...]], Any]
    common: dict[str, Any]

    @property
    def nbytes(self) -> int:
        """Bytes held by the captured tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors)


@dataclass
class Targets:
    """What this rank's new layout needs, with empty buffers to fill."""

    metas: list[ShardMeta]
    tensors: list[torch.Tensor]
    object_keys: list[tuple[str, tuple[int, ...]]]
    _sharded: dict[str, Any] = field(repr=False)
    _sharded_tensors: list[Any] = field(repr=False)
    _nonpersistent: dict[str, Any] = field(repr=False)
    _factories: dict[str, Any] = field(repr=False)


def state_request(
    bundle: ModelBundle, args: MegatronArgs, *, for_loading: bool, optimizer: bool = True
) -> dict[str, Any]:
    """The sharded state dict of the model, and of the optimizer unless ``optimizer`` is False.

    A DistributedOptimizer's state is described locally elsewhere (``distopt_state``): its own
    model-space description gathers over the data-parallel group.
    """
    metadata = content_metadata(args)
    request: dict[str, Any] = {"model": bundle.gpt.sharded_state_dict(metadata=metadata)}
    if not optimizer:
        return request
    if for_loading and args.use_distributed_optimizer:
        optimizer_fixes.prime_optimizer_state(bundle.optimizer)
    request["optimizer"] = bundle.optimizer.sharded_state_dict(
        request, is_loading=for_loading, metadata=metadata
    )
    return request


def live_shards(bundle: ModelBundle, args: MegatronArgs, *, optimizer: bool = True) -> CapturedState:
    """This rank's state *without copying*: the tensors are views of live parameters and Adam state.

    They change at every optimizer step: copy them before the next step (snapshots) or clone them
    (:func:`capture`). The list stays valid for a layout once the optimizer has stepped once (torch
    allocates Adam's state at its first step, then updates it in place). No communication.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

    request = state_request(bundle, args, for_loading=False, optimizer=optimizer)
    sharded, common = save_preprocess(request, False)
    metas: list[ShardMeta] = []
    tensors: list[torch.Tensor] = []
    objects: dict[tuple[str, tuple[int, ...]], Any] = {}
    for item in nested_values(sharded):
        if isinstance(item, ShardedTensor):
            box = sharded_box(item)
            data = item.data.detach().reshape([b - a for a, b in box])
            metas.append(ShardMeta(item.key, box, tuple(item.global_shape), data.dtype))
            tensors.append(data)
        elif isinstance(item, ShardedObject):
            objects[(item.key, tuple(item.global_offset))] = item.data
    return CapturedState(metas=metas, tensors=tensors, objects=objects, common=common)


def capture(bundle: ModelBundle, args: MegatronArgs, *, optimizer: bool = True) -> CapturedState:
    """Clone this rank's whole state to CPU memory; no communication."""
    live = live_shards(bundle, args, optimizer=optimizer)
    return CapturedState(
        metas=live.metas,
        tensors=[t.to("cpu", copy=True) for t in live.tensors],
        objects=copy.deepcopy(live.objects),
        common=copy.deepcopy(live.common),
    )


def prepare_targets(bundle: ModelBundle, args: MegatronArgs, *, optimizer: bool = True) -> Targets:
    """Describe, and allocate, what the current layout needs on this rank."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess
    from megatron.core.dist_checkpointing.utils import extract_sharded_base

    request = state_request(bundle, args, for_loading=True, optimizer=optimizer)
    sharded, nonpersistent, factories = load_preprocess(request)
    sharded, _ = extract_sharded_base(sharded)
    sharded_tensors = [x for x in nested_values(sharded) if isinstance(x, ShardedTensor)]
    metas, tensors = [], []
    for item in sharded_tensors:
        box = sharded_box(item)
        metas.append(ShardMeta(item.key, box, tuple(item.global_shape), item.dtype))
        tensors.append(torch.zeros([b - a for a, b in box], dtype=item.dtype))
    object_keys = [
        (x.key, tuple(x.global_offset)) for x in nested_values(sharded) if isinstance(x, ShardedObject)
    ]
    return Targets(metas, tensors, object_keys, sharded, sharded_tensors, nonpersistent, factories)


def clip_to(box: Box, global_shape: tuple[int, ...]) -> Box | None:
    """``box`` cut to a (smaller) global shape; None when nothing of it lies inside."""
    clipped = tuple((start, min(stop, size)) for (start, stop), size in zip(box, global_shape))
    return None if any(start >= stop for start, stop in clipped) else clipped


def load_targets(
    bundle: ModelBundle,
    targets: Targets,
    objects: dict[tuple[str, tuple[int, ...]], Any],
    common: dict[str, Any],
) -> None:
    """Load filled targets, objects and the common state into the current model and optimizer."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, merge
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        apply_factory_merges,
    )

    filled = {id(st): t for st, t in zip(targets._sharded_tensors, targets.tensors)}

    def fill(item: Any) -> Any:
        if isinstance(item, ShardedTensor):
            return filled[id(item)].reshape(item.local_shape)
        if isinstance(item, ShardedObject):
            return objects[(item.key, tuple(item.global_offset))]
        return item

    state = targets._sharded
    dict_list_map_inplace(fill, state)
    result = copy.deepcopy(common)
    merge(result, targets._nonpersistent)
    merge(result, state)
    result = apply_factory_merges(result, targets._factories)
    bundle.gpt.load_state_dict(result["model"])
    if "optimizer" in result:
        bundle.optimizer.load_state_dict(result["optimizer"])
        optimizer_fixes.unshare_step_tensors(bundle.optimizer)
