"""Detection and decisions end to end: real launchers in ``--unicron`` mode, gloo workers, injected faults.

The workers (``tests/workers/heal.py``) follow the worker protocol; everything asserted comes from the
incident log the coordinator writes, the launchers' output and their exit codes. Each fault proves it
fired: the coordinator copies the injector's ``t_fault`` into the incident.
"""

import pytest

from megatron_unicron.config import DetectionConfig
from megatron_unicron.incident_log import read_log
from megatron_unicron.testing.harness import JobRunner

LAUNCHER = ["--unicron", "--shutdown-timeout", "3"]


def heal(jobs: JobRunner, log, *injects: str, iters: int = 8, extra=()) -> list[str]:
    argv = [jobs.worker("heal.py"), "--iters", str(iters), "--incident-log", str(log), *extra]
    for spec in injects:
        argv += ["--inject", spec]
    return argv


def assert_timeline(line: dict) -> None:
    assert line["t_fault"] is not None, "the injected fault did not fire (or was not matched)"
    assert line["t_fault"] <= line["t_detected"] <= line["t_decided"], line
    if line["t_resumed"] is not None:
        assert line["t_decided"] <= line["t_resumed"], line


@pytest.mark.timeout(60)
def test_a_sigkilled_worker_is_one_incident_and_is_restarted(jobs: JobRunner, tmp_path) -> None:
    log = tmp_path / "incidents.jsonl"
    result = jobs.run(heal(jobs, log, "kill:2:4"), nproc_per_node=3, launcher_args=LAUNCHER, timeout_s=50)
    assert result.returncode == 0, result.output
    (line,) = read_log(str(log))
    assert (line["root_kind"], line["severity"], line["action"], line["restart"], line["exit_code"]) == (
        "exited",
        "SEV2",
        "restart",
        [2],
        -9,
    )
    assert (line["outcome"], line["iteration"], line["new_generation"]) == ("resumed", 4, 1)
    assert {e["kind"] for e in line["events"]} - {"exited"} <= {"conn-reset", "nccl-timeout"}
    assert_timeline(line)
    assert "rank 2 started in generation 1 (restarted: True)" in result.stdout
    assert result.stdout.count("finished 8 iterations in generation 1") == 3, result.output
    assert (
        "unicron: incident 1 SEV2 exited rank 2 (node0, SIGKILL) at iteration 4 -> restart" in result.stderr
    )
    assert result.survivors == ()


@pytest.mark.timeout(60)
def test_a_stopped_worker_is_the_hung_root_killed_and_restarted(jobs: JobRunner, tmp_path) -> None:
    log = tmp_path / "incidents.jsonl"
    result = jobs.run(heal(jobs, log, "hang:1:4"), nproc_per_node=3, launcher_args=LAUNCHER, timeout_s=50)
    assert result.returncode == 0, result.output
    (line,) = read_log(str(log))
    assert (line["root_kind"], line["severity"], line["action"], line["restart"], line["outcome"]) == (
        "hang",
        "SEV2",
        "restart",
        [1],
        "resumed",
    )
    peers = sorted(e["rank"] for e in line["events"] if e["kind"] == "nccl-timeout")
    inferred = [e for e in line["events"] if e["source"] == "coordinator"]
    assert peers == [0, 2] and len(inferred) == 1 and "state T" in inferred[0]["message"]
    assert_timeline(line)
    assert "rank 1 started in generation 1 (restarted: True)" in result.stdout
    assert result.stdout.count("finished 8 iterations in generation 1") == 3, result.output
    assert result.survivors == ()


@pytest.mark.timeout(60)
def test_a_repeated_fault_escalates_from_reattempt_to_restart(jobs: JobRunner, tmp_path) -> None:
    log = tmp_path / "incidents.jsonl"
    argv = heal(jobs, log, "conn-refused:1:3", "conn-refused:1:5")
    result = jobs.run(argv, nproc_per_node=3, launcher_args=LAUNCHER, timeout_s=50)
    assert result.returncode == 0, result.output
    first, second = read_log(str(log))
    assert (first["root_kind"], first["severity"], first["action"], first["outcome"]) == (
        "conn-refused",
        "SEV3",
        "reattempt",
        "resumed",
    )
    assert (
        second["root_kind"],
        second["severity"],
        second["escalated"],
        second["action"],
        second["restart"],
    ) == ("conn-refused", "SEV2", "repeat", "restart", [1])
    assert (second["generation"], second["new_generation"], second["outcome"]) == (1, 2, "resumed")
    assert_timeline(first)
    assert_timeline(second)
    assert first["t_fault"] < second["t_fault"]
    assert "rank 1 started in generation 2 (restarted: True)" in result.stdout
    assert result.stdout.count("finished 8 iterations in generation 2") == 3, result.output
    assert "SEV2 (escalated from SEV3: repeat) conn-refused rank 1" in result.stderr


@pytest.mark.timeout(60)
def test_a_lost_node_is_detected_by_its_lease_and_stops_the_job(jobs: JobRunner, tmp_path) -> None:
    log = tmp_path / "incidents.jsonl"
    save = tmp_path / "ckpt"
    save.mkdir()
    (save / "latest_checkpointed_iteration.txt").write_text("2\n")
    argv = heal(jobs, log, "node:3:4", extra=["--save", str(save)])
    result = jobs.run(argv, nproc_per_node=2, nnodes=2, launcher_args=LAUNCHER, timeout_s=50)
    assert result.nodes[1].returncode == -9, result.output  # the injector SIGKILLed node1's launcher
    assert result.nodes[0].returncode == 1, result.output  # node0 ended cleanly: the job was stopped
    (line,) = read_log(str(log))
    assert (
        line["root_kind"],
        line["severity"],
        line["action"],
        line["outcome"],
        line["node"],
        line["ranks"],
    ) == ("lost-node", "SEV1", "stop", "stopped", "node1", [2, 3])
    assert_timeline(line)
    ttl = DetectionConfig().lease_ttl_s
    assert line["t_detected"] - line["t_fault"] <= ttl + 1.5, "the lost node was not detected within the TTL"
    assert "node1 was lost" in line["reason"] and f"checkpoint of iteration 2 in {save}" in line["reason"]
    assert line["checkpoint"] == str(save)
    node0 = result.nodes[0].stdout + result.nodes[0].stderr
    assert "unicron: incident 1 SEV1 lost-node node1 (rank(s) 2, 3)" in node0
    assert node0.count("stopped: {'reason'") == 2, node0  # both workers of node0 saw the stop
    assert "unicron: job none stopped: node1 was lost" in node0  # the coordinator's line
    assert "ended: the job was stopped: node1 was lost" in node0  # the launcher's exit summary
    assert result.survivors == ()
