"""The background writer and the verifying reader: exact round trips, checksums, crash consistency."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from snapshot_fixtures import synthetic_shards

from megatron_unicron.megatron.distopt_state import FlatMeta
from megatron_unicron.snapshot.layout import SlotDirectory
from megatron_unicron.snapshot.manifest import Manifest, ShardRecord
from megatron_unicron.snapshot.reader import load_newest, load_slot
from megatron_unicron.snapshot.writer import COPY_DELAY_ENV, CopyDelay, SnapshotRequest, SnapshotWriter


def request(iteration: int, metas, tensors, **state) -> SnapshotRequest:
    return SnapshotRequest(iteration=iteration, generation=0, layout=(2, 2, 1), coords=(1, 0, 0), metas=metas,
                           tensors=tensors, state={"iteration": iteration, **state})


def write(directory: Path, *requests: SnapshotRequest) -> SnapshotWriter:
    writer = SnapshotWriter(SlotDirectory(directory), job="j", node="node0", launch_rank=1)
    for r in requests:
        writer.submit(r)
        writer.wait()
    return writer


def test_a_snapshot_reads_back_exactly(tmp_path: Path) -> None:
    metas, tensors = synthetic_shards()
    writer = write(tmp_path, request(7, metas, tensors, note="hello"))
    writer.close()
    loaded = load_newest(tmp_path)
    assert loaded is not None and loaded.corrupt == []
    assert loaded.manifest.iteration == 7 and loaded.manifest.position == (2, 2, 1, 0)
    assert loaded.metas == metas
    for got, want in zip(loaded.tensors, tensors, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert loaded.state == {"iteration": 7, "note": "hello"}


def test_tensors_in_the_trainer_state_round_trip(tmp_path: Path) -> None:
    metas, tensors = synthetic_shards()
    state = {"rng": torch.arange(7, dtype=torch.uint8), "step": torch.tensor(3.0),
             "bf": torch.ones(2, dtype=torch.bfloat16), "strided": torch.arange(12.0).view(3, 4).t()}
    write(tmp_path, request(1, metas, tensors, **state)).close()
    loaded = load_newest(tmp_path)
    assert loaded is not None and loaded.state is not None
    for key, value in state.items():
        assert loaded.state[key].dtype == value.dtype and torch.equal(loaded.state[key], value), key


def test_the_copy_is_taken_when_submitted_not_later(tmp_path: Path) -> None:
    metas, tensors = synthetic_shards()
    expected = [t.clone() for t in tensors]
    writer = write(tmp_path, request(1, metas, tensors))
    for t in tensors:  # what the optimizer step does after the before-step wait
        t.add_(1)
    writer.close()
    loaded = load_newest(tmp_path)
    assert loaded is not None
    assert all(torch.equal(a, b) for a, b in zip(loaded.tensors, expected))


def test_two_slots_keep_the_two_newest_snapshots(tmp_path: Path) -> None:
    metas, _ = synthetic_shards()
    writer = write(tmp_path, *(request(i, metas, synthetic_shards(seed=i)[1]) for i in (1, 2, 3)))
    writer.close()
    directory = SlotDirectory(tmp_path)
    assert [m.iteration for m in directory.manifests()] == [3, 2]
    for m in directory.manifests():
        loaded = load_slot(directory, m)
        assert loaded is not None and loaded.state == {"iteration": m.iteration}
        assert all(torch.equal(a, b) for a, b in zip(loaded.tensors, synthetic_shards(seed=m.iteration)[1]))
    # a restarted writer continues the sequence and overwrites the older slot
    write(tmp_path, request(4, metas, synthetic_shards(seed=4)[1])).close()
    assert [m.iteration for m in directory.manifests()] == [4, 3]


def test_a_corrupt_byte_is_detected_and_only_that_shard_is_skipped(tmp_path: Path) -> None:
    metas, tensors = synthetic_shards()
    write(tmp_path, request(1, metas, tensors)).close()
    directory = SlotDirectory(tmp_path)
    (m,) = directory.manifests()
    victim = m.shards[2]
    with open(directory.data_path(m.slot), "r+b") as f:
        f.seek(victim.offset + 5)
        byte = f.read(1)
        f.seek(victim.offset + 5)
        f.write(bytes([byte[0] ^ 0x40]))
    loaded = load_slot(directory, m)
    assert loaded is not None
    assert loaded.corrupt == [f"{victim.key} {victim.box}"]
    assert [meta.key for meta in loaded.metas] == [s.key for s in m.shards if s is not victim]
    assert loaded.state is not None
    with open(directory.state_path(m.slot), "r+b") as f:
        f.write(b"\0")
    assert load_slot(directory, m).state is None  # type: ignore[union-attr]


def test_the_copy_delay_knob_parses_and_applies_once(tmp_path: Path) -> None:
    assert CopyDelay.parse("") == CopyDelay()
    delay = CopyDelay.parse("2.5@4:3")
    assert delay == CopyDelay(2.5, 4, 3)
    assert delay.applies(4, 3, tmp_path)
    assert not delay.applies(5, 3, tmp_path) and not delay.applies(4, 2, tmp_path)
    (tmp_path / "b.copying").write_text("4")
    assert not delay.applies(4, 3, tmp_path)  # a killed writer's marker: its restart copies at full speed
    with pytest.raises(ValueError, match=COPY_DELAY_ENV):
        CopyDelay.parse("soon")


CHILD = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from snapshot_fixtures import synthetic_shards
from megatron_unicron.snapshot.layout import SlotDirectory
from megatron_unicron.snapshot.writer import SnapshotRequest, SnapshotWriter
writer = SnapshotWriter(SlotDirectory(Path({path!r})), job="j", node="node0", launch_rank=1)
metas, _ = synthetic_shards()
for i in (1, 2):
    writer.submit(SnapshotRequest(iteration=i, generation=0, layout=(1, 1, 1), coords=(0, 0, 0), metas=metas,
                                  tensors=synthetic_shards(seed=i)[1], state={{"iteration": i}}))
    writer.wait()
print("unreachable: the copy of iteration 2 sleeps until killed", flush=True)
time.sleep(60)
"""


@pytest.mark.timeout(60)
def test_a_writer_killed_mid_copy_leaves_the_previous_snapshot_valid(tmp_path: Path) -> None:
    tests = str(Path(__file__).resolve().parent)
    env = dict(os.environ, **{COPY_DELAY_ENV: "60@2"})
    env["PYTHONPATH"] = os.pathsep.join([str(Path(tests).parents[1]), env.get("PYTHONPATH", "")])
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(tests=tests, path=str(tmp_path))], env=env)
    try:
        deadline = time.monotonic() + 45
        while not list(tmp_path.glob("*.copying")):
            assert child.poll() is None and time.monotonic() < deadline, "the delayed copy never started"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        child.kill()
    (marker,) = tmp_path.glob("*.copying")
    torn = marker.name[0]
    assert marker.read_text() == "2"  # the kill landed while iteration 2 was being copied into `torn`
    directory = SlotDirectory(tmp_path)
    assert not directory.manifest_path(torn).exists()  # the torn slot is never offered
    (m,) = directory.manifests()
    assert (m.slot, m.iteration) != (torn, 2) and m.iteration == 1
    loaded = load_slot(directory, m)
    assert loaded is not None and loaded.corrupt == []
    assert all(torch.equal(a, b) for a, b in zip(loaded.tensors, synthetic_shards(seed=1)[1], strict=True))
    # proof that it was mid-copy: the torn slot holds the first half of iteration 2 and nothing after it
    new = synthetic_shards(seed=2)[1]
    raw = directory.data_path(torn).read_bytes()
    offsets = [s.offset for s in m.shards]
    first = new[0].contiguous().view(torch.uint8).view(-1).numpy().tobytes()
    last = new[-1].contiguous().view(torch.uint8).view(-1).numpy().tobytes()
    assert raw[offsets[0] : offsets[0] + len(first)] == first
    assert raw[offsets[-1] : offsets[-1] + len(last)] != last


def flat_shards() -> tuple[list[FlatMeta], list[torch.Tensor]]:
    """DistributedOptimizer-style shards: elements [3, 17) of a (4, 6) box, [0, 5) of a 1-D one."""
    metas = [FlatMeta("optimizer.state.exp_avg.w", ((0, 4), (6, 12)), (4, 12), torch.float32, (3, 17)),
             FlatMeta("optimizer.state.exp_avg_sq.b", ((0, 8),), (8,), torch.float32, (0, 5))]  # fmt: skip
    return metas, [torch.arange(14.0), torch.arange(5.0) * -1]


def test_flat_ranges_of_a_distributed_optimizer_read_back_after_the_boxes(tmp_path: Path) -> None:
    metas, tensors = synthetic_shards()
    flat_metas, flat_tensors = flat_shards()
    writer = write(tmp_path, SnapshotRequest(iteration=3, generation=0, layout=(1, 2, 2), coords=(0, 1, 1),
                                             metas=metas, tensors=tensors, state={"adam_step": 3.0},
                                             flat_metas=flat_metas, flat_tensors=flat_tensors))  # fmt: skip
    writer.close()
    directory = SlotDirectory(tmp_path)
    (m,) = directory.manifests()
    assert [s.flat for s in m.shards] == [None] * len(metas) + [(3, 17), (0, 5)]
    assert Manifest.from_json(m.to_json()) == m
    loaded = load_slot(directory, m)
    assert loaded is not None and loaded.corrupt == []
    assert loaded.metas == metas and loaded.flat_metas == flat_metas
    assert all(torch.equal(a, b) for a, b in zip(loaded.flat_tensors, flat_tensors, strict=True))
    victim = m.shards[-2]  # a corrupt flat range is left out like a box
    with open(directory.data_path(m.slot), "r+b") as f:
        f.seek(victim.offset + 1)
        f.write(b"\xff")
    loaded = load_slot(directory, m)
    assert loaded is not None and loaded.flat_metas == flat_metas[1:] and len(loaded.flat_tensors) == 1
    assert loaded.corrupt == [f"{victim.key} {victim.box}"]


def test_a_flat_range_must_fit_its_box_and_its_bytes() -> None:
    record = dict(key="k", box=((0, 4), (0, 6)), global_shape=(4, 6), dtype="float32", offset=0)
    assert ShardRecord(**record, nbytes=40, flat=(2, 12)).shape == (10,)
    with pytest.raises(ValueError, match="flat range"):
        ShardRecord(**record, nbytes=40, flat=(20, 30))
    with pytest.raises(ValueError, match="bytes"):
        ShardRecord(**record, nbytes=96, flat=(2, 12))
