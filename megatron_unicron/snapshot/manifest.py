"""The manifest of one snapshot slot: what the slot's files hold, and the checksums that prove it.

A manifest is written (atomically, by ``os.replace``) only after its slot's files are complete, so its
presence is the proof that the slot can be read; readers still verify every shard's CRC-32C, because
memory can be corrupted after the fact. It describes the shards the way megatron-core's sharded state
dict does (key, box in the global tensor, global shape, dtype), independently of the layout, plus where
each shard's bytes lie in the slot's data file, and the layout and position of the rank that wrote it.
A DistributedOptimizer's shard is a *flat range* of its box (``flat``: elements ``[start, stop)`` in C
order, as ``megatron.distopt_state`` describes it); such a record holds just those elements.
The trainer-level state (progress, LR schedule, RNG, small objects) is a pickled file next to it, with
its own CRC-32C here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from megatron_unicron.transition.transfer_plan import Box

FORMAT = 2  # 2: CRC-32C checksums (1: zlib CRC-32)
SLOTS = ("a", "b")

_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool)
}  # fmt: skip


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the manifest's spelling)."""
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"snapshots do not support tensors of dtype {dtype}")
    return name


def dtype_of(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} in a snapshot manifest") from None


@dataclass(frozen=True, kw_only=True)
class ShardRecord:
    """Where one shard lies in a slot's data file (the same for every snapshot of a layout)."""

    key: str
    box: Box
    global_shape: tuple[int, ...]
    dtype: str
    offset: int
    nbytes: int
    flat: tuple[int, int] | None = None
    """For a flat range of the box (DistributedOptimizer state): its C-order elements ``[start, stop)``."""

    def __post_init__(self) -> None:
        if len(self.box) != len(self.global_shape):
            raise ValueError(f"shard {self.key}: box {self.box} does not match shape {self.global_shape}")
        if any(not 0 <= a <= b for a, b in self.box):
            raise ValueError(f"shard {self.key}: bad box {self.box}")
        numel = 1
        for a, b in self.box:
            numel *= b - a
        if self.flat is not None:
            start, stop = self.flat
            if not 0 <= start <= stop <= numel:
                raise ValueError(f"shard {self.key}: flat range {self.flat} outside box {self.box}")
            numel = stop - start
        if numel * dtype_of(self.dtype).itemsize != self.nbytes:
            raise ValueError(f"shard {self.key}: {self.nbytes} bytes do not fit {self.dtype} box {self.box}")
        if self.offset < 0:
            raise ValueError(f"shard {self.key}: negative offset {self.offset}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON (``flat`` only for a flat range)."""
        data = {"key": self.key, "box": self.box, "global_shape": self.global_shape, "dtype": self.dtype,
                "offset": self.offset, "nbytes": self.nbytes}  # fmt: skip
        if self.flat is not None:
            data["flat"] = self.flat
        return data

    @property
    def shape(self) -> tuple[int, ...]:
        """The shard's local shape: its box's extent, or the length of its flat range."""
        if self.flat is not None:
            return (self.flat[1] - self.flat[0],)
        return tuple(b - a for a, b in self.box)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardRecord:
        """Inverse of :meth:`to_dict` (JSON lists back to tuples)."""
        return cls(
            key=data["key"],
            box=tuple((int(a), int(b)) for a, b in data["box"]),
            global_shape=tuple(int(n) for n in data["global_shape"]),
            dtype=data["dtype"],
            offset=int(data["offset"]),
            nbytes=int(data["nbytes"]),
            flat=(int(data["flat"][0]), int(data["flat"][1])) if data.get("flat") is not None else None,
        )


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """A complete snapshot slot of one launch rank."""

    job: str
    node: str
    """The node whose worker wrote the snapshot (for a replica: the source node)."""
    launch_rank: int
    slot: str
    iteration: int
    """Committed iterations the snapshot holds (the state at the start of iteration ``iteration + 1``)."""
    generation: int
    sequence: int
    """Increases with every snapshot of this launch rank: orders two snapshots of the same iteration."""
    layout: tuple[int, int, int]
    """(tp, pp, dp) of the generation that wrote it."""
    coords: tuple[int, int, int]
    """(tp_rank, pp_rank, dp_rank) of the writer in that layout."""
    data_bytes: int
    state_bytes: int
    state_crc: int
    shards: tuple[ShardRecord, ...]
    crcs: tuple[int, ...]
    """CRC-32C of each shard's bytes."""
    created: float
    format: int = FORMAT

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise ValueError(f"snapshot manifest format {self.format} is not {FORMAT}")
        if self.slot not in SLOTS:
            raise ValueError(f"snapshot slot must be one of {SLOTS}, got {self.slot!r}")
        if self.iteration < 0 or self.launch_rank < 0 or self.sequence < 0:
            raise ValueError("snapshot iteration, launch rank and sequence must be >= 0")
        if min(self.layout) < 1 or len(self.layout) != 3 or len(self.coords) != 3:
            raise ValueError(f"bad snapshot layout {self.layout} / coords {self.coords}")
        if len(self.crcs) != len(self.shards):
            raise ValueError(f"{len(self.crcs)} checksums for {len(self.shards)} shards")
        end = max((s.offset + s.nbytes for s in self.shards), default=0)
        if end > self.data_bytes:
            raise ValueError(f"snapshot shards end at byte {end}, past the data size {self.data_bytes}")

    @property
    def position(self) -> tuple[int, int, int, int]:
        """(tp_size, pp_size, tp_rank, pp_rank): the RNG streams of a rank depend on these."""
        return (self.layout[0], self.layout[1], self.coords[0], self.coords[1])

    def to_json(self, shards: str | None = None) -> str:
        """The manifest file's text; ``shards``: :func:`shards_json` of its shards, when already known."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "shards"}
        text = json.dumps(data, sort_keys=True)
        return f'{text[:-1]}, "shards": {shards if shards is not None else shards_json(self.shards)}}}'

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse a manifest file; ValueError if it is not one."""
        try:
            data = json.loads(text)
            data["shards"] = tuple(ShardRecord.from_dict(s) for s in data["shards"])
            data["crcs"] = tuple(int(c) for c in data["crcs"])
            data["layout"] = tuple(data["layout"])
            data["coords"] = tuple(data["coords"])
            return cls(**data)
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"not a snapshot manifest: {e}") from None


def shards_json(shards: tuple[ShardRecord, ...] | list[ShardRecord]) -> str:
    """The JSON of a shard list (the same for every snapshot of a layout: writers compute it once)."""
    return json.dumps([s.to_dict() for s in shards])


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Create or truncate ``path`` and write ``data`` (unbuffered: three system calls)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def write_atomically(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``path`` so that a reader sees the old file or the whole new one, never part of it."""
    tmp = f"{os.fspath(path)}.tmp"
    write_bytes(tmp, data)
    os.replace(tmp, path)


def read_manifest(path: Path) -> Manifest | None:
    """The manifest at ``path``; None when it is absent or unreadable (a slot being rewritten)."""
    try:
        return Manifest.from_json(path.read_bytes())
    except (OSError, ValueError):
        return None
