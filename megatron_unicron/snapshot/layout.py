"""Where snapshots live in node-local shared memory, and the two-slot discipline that keeps one valid.

::

    <root>/<job>/<node>/                       the node's snapshot directory (UNICRON_SNAPSHOT_DIR),
        rank<R>/                               owned by the node's agent
            a.data  a.state  a.json            slot a: shard bytes, pickled trainer state, manifest
            b.data  b.state  b.json            slot b
        replicas/<source node>/rank<R>/        the same, received from a peer node's agent

``<root>`` is ``/dev/shm/unicron`` (``UNICRON_SNAPSHOT_ROOT`` overrides it, e.g. for tests). Each slot
has its own manifest, present only while the slot is complete: a writer deletes the manifest of the
slot it is about to overwrite (the older one), writes the data, then writes the manifest atomically. A
crash at any point leaves the other slot and its manifest untouched, and a slot without a manifest is
never read. Two manifests also give a history of two snapshots per rank.

The files are in tmpfs, so writes are visible to every process at once and outlive the writer; no
fsync is needed for a process crash (a lost node loses its memory anyway: that is what the replica on
a peer node is for).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from megatron_unicron.snapshot.manifest import SLOTS, Manifest, read_manifest, write_atomically, write_bytes

ROOT_ENV = "UNICRON_SNAPSHOT_ROOT"
"""Overrides the root of every job's snapshots (default ``/dev/shm/unicron``)."""
DIR_ENV = "UNICRON_SNAPSHOT_DIR"
"""The node's snapshot directory; the agent sets it for its workers."""
DEFAULT_ROOT = "/dev/shm/unicron"
REPLICAS = "replicas"
_RANK_DIR = re.compile(r"^rank(\d+)$")


def snapshot_root() -> Path:
    """The root of every job's snapshot directories."""
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def node_dir(job: str, node: str, root: Path | None = None) -> Path:
    """``<root>/<job>/<node>``."""
    return (root if root is not None else snapshot_root()) / job / node


def rank_dir(node_directory: Path, launch_rank: int) -> Path:
    """The directory of one launch rank's own snapshots."""
    return node_directory / f"rank{launch_rank}"


def replica_dir(node_directory: Path, source_node: str, launch_rank: int) -> Path:
    """Where this node keeps the replica of ``source_node``'s rank ``launch_rank``."""
    return node_directory / REPLICAS / source_node / f"rank{launch_rank}"


def rank_dirs(parent: Path) -> dict[int, Path]:
    """The ``rank<R>`` directories directly under ``parent``, by launch rank."""
    found: dict[int, Path] = {}
    try:
        entries = list(parent.iterdir())
    except OSError:
        return found
    for entry in entries:
        match = _RANK_DIR.match(entry.name)
        if match and entry.is_dir():
            found[int(match.group(1))] = entry
    return found


def replica_dirs(node_directory: Path) -> dict[tuple[str, int], Path]:
    """Every replica this node holds, by (source node, launch rank)."""
    found: dict[tuple[str, int], Path] = {}
    try:
        sources = [p for p in (node_directory / REPLICAS).iterdir() if p.is_dir()]
    except OSError:
        return found
    for source in sources:
        for rank, path in rank_dirs(source).items():
            found[(source.name, rank)] = path
    return found


class SlotDirectory:
    """The two slots of one rank directory (a worker's own, or a replica)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # File names as strings, joined once: a writer at N = 1 touches them every iteration.
        self._names = {slot: {kind: os.fspath(path / f"{slot}.{kind}") for kind in ("state", "json")}
                       for slot in SLOTS}  # fmt: skip

    def data_path(self, slot: str) -> Path:
        """The slot's shard bytes."""
        return self.path / f"{slot}.data"

    def state_path(self, slot: str) -> Path:
        """The slot's pickled trainer-level state."""
        return self.path / f"{slot}.state"

    def manifest_path(self, slot: str) -> Path:
        """The slot's manifest (present only when the slot is complete)."""
        return self.path / f"{slot}.json"

    def manifests(self) -> list[Manifest]:
        """The complete slots' manifests, newest (highest sequence) first."""
        found = [m for m in (read_manifest(self.manifest_path(s)) for s in SLOTS) if m is not None]
        return sorted(found, key=lambda m: m.sequence, reverse=True)

    def newest(self) -> Manifest | None:
        """The newest complete snapshot, if any."""
        manifests = self.manifests()
        return manifests[0] if manifests else None

    def next_sequence(self) -> int:
        """One more than the newest sequence number on disk."""
        newest = self.newest()
        return newest.sequence + 1 if newest is not None else 0

    def open_slot(self) -> str:
        """Pick the slot to overwrite (one without a manifest, else the older) and invalidate it.

        After this returns, the chosen slot has no manifest: a crash while it is rewritten leaves it
        unreadable, and the other slot is untouched.
        """
        complete = {m.slot: m.sequence for m in self.manifests()}
        missing = [s for s in SLOTS if s not in complete]
        slot = missing[0] if missing else min(complete, key=lambda s: complete[s])
        self.invalidate(slot)
        return slot

    def invalidate(self, slot: str) -> None:
        """Remove ``slot``'s manifest (before its files are rewritten); creates the directory if needed."""
        try:
            os.unlink(self._names[slot]["json"])
        except FileNotFoundError:
            self.path.mkdir(parents=True, exist_ok=True)

    def write_state(self, slot: str, data: bytes) -> None:
        """Replace ``slot``'s pickled trainer state (the slot is invalid meanwhile)."""
        write_bytes(self._names[slot]["state"], data)

    def commit(self, manifest: Manifest, *, shards_json: str | None = None) -> None:
        """Publish a slot whose files are complete (``shards_json``: its shards' JSON, if known)."""
        write_atomically(self._names[manifest.slot]["json"], manifest.to_json(shards_json).encode())
