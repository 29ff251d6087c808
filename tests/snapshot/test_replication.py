"""Replication between two agents' receivers and senders, over real TCP sockets (in one process)."""

from __future__ import annotations

from pathlib import Path

import torch
from snapshot_fixtures import synthetic_shards

from megatron_unicron.snapshot.layout import SlotDirectory, rank_dir, replica_dir
from megatron_unicron.snapshot.reader import load_newest
from megatron_unicron.snapshot.replication import ReplicaReceiver, ReplicaSender, send_snapshot
from megatron_unicron.snapshot.writer import SnapshotRequest, SnapshotWriter


def snapshot(directory: Path, rank: int, *iterations: int) -> None:
    writer = SnapshotWriter(SlotDirectory(directory), job="j", node="node0", launch_rank=rank)
    metas, _ = synthetic_shards()
    for i in iterations:
        writer.submit(SnapshotRequest(iteration=i, generation=0, layout=(1, 1, 2), coords=(0, 0, rank),
                                      metas=metas, tensors=synthetic_shards(seed=i)[1], state={"i": i}))
    writer.close()


def test_the_peer_keeps_a_verified_copy_of_each_new_snapshot(tmp_path: Path) -> None:
    source, peer = tmp_path / "node0", tmp_path / "node1"
    receiver = ReplicaReceiver(peer, "127.0.0.1")
    receiver.start()
    try:
        sender = ReplicaSender(source, "node0", lambda: receiver.address)
        snapshot(rank_dir(source, 0), 0, 1)
        snapshot(rank_dir(source, 1), 1, 1)
        assert sender.send_new() == 2
        assert sender.send_new() == 0  # nothing new: nothing sent
        snapshot(rank_dir(source, 0), 0, 2)
        assert sender.send_new() == 1
        for rank, newest in ((0, 2), (1, 1)):
            replica = load_newest(replica_dir(peer, "node0", rank))
            assert replica is not None and replica.corrupt == [] and replica.state == {"i": newest}
            assert replica.manifest.node == "node0" and replica.manifest.launch_rank == rank
            assert all(torch.equal(a, b) for a, b in zip(replica.tensors, synthetic_shards(seed=newest)[1]))
        assert receiver.received == 3
    finally:
        receiver.close()


def test_a_torn_or_corrupt_stream_is_refused_and_the_previous_replica_stays(tmp_path: Path) -> None:
    source, peer = tmp_path / "node0", tmp_path / "node1"
    receiver = ReplicaReceiver(peer, "127.0.0.1")
    receiver.start()
    try:
        snapshot(rank_dir(source, 0), 0, 1)
        directory = SlotDirectory(rank_dir(source, 0))
        assert send_snapshot(receiver.address, "node0", directory, directory.manifests()[0]) == (True, "")
        snapshot(rank_dir(source, 0), 0, 1, 2)
        newest = directory.manifests()[0]
        with open(directory.data_path(newest.slot), "r+b") as f:  # as if the slot were reused mid-send
            f.seek(newest.shards[0].offset)
            f.write(b"\xff\xff")
        ok, reason = send_snapshot(receiver.address, "node0", directory, newest)
        assert not ok and "fails its checksum" in reason and receiver.refused == 1
        kept = load_newest(replica_dir(peer, "node0", 0))
        assert kept is not None and kept.state == {"i": 1} and kept.corrupt == []
    finally:
        receiver.close()
