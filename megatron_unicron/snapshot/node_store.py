"""The agent's side of snapshots: it owns the node's snapshot directory and replicates it to a peer.

Workers write their snapshots into the directory the agent creates and names in their environment
(``UNICRON_SNAPSHOT_DIR``); the files live in shared memory, so they outlive a worker that crashes and
are there for its restart. With more than one node the agent also runs a receiver for its peer's
replicas (address published in the store under the job's keys) and a sender that streams every new
snapshot of its own ranks to node (k+1) mod nnodes. When the job ends for the node (done, stopped or
failed: the agent's ``run()`` returns) the directory is removed; it is never removed earlier, since a
restarted worker may need it.
"""

from __future__ import annotations

import logging
import shutil
import socket
from pathlib import Path

from megatron_unicron.snapshot.layout import DIR_ENV, node_dir
from megatron_unicron.snapshot.replication import ReplicaReceiver, ReplicaSender
from megatron_unicron.store import Store

logger = logging.getLogger(__name__)


def receiver_key(job: str, node: str) -> str:
    """Store key holding ``host:port`` of ``node``'s replica receiver."""
    return f"unicron/{job}/snapshot/receiver/{node}"


def local_address(toward: str) -> str:
    """This machine's address on the route to ``toward`` (loopback when ``toward`` is loopback)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((toward, 9))  # no packet is sent: this only picks the outgoing interface
            return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"


class NodeSnapshots:
    """One node's snapshot directory, its replica receiver and its sender."""

    def __init__(
        self, *, job: str, node_rank: int, nnodes: int, store: Store, master_addr: str,
        root: Path | None = None, poll_s: float = 0.2,
    ) -> None:
        self.job = job
        self.node = f"node{node_rank}"
        self.peer = f"node{(node_rank + 1) % nnodes}" if nnodes > 1 else None
        self.directory = node_dir(job, self.node, root)
        self._store = store
        self._master_addr = master_addr
        self._poll_s = poll_s
        self.receiver: ReplicaReceiver | None = None
        self.sender: ReplicaSender | None = None
        self._sender_store: Store | None = None

    def worker_env(self) -> dict[str, str]:
        """What the node's workers need in their environment."""
        return {DIR_ENV: str(self.directory)}

    def start(self) -> None:
        """Create the directory; with a peer node, start receiving and sending replicas."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.peer is None:
            return
        self.receiver = ReplicaReceiver(self.directory, local_address(self._master_addr))
        self.receiver.start()
        host, port = self.receiver.address
        self._store.set(receiver_key(self.job, self.node), f"{host}:{port}")
        self._sender_store = self._store.clone()
        self.sender = ReplicaSender(self.directory, self.node, self._peer_address, poll_s=self._poll_s)
        self.sender.start()
        logger.info("snapshots of %s in %s; replicas go to %s, received on %s:%d",
                    self.node, self.directory, self.peer, host, port)  # fmt: skip

    def _peer_address(self) -> tuple[str, int] | None:
        assert self._sender_store is not None and self.peer is not None
        raw = self._sender_store.try_get(receiver_key(self.job, self.peer))
        if raw is None:
            return None
        host, _, port = raw.decode().rpartition(":")
        return host, int(port)

    def close(self) -> None:
        """Stop replication and remove the node's directory (the job ended for this node)."""
        if self.sender is not None:
            self.sender.close()
        if self.receiver is not None:
            self.receiver.close()
        if self._sender_store is not None:
            self._sender_store.close()
        shutil.rmtree(self.directory, ignore_errors=True)
        try:
            self.directory.parent.rmdir()  # the job's directory, once every node of this machine left
        except OSError:
            pass
