"""Writer of ``torch_dist`` checkpoints in one process, without a process group.

Produces what megatron-core 0.16.1's ``dist_checkpointing.save`` writes and its ``load`` reads:

* the DCP files: written by ``torch.distributed.checkpoint.save(..., no_dist=True)`` with torch's
  ``FileSystemWriter`` and a planner whose write items are our chunks. Every stacked ``decoder.layers.*``
  key is stored as one chunk per layer (offset ``(layer, 0, ...)``, as megatron's prepended layer axis),
  every other key as one chunk; the planner's ``resolve_data`` pulls each chunk from the ``Pipeline`` only
  when DCP writes it, so memory stays bounded by one slab. Optimizer state uses megatron's keys:
  ``optimizer.state.{exp_avg,exp_avg_sq}.<key>``, plus ``optimizer.state.fp32_param.<key>`` (mixed precision)
  or ``optimizer.state.param.<key>`` (distributed optimizer, ``fully_reshardable``).
* byte objects (``torch.save([obj])`` as megatron's ``ShardedObject``):
  ``<module>._extra_state/shard_<l>_<L>`` per layer and, when the layout is unchanged,
  ``rng_state/shard_<pp>.<tp>_<PP>.<TP>``;
* ``common.pt``: args, iteration, the optimizer's non-tensor state, the scheduler, ``content_metadata``;
* ``metadata.json`` last: ``{"sharded_backend": "torch_dist", "sharded_backend_version": 1, ...}``.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from typing import Any, cast

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.api import CheckpointException as DcpException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from megatron_unicron.ckpt import safe_unpickle
from megatron_unicron.ckpt.common_out import content_metadata, dist_common_optimizer
from megatron_unicron.ckpt.errors import CheckpointError
from megatron_unicron.ckpt.layout_rules import LAYER_PREFIX, parse_optimizer_key
from megatron_unicron.ckpt.plan import Pipeline, Target, target_args
from megatron_unicron.ckpt.report import ConversionReport
from megatron_unicron.ckpt.source import CheckpointSource, OptimizerKind
from megatron_unicron.ckpt.writer_legacy import iteration_dir
from megatron_unicron.ckpt.zip_writer import TorchZipWriter, WriteQueue

CONFIG = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


def dcp_key(key: str, kind: OptimizerKind | None) -> str:
    """The DCP key megatron-core uses for a canonical key (DistOpt names its main params ``param``)."""
    parsed = parse_optimizer_key(key)
    if parsed is not None and parsed[0] == "fp32_param" and kind is OptimizerKind.DISTRIBUTED:
        return f"optimizer.state.param.{parsed[1]}"
    return key


class _StreamingPlanner(DefaultSavePlanner):
    """A DCP save planner whose items are given up front and whose data is produced on demand."""

    def __init__(
        self,
        items: list[WriteItem],
        tensors: dict[tuple[str, tuple[int, ...]], tuple[str, int | None]],
        objects: dict[str, Any],
        pipeline: Pipeline,
    ) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._items = items
        self._tensors = tensors
        self._objects = objects
        self._pipeline = pipeline

    def create_local_plan(self) -> SavePlan:
        """All chunks and objects, in key order (layers ascending)."""
        self.plan = SavePlan(list(self._items))
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        """Pull one chunk from the pipeline, or serialize one object as megatron's ShardedObject does."""
        if write_item.type == WriteItemType.BYTE_IO:
            buf = io.BytesIO()
            torch.save([self._objects[write_item.index.fqn]], buf, pickle_module=safe_unpickle)
            buf.seek(0)
            return buf
        offset = tuple(write_item.index.offset or ())
        key, layer = self._tensors[(write_item.index.fqn, offset)]
        slab = self._pipeline.slab(key, layer)
        return slab.unsqueeze(0) if layer is not None else slab


class _StreamingFileWriter(FileSystemWriter):
    """torch's ``FileSystemWriter`` whose ``write_data`` writes item by item and keeps nothing.

    torch's own loop keeps every written tensor of a file alive until the file is complete (a dict it only
    needs for safetensors output), which would hold a whole checkpoint in memory. This one writes each item
    as torch does (``torch.save`` of the tensor, or the raw bytes of a byte object) and records the same
    ``_StorageInfo`` (file, offset, length), so torch's and megatron's readers read it unchanged.
    """

    FILE_BYTES = 4 << 30  # start a new ``__0_<n>.distcp`` after this many bytes

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Write every item of the plan in order, pulling each one from the planner just before.

        The ``torch.save`` of an item runs in a background thread while the next item is pulled (read and
        checksummed); at most one item waits.
        """
        results: list[WriteResult] = []
        state: dict[str, Any] = {"stream": None, "name": "", "count": 0, "prefix": plan.storage_data.prefix}

        def write(item: WriteItem, data: Any) -> None:  # in the writer thread only
            stream = state["stream"]
            if stream is None or stream.tell() >= self.FILE_BYTES:
                if stream is not None:
                    stream.close()
                state["name"] = f"{state['prefix']}{state['count']}.distcp"
                state["count"] += 1
                stream = state["stream"] = open(os.path.join(str(self.path), state["name"]), "wb")  # noqa: SIM115
            offset = stream.tell()
            if item.type == WriteItemType.BYTE_IO:
                stream.write(cast(io.BytesIO, data).getbuffer())
            else:
                tensor = cast(torch.Tensor, data).detach().contiguous()
                if tensor.untyped_storage().nbytes() != tensor.nbytes:
                    tensor = tensor.clone()
                torch.save(tensor, stream)
            length = stream.tell() - offset
            results.append(
                WriteResult(
                    index=item.index,
                    size_in_bytes=length,
                    storage_data=_StorageInfo(state["name"], offset, length),
                )
            )

        try:
            with WriteQueue() as queue:
                for item in plan.items:
                    queue.submit(write, item, planner.resolve_data(item))
        finally:
            if state["stream"] is not None:
                state["stream"].close()
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut


class DistWriter:
    """Writes the target as a torch_dist checkpoint under ``root``; see the module docstring."""

    def __init__(
        self,
        root: str,
        source: CheckpointSource,
        target: Target,
        pipeline: Pipeline,
        report: ConversionReport,
    ) -> None:
        self.root = root
        self.source = source
        self.target = target
        self.pipeline = pipeline
        self.report = report

    def _objects(self) -> dict[str, Any]:
        objects: dict[str, Any] = {}
        n = self.source.spec.num_layers
        keys = [
            k for k in self.source.extra_states if k != "output_layer._extra_state"
        ]  # megatron keeps none
        core = LAYER_PREFIX + "self_attention.core_attention._extra_state"
        if self.target.layer_spec == "te" and core not in keys:
            keys.append(core)
        for key in keys:
            if key == core and self.target.layer_spec != "te":
                continue
            if not key.startswith(LAYER_PREFIX):
                objects[f"{key}/shard_0_1"] = self.source.extra_states[key][0]
                continue
            values = self.source.extra_states.get(key, [None] * n)
            for layer in range(n):
                objects[f"{key}/shard_{layer}_{n}"] = values[layer]
        rng = self.source.common.rng
        if self.target.keep_rng and rng is not None:
            pp_n, tp_n = self.target.layout.pp, self.target.layout.tp
            for (pp, tp), state in rng.items():
                objects[f"rng_state/shard_{pp}.{tp}_{pp_n}.{tp_n}"] = state
        return objects

    def _items(self) -> tuple[list[WriteItem], dict[tuple[str, tuple[int, ...]], tuple[str, int | None]]]:
        items: list[WriteItem] = []
        sources: dict[tuple[str, tuple[int, ...]], tuple[str, int | None]] = {}
        for key, info in self.pipeline.tensors.items():
            fqn = dcp_key(key, self.target.optimizer)
            props = TensorProperties(dtype=info.dtype)
            for layer in info.layers:
                if layer is None:
                    offsets, sizes = (0,) * len(info.shape), info.shape
                else:
                    offsets, sizes = (layer,) + (0,) * (len(info.shape) - 1), (1, *info.shape[1:])
                items.append(
                    WriteItem(
                        index=MetadataIndex(fqn, torch.Size(offsets)),
                        type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(
                            chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
                            properties=props,
                            size=torch.Size(info.shape),
                        ),
                    )
                )
                sources[(fqn, offsets)] = (key, layer)
        return items, sources

    def _common(self) -> dict[str, Any]:
        common = self.source.common
        out: dict[str, Any] = {
            "args": target_args(self.source, self.target),
            "checkpoint_version": 3.0,
            "iteration": common.iteration,
        }
        if self.target.optimizer is not None and common.optimizer is not None:
            out["optimizer"] = dist_common_optimizer(common.optimizer, self.target.optimizer)
            if common.opt_param_scheduler is not None:
                out["opt_param_scheduler"] = common.opt_param_scheduler
        if common.num_floating_point_operations_so_far is not None:
            out["num_floating_point_operations_so_far"] = common.num_floating_point_operations_so_far
        if self.target.keep_rng and common.rerun_state_machine is not None:
            out["rerun_state_machine"] = common.rerun_state_machine
        out.update(common.extra)
        out["content_metadata"] = content_metadata(self.target.optimizer)
        return out

    def write(self) -> None:
        """Write the DCP files, ``common.pt`` and, last, ``metadata.json``."""
        path = os.path.join(self.root, iteration_dir(self.target))
        os.makedirs(path, exist_ok=True)
        objects = self._objects()
        items, sources = self._items()
        items = [WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO) for fqn in objects] + items
        planner = _StreamingPlanner(items, sources, objects, self.pipeline)
        with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": intended
            warnings.simplefilter("ignore", UserWarning)
            # like torch.save (the legacy writer), no fsync: the output is renamed into place only when done
            writer = _StreamingFileWriter(path, thread_count=1, sync_files=False)
            try:
                dcp_save({}, storage_writer=writer, planner=planner, no_dist=True)
            except DcpException as e:  # DCP wraps what the pipeline raised: hand the original on
                for failure in getattr(e, "failures", {}).values():
                    if isinstance(failure, (CheckpointError, OSError)):
                        raise failure from None
                raise CheckpointError(f"writing the torch_dist files failed: {e}") from None
        common = TorchZipWriter(os.path.join(path, "common.pt"))
        try:
            common.finish(self._common())
        finally:
            common.close()
        with open(os.path.join(path, "metadata.json"), "w") as f:
            json.dump(CONFIG, f)
        self.report.bytes_written += sum(
            os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
        )
