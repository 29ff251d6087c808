"""Every error type and both process/node signals, injected into real megatron-core GPT training.

4 gloo ranks of ``examples/gpt/pretrain_gpt.py`` (the tiny YAML model) run through ``unicron-run
--unicron``; several independent faults share one run, each at its own iteration, so each produces its
own incident line. From the incident log every test asserts the root kind, severity, action, rank,
node, iteration, phase and a complete, ordered timeline; from the output that each fault fired; from
the metrics the loss curve (SEV3: bit-identical to the uninterrupted run; SEV2 and SEV1: every iteration
trained, the same losses up to fp32 reduction order); and that nothing leaked.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e_helpers import FD_SLACK, TP1PP2DP2, assert_clean, assert_fired, assert_timeline, train

from megatron_unicron.testing.harness import assert_no_leaks

pytestmark = pytest.mark.timeout(600)

# Other layouts, or a changed layout, sum the same fp32 numbers in another order (tests/test_pretrain.py).
CLOSE = {"rel": 2e-6, "abs": 2e-6}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """The uninterrupted loss curve: plain megatron-core training (no --unicron) at TP2 PP2."""
    run = train(tmp_path_factory.mktemp("reference"), "reference", unicron=False)
    assert_clean(run)
    return run.curve()


def check(line: dict, kind: str, severity: str, action: str, rank: int | None, iteration: int,
          phase: str | None) -> None:  # fmt: skip
    got = (line["root_kind"], line["severity"], line["action"], line["iteration"], line["phase"])
    assert got == (kind, severity, action, iteration, phase), line
    if rank is not None:
        assert line["ranks"] == [rank] and line["node"] == "node0", line


# (spec, root kind, root rank, phase of the root event); close: see below.
SEV3 = [
    ("nccl-timeout:0:5:forward", "nccl-timeout", 0, "forward"),
    ("network:1:7:backward", "network", 1, "backward"),
    ("link-flap:3:9:p2p", "link-flap", 3, "p2p"),
    ("conn-refused:3:11:optimizer", "conn-refused", 3, "optimizer"),
    ("conn-reset:2:13:allreduce", "conn-reset", 2, "allreduce"),
]


def test_sev3_kinds_reattempt_in_place_with_a_bit_identical_loss_curve(
    reference: list[float], tmp_path: Path
) -> None:
    specs = ("close:1:3:forward", *(spec for spec, *_ in SEV3))
    # A false timeout on loaded cores would be a seventh incident: the waits' floor is raised (detection
    # speed is the benchmark's business; the peers' waits end with the decision or at this floor).
    run = train(tmp_path, "sev3", "--unicron-detection-min-timeout-s", "2", injects=specs)
    assert_fired(run, *specs)
    assert len(run.incidents) == 6, run.incidents
    close, *raised = run.incidents
    # Rank 1 shut down its connections: its peers may report "Connection closed by peer" before it does,
    # so the root is a conn-reset on one of the ranks involved, at the iteration of the fault.
    assert (close["root_kind"], close["severity"], close["action"], close["iteration"]) == (
        "conn-reset", "SEV3", "reattempt", 3)  # fmt: skip
    ones = [e for e in close["events"] if e["rank"] == 1]
    assert ones and ones[0]["kind"] == "conn-reset" and "closed its connections" in ones[0]["message"]
    assert_timeline(close)
    for line, (spec, kind, rank, phase) in zip(raised, SEV3):
        check(line, kind, "SEV3", "reattempt", rank, int(spec.split(":")[2]), phase)
        assert line["restart"] == [] and line["members"] == [0, 1, 2, 3], line
        assert_timeline(line)
    assert [line["new_generation"] for line in run.incidents] == list(range(1, 7))
    assert run.curve() == reference  # bit-identical: every interrupted iteration was redone exactly
    assert_clean(run)


def test_sev2_kinds_restart_the_failed_process_and_finish(reference: list[float], tmp_path: Path) -> None:
    specs = ("kill:3:3:forward", "other:1:8:backward", "cuda:2:13:optimizer")
    run = train(tmp_path, "sev2a", *TP1PP2DP2, injects=specs)
    assert_fired(run, *specs)
    kill, other, cuda = run.incidents
    check(kill, "exited", "SEV2", "restart", 3, 3, None)
    assert kill["exit_code"] == -9 and kill["restart"] == [3]
    check(other, "other", "SEV2", "restart", 1, 8, "backward")
    check(cuda, "cuda", "SEV2", "restart", 2, 13, "optimizer")
    for line in run.incidents:
        assert line["restart"] == line["ranks"] and line["members"] == [0, 1, 2, 3], line
        assert_timeline(line)
    for rank in (3, 1, 2):
        assert f"restarting rank {rank}" in run.output
    assert run.curve() == pytest.approx(reference, **CLOSE)
    assert_clean(run)


def test_exit_hang_and_illegal_memory_restart_and_finish(reference: list[float], tmp_path: Path) -> None:
    specs = ("exit:0:3:backward", "hang:2:8:forward", "illegal-memory:1:13:allreduce")
    run = train(tmp_path, "sev2b", *TP1PP2DP2, injects=specs)
    assert_fired(run, *specs)
    exited, hang, memory = run.incidents
    check(exited, "exited", "SEV2", "restart", 0, 3, None)
    assert exited["exit_code"] == 13
    # A stopped process says nothing: its peers' collectives time out and its agent sees it stopped (T).
    check(hang, "hang", "SEV2", "restart", 2, 8, None)
    inferred = [e for e in hang["events"] if e["source"] == "coordinator"]
    assert len(inferred) == 1 and "state T" in inferred[0]["message"]
    assert {e["kind"] for e in hang["events"] if e["source"] == "worker"} <= {"nccl-timeout", "conn-reset"}
    check(memory, "illegal-memory", "SEV2", "restart", 1, 13, "allreduce")
    for line in run.incidents:
        assert_timeline(line)
    assert run.curve() == pytest.approx(reference, **CLOSE)
    assert_clean(run)


def test_sev1_device_errors_isolate_the_rank_and_shrink_the_layout(
    reference: list[float], tmp_path: Path
) -> None:
    specs = ("ecc:1:3:forward", "nvlink:2:7:backward", "dma:0:11:optimizer")
    run = train(tmp_path, "sev1", *TP1PP2DP2, injects=specs)
    assert_fired(run, *specs)
    ecc, nvlink, dma = run.incidents
    check(ecc, "ecc", "SEV1", "reconfigure", 1, 3, "forward")
    check(nvlink, "nvlink", "SEV1", "reconfigure", 2, 7, "backward")
    check(dma, "dma", "SEV1", "reconfigure", 0, 11, "optimizer")
    left = set()
    for line in run.incidents:
        left.add(line["ranks"][0])
        assert not left & set(line["members"]), line  # every failed device is out for good
        assert_timeline(line)
    sizes = [line["layout"]["tp"] * line["layout"]["pp"] * line["layout"]["dp"] for line in run.incidents]
    assert sizes == [len(line["members"]) for line in run.incidents] and sizes[0] < 4 and sizes[-1] == 1
    assert dma["members"] == [3]
    assert run.output.count("exited with code 75") == 3 and "the job continues without it" in run.output
    assert run.curve() == pytest.approx(reference, rel=1e-5, abs=1e-5)
    assert_clean(run, ranks=[3])


def test_a_lost_node_and_then_a_driver_error_leave_one_rank_training(
    reference: list[float], tmp_path: Path
) -> None:
    specs = ("node:3:4:forward", "driver:1:10:backward")
    run = train(tmp_path, "node", *TP1PP2DP2, nproc=2, nnodes=2, injects=specs)
    assert_fired(run, *specs)
    lost, driver = run.incidents
    assert (lost["root_kind"], lost["severity"], lost["action"], lost["node"], lost["ranks"]) == (
        "lost-node", "SEV1", "reconfigure", "node1", [2, 3])  # fmt: skip
    assert lost["iteration"] == 4 and lost["members"] == [0, 1] and "lease not renewed" in lost["message"]
    check(driver, "driver", "SEV1", "reconfigure", 1, 10, "backward")
    assert driver["members"] == [0]
    for line in run.incidents:
        assert_timeline(line)
    assert lost["t_detected"] - lost["t_fault"] < 10.0, lost  # the lease TTL (3 s), room for loaded cores
    assert [n.returncode for n in run.result.nodes] == [0, -9]  # node1's launcher was SIGKILLed
    assert run.curve() == pytest.approx(reference, rel=1e-5, abs=1e-5)
    assert_no_leaks(run.result, ranks=[0], fd_slack=FD_SLACK)
