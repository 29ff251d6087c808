"""Replication of a node's snapshots to one peer node's agent, over TCP.

Each agent runs a :class:`ReplicaReceiver` (a threaded TCP server whose address is published in the
store) and a :class:`ReplicaSender` thread. The sender watches its node's rank directories; whenever a
rank has a newer complete snapshot it streams it to the peer (node k sends to node (k+1) mod nnodes),
file by file in fixed-size chunks, so memory stays bounded whatever the snapshot's size. The receiver
writes it into ``replicas/<source node>/rank<R>/`` with the same two-slot discipline as a worker, then
checks every shard's CRC-32C against the manifest and publishes the manifest only if all match: a snapshot
torn by its writer while it was being sent (its slot reused) is refused and the previous replica stays.

Wire format, per snapshot: an 8-byte big-endian length and a JSON header ``{"source", "manifest"}``,
then the data file's bytes, then the state file's bytes; the receiver answers one JSON line
``{"ok": bool, "reason": str}``.
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import struct
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from megatron_unicron.checksum import crc32c
from megatron_unicron.snapshot.layout import SlotDirectory, rank_dirs, replica_dir
from megatron_unicron.snapshot.manifest import Manifest

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
_LENGTH = struct.Struct(">Q")
MAX_HEADER = 64 << 20


def _recv_exactly(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if data is None or len(data) != size:
        raise ConnectionError(f"peer closed the stream after {len(data or b'')} of {size} bytes")
    return data


def _copy_stream(source: BinaryIO, target: BinaryIO, size: int) -> None:
    left = size
    while left:
        chunk = source.read(min(CHUNK, left))
        if not chunk:
            raise ConnectionError(f"stream ended {left} bytes early")
        target.write(chunk)
        left -= len(chunk)


def _crc_of_range(f: BinaryIO, offset: int, size: int) -> int:
    f.seek(offset)
    crc, left = 0, size
    while left:
        chunk = f.read(min(CHUNK, left))
        if not chunk:
            break
        crc = crc32c(chunk, crc)
        left -= len(chunk)
    return crc


def verify_files(directory: SlotDirectory, manifest: Manifest) -> str | None:
    """Check a slot's files against ``manifest`` (in chunks); the first problem found, or None."""
    with open(directory.data_path(manifest.slot), "rb") as f:
        for shard, crc in zip(manifest.shards, manifest.crcs):
            if _crc_of_range(f, shard.offset, shard.nbytes) != crc:
                return f"shard {shard.key} {shard.box} fails its checksum"
    with open(directory.state_path(manifest.slot), "rb") as f:
        if _crc_of_range(f, 0, manifest.state_bytes) != manifest.state_crc:
            return "the trainer state fails its checksum"
    return None


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        try:
            reply = self.server.receiver.receive(self.rfile)  # type: ignore[arg-type]
        except (OSError, ValueError, ConnectionError) as error:
            reply = {"ok": False, "reason": f"{type(error).__name__}: {error}"}
        try:
            self.wfile.write((json.dumps(reply) + "\n").encode())
        except OSError:
            pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    receiver: ReplicaReceiver


class ReplicaReceiver:
    """Accepts snapshots of other nodes and keeps them under ``<node dir>/replicas``."""

    def __init__(self, node_directory: Path, host: str) -> None:
        self.node_directory = node_directory
        self._server = _Server((host, 0), _Handler)
        self._server.receiver = self
        self._locks: dict[tuple[str, int], threading.Lock] = {}
        self._guard = threading.Lock()
        self._thread = threading.Thread(target=self._server.serve_forever, name="unicron-replica-receiver",
                                        kwargs={"poll_interval": 0.2}, daemon=True)  # fmt: skip
        self.received = 0
        self.refused = 0

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` senders connect to."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Serve on a background thread."""
        self._thread.start()

    def close(self) -> None:
        """Stop serving."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def receive(self, stream: BinaryIO) -> dict[str, object]:
        """Read one snapshot from ``stream`` into the replica tree; the reply for the sender."""
        (length,) = _LENGTH.unpack(_recv_exactly(stream, _LENGTH.size))
        if length > MAX_HEADER:
            raise ValueError(f"header of {length} bytes is too large")
        header = json.loads(_recv_exactly(stream, length))
        source = str(header["source"])
        manifest = Manifest.from_json(header["manifest"])
        if "/" in source or source in ("", ".", ".."):
            raise ValueError(f"bad source node name {source!r}")
        key = (source, manifest.launch_rank)
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            directory = SlotDirectory(replica_dir(self.node_directory, source, manifest.launch_rank))
            slot = directory.open_slot()
            with open(directory.data_path(slot), "wb") as f:
                _copy_stream(stream, f, manifest.data_bytes)
            with open(directory.state_path(slot), "wb") as f:
                _copy_stream(stream, f, manifest.state_bytes)
            stored = replace(manifest, slot=slot)
            problem = verify_files(directory, stored)
            if problem is not None:
                self.refused += 1
                return {"ok": False, "reason": problem}
            directory.commit(stored)
        self.received += 1
        return {"ok": True, "reason": ""}


def send_snapshot(address: tuple[str, int], source: str, directory: SlotDirectory, manifest: Manifest,
                  timeout_s: float = 60.0) -> tuple[bool, str]:  # fmt: skip
    """Stream one complete slot to a receiver; ``(accepted, reason)``."""
    header = json.dumps({"source": source, "manifest": manifest.to_json()}).encode()
    with socket.create_connection(address, timeout=timeout_s) as sock, sock.makefile("rwb") as stream:
        stream.write(_LENGTH.pack(len(header)) + header)
        for path, size in ((directory.data_path(manifest.slot), manifest.data_bytes),
                           (directory.state_path(manifest.slot), manifest.state_bytes)):  # fmt: skip
            with open(path, "rb") as f:
                _copy_stream(f, stream, size)  # type: ignore[arg-type]
        stream.flush()
        sock.shutdown(socket.SHUT_WR)
        reply = json.loads(stream.readline() or b'{"ok": false, "reason": "no reply"}')
    return bool(reply.get("ok")), str(reply.get("reason", ""))


class ReplicaSender:
    """Sends every new complete snapshot of this node's ranks to the peer node's receiver."""

    def __init__(
        self, node_directory: Path, node: str, peer_address: Callable[[], tuple[str, int] | None], *,
        poll_s: float = 0.2,
    ) -> None:
        """``peer_address()`` returns the peer receiver's ``(host, port)``, or None while unknown."""
        self.node_directory = node_directory
        self.node = node
        self.peer_address = peer_address
        self.poll_s = poll_s
        self.sent = 0
        self.failed = 0
        self._sent: dict[int, int] = {}  # launch rank -> sequence of the last snapshot accepted
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="unicron-replica-sender", daemon=True)
        self._complained = False

    def start(self) -> None:
        """Start the sender thread."""
        self._thread.start()

    def close(self) -> None:
        """Stop the sender thread (a snapshot being sent is finished first)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.send_new()
            except Exception:  # a replication problem must never take the agent down
                logger.exception("unicron: snapshot replication from %s failed", self.node)

    def send_new(self) -> int:
        """Send every rank's newest snapshot not sent yet; returns how many were accepted."""
        accepted = 0
        for rank, path in sorted(rank_dirs(self.node_directory).items()):
            directory = SlotDirectory(path)
            newest = directory.newest()
            if newest is None or self._sent.get(rank) == newest.sequence:
                continue
            address = self.peer_address()
            if address is None:
                return accepted
            try:
                ok, reason = send_snapshot(address, self.node, directory, newest)
            except OSError as error:
                ok, reason = False, f"{type(error).__name__}: {error}"
            if ok:
                self._sent[rank] = newest.sequence
                self.sent += 1
                accepted += 1
                self._complained = False
            else:
                self.failed += 1
                if not self._complained:
                    logger.warning("unicron: replica of rank %d (iteration %d) not accepted: %s",
                                   rank, newest.iteration, reason)  # fmt: skip
                    self._complained = True
        return accepted
