"""Streaming writer of ``torch.save``-compatible zip files, and a one-deep background write queue.

``TorchZipWriter.add(tensor)`` writes the tensor's bytes as a ``data/<key>`` record and returns a
``TensorRef``; ``finish(obj)`` pickles ``obj`` (whose tensors are ``TensorRef``s or small real tensors) into
``data.pkl`` with the placeholder-aware pickler. The result is an ordinary ``torch.save`` file (``torch.load``
reads it, ``mmap=True`` too). Records are written by torch's ``PyTorchFileWriter`` (CRC32 like
``torch.save``), which releases the GIL: with a ``WriteQueue`` the write of one slab overlaps reading and
checksumming the next, while at most one slab waits (memory stays bounded).
"""

from __future__ import annotations

import collections
import math
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from megatron_unicron.ckpt import safe_unpickle
from megatron_unicron.ckpt.torch_zip import map_tensors

__all__ = ["TensorRef", "TorchZipWriter", "WriteQueue"]


class WriteQueue:
    """One background thread running writes in order; ``submit`` waits while ``depth`` writes are pending."""

    def __init__(self, depth: int = 1) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-write")
        self._pending: collections.deque[Future[Any]] = collections.deque()
        self._depth = depth

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the background after the earlier writes (errors surface on a later call)."""
        while len(self._pending) >= self._depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def drain(self) -> None:
        """Wait for every pending write (raising the first error)."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Drain and stop the thread."""
        try:
            self.drain()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> WriteQueue:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None:  # an error is on its way out: stop without raising another one
            for f in self._pending:
                f.cancel()
            self._pending.clear()
        self.close()


@dataclass(frozen=True)
class TensorRef:
    """A tensor already written as a record of a ``TorchZipWriter``; pickles as that tensor."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    is_tensor_ref = True  # recognised by ``torch_zip.map_tensors``

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    def __reduce__(self) -> Any:
        stride = []
        acc = 1
        for s in reversed(self.shape):
            stride.append(acc)
            acc *= s
        return (
            torch._utils._rebuild_tensor_v2,
            (
                _StorageHandle(self.key, self.dtype, self.numel),
                0,
                torch.Size(self.shape),
                tuple(reversed(stride)),
                False,
                collections.OrderedDict(),
            ),
        )


@dataclass(frozen=True)
class _StorageHandle:
    key: str
    dtype: torch.dtype
    numel: int


class TorchZipWriter:
    """Writes a ``torch.save``-compatible zip file record by record (``add``), then ``finish(obj)``."""

    def __init__(self, path: str, queue: WriteQueue | None = None) -> None:
        self.path = path
        self._queue = queue
        self._opener = torch.serialization._open_zipfile_writer(path)
        self._writer = self._opener.__enter__()
        self._count = 0
        self._closed = False
        self.nbytes = 0

    def add(self, tensor: torch.Tensor) -> TensorRef:
        """Write ``tensor``'s bytes now; the returned reference stands for it in ``finish(obj)``."""
        t = tensor.detach().cpu().contiguous()
        if t.untyped_storage().nbytes() != t.nbytes or t.storage_offset() != 0:
            t = t.clone()
        key = str(self._count)
        self._count += 1
        if self._queue is None:
            self._writer.write_record(f"data/{key}", t.untyped_storage(), t.nbytes)
        else:  # the closure keeps ``t`` alive until its bytes are written
            self._queue.submit(self._writer.write_record, f"data/{key}", t.untyped_storage(), t.nbytes)
        self.nbytes += t.nbytes
        return TensorRef(key, t.dtype, tuple(t.shape))

    def finish(self, obj: Any) -> None:
        """Pickle ``obj`` (small real tensors are written here too) and close the file."""
        obj = map_tensors(obj, lambda t: self.add(t) if isinstance(t, torch.Tensor) else t)

        def persistent_id(o: Any) -> Any:
            if isinstance(o, _StorageHandle):
                stype = getattr(torch, torch.storage._dtype_to_storage_type_map()[o.dtype])
                return ("storage", stype, o.key, "cpu", o.numel)
            return None

        data = safe_unpickle.dumps(obj, protocol=2, persistent_id=persistent_id)
        if self._queue is not None:
            self._queue.drain()
        self._writer.write_record("data.pkl", data, len(data))
        self._writer.write_record(".format_version", "1", 1)
        align = str(torch.serialization._get_storage_alignment())
        self._writer.write_record(".storage_alignment", align, len(align))
        self._writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self.close()
        self.nbytes += len(data)

    def close(self) -> None:
        """Close the file; without ``finish`` it has no ``data.pkl`` (unreadable; callers delete it)."""
        if not self._closed:
            self._closed = True
            if self._queue is not None:
                self._queue.drain()
            self._opener.__exit__(None, None, None)
