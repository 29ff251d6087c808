"""Asynchronous torch_dist checkpoints: plan on the training thread, write on a background thread.

What Megatron-LM's ``--async-save`` does, adapted to a CPU/gloo process: ``dist_checkpointing.save(...,
async_sharded_save=True)`` runs the collective part (the save plan, ``common.pt`` on rank 0) on the
training thread and returns an ``AsyncRequest``; its write runs on a thread of this process instead of
a forked process, and :meth:`AsyncCheckpoint.finalize` later runs the collective finalisation (the
global ``.metadata``, ``metadata.json``) on the training thread of every rank, then advances
``latest_checkpointed_iteration.txt``. The result is the checkpoint :func:`checkpoint.save` writes.

Why a thread and not megatron's forked writer: a fork of a training process costs more CPU than the
write of a small checkpoint (measured on the tiny CPU model: the iteration running beside the write took
+130 ms with the forked writer, +50 ms with the thread), and the writer's results then travel through a
queue of this process, which the CPU patch provides (``cpu.py``: no spawned ``Manager``). Tensors are
cloned first (they alias live parameters and Adam state, which the next step changes).
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from megatron_unicron.megatron import checkpoint, optimizer_fixes

if TYPE_CHECKING:
    from megatron_unicron.megatron.args import MegatronArgs
    from megatron_unicron.megatron.train import Trainer

logger = logging.getLogger(__name__)


def _clone_tensors(state: dict[str, Any]) -> None:
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    def clone(item: Any) -> Any:
        if isinstance(item, ShardedTensor | ShardedTensorFactory) and item.data is not None:
            item.data = item.data.detach().clone()
        return item

    dict_list_map_inplace(clone, state)


def _write(request: Any) -> None:
    """Run a request's write on this thread (megatron's multi-process writer, minus the processes)."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    if request.async_fn is None:
        return
    args = list(request.async_fn_args)
    if request.preload_fn is not None:
        args[1] = request.preload_fn()
    fn = request.async_fn
    if not (isinstance(fn, functools.partial) and fn.func.__name__ == "write_preloaded_data_multiproc"):
        fn(*args, **request.async_fn_kwargs)  # another megatron version: its own writer
        return
    transform_list, use_msc = fn.args
    _rank, buckets, results = args
    local: queue.Queue[Any] = queue.Queue()
    count: queue.Queue[int] = queue.Queue()
    written: dict[int, Any] = {}
    extra = {"use_msc": True} if use_msc else {}
    for index, bucket in enumerate(buckets):
        count.put(index)
        FileSystemWriterAsync.write_preloaded_data(transform_list, index, bucket, local, count, True, **extra)
        done, result = local.get()
        if isinstance(result, Exception):
            results.put(result)
            return
        written[done] = result
    results.put(written)


class PersistFailed(RuntimeError):
    """Some rank could not write its part of an asynchronous checkpoint (every rank raises it)."""


@dataclass
class AsyncCheckpoint:
    """One checkpoint being written; :meth:`finalize` (collective) makes it the newest."""

    root: str
    iteration: int
    directory: str
    plan_seconds: float
    _request: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    _errors: list[BaseException] = field(default_factory=list, repr=False)

    def written(self) -> bool:
        """Whether this rank's files are written."""
        return not self._thread.is_alive()

    def wait(self) -> float:
        """Wait until this rank's files are written (no communication); returns the seconds waited."""
        started = time.perf_counter()
        self._thread.join()
        return time.perf_counter() - started

    def finalize(self) -> float:
        """Collective: write the global metadata, then advance the tracker; returns the seconds it took.

        If any rank failed to write its files, every rank leaves the checkpoint incomplete (it never
        becomes the newest) and raises.
        """
        started = time.perf_counter()
        self.wait()
        failed = torch.tensor([1 if self._errors else 0], dtype=torch.int32)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item():
            why = f": {self._errors[0]}" if self._errors else " on another rank"
            raise PersistFailed(f"writing checkpoint {self.directory} failed{why}")
        for finalize_fn in self._request.finalize_fns:
            finalize_fn()
        if dist.get_rank() == 0:
            newest = checkpoint.read_tracker(self.root)
            if newest is None or newest < self.iteration:  # a later synchronous save may have won
                tracker = Path(self.root) / checkpoint.TRACKER_FILE
                tmp = tracker.with_name(tracker.name + ".tmp")
                tmp.write_text(str(self.iteration))
                os.replace(tmp, tracker)
        return time.perf_counter() - started


class AsyncCheckpointer:
    """Starts asynchronous checkpoints; keeps megatron's cached save plan while the layout is the same."""

    def __init__(self) -> None:
        self._strategy: Any = None
        self._generation: weakref.ref[Any] | None = None  # weak: a generation holds its process groups

    def start(self, root: str, trainer: Trainer, args: MegatronArgs) -> AsyncCheckpoint:
        """Collective: plan the checkpoint of the current iteration and start writing it."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

        started = time.perf_counter()
        checkpoint._import_dist_checkpointing()
        optimizer_fixes.apply()
        gen = trainer.generation
        assert gen is not None
        first = self._generation is None or self._generation() is not gen
        if first:  # the cached plan is only valid for one layout (one generation)
            self._strategy = TorchDistSaveShardedStrategy(
                "torch_dist", 1, thread_count=1, cached_metadata=True
            )
            self._generation = weakref.ref(gen)
        iteration = trainer.progress.iteration
        directory = checkpoint.checkpoint_dir(root, iteration)
        if dist.get_rank() == 0:
            os.makedirs(directory, exist_ok=True)
        dist.barrier()
        state = checkpoint.sharded_state(trainer, args, for_loading=False)
        _clone_tensors(state)
        state.update(
            args=checkpoint.megatron_args_namespace(args, trainer),
            checkpoint_version=checkpoint.CHECKPOINT_VERSION,
            iteration=iteration,
            opt_param_scheduler=gen.bundle.scheduler.state_dict(),
            num_floating_point_operations_so_far=trainer.progress.floating_point_operations,
        )
        request = dist_checkpointing.save(
            state,
            directory,
            self._strategy,
            async_sharded_save=True,
            validate_access_integrity=first,
            content_metadata=checkpoint.serializable_metadata(checkpoint.sharded_metadata(args)),
        )
        errors: list[BaseException] = []

        def write() -> None:
            try:
                _write(request)
            except BaseException as error:  # reported by finalize() on the training thread
                errors.append(error)

        thread = threading.Thread(target=write, name=f"unicron-persist-{iteration}", daemon=True)
        thread.start()
        return AsyncCheckpoint(
            root=root, iteration=iteration, directory=directory, plan_seconds=time.perf_counter() - started,
            _request=request, _thread=thread, _errors=errors,
        )  # fmt: skip
