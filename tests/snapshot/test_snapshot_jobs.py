"""Snapshots with real training through ``unicron-run --unicron`` (TP2 PP2 on 4 gloo ranks).

The reference is an uninterrupted run with snapshots every 2 iterations, persisted every 2 snapshots.
Every other run is compared with its loss curve, bit for bit while the layout is the same: a restarted
rank that resumes from its own snapshot, a rank killed while copying its newest snapshot (everyone rolls
back to the previous one), a run resumed from the checkpoint the snapshots persisted asynchronously, a
lost node whose pipeline stage survives only as replicas on the peer node, and a failed device whose
shards fill a smaller layout from its node's snapshot. Each fault proves it fired.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from megatron_unicron.incident_log import read_log
from megatron_unicron.snapshot.layout import ROOT_ENV, SlotDirectory, rank_dir, replica_dir
from megatron_unicron.snapshot.reader import load_newest
from megatron_unicron.snapshot.writer import COPY_DELAY_ENV
from megatron_unicron.testing.harness import JobResult, assert_no_leaks, run_job, start_job

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "examples/gpt/pretrain_gpt.py")
YAML = str(ROOT / "examples/gpt/configs/tiny_gpt.yaml")
ITERS = 20
# The machine's 2 cores are shared: thresholds that no healthy (if slow) step crosses, so that the only
# incidents are the injected ones (a dead peer is still seen at once: its connections close).
UNICRON = ["--unicron", "--unicron-detection-pg-timeout-s", "3", "--unicron-detection-slow-factor", "20",
           "--unicron-detection-warmup-floor-s", "10", "--unicron-detection-min-timeout-s", "2"]


def run(tmp: Path, name: str, *extra: str, env: dict[str, str] | None = None, unicron: bool = True,
        nproc: int = 4) -> tuple[JobResult, list[dict]]:  # fmt: skip
    metrics = tmp / f"{name}.jsonl"
    argv = [SCRIPT, "--yaml-cfg", YAML, "--train-iters", str(ITERS), "--unicron-metrics-log", str(metrics),
            *(UNICRON + ["--unicron-incident-log", str(tmp / f"{name}.incidents.jsonl")] if unicron else []),
            *extra]  # fmt: skip
    job_env = {ROOT_ENV: str(tmp / "shm"), **(env or {})}
    launcher = ["--unicron", "--shutdown-timeout", "3"] if unicron else []
    result = run_job(argv, nproc_per_node=nproc, launcher_args=launcher, env=job_env, timeout_s=170)
    assert result.returncode == 0, result.output[-5000:]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return result, records


def curve(records: list[dict]) -> dict[int, tuple[float, float]]:
    """Loss and grad norm per iteration (a redone iteration: its last record)."""
    return {r["iteration"]: (r["lm_loss"], r["grad_norm"]) for r in records}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, JobResult, list[dict]]:
    tmp = tmp_path_factory.mktemp("reference")
    snapshots = ["--unicron-snapshot-interval", "2", "--unicron-persist-interval", "2"]
    save = ["--save", str(tmp / "ckpt"), "--save-interval", "1000"]
    result, records = run(tmp, "reference", *snapshots, *save)
    assert read_log(str(tmp / "reference.incidents.jsonl")) == [], "the reference run was interrupted"
    return tmp, result, records


@pytest.mark.timeout(240)
def test_snapshots_leave_training_unchanged_and_leave_nothing_behind(reference) -> None:
    tmp, result, records = reference
    assert [r["iteration"] for r in records] == list(range(1, ITERS + 1))
    assert records[-1]["lm_loss"] < records[0]["lm_loss"] - 0.3
    assert_no_leaks(result, fd_slack=6)
    assert not any((tmp / "shm").iterdir()), "the agent did not remove the job's snapshot directory"


@pytest.mark.timeout(240)
def test_the_persisted_checkpoint_resumes_exactly(reference, tmp_path: Path) -> None:
    tmp, result, base = reference
    assert "persisted iteration 4" in result.stderr, result.stderr[-3000:]
    persisted = tmp / "ckpt" / "iter_0000004"
    assert (persisted / "metadata.json").is_file() and (persisted / ".metadata").is_file()
    resume = tmp_path / "resume"
    resume.mkdir()
    (resume / "iter_0000004").symlink_to(persisted)
    (resume / "latest_checkpointed_iteration.txt").write_text("4")
    _, records = run(tmp_path, "resumed", "--load", str(resume), unicron=False)
    assert [r["iteration"] for r in records] == list(range(5, ITERS + 1))
    expected = curve(base)
    assert {i: v for i, v in curve(records).items()} == {i: expected[i] for i in range(5, ITERS + 1)}


@pytest.mark.timeout(240)
def test_a_restarted_rank_resumes_from_its_own_snapshot(reference, tmp_path: Path) -> None:
    _, _, base = reference
    # TP2 PP2 DP1: rank 3's shards exist nowhere else; no --save, so no checkpoint could help either.
    result, records = run(tmp_path, "sev2", "--unicron-snapshot-interval", "1",
                          "--unicron-inject", "kill:3:5:optimizer")  # fmt: skip
    (incident,) = read_log(str(tmp_path / "sev2.incidents.jsonl"))
    assert incident["t_fault"] is not None and (incident["action"], incident["restart"]) == ("restart", [3])
    assert incident["outcome"] == "resumed"
    assert "resumed after iteration 4" in result.stdout, result.output[-4000:]
    assert "rolls back" not in result.stderr
    assert curve(records) == curve(base)


@pytest.mark.timeout(240)
def test_a_rank_killed_mid_copy_rolls_everyone_back_to_the_previous_snapshot(reference, tmp_path) -> None:
    _, _, base = reference
    # Rank 3's copy of snapshot 4 sleeps 5 s half-way; the kill lands meanwhile (backward of iteration 5).
    result, records = run(tmp_path, "midcopy", "--unicron-snapshot-interval", "1",
                          "--unicron-inject", "kill:3:5:backward", env={COPY_DELAY_ENV: "5@4:3"})  # fmt: skip
    copying = result.stderr.find("[rank3] WARNING megatron_unicron.snapshot.writer: unicron: copying the "
                                 "snapshot of iteration 4")  # fmt: skip
    fired = result.stderr.find("fired kill:3:5:backward")
    assert 0 <= copying < fired, result.stderr[-4000:]
    assert "every member rolls back to the snapshots of iteration 3" in result.stderr
    assert "resumed after iteration 3" in result.stdout, result.output[-4000:]
    assert curve(records) == curve(base)


@pytest.mark.timeout(300)
def test_a_lost_node_comes_back_from_its_replica_on_the_peer_node(reference, tmp_path: Path) -> None:
    _, _, base = reference
    # TP2 PP2 DP1 on two nodes: node1 holds the second pipeline stage and nothing else holds it, except
    # the replicas of its snapshots that its agent streamed to node0's agent.
    metrics = tmp_path / "m.jsonl"
    logs = ["--unicron-incident-log", str(tmp_path / "inc.jsonl"), "--unicron-metrics-log", str(metrics)]
    argv = [SCRIPT, "--yaml-cfg", YAML, "--train-iters", str(ITERS), "--unicron-snapshot-interval", "4"]
    argv += logs + UNICRON
    shm = tmp_path / "shm" / "snaprep"
    launcher = ["--unicron", "--run-id", "snaprep", "--shutdown-timeout", "3"]
    env = {ROOT_ENV: str(tmp_path / "shm")}
    with start_job(argv, nproc_per_node=2, nnodes=2, launcher_args=launcher, env=env, timeout_s=250) as job:
        replicated = None
        deadline = time.monotonic() + 150
        while replicated is None and time.monotonic() < deadline:
            replicas = [load_newest(replica_dir(shm / "node0", "node1", r)) for r in (2, 3)]
            sources = [SlotDirectory(rank_dir(shm / "node1", r)).newest() for r in (2, 3)]
            if all(replicas) and all(sources):
                iterations = {m.manifest.iteration for m in replicas if not m.corrupt}  # type: ignore[union-attr]
                newest = {m.iteration for m in sources}  # type: ignore[union-attr]
                if len(iterations) == 1 and iterations == newest and min(iterations) >= 8:
                    replicated = iterations.pop()
            time.sleep(0.02)
        assert replicated is not None, "node1's snapshots never reached node0"
        job.kill_node(1)
        result = job.wait()
    assert result.nodes[0].returncode == 0, result.output[-5000:]
    assert "-> reconfigure" in result.stderr
    assert "with replicas from node1" in result.stderr, result.stderr[-4000:]
    # A newer snapshot can reach node0 between the look above and the kill: the rollback takes the newest
    # replica that is complete on node0, never an older one than seen.
    rollback = re.search(r"every member rolls back to the snapshots of iteration (\d+)", result.stderr)
    assert rollback is not None, result.stderr[-4000:]
    rolled = int(rollback.group(1))
    assert rolled >= replicated and rolled % 4 == 0, (rolled, replicated)
    assert f"resumed after iteration {rolled}" in result.stdout
    got, expected = curve([json.loads(line) for line in metrics.read_text().splitlines()]), curve(base)
    assert sorted(got) == sorted(expected)
    for i in sorted(got):  # exact in the old layout, fp32 reduction order in the new one
        assert got[i] == (expected[i] if i <= rolled else pytest.approx(expected[i], rel=1e-5, abs=1e-5))
    assert not (shm / "node0").exists(), "node0's agent did not remove its snapshot directory"


@pytest.mark.timeout(240)
def test_a_failed_device_at_tp2_pp2_continues_at_a_smaller_layout_from_snapshots(reference, tmp_path) -> None:
    _, _, base = reference
    # TP2 PP2 DP1: rank 1's device fails (ECC, SEV1): it is left out, the three others move to a 2-rank
    # layout, and rank 1's half of its stage (held by no other process) comes from its node's snapshot.
    result, records = run(tmp_path, "ecc", "--unicron-snapshot-interval", "1",
                          "--unicron-inject", "ecc:1:6:backward")  # fmt: skip
    assert "fired ecc:1:6:backward" in result.stderr
    (incident,) = read_log(str(tmp_path / "ecc.incidents.jsonl"))
    outcome = (incident["severity"], incident["action"], incident["outcome"])
    assert outcome == ("SEV1", "reconfigure", "resumed"), incident
    layout = incident["layout"]
    assert layout["tp"] * layout["pp"] * layout["dp"] == len(incident["members"]) < 4
    assert 1 not in incident["members"]
    assert "resumed after iteration 5" in result.stdout, result.output[-4000:]
    got, expected = curve(records), curve(base)
    assert sorted(got) == list(range(1, ITERS + 1))
    for i in sorted(got):  # exact in the old layout, fp32 reduction order in the new one
        assert got[i] == (expected[i] if i <= 5 else pytest.approx(expected[i], rel=1e-5, abs=1e-5))
