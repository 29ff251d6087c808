"""Writes one rank's snapshots into its slot directory on a background thread.

The training thread hands over *live* tensors (views of parameters and Adam state, no copy) right after
an iteration committed; the writer thread copies their bytes into the slot that is not the newest
(memory-mapped from shared memory), computes a CRC-32C per shard, writes the pickled trainer state and
finally the manifest. A DistributedOptimizer rank's optimizer shards are flat ranges of boxes
(``megatron.distopt_state.FlatMeta``); they are written after the boxes, one record each. Forward and
backward of the next iteration run meanwhile (they do not modify parameters or optimizer state); the
trainer calls :meth:`SnapshotWriter.wait` before the optimizer step, which is the only point where
training can stall on a snapshot.

The copy is one ``torch._foreach_copy_`` and the checksums are CRC-32C (``checksum``) on the mapped
bytes: both release the GIL, so the training thread is not held up by them.

``UNICRON_SNAPSHOT_COPY_DELAY_S=SECONDS[@ITERATION[:RANK]]`` (tests only) sleeps half-way through a copy
(every snapshot, or that iteration's, on every launch rank or that one), after writing
``<slot>.copying`` with the iteration and logging a warning, so that a test can kill the worker
mid-copy and prove it did. A marker left by a killed writer turns the delay off for its restart.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_unicron.checksum import crc32c, crc32c_each
from megatron_unicron.megatron.distopt_state import FlatMeta
from megatron_unicron.megatron.guard import KeptCopy
from megatron_unicron.megatron.state import ShardMeta
from megatron_unicron.snapshot.layout import SlotDirectory
from megatron_unicron.snapshot.manifest import SLOTS, Manifest, ShardRecord, dtype_name, shards_json

logger = logging.getLogger(__name__)

COPY_DELAY_ENV = "UNICRON_SNAPSHOT_COPY_DELAY_S"
ALIGN = 64  # bytes; every shard starts aligned, so its bytes can be viewed as any dtype
Shard = ShardMeta | FlatMeta


@dataclass(frozen=True)
class SnapshotRequest:
    """What one snapshot holds: live tensors (not copied yet) and the small trainer-level state."""

    iteration: int
    generation: int
    layout: tuple[int, int, int]
    coords: tuple[int, int, int]
    metas: Sequence[ShardMeta]
    tensors: Sequence[torch.Tensor]
    state: dict[str, Any] = field(repr=False)
    """Pickled by the writer thread: it must not change before the next optimizer step."""
    flat_metas: Sequence[FlatMeta] = ()
    """DistributedOptimizer shards (flat ranges of boxes), with their live 1-D views."""
    flat_tensors: Sequence[torch.Tensor] = ()

    def __post_init__(self) -> None:
        if len(self.metas) != len(self.tensors):
            raise ValueError(f"{len(self.metas)} shard descriptions for {len(self.tensors)} tensors")
        if len(self.flat_metas) != len(self.flat_tensors):
            raise ValueError(
                f"{len(self.flat_metas)} flat shard descriptions for {len(self.flat_tensors)} tensors"
            )


@dataclass(frozen=True)
class CopyDelay:
    """The test-only copy delay (see the module docstring)."""

    seconds: float = 0.0
    iteration: int | None = None
    rank: int | None = None

    @classmethod
    def parse(cls, text: str) -> CopyDelay:
        """``SECONDS[@ITERATION[:RANK]]``; no delay when empty."""
        if not text.strip():
            return cls()
        seconds, _, where = text.partition("@")
        iteration, _, rank = where.partition(":")
        try:
            return cls(float(seconds), int(iteration) if iteration else None, int(rank) if rank else None)
        except ValueError:
            raise ValueError(f"{COPY_DELAY_ENV}={text!r}: give SECONDS[@ITERATION[:RANK]]") from None

    def applies(self, iteration: int, rank: int, directory: Path) -> bool:
        """Whether to delay this copy (never again once a killed writer left its marker)."""
        return (self.seconds > 0 and self.iteration in (None, iteration) and self.rank in (None, rank)
                and not any(directory.glob("*.copying")))  # fmt: skip


def _tensor(array: Any) -> torch.Tensor:
    return torch.from_numpy(array)


class _Pickler(pickle.Pickler):
    """Pickles CPU tensors as numpy arrays: their bytes as they are, far cheaper than torch's reducer."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and obj.dtype != torch.bfloat16:
            return _tensor, (obj.detach().numpy(),)
        return NotImplemented


def dumps(state: Any) -> bytes:
    """Pickle a snapshot's trainer-level state (``pickle.loads`` reads it back)."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(state)
    return buffer.getvalue()


def _shape(meta: Shard) -> list[int]:
    if isinstance(meta, FlatMeta):
        return [meta.flat[1] - meta.flat[0]]
    return [b - a for a, b in meta.box]


def plan_offsets(metas: Sequence[Shard]) -> tuple[list[int], int]:
    """Aligned byte offsets of each shard in a slot's data file, and the file's size."""
    offsets, end = [], 0
    for meta in metas:
        offsets.append(end)
        numel = int(torch.Size(_shape(meta)).numel())
        end += -(-numel * meta.dtype.itemsize // ALIGN) * ALIGN
    return offsets, end


class _SlotMap:
    """One slot's data file mapped into memory, with a view and a record per shard of a shard list."""

    def __init__(
        self, path: os.PathLike[str], metas: Sequence[ShardMeta], flat_metas: Sequence[FlatMeta]
    ) -> None:
        self.metas, self.flat_metas = metas, flat_metas
        every: list[Shard] = [*metas, *flat_metas]
        offsets, self.size = plan_offsets(every)
        with open(path, "ab") as f:  # create it, then give it exactly the size needed
            f.truncate(self.size)
        self.buffer = torch.from_file(os.fspath(path), shared=True, size=max(self.size, 1), dtype=torch.uint8)
        self.bytes = self.buffer.numpy().data  # a memoryview of the mapping
        self.views = []
        self.records = []
        for meta, offset in zip(every, offsets):
            shape = _shape(meta)
            nbytes = int(torch.Size(shape).numel()) * meta.dtype.itemsize
            self.views.append(self.buffer[offset : offset + nbytes].view(meta.dtype).view(shape))
            self.records.append(ShardRecord(
                key=meta.key, box=meta.box, global_shape=meta.global_shape, dtype=dtype_name(meta.dtype),
                offset=offset, nbytes=nbytes, flat=meta.flat if isinstance(meta, FlatMeta) else None,
            ))  # fmt: skip
        self.shard_bytes = [self.bytes[r.offset : r.offset + r.nbytes] for r in self.records]
        self.shards_json = shards_json(self.records)

    def checksums(self) -> tuple[int, ...]:
        """CRC-32C of every shard's bytes as they are now in the slot."""
        return crc32c_each(self.shard_bytes)


@dataclass
class WriterStats:
    """What the writer did so far."""

    written: int = 0
    failed: int = 0
    copy_seconds: float = 0.0
    last_iteration: int | None = None
    last_error: str | None = None


class SnapshotWriter:
    """Background writer of one launch rank's snapshots (one snapshot in flight at a time)."""

    def __init__(self, directory: SlotDirectory, *, job: str, node: str, launch_rank: int) -> None:
        self.directory = directory
        self.job = job
        self.node = node
        self.launch_rank = launch_rank
        self.stats = WriterStats()
        self.copy_delay = CopyDelay.parse(os.environ.get(COPY_DELAY_ENV, ""))
        # Which slot holds which snapshot: read from disk once (a restarted writer continues), then kept.
        self._complete = {m.slot: m.sequence for m in directory.manifests()}
        self._sequence = max(self._complete.values(), default=-1) + 1
        self._maps: dict[str, _SlotMap] = {}
        self.newest: KeptCopy | None = None
        """The live tensors of the newest snapshot written by this writer and their copies in its slot,
        which no write touches until another snapshot is complete (writes go to the other slot)."""
        self._requests: queue.SimpleQueue[SnapshotRequest | None] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        name = f"unicron-snapshot-rank{launch_rank}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """Whether a snapshot is being written."""
        return not self._idle.is_set()

    def submit(self, request: SnapshotRequest) -> None:
        """Start writing ``request`` in the background (waits for the previous snapshot first)."""
        self.wait()
        if not self._thread.is_alive():
            raise RuntimeError("the snapshot writer was closed")
        self._idle.clear()
        self._requests.put(request)

    def wait(self) -> float:
        """Block until no snapshot is being written; returns the seconds spent waiting."""
        if self._idle.is_set():
            return 0.0
        started = time.perf_counter()
        self._idle.wait()
        return time.perf_counter() - started

    def close(self) -> None:
        """Finish the snapshot in flight, stop the thread and unmap the slots."""
        self.wait()
        if self._thread.is_alive():
            self._requests.put(None)
            self._thread.join()
        self._maps.clear()

    # ------------------------------------------------------------------ the writer thread
    def _run(self) -> None:
        while True:
            request = self._requests.get()
            if request is None:
                return
            try:
                self._write(request)
            except Exception as error:  # a snapshot that cannot be written must not stop training
                self.stats.failed += 1
                self.stats.last_error = f"{type(error).__name__}: {error}"
                logger.exception("unicron: snapshot of iteration %d failed", request.iteration)
            finally:
                self._idle.set()

    def _slot_map(self, slot: str, metas: Sequence[ShardMeta], flat_metas: Sequence[FlatMeta]) -> _SlotMap:
        current = self._maps.get(slot)
        same_flat = current is not None and (
            current.flat_metas is flat_metas or not (current.flat_metas or flat_metas)
        )
        if current is None or current.metas is not metas or not same_flat:
            self._maps.pop(slot, None)
            current = _SlotMap(self.directory.data_path(slot), metas, flat_metas)
            self._maps[slot] = current
        return current

    def _write(self, request: SnapshotRequest) -> None:
        started = time.perf_counter()
        directory = self.directory
        free = [s for s in SLOTS if s not in self._complete]
        slot = free[0] if free else min(self._complete, key=lambda s: self._complete[s])
        self._complete.pop(slot, None)
        directory.invalidate(slot)  # the older slot loses its manifest before any byte changes
        slot_map = self._slot_map(slot, request.metas, request.flat_metas)
        views, tensors = slot_map.views, [*request.tensors, *request.flat_tensors]
        delayed = self.copy_delay.applies(request.iteration, self.launch_rank, directory.path)
        if delayed:
            half = len(views) // 2
            (directory.path / f"{slot}.copying").write_text(str(request.iteration))
            torch._foreach_copy_(views[:half], tensors[:half])
            logger.warning("unicron: copying the snapshot of iteration %d into slot %s of %s, delayed %gs",
                           request.iteration, slot, directory.path, self.copy_delay.seconds)  # fmt: skip
            time.sleep(self.copy_delay.seconds)
            torch._foreach_copy_(views[half:], tensors[half:])
        elif views:
            torch._foreach_copy_(views, tensors)
        crcs = slot_map.checksums()
        state = dumps(request.state)
        directory.write_state(slot, state)
        manifest = Manifest(
            job=self.job, node=self.node, launch_rank=self.launch_rank, slot=slot,
            iteration=request.iteration, generation=request.generation, sequence=self._sequence,
            layout=request.layout, coords=request.coords, data_bytes=slot_map.size, state_bytes=len(state),
            state_crc=crc32c(state), shards=tuple(slot_map.records), crcs=crcs, created=time.time(),
        )  # fmt: skip
        directory.commit(manifest, shards_json=slot_map.shards_json)
        self._complete[slot] = manifest.sequence
        self.newest = KeptCopy(request.iteration, tensors, views)
        if delayed:
            (directory.path / f"{slot}.copying").unlink(missing_ok=True)
        self._sequence += 1
        self.stats.written += 1
        self.stats.last_iteration = request.iteration
        self.stats.copy_seconds += time.perf_counter() - started
