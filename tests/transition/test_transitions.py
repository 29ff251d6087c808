"""Transitions of a running job with real training: restarts from replicas, lost and returning nodes,
planned re-layouts, repeated recoveries. Oracle: the loss curve of an uninterrupted run (bit-identical
when the layout is kept, fp32 reduction-order tolerance when it changes)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import psutil
import pytest
import torch

from megatron_unicron.events import LayoutSpec
from megatron_unicron.incident_log import read_log
from megatron_unicron.testing.harness import JobResult, assert_no_leaks, run_job, start_job

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "examples/gpt/pretrain_gpt.py")
RELAYOUT = str(ROOT / "tests/workers/relayout.py")
YAML = str(ROOT / "examples/gpt/configs/tiny_gpt.yaml")
UNICRON_LAUNCHER = ("--unicron",)
FD_SLACK = 6  # gloo's per-process transport device (see tests/test_pretrain.py)
TOLERANCE = dict(rel=1e-5, abs=1e-5)  # fp32 reduction order after a change of layout


def flags(tmp: Path, name: str, tp: int, pp: int, iters: int, *extra: str) -> list[str]:
    layout = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    metrics = ["--unicron-metrics-log", str(tmp / f"{name}.jsonl")]
    return ["--yaml-cfg", YAML, *layout, "--train-iters", str(iters), *metrics, *extra]


def unicron(tmp: Path, name: str, *inject: str) -> list[str]:
    args = ["--unicron", "--unicron-incident-log", str(tmp / f"{name}.incidents.jsonl")]
    for spec in inject:
        args += ["--unicron-inject", spec]
    return args


def losses(tmp: Path, name: str) -> dict[int, float]:
    lines = (tmp / f"{name}.jsonl").read_text().splitlines()
    return {r["iteration"]: r["lm_loss"] for r in map(json.loads, lines)}


def incidents(tmp: Path, name: str) -> list[dict]:
    return read_log(str(tmp / f"{name}.incidents.jsonl"))


def check(result: JobResult) -> None:
    assert result.returncode == 0, result.output[-5000:]
    assert_no_leaks(result, fd_slack=FD_SLACK)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[int, float]]]:
    """Uninterrupted runs: TP1 PP2 DP2 (4 ranks) and TP2 PP1 (2 ranks), with --unicron and no fault."""
    tmp = tmp_path_factory.mktemp("reference")
    for name, tp, pp, iters, nproc in (("pp2dp2", 1, 2, 16, 4), ("tp2", 2, 1, 22, 2)):
        argv = [SCRIPT, *flags(tmp, name, tp, pp, iters), *unicron(tmp, name)]
        check(run_job(argv, nproc_per_node=nproc, timeout_s=300, launcher_args=UNICRON_LAUNCHER))
    return tmp, {"pp2dp2": losses(tmp, "pp2dp2"), "tp2": losses(tmp, "tp2")}


@pytest.mark.timeout(900)
def test_kills_and_a_hang_restart_from_dp_replicas_and_match_exactly(reference, tmp_path: Path) -> None:
    _, curves = reference
    faults = ("kill:3:3:forward", "kill:2:6:allreduce", "hang:1:9:forward", "kill:0:12:optimizer")
    argv = [SCRIPT, *flags(tmp_path, "run", 1, 2, 16), *unicron(tmp_path, "run", *faults)]
    check(run_job(argv, nproc_per_node=4, timeout_s=600, launcher_args=UNICRON_LAUNCHER))
    found = [
        (i["root_kind"], i["severity"], i["action"], i["ranks"], i["outcome"])
        for i in incidents(tmp_path, "run")
    ]
    assert found == [
        ("exited", "SEV2", "restart", [3], "resumed"),
        ("exited", "SEV2", "restart", [2], "resumed"),
        ("hang", "SEV2", "restart", [1], "resumed"),
        ("exited", "SEV2", "restart", [0], "resumed"),
    ]
    assert losses(tmp_path, "run") == curves["pp2dp2"]  # the layout was kept: bit-identical


@pytest.mark.timeout(600)
def test_a_killed_rank_restarts_in_the_warm_spare_and_matches_exactly(tmp_path: Path) -> None:
    # The node's spare starts once training runs; then rank 3 is SIGKILLed from outside, mid-training.
    iters = 120
    argv = [SCRIPT, *flags(tmp_path, "run", 1, 2, iters), *unicron(tmp_path, "run")]
    with start_job(argv, nproc_per_node=4, timeout_s=400, launcher_args=UNICRON_LAUNCHER) as job:
        job.wait_for_output("started a warm spare (pid ", timeout_s=200)
        found = re.search(r"started a warm spare \(pid (\d+)\)", job.read_output())
        assert found is not None
        spare = int(found.group(1))
        (victim,) = [p for p in map(psutil.Process, job.worker_pids())
                     if p.environ().get("RANK") == "3" and "megatron_unicron.spare" not in p.cmdline()]
        victim.kill()
        result = job.wait()
    check(result)
    assert f"restarting rank 3 in the warm spare (pid {spare})" in result.stderr, result.stderr[-4000:]
    (incident,) = incidents(tmp_path, "run")
    outcome = (incident["root_kind"], incident["severity"], incident["action"], incident["ranks"])
    assert outcome == ("exited", "SEV2", "restart", [3]) and incident["outcome"] == "resumed", incident
    reference_run = [SCRIPT, *flags(tmp_path, "ref", 1, 2, iters), "--unicron"]
    cold = ("--unicron", "--no-warm-spare")
    reference = run_job(reference_run, nproc_per_node=4, timeout_s=300, launcher_args=cold)
    check(reference)
    assert "warm spare" not in reference.stderr
    assert losses(tmp_path, "run") == losses(tmp_path, "ref")  # the layout was kept: bit-identical


@pytest.mark.timeout(900)
def test_lost_node_shrinks_then_scales_back_up(reference, tmp_path: Path) -> None:
    _, curves = reference
    # Slowed iterations (2.5x: below the 3x of a hang) keep training going while the returning node's
    # workers start; those starts load both cores, hence the higher floor of the adaptive timeout. The
    # devices are declared too small for the whole model (it needs 4.2 MiB at PP1, 2.7 at PP2; 0.9 of
    # 4.1 usable): the 2 survivors must keep both pipeline stages, TP1 PP2 DP1, where roomy ones would
    # go PP1 DP2.
    slow = ("slow=2.5:0:6", "slow=2.5:1:6")
    small = ("--unicron-device-memory-gib", "0.004", "--unicron-detection-min-timeout-s", "2")
    argv = [SCRIPT, *flags(tmp_path, "run", 1, 2, 60, *small), *unicron(tmp_path, "run", "node:3:5", *slow)]
    with start_job(argv, nproc_per_node=2, nnodes=2, timeout_s=600, launcher_args=UNICRON_LAUNCHER) as job:
        job.wait_for_output("-> reconfigure", timeout_s=240)
        time.sleep(1.0)
        job.rejoin_node(1)
        job.wait_for_output("scale-up to", timeout_s=240)
        result = job.wait()
    assert result.nodes[0].returncode == 0, result.output[-5000:]
    assert "rejoining a running job" in result.stderr
    (lost,) = [i for i in incidents(tmp_path, "run") if i["root_kind"] == "lost-node"]
    assert (lost["severity"], lost["action"], lost["node"], lost["outcome"]) == (
        "SEV1",
        "reconfigure",
        "node1",
        "resumed",
    )
    assert lost["t_detected"] - lost["t_fault"] < 6.0
    assert lost["layout"] == {"tp": 1, "pp": 2, "dp": 1}
    assert "scale-up to TP1PP2DP2" in result.stderr, result.stderr[-4000:]
    curve = losses(tmp_path, "run")
    argv = [SCRIPT, *flags(tmp_path, "ref", 1, 2, 60), "--unicron"]
    reference_run = run_job(argv, nproc_per_node=4, timeout_s=300, launcher_args=UNICRON_LAUNCHER)
    check(reference_run)
    expected = losses(tmp_path, "ref")
    assert [curve[i] for i in range(5, 61)] == pytest.approx([expected[i] for i in range(5, 61)], **TOLERANCE)
    del curves


def last_lines(tmp: Path, name: str) -> dict[int, dict]:
    """The metrics log's newest line per iteration (a rollback to a snapshot redoes iterations)."""
    return {r["iteration"]: r for r in map(json.loads, (tmp / f"{name}.jsonl").read_text().splitlines())}


def matches_a_checkpoint_switch(
    tmp: Path, name: str, start: tuple[int, int, int], iters: int, *extra: str
) -> tuple[int, LayoutSpec]:
    """Check run ``name``'s curve against an uninterrupted run that switches layout through a checkpoint.

    The switch is where the metrics log's layout first changes; the reference trains at ``start``
    (TP, PP, processes) up to there, saves, and goes on at the new layout from that checkpoint. Before
    the switch the curves are bit-identical (the layout was kept; a rolled-back iteration is redone
    exactly), after it equal to fp32 tolerance. Returns the switch iteration and the new layout.
    """
    lines = last_lines(tmp, name)
    assert sorted(lines) == list(range(1, iters + 1))
    switch = min(i for i, line in lines.items() if line["layout"] != lines[1]["layout"])
    found = re.fullmatch(r"TP(\d+)PP(\d+)DP(\d+)", lines[switch]["layout"])
    assert found is not None
    tp, pp, dp = map(int, found.groups())
    new = LayoutSpec(tp=tp, pp=pp, dp=dp)
    assert {lines[i]["layout"] for i in range(switch, iters + 1)} == {lines[switch]["layout"]}
    ckpt = ("--save", str(tmp / "ckpt"))
    stop = ("--save-interval", str(switch - 1), "--exit-interval", str(switch - 1))
    first = [SCRIPT, *flags(tmp, "before", start[0], start[1], iters, *extra, *ckpt, *stop)]
    check(run_job(first, nproc_per_node=start[2], timeout_s=300))
    resume = [SCRIPT, *flags(tmp, "after", new.tp, new.pp, iters, *extra, "--load", str(tmp / "ckpt"))]
    check(run_job(resume, nproc_per_node=new.world_size, timeout_s=300))
    before, after = losses(tmp, "before"), losses(tmp, "after")
    assert [lines[i]["lm_loss"] for i in range(1, switch)] == [before[i] for i in range(1, switch)]
    assert [lines[i]["lm_loss"] for i in range(switch, iters + 1)] == pytest.approx(
        [after[i] for i in range(switch, iters + 1)], **TOLERANCE)
    return switch, new


@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", ["kill", "hang"])
def test_a_rank_failing_twice_at_tp2pp2_is_left_out_and_the_job_goes_on_smaller(tmp_path: Path, kind) -> None:
    # TP2 PP2 has no DP replica: the first failure restarts rank 1 from its snapshot, kept by the agent
    # (the job may roll back to that snapshot's iteration); the second, within the escalation window,
    # is SEV1: rank 1 (its device, as far as the job can tell) is left out, a hung process killed, and
    # the 3 survivors go on at a smaller layout the plan generator picks, its state from snapshots.
    faults = (f"{kind}:1:4:forward", f"{kind}:1:7:forward")
    # The floor of the adaptive timeout is raised: a warm spare starting loads both cores of this machine.
    snapshots = ("--unicron-snapshot-interval", "1", "--unicron-detection-min-timeout-s", "2")
    argv = [SCRIPT, *flags(tmp_path, "run", 2, 2, 12, *snapshots), *unicron(tmp_path, "run", *faults)]
    result = run_job(argv, nproc_per_node=4, timeout_s=500, launcher_args=UNICRON_LAUNCHER)
    assert result.returncode == 0, result.output[-5000:]  # the job succeeded without rank 1
    assert_no_leaks(result, ranks=[0, 2, 3], fd_slack=FD_SLACK)
    assert all(f"unicron-inject: fired {fault}" in result.stderr for fault in faults)
    found = [(i["severity"], i["escalated"], i["action"], i["ranks"], i["outcome"])
             for i in incidents(tmp_path, "run")]
    assert found == [("SEV2", "", "restart", [1], "resumed"),
                     ("SEV1", "repeat", "reconfigure", [1], "resumed")], result.output[-5000:]
    switch, new = matches_a_checkpoint_switch(tmp_path, "run", (2, 2, 4), 12)
    assert 4 <= switch <= 7 and new.world_size < 4


@pytest.mark.timeout(900)
def test_eight_ranks_lose_a_node_at_tp2pp2dp2_and_go_on_at_dp1(tmp_path: Path) -> None:
    # 2 nodes x 4 ranks. Devices too small for TP or PP alone (2 MiB: TP2 PP2 needs 1.5, TP2 PP1 2.3),
    # so the 4 survivors keep TP2 PP2 and drop to DP1, their state in their own memory.
    extra = ("--unicron-device-memory-gib", "0.002")
    argv = [SCRIPT, *flags(tmp_path, "run", 2, 2, 12, *extra), *unicron(tmp_path, "run", "node:4:5")]
    result = run_job(argv, nproc_per_node=4, nnodes=2, timeout_s=500, launcher_args=UNICRON_LAUNCHER)
    assert result.nodes[0].returncode == 0, result.output[-5000:]
    assert_no_leaks(result, ranks=range(4), fd_slack=FD_SLACK)
    (lost,) = incidents(tmp_path, "run")
    assert (lost["root_kind"], lost["severity"], lost["action"], lost["ranks"], lost["outcome"]) == (
        "lost-node", "SEV1", "reconfigure", [4, 5, 6, 7], "resumed")
    switch, new = matches_a_checkpoint_switch(tmp_path, "run", (2, 2, 8), 12, *extra)
    assert switch == 5 and new == LayoutSpec(tp=2, pp=2, dp=1)  # the iteration in flight is redone


@pytest.mark.timeout(600)
def test_ten_reattempts_leak_nothing_and_match_exactly(reference, tmp_path: Path) -> None:
    _, curves = reference
    # Ten different (kind, rank) pairs: the same fault recurring on a rank would be graded up to SEV2.
    kinds = ("conn-reset", "network", "conn-refused", "link-flap", "nccl-timeout")
    faults = [f"{kinds[k // 2]}:{k % 2}:{2 + 2 * k}:backward" for k in range(10)]
    # The peers' waits end with the decision: a longer floor only keeps loaded cores from a false timeout,
    # which would be an eleventh incident.
    extra = ("--unicron-detection-pg-timeout-s", "3", "--unicron-detection-min-timeout-s", "2")
    argv = [SCRIPT, *flags(tmp_path, "run", 2, 1, 22, *extra), *unicron(tmp_path, "run", *faults)]
    check(run_job(argv, nproc_per_node=2, timeout_s=500, launcher_args=UNICRON_LAUNCHER))
    found = incidents(tmp_path, "run")
    assert [(i["severity"], i["action"], i["outcome"]) for i in found] == [
        ("SEV3", "reattempt", "resumed")
    ] * 10
    assert [i["root_kind"] for i in found] == [kinds[k // 2] for k in range(10)]
    assert losses(tmp_path, "run") == curves["tp2"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "start, chain, extra",
    [
        ((2, 2), "3:1,2;6:2,1;9:2,2", ()),
        # The DistributedOptimizer's shards move as flat ranges of model-space boxes (DP 4 -> 2 -> 2 -> 4).
        ((1, 1), "3:2,1;6:1,2;9:1,1", ("--use-distributed-optimizer",)),
        # Ten consecutive transitions through every layout of 4 ranks: nothing may leak (check()).
        ((2, 2), "3:1,2;5:4,1;7:1,1;9:2,2;11:1,4;13:2,1;15:1,1;17:4,1;19:1,2;21:2,2", ()),
    ],
    ids=["adam", "distributed-optimizer", "ten-transitions"],
)
def test_planned_relayouts_in_the_same_processes(tmp_path: Path, start, chain, extra) -> None:
    iters = max(int(step.split(":")[0]) for step in chain.split(";")) + 3
    argv = [RELAYOUT, *flags(tmp_path, "chain", *start, iters, *extra)]
    reports = tmp_path / "transitions.jsonl"
    env = {"RELAYOUT": chain, "RELAYOUT_REPORT": str(reports)}
    check(run_job(argv, nproc_per_node=4, timeout_s=400, env=env))
    layouts = [(r["rank"], r["layout"]) for r in map(json.loads, reports.read_text().splitlines())]
    assert len(layouts) == 4 * len(chain.split(";")), layouts  # every rank went through every transition
    plain = [SCRIPT, *flags(tmp_path, "plain", *start, iters, *extra)]
    check(run_job(plain, nproc_per_node=4, timeout_s=300))
    relaid, expected = losses(tmp_path, "chain"), losses(tmp_path, "plain")
    assert sorted(relaid) == list(range(1, iters + 1))
    assert [relaid[i] for i in range(1, 4)] == [expected[i] for i in range(1, 4)]
    assert [relaid[i] for i in range(4, iters + 1)] == pytest.approx(
        [expected[i] for i in range(4, iters + 1)], **TOLERANCE
    )


@pytest.mark.timeout(600)
def test_a_live_relayout_leaves_the_state_a_checkpoint_relayout_leaves(tmp_path: Path) -> None:
    # Reference: train 3 iterations at TP2 PP2, save, reload the checkpoint at TP1 PP2 (resharding on
    # load) and train on. The live re-layout after iteration 3 must leave the same state: the same next
    # losses and, at the end, the same parameters and optimizer state, tensor by tensor.
    from megatron_unicron.ckpt.source import open_checkpoint

    live, switched = tmp_path / "live", tmp_path / "switched"
    final = ("--save-interval", "6")
    chain = [RELAYOUT, *flags(tmp_path, "live", 2, 2, 6, "--save", str(live), *final)]
    check(run_job(chain, nproc_per_node=4, timeout_s=300, env={"RELAYOUT": "3:1,2"}))
    stop_at_3 = ("--save-interval", "3", "--exit-interval", "3")
    first = [SCRIPT, *flags(tmp_path, "before", 2, 2, 6, "--save", str(switched), *stop_at_3)]
    check(run_job(first, nproc_per_node=4, timeout_s=300))
    resume = ("--save", str(switched), *final, "--load", str(switched))
    then = [SCRIPT, *flags(tmp_path, "after", 1, 2, 6, *resume)]
    check(run_job(then, nproc_per_node=4, timeout_s=300))
    relaid, before, after = losses(tmp_path, "live"), losses(tmp_path, "before"), losses(tmp_path, "after")
    assert sorted(before) == [1, 2, 3] and sorted(after) == [4, 5, 6]
    assert [relaid[i] for i in (1, 2, 3)] == [before[i] for i in (1, 2, 3)]
    assert [relaid[i] for i in (4, 5, 6)] == pytest.approx([after[i] for i in (4, 5, 6)], **TOLERANCE)
    with open_checkpoint(str(live)) as got, open_checkpoint(str(switched)) as want:
        assert got.iteration == want.iteration == 6
        assert set(got.tensors) == set(want.tensors)
        assert any(k.startswith("optimizer.") for k in want.tensors)  # Adam moments compared too
        for key in sorted(want.tensors):
            a, b = got.full_tensor(key), want.full_tensor(key)
            assert a.shape == b.shape, key
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (key, float((a - b).abs().max()))


@pytest.mark.timeout(600)
def test_a_corrupt_replica_is_dropped_and_the_next_rung_serves(tmp_path: Path) -> None:
    # TP1 PP2 DP2: rank 3 is killed and its only live copy, rank 2, sends it corrupted state. The checksum
    # catches it, every member learns it, and the transfer is planned again without rank 2: from the
    # in-memory snapshots, the next rung. The loss curve is still that of the uninterrupted run.
    faults = ("kill:3:8:forward", "corrupt:2:8:forward")
    snapshots = ("--unicron-snapshot-interval", "1")
    argv = [SCRIPT, *flags(tmp_path, "run", 1, 2, 14), *unicron(tmp_path, "run", *faults), *snapshots]
    result = run_job(argv, nproc_per_node=4, timeout_s=400, launcher_args=UNICRON_LAUNCHER)
    check(result)
    assert "unicron-inject: fired corrupt:2:8" in result.stderr
    assert "state from rank(s) [2] failed its checksum; planning the transfer again" in result.stderr
    assert "reloads the newest checkpoint" not in result.stderr
    (incident,) = incidents(tmp_path, "run")
    outcome = (incident["root_kind"], incident["action"], incident["ranks"], incident["outcome"])
    assert outcome == ("exited", "restart", [3], "resumed")
    plain = [SCRIPT, *flags(tmp_path, "ref", 1, 2, 14), "--unicron"]
    check(run_job(plain, nproc_per_node=4, timeout_s=300, launcher_args=UNICRON_LAUNCHER))
    assert losses(tmp_path, "run") == losses(tmp_path, "ref")  # the layout was kept: bit-identical


@pytest.mark.timeout(600)
def test_a_killed_rank_of_a_distributed_optimizer_job_comes_back_from_the_checkpoint(tmp_path: Path) -> None:
    # The DistributedOptimizer keeps one copy of each optimizer shard (no DP replica holds the dead
    # rank's), and this job takes no snapshots (tests/transition/test_distopt_snapshots.py does): the
    # only rung left is the checkpoint, which every member reloads; the loss curve is still that of the
    # uninterrupted run.
    distopt = ("--use-distributed-optimizer", "--save-interval", "5")
    ckpt = ("--save", str(tmp_path / "ckpt"))
    argv = [SCRIPT, *flags(tmp_path, "run", 1, 2, 12, *distopt, *ckpt), *unicron(tmp_path, "run", "kill:3:8")]
    result = run_job(argv, nproc_per_node=4, timeout_s=400, launcher_args=UNICRON_LAUNCHER)
    check(result)
    assert "unicron-inject: fired kill:3:8" in result.stderr
    assert "every member reloads the newest checkpoint" in result.stderr
    (incident,) = incidents(tmp_path, "run")
    outcome = (incident["root_kind"], incident["action"], incident["ranks"], incident["outcome"])
    assert outcome == ("exited", "restart", [3], "resumed")
    ref_ckpt = ("--save", str(tmp_path / "ref"))
    plain = [SCRIPT, *flags(tmp_path, "ref", 1, 2, 12, *distopt, *ref_ckpt), "--unicron"]
    check(run_job(plain, nproc_per_node=4, timeout_s=300, launcher_args=UNICRON_LAUNCHER))
    assert losses(tmp_path, "run") == losses(tmp_path, "ref")
