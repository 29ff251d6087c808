"""Reads snapshot slots back into private memory and verifies every shard against its CRC-32C.

A slot is read only through its manifest (present only when the slot is complete). Its bytes are first
copied into private memory, then checksummed, so that what was verified is exactly what is served even
if the slot is rewritten afterwards. A shard whose checksum fails is reported and left out (the next
rung of the ladder serves it); a trainer state that fails its checksum makes the snapshot's small state
unavailable, not its shards. Flat-range records (DistributedOptimizer state) come back as 1-D tensors
described by ``FlatMeta``, apart from the boxes.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_unicron.checksum import crc32c
from megatron_unicron.megatron.distopt_state import FlatMeta
from megatron_unicron.megatron.state import ShardMeta
from megatron_unicron.snapshot.layout import SlotDirectory
from megatron_unicron.snapshot.manifest import Manifest, ShardRecord, dtype_of, read_manifest

logger = logging.getLogger(__name__)


@dataclass
class LoadedSnapshot:
    """The verified content of one snapshot slot."""

    manifest: Manifest
    path: Path
    metas: list[ShardMeta]
    tensors: list[torch.Tensor]
    corrupt: list[str] = field(default_factory=list)
    """Keys (with boxes) of shards that failed their checksum and were left out."""
    state: dict[str, Any] | None = None
    """The trainer-level state, None when its file failed its checksum."""
    flat_metas: list[FlatMeta] = field(default_factory=list)
    """The verified DistributedOptimizer shards (flat ranges of boxes)."""
    flat_tensors: list[torch.Tensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Bytes of the verified shards."""
        return sum(t.numel() * t.element_size() for t in [*self.tensors, *self.flat_tensors])


def _read(path: Path, size: int) -> bytearray:
    buffer = bytearray(size)
    with open(path, "rb", buffering=0) as f:
        view = memoryview(buffer)
        done = 0
        while done < size:
            count = f.readinto(view[done:])
            if not count:
                raise OSError(f"{path} ends after {done} of {size} bytes")
            done += count
    return buffer


def _shard_meta(record: ShardRecord) -> ShardMeta:
    return ShardMeta(record.key, record.box, record.global_shape, dtype_of(record.dtype))


def load_slot(directory: SlotDirectory, manifest: Manifest) -> LoadedSnapshot | None:
    """Copy one complete slot into memory and verify it; None when its files cannot be read."""
    slot = manifest.slot
    try:
        data = _read(directory.data_path(slot), manifest.data_bytes)
        state_bytes = _read(directory.state_path(slot), manifest.state_bytes)
    except OSError as error:
        logger.warning("unicron: snapshot %s slot %s unreadable: %s", directory.path, slot, error)
        return None
    if read_manifest(directory.manifest_path(slot)) != manifest:  # rewritten meanwhile: the copy may be torn
        return None
    whole = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    loaded = LoadedSnapshot(manifest=manifest, path=directory.path, metas=[], tensors=[])
    for record, crc in zip(manifest.shards, manifest.crcs):
        chunk = memoryview(data)[record.offset : record.offset + record.nbytes]
        if crc32c(chunk) != crc:
            loaded.corrupt.append(f"{record.key} {record.box}")
            continue
        piece = whole[record.offset : record.offset + record.nbytes].view(dtype_of(record.dtype))
        if record.flat is not None:
            loaded.flat_metas.append(
                FlatMeta(record.key, record.box, record.global_shape, dtype_of(record.dtype), record.flat)
            )
            loaded.flat_tensors.append(piece)
            continue
        loaded.metas.append(_shard_meta(record))
        loaded.tensors.append(piece.view(record.shape))
    if crc32c(state_bytes) == manifest.state_crc:
        loaded.state = pickle.loads(state_bytes)
    else:
        loaded.corrupt.append("trainer state")
    if loaded.corrupt:
        logger.warning(
            "unicron: snapshot %s (iteration %d) fails its checksum for %d item(s), skipped: %s",
            directory.path, manifest.iteration, len(loaded.corrupt), ", ".join(loaded.corrupt[:3]),
        )  # fmt: skip
    return loaded


def load_newest(path: Path, *, iteration: int | None = None) -> LoadedSnapshot | None:
    """The newest complete snapshot in a rank directory (of ``iteration`` when given), verified."""
    directory = SlotDirectory(path)
    for manifest in directory.manifests():
        if iteration is None or manifest.iteration == iteration:
            return load_slot(directory, manifest)
    return None
