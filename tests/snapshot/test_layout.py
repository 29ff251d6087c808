"""Manifests, the two-slot discipline and which directories a process serves (pure, fast)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_unicron.events import Action, Decision, LayoutSpec
from megatron_unicron.snapshot.ladder import is_current, served_directories
from megatron_unicron.snapshot.layout import SlotDirectory, rank_dir, replica_dir
from megatron_unicron.snapshot.manifest import Manifest, ShardRecord, read_manifest


def manifest(slot: str = "a", sequence: int = 0, iteration: int = 5, generation: int = 0) -> Manifest:
    shard = ShardRecord(key="w", box=((0, 2), (4, 8)), global_shape=(2, 8), dtype="float32", offset=0,
                        nbytes=32)
    return Manifest(job="j", node="node0", launch_rank=3, slot=slot, iteration=iteration,
                    generation=generation, sequence=sequence, layout=(2, 2, 1), coords=(1, 1, 0),
                    data_bytes=64, state_bytes=10, state_crc=7, shards=(shard,), crcs=(123,), created=1.0)


def test_manifest_round_trips_through_json() -> None:
    m = manifest()
    assert Manifest.from_json(m.to_json()) == m
    assert m.position == (2, 2, 1, 1)


@pytest.mark.parametrize(
    "change, problem",
    [
        (dict(slot="c"), "slot"),
        (dict(iteration=-1), ">= 0"),
        (dict(data_bytes=16), "past the data size"),
        (dict(layout=(0, 2, 1)), "layout"),
        (dict(crcs=()), "checksums"),
    ],
)
def test_a_bad_manifest_is_refused(change: dict, problem: str) -> None:
    base = manifest().__dict__ | change
    with pytest.raises(ValueError, match=problem):
        Manifest(**base)


def test_a_shard_record_checks_its_size() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        ShardRecord(key="w", box=((0, 2),), global_shape=(2,), dtype="float32", offset=0, nbytes=4)


def test_garbage_is_no_manifest(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"not": "a manifest"}')
    (tmp_path / "b.json").write_text("{torn")
    assert read_manifest(tmp_path / "a.json") is None and read_manifest(tmp_path / "b.json") is None
    assert SlotDirectory(tmp_path).manifests() == []


def test_slots_alternate_and_the_older_one_is_invalidated_first(tmp_path: Path) -> None:
    d = SlotDirectory(tmp_path / "rank3")
    assert d.newest() is None and d.next_sequence() == 0
    first = d.open_slot()
    d.commit(manifest(slot=first, sequence=0, iteration=1))
    second = d.open_slot()
    assert second != first
    d.commit(manifest(slot=second, sequence=1, iteration=2))
    assert [m.iteration for m in d.manifests()] == [2, 1] and d.next_sequence() == 2
    third = d.open_slot()  # the older slot (iteration 1) loses its manifest before it is rewritten
    assert third == first and not d.manifest_path(third).exists()
    assert [m.iteration for m in d.manifests()] == [2]


def decision(live: tuple[int, ...], rank_node: dict[int, str]) -> Decision:
    return Decision(job="j", generation=1, action=Action.RESTART, incident="1",
                    layout=LayoutSpec(tp=1, pp=1, dp=2), members=live[:2], live=live, rank_node=rank_node)


def test_each_directory_has_one_server(tmp_path: Path) -> None:
    node = tmp_path / "node0"
    for r in (0, 1, 2):
        rank_dir(node, r).mkdir(parents=True)
    replica_dir(node, "node1", 5).mkdir(parents=True)
    nodes = {0: "node0", 1: "node0", 2: "node0", 3: "node1", 4: "node1", 5: "node1"}
    d = decision((1, 2, 3, 4), nodes)  # rank 0 (node0) and 5 (node1) are gone
    served = {r: served_directories(node, d, launch_rank=r, node="node0") for r in (1, 2)}
    assert served[1] == [rank_dir(node, 0), rank_dir(node, 1), replica_dir(node, "node1", 5)]
    assert served[2] == [rank_dir(node, 2)]


def test_snapshots_beyond_a_later_rollback_are_ignored() -> None:
    rollbacks = [(3, 10)]  # generation 3 resumed at iteration 10
    assert is_current(manifest(iteration=12, generation=3), rollbacks)  # written after the rollback
    assert is_current(manifest(iteration=10, generation=1), rollbacks)  # the past it resumed from
    assert not is_current(manifest(iteration=11, generation=2), rollbacks)  # an abandoned future
