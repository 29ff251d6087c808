"""Lazy reading of ``torch.save`` zip files with bounded memory, and tensor-tree helpers.

A ``torch.save`` file is a zip archive: ``data.pkl`` (the pickled object, whose tensors refer to storages by
key) plus one uncompressed record ``data/<key>`` per storage. ``TorchZipReader.load()`` unpickles
``data.pkl`` with the restricted unpickler (``safe_unpickle``) and turns every tensor into a ``LazyTensor``:
a reference (record offset, storage offset, shape, stride, dtype) whose bytes are read with one ``pread``
only when ``materialize()`` is called. Reading a whole checkpoint tensor by tensor thus holds one tensor at
a time; ``torch.load(mmap=True)`` would instead keep every touched page of the file mapped until the last
tensor of the file dies, so peak RSS would grow to the file size.

``zip_writer.TorchZipWriter`` is the inverse (streaming writes).
"""

from __future__ import annotations

import argparse
import collections
import io
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from megatron_unicron.ckpt import safe_unpickle
from megatron_unicron.ckpt.errors import CheckpointError

__all__ = ["FileWindow", "LazyRange", "LazyTensor", "TorchZipReader", "materialize", "map_tensors"]


class _Bytes:
    """Random access to the bytes of a file or an in-memory buffer."""

    def __init__(self, source: str | bytes, name: str) -> None:
        self.source = source
        self.name = name

    def read(self, offset: int, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)  # not zero-filled, unlike a bytearray
        self.read_into(offset, memoryview(buf.numpy().data))
        return buf

    def read_into(self, offset: int, buf: memoryview) -> None:
        nbytes = len(buf)
        if isinstance(self.source, bytes):
            chunk = self.source[offset : offset + nbytes]
            buf[: len(chunk)] = chunk
            got = len(chunk)
        else:
            with open(self.source, "rb", buffering=0) as f:
                f.seek(offset)
                got = f.readinto(buf) or 0
        if got != nbytes:
            raise CheckpointError(
                f"{self.name}: truncated (wanted {nbytes} bytes at offset {offset}, got {got})"
            )


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True)
class StorageRef:
    """One ``data/<key>`` record: its dtype, element count and byte offset in the container."""

    key: str
    dtype: torch.dtype
    numel: int
    offset: int
    data: _Bytes


@dataclass(frozen=True)
class LazyTensor:
    """A tensor of a checkpoint file, read only when ``materialize()`` is called."""

    storage: StorageRef
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    def __post_init__(self) -> None:
        span = self._span()
        itemsize = self.dtype.itemsize
        if (self.storage_offset + span) * itemsize > self.storage.numel * self.storage.dtype.itemsize:
            raise CheckpointError(
                f"{self.storage.data.name}: tensor of shape {list(self.shape)} exceeds its storage record "
                f"data/{self.storage.key}"
            )

    def _span(self) -> int:
        if any(s == 0 for s in self.shape):
            return 0
        return 1 + sum((s - 1) * st for s, st in zip(self.shape, self.stride))

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's elements."""
        return self.numel * self.dtype.itemsize

    def materialize(self) -> torch.Tensor:
        """Read the tensor's bytes and return a contiguous CPU tensor."""
        if self.numel == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        span = self._span()
        itemsize = self.dtype.itemsize
        buf = self.storage.data.read(self.storage.offset + self.storage_offset * itemsize, span * itemsize)
        flat = buf.view(self.dtype)
        view = flat.as_strided(self.shape, self.stride)
        return view if view.is_contiguous() and span == self.numel else view.contiguous()

    def read_flat(self, start: int, end: int) -> torch.Tensor:
        """Elements ``[start, end)`` of a contiguous tensor, flattened (reads only those bytes)."""
        if not _is_contiguous(self.shape, self.stride):
            return self.materialize().reshape(-1)[start:end].clone()
        if not 0 <= start <= end <= self.numel:
            raise CheckpointError(
                f"{self.storage.data.name}: range [{start}, {end}) outside a tensor of {self.numel} elements"
            )
        itemsize = self.dtype.itemsize
        buf = self.storage.data.read(
            self.storage.offset + (self.storage_offset + start) * itemsize, (end - start) * itemsize
        )
        return buf.view(self.dtype) if end > start else torch.empty(0, dtype=self.dtype)

    def read_flat_into(self, start: int, end: int, dest: torch.Tensor) -> None:
        """Read elements ``[start, end)`` of the flattened tensor straight into contiguous ``dest``."""
        if dest.dtype != self.dtype or dest.numel() != end - start or not dest.is_contiguous():
            raise ValueError(
                "read_flat_into: dest must be contiguous, of the tensor's dtype and the range's size"
            )
        if not _is_contiguous(self.shape, self.stride):
            dest.copy_(self.materialize().reshape(-1)[start:end])
            return
        if not 0 <= start <= end <= self.numel:
            raise CheckpointError(
                f"{self.storage.data.name}: range [{start}, {end}) outside a tensor of {self.numel} elements"
            )
        if end > start:
            itemsize = self.dtype.itemsize
            view = memoryview(dest.reshape(-1).view(torch.uint8).numpy().data)
            self.storage.data.read_into(self.storage.offset + (self.storage_offset + start) * itemsize, view)


@dataclass(frozen=True)
class LazyRange:
    """Elements ``[start, end)`` of a flat ``LazyTensor``, viewed as ``shape`` (a DistOpt buffer slice)."""

    tensor: LazyTensor
    start: int
    end: int
    shape: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        """Element type."""
        return self.tensor.dtype

    def materialize(self) -> torch.Tensor:
        """Read the range and return it with ``shape``."""
        return self.tensor.read_flat(self.start, self.end).view(self.shape)

    def read_flat_into(self, start: int, end: int, dest: torch.Tensor) -> None:
        """Read elements ``[start, end)`` of this range straight into contiguous ``dest``."""
        self.tensor.read_flat_into(self.start + start, self.start + end, dest)


def _is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for s, st in zip(reversed(shape), reversed(stride)):
        if s != 1 and st != expected:
            return False
        expected *= s
    return True


def _lazy_tensor_globals() -> dict[str, Any]:
    def rebuild_v2(storage: Any, offset: int, size: Any, stride: Any, *_: Any) -> LazyTensor:
        return _lazy(storage, offset, size, stride, None)

    def rebuild_v1(storage: Any, offset: int, size: Any, stride: Any) -> LazyTensor:
        return _lazy(storage, offset, size, stride, None)

    def rebuild_v3(
        storage: Any, offset: int, size: Any, stride: Any, _rg: Any, _hooks: Any, dtype: Any, *_: Any
    ) -> LazyTensor:
        return _lazy(storage, offset, size, stride, dtype)

    def rebuild_parameter(data: Any, *_: Any) -> Any:
        return data

    def rebuild_from_type_v2(func: Callable[..., Any], new_type: Any, args: Any, state: Any) -> Any:
        if new_type not in (torch.Tensor, torch.nn.Parameter):
            raise CheckpointError(f"refusing to rebuild a tensor of type {new_type!r}")
        return func(*args)

    out: dict[str, Any] = {
        "torch._utils._rebuild_tensor": rebuild_v1,
        "torch._utils._rebuild_tensor_v2": rebuild_v2,
        "torch._utils._rebuild_tensor_v3": rebuild_v3,
        "torch._utils._rebuild_parameter": rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": rebuild_parameter,
        "torch._tensor._rebuild_from_type_v2": rebuild_from_type_v2,
        "torch.UntypedStorage": _StorageType(torch.uint8),
        "torch.storage.UntypedStorage": _StorageType(torch.uint8),
    }
    for dtype, name in torch.storage._dtype_to_storage_type_map().items():
        out[f"torch.{name}"] = _StorageType(dtype)
    return out


def _lazy(storage: Any, offset: int, size: Any, stride: Any, dtype: torch.dtype | None) -> LazyTensor:
    if not isinstance(storage, StorageRef):
        raise CheckpointError(f"tensor rebuilt from {type(storage).__name__}, not from a storage record")
    return LazyTensor(
        storage,
        int(offset),
        tuple(int(s) for s in size),
        tuple(int(s) for s in stride),
        dtype or storage.dtype,
    )


class TorchZipReader:
    """A ``torch.save`` zip file (path or bytes) read lazily; ``load()`` returns the object."""

    def __init__(self, source: str | bytes, name: str | None = None) -> None:
        self.name = name or (source if isinstance(source, str) else "<bytes>")
        self._reader: Any
        try:
            self._reader = torch._C.PyTorchFileReader(
                source if isinstance(source, str) else io.BytesIO(source)
            )
        except (RuntimeError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{self.name}: not a readable torch.save zip file ({first})") from None
        self._data = _Bytes(source, self.name)

    def _storage(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.name}: unsupported persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise CheckpointError(f"{self.name}: unsupported storage type {stype!r}")
        record = f"data/{key}"
        if not self._reader.has_record(record):
            raise CheckpointError(f"{self.name}: missing storage record {record} (truncated file?)")
        size = self._reader.get_record_size(record)
        if size != numel * stype.dtype.itemsize:
            raise CheckpointError(
                f"{self.name}: storage record {record} has {size} bytes, expected "
                f"{numel * stype.dtype.itemsize}"
            )
        return StorageRef(
            str(key), stype.dtype, int(numel), int(self._reader.get_record_offset(record)), self._data
        )

    def load(self, extra_globals: Mapping[str, Any] | None = None) -> Any:
        """Unpickle ``data.pkl``; tensors come back as ``LazyTensor``."""
        if self._reader.has_record("byteorder"):
            order = bytes(self._reader.get_record("byteorder")).decode()
            if order != sys.byteorder:
                raise CheckpointError(f"{self.name}: written on a {order}-endian machine; not supported")
        try:
            pkl = self._reader.get_record("data.pkl")
        except RuntimeError:
            raise CheckpointError(
                f"{self.name}: no data.pkl record (truncated or not a checkpoint)"
            ) from None
        cache: dict[str, StorageRef] = {}

        def persistent_load(pid: Any) -> StorageRef:
            key = str(pid[2]) if isinstance(pid, tuple) and len(pid) > 2 else repr(pid)
            if key not in cache:
                cache[key] = self._storage(pid)
            return cache[key]

        unpickler = safe_unpickle.RestrictedUnpickler(
            io.BytesIO(bytes(pkl)),
            source=self.name,
            tensor_globals=_lazy_tensor_globals(),
            extra_globals=extra_globals,
        )
        unpickler.persistent_load = persistent_load  # type: ignore[method-assign]
        try:
            return unpickler.load()
        except CheckpointError:
            raise
        except Exception as e:  # a corrupt pickle raises anything from UnpicklingError to IndexError
            raise CheckpointError(
                f"{self.name}: corrupt pickle in data.pkl ({type(e).__name__}: {e})"
            ) from None


def map_tensors(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply ``fn`` to every tensor-like leaf (``torch.Tensor``, ``LazyTensor``, a writer's ``TensorRef``)."""
    if isinstance(obj, (torch.Tensor, LazyTensor)) or getattr(obj, "is_tensor_ref", False):
        return fn(obj)
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, map_tensors(v, fn)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [map_tensors(v, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(map_tensors(v, fn) for v in obj)
    if isinstance(obj, argparse.Namespace):
        return argparse.Namespace(**{k: map_tensors(v, fn) for k, v in vars(obj).items()})
    return obj


def materialize(obj: Any) -> Any:
    """``obj`` with every ``LazyTensor`` read into a real tensor (for small objects: RNG, steps)."""
    return map_tensors(obj, lambda t: t.materialize() if isinstance(t, LazyTensor) else t)


class FileWindow(io.RawIOBase):
    """A read-only file object over bytes ``[offset, offset + length)`` of a file (a DCP item)."""

    def __init__(self, path: str, offset: int, length: int) -> None:
        super().__init__()
        self._f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        self._offset, self._length, self._pos = offset, length, 0

    def readable(self) -> bool:
        """Always readable."""
        return True

    def seekable(self) -> bool:
        """Always seekable."""
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        """Seek within the window."""
        base = {0: 0, 1: self._pos, 2: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self) -> int:
        """Position within the window."""
        return self._pos

    def readinto(self, buf: Any) -> int:
        """Read into ``buf`` without crossing the window's end."""
        n = max(0, min(len(buf), self._length - self._pos))
        self._f.seek(self._offset + self._pos)
        got = self._f.readinto(memoryview(buf)[:n]) or 0
        self._pos += got
        return got

    def close(self) -> None:
        """Close the underlying file."""
        self._f.close()
        super().close()
