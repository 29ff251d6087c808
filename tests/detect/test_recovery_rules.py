"""Rules for recoveries that cannot go on as before: SEV1 isolates the failed rank, failed recoveries
escalate, a failed SEV1 recovery stops the job, an excluded rank leaves without a fault (pure code and
an in-process agent)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from megatron_unicron.agent import AgentConfig, NodeAgent, Outcome
from megatron_unicron.coordinator import Coordinator
from megatron_unicron.decisions import JobState, Verdict, decide
from megatron_unicron.events import Action, Decision, ErrorKind, FaultEvent, LayoutSpec, Severity
from megatron_unicron.incident_log import read_log
from megatron_unicron.incidents import (
    EXITED,
    RUNNING,
    STOPPED,
    Collector,
    EscalationHistory,
    Incident,
    JobSettings,
    WorkerState,
    form_incident,
    infer_hangs,
    not_resumed_incident,
)
from megatron_unicron.protocol import JobChannel
from megatron_unicron.store import JobKeys, host_store
from megatron_unicron.unicron_policy import UnicronPolicy
from megatron_unicron.worker_states import post_states

NODES = {0: "node0", 1: "node0", 2: "node0", 3: "node0"}
SETTINGS = JobSettings(job="j", world_size=4, layout=LayoutSpec(tp=1, pp=2, dp=2), rank_node=NODES)


def event(kind: ErrorKind, rank: int | None, t: float = 10.0, **kw: object) -> FaultEvent:
    return FaultEvent(job="j", kind=kind, rank=rank, node="node0", generation=0, t_detected=t, **kw)  # type: ignore[arg-type]


def states(**status: str) -> dict[int, WorkerState]:
    return {
        int(r[1:]): WorkerState(rank=int(r[1:]), node="node0", pid=1, status=s) for r, s in status.items()
    }


def incident(
    *events: FaultEvent, failed_recovery: Severity | None = None, history: EscalationHistory | None = None
) -> Incident:
    collect = Collector(opened_at=10.0, generation=0, members=range(4), grace_s=0.5, bound_s=4.0)
    for e in events:
        collect.add(e)
    return form_incident(
        collect,
        incident_id=1,
        job="j",
        rank_node=NODES,
        states=states(),
        now=11.0,
        history=history or EscalationHistory(60.0),
        failed_recovery=failed_recovery,
    )


class Planner:
    """A plan function that records what it was asked and keeps every survivor it is given."""

    def __init__(self) -> None:
        self.asked: list[tuple[JobState, frozenset[str]]] = []

    def __call__(self, state: JobState, lost: frozenset[str]) -> Decision:
        self.asked.append((state, lost))
        members = state.live[:2]
        return Decision(
            job="j",
            generation=state.generation + 1,
            action=Action.RECONFIGURE,
            incident="",
            layout=LayoutSpec(tp=1, pp=1, dp=len(members)),
            members=members,
            live=state.live,
        )


def test_a_device_error_leaves_its_rank_and_dead_processes_out_of_the_plan() -> None:
    ecc = incident(event(ErrorKind.ECC, 1), event(ErrorKind.NCCL_TIMEOUT, 0, t=10.5))
    plan = Planner()
    verdict = decide(
        ecc,
        SETTINGS,
        generation=0,
        members=(0, 1, 2, 3),
        progress={0: 3},
        states=states(r0=RUNNING, r1=RUNNING, r2=RUNNING, r3=EXITED),
        lost_nodes=frozenset(),
        plan_fn=plan,
    )
    ((state, lost),) = plan.asked
    assert state.live == (0, 2) and lost == frozenset()  # rank 1's device failed, rank 3 is dead
    assert verdict.action is Action.RECONFIGURE and 1 not in verdict.decision.live


def test_a_hung_rank_left_out_of_the_plan_is_killed_by_its_agent_a_responsive_one_is_not() -> None:
    # Rank 1 hangs (stopped) a second time within the window: SEV1, the job goes on without it.
    first = event(ErrorKind.TASK_HANG, 1, t=1.0, source="coordinator")
    history = EscalationHistory(60.0)
    history.record(first, Severity.SEV2, 1.0)
    hang = incident(event(ErrorKind.TASK_HANG, 1, source="coordinator"), history=history)
    assert hang.severity is Severity.SEV1
    verdict = decide(
        hang,
        SETTINGS,
        generation=0,
        members=(0, 1, 2, 3),
        progress={0: 3},
        states=states(r0=RUNNING, r1=STOPPED, r2=RUNNING, r3=RUNNING),
        lost_nodes=frozenset(),
        plan_fn=Planner(),
    )
    assert verdict.action is Action.RECONFIGURE and 1 not in verdict.decision.live
    assert dict(verdict.commands) == {"node0": {"op": "kill", "ranks": [1], "generation": 1}}
    # A device error's rank still runs and reads the decision: it leaves by itself, nothing is killed.
    ecc = incident(event(ErrorKind.ECC, 2))
    verdict = decide(ecc, SETTINGS, generation=0, members=(0, 1, 2, 3), progress={0: 3},
                     states=states(r0=RUNNING, r1=RUNNING, r2=RUNNING, r3=RUNNING),
                     lost_nodes=frozenset(), plan_fn=Planner())
    assert 2 not in verdict.decision.live and dict(verdict.commands) == {}


def test_a_lost_node_still_names_the_node_to_the_planner() -> None:
    two_nodes = {0: "node0", 1: "node0", 2: "node1", 3: "node1"}
    settings = JobSettings(job="j", world_size=4, layout=SETTINGS.layout, rank_node=two_nodes)
    lost = FaultEvent(
        job="j",
        kind=ErrorKind.LOST_NODE,
        rank=None,
        node="node1",
        generation=0,
        t_detected=10.0,
        source="coordinator",
    )
    plan = Planner()
    decide(
        incident(lost),
        settings,
        generation=0,
        members=(0, 1, 2, 3),
        progress={},
        states=states(),
        lost_nodes=frozenset({"node1"}),
        plan_fn=plan,
    )
    assert plan.asked[0][1] == frozenset({"node1"}) and plan.asked[0][0].live == (0, 1)


@pytest.mark.parametrize(
    "pending, expected, exhausted",
    [
        (Severity.SEV3, Severity.SEV2, False),
        (Severity.SEV2, Severity.SEV1, False),
        (Severity.SEV1, Severity.SEV1, True),
    ],
)
def test_an_incident_during_a_recovery_escalates_it(
    pending: Severity, expected: Severity, exhausted: bool
) -> None:
    during = incident(
        event(ErrorKind.CONN_RESET, 2, message="during transition: RuntimeError: state lost"),
        failed_recovery=pending,
    )
    assert (during.severity, during.escalated, during.exhausted) == (expected, "recovery-failed", exhausted)


def test_without_a_recovery_in_progress_nothing_changes() -> None:
    plain = incident(event(ErrorKind.CONN_RESET, 2))
    assert (plain.severity, plain.escalated, plain.exhausted) == (Severity.SEV3, "", False)
    worse = incident(event(ErrorKind.ECC, 2), failed_recovery=Severity.SEV3)  # already above the floor
    assert (worse.severity, worse.escalated, worse.exhausted) == (Severity.SEV1, "", False)


def test_an_exhausted_incident_stops_with_the_failure_and_the_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("6")
    settings = JobSettings(job="j", world_size=4, layout=SETTINGS.layout, rank_node=NODES, save=str(tmp_path))
    failed = incident(
        event(ErrorKind.CONN_RESET, 2, message="during transition: RuntimeError: state lost", iteration=7),
        failed_recovery=Severity.SEV1,
    )
    plan = Planner()
    verdict = decide(
        failed,
        settings,
        generation=2,
        members=(0, 1, 2, 3),
        progress={},
        states=states(),
        lost_nodes=frozenset(),
        plan_fn=plan,
    )
    assert verdict.action is Action.STOP and plan.asked == []  # no further plan is tried
    assert "the SEV1 recovery, the last resort, failed (conn-reset on rank 2 (node0): during transition" in (
        verdict.stop_reason
    )
    assert f"checkpoint of iteration 6 in {tmp_path}" in verdict.stop_reason and verdict.checkpoint == str(
        tmp_path
    )


def test_a_sev1_recovery_that_does_not_resume_is_exhausted() -> None:
    sev1 = incident(event(ErrorKind.NVLINK, 1))
    late = not_resumed_incident(
        sev1, incident_id=2, generation=1, waiting=(0,), timeout_s=5.0, now=20.0, severity=Severity.SEV1
    )
    assert late.exhausted and late.escalated == "not-resumed"
    sev2 = incident(event(ErrorKind.CUDA, 1))
    assert not not_resumed_incident(
        sev2, incident_id=2, generation=1, waiting=(0,), timeout_s=5.0, now=20.0, severity=Severity.SEV1
    ).exhausted


# An agent with two workers; rank 1 leaves with code 75 once the coordinator's decision excludes it.
WORKER = """
import os, sys, time
from datetime import timedelta
from megatron_unicron.protocol import JobChannel
from megatron_unicron.store import JobKeys, connect_store
if os.environ["RANK"] == "1":
    store = connect_store("127.0.0.1", int(os.environ["MASTER_PORT"]), timedelta(seconds=20))
    channel = JobChannel(store, JobKeys("u"))
    while channel.decision(1) is None:
        time.sleep(0.05)
    sys.exit(75)
"""


@pytest.mark.timeout(60)
def test_an_excluded_rank_leaves_without_a_fault_and_the_node_succeeds(tmp_path: Path) -> None:
    store = host_store("127.0.0.1", 0)
    try:
        config = AgentConfig(
            job="u",
            node_rank=0,
            nnodes=1,
            nproc_per_node=2,
            mode="unicron",
            argv=(sys.executable, "-c", WORKER),
            master_addr="127.0.0.1",
            master_port=store.address[1],
            shutdown_timeout_s=2.0,
        )
        channel = JobChannel(store.clone(), JobKeys("u"))
        decision = Decision(
            job="u",
            generation=1,
            action=Action.RECONFIGURE,
            incident="1",
            layout=LayoutSpec(tp=1, pp=1, dp=1),
            members=(0,),
            live=(0,),
        )
        publisher = threading.Timer(1.0, channel.publish_decision, args=(decision,))
        publisher.start()
        result = NodeAgent(config, store, UnicronPolicy()).run()
        publisher.join()
        assert result.outcome is Outcome.SUCCEEDED, result
        assert channel.faults(0) == [] and channel.faults(1) == []
    finally:
        store.close()


def test_a_fault_right_after_a_resumed_recovery_is_not_its_failure(tmp_path: Path) -> None:
    store = host_store("127.0.0.1", 0)
    try:
        channel = JobChannel(store, JobKeys("job"))
        log = str(tmp_path / "incidents.jsonl")
        channel.post_config({"world_size": 4, "layout": {"tp": 1, "pp": 2, "dp": 2}, "incident_log": log})
        clock = [1000.0]
        coordinator = Coordinator(channel, nodes=["node0"], rank_node=NODES, clock=lambda: clock[0])

        def fault(kind: ErrorKind, generation: int) -> None:
            for rank in range(4):  # every member reports: the incident closes at once
                channel.report(
                    FaultEvent(
                        job="job",
                        kind=kind if rank == 1 else ErrorKind.NCCL_TIMEOUT,
                        rank=rank,
                        node="node0",
                        generation=generation,
                        t_detected=clock[0] - (0.1 if rank == 1 else 0.0),  # the root reports first
                    )
                )

        coordinator.poll()
        fault(ErrorKind.CONN_REFUSED, 0)
        clock[0] += 0.01
        coordinator.poll()
        assert channel.decision(1) is not None
        for rank in range(4):
            channel.post_resumed(1, rank, 5)
        fault(ErrorKind.LINK_FLAP, 1)  # a few fast iterations later: before the slow poll sees the resumption
        clock[0] += 0.01
        coordinator.poll()
        assert channel.decision(2) is not None
        for rank in range(4):
            channel.post_resumed(2, rank, 9)
        clock[0] += 0.3
        coordinator.poll()
        first, second = read_log(log)
        assert first["outcome"] == "resumed" and first["t_resumed"] is not None
        assert (second["severity"], second["escalated"], second["action"]) == ("SEV3", "", "reattempt")
    finally:
        store.close()


def test_a_workers_own_hang_report_does_not_make_its_running_peers_hung() -> None:
    slow = event(ErrorKind.TASK_HANG, 2, iteration=57, source="worker")
    running = states(r0=RUNNING, r1=RUNNING, r2=RUNNING, r3=RUNNING)
    assert infer_hangs([slow], range(4), NODES, running, job="j", generation=0, now=12.0) == []
    timeout = event(ErrorKind.NCCL_TIMEOUT, 0)  # a peer blocked in a collective does implicate the silent
    hung = infer_hangs([timeout], range(4), NODES, running, job="j", generation=0, now=12.0)
    assert [e.rank for e in hung] == [1, 2, 3]


@pytest.mark.parametrize("finished", [True, False])
def test_a_rank_flagged_as_hung_that_finishes_its_iteration_was_only_slow(
    tmp_path: Path, finished: bool
) -> None:
    store = host_store("127.0.0.1", 0)
    try:
        channel = JobChannel(store, JobKeys("job"))
        log = str(tmp_path / "incidents.jsonl")
        channel.post_config({"world_size": 4, "layout": {"tp": 1, "pp": 2, "dp": 2}, "incident_log": log})
        clock = [1000.0]
        coordinator = Coordinator(channel, nodes=["node0"], rank_node=NODES, clock=lambda: clock[0])
        post_states(
            channel, "node0", [WorkerState(rank=r, node="node0", pid=1, status=RUNNING) for r in range(4)]
        )
        for rank in range(4):
            channel.post_progress(rank, 56, 0)
        coordinator.poll()
        channel.report(FaultEvent(job="job", kind=ErrorKind.TASK_HANG, rank=2, node="node0", generation=0,
                                  iteration=57, t_detected=clock[0], source="worker",
                                  message="iteration 57 running for 0.74s"))  # fmt: skip
        if finished:
            channel.post_progress(2, 57, 0)
        for _ in range(30):  # well past the incident's collection bound
            clock[0] += 0.25
            post_states(
                channel, "node0", [WorkerState(rank=r, node="node0", pid=1, status=RUNNING) for r in range(4)]
            )
            coordinator.poll()
        decision = channel.decision(1)
        if finished:
            assert decision is None and coordinator.records == []
        else:  # really stuck: its own report is the root, and only it is restarted
            assert decision is not None and decision.restart == (2,)
    finally:
        store.close()


def _restart_verdict(failure: Incident, settings: JobSettings, **status: str) -> Verdict:
    return decide(failure, settings, generation=0, members=(0, 1, 2, 3), progress={},
                  states=states(**status), lost_nodes=frozenset())


def test_a_restart_that_would_lose_the_only_copy_of_a_state_is_not_tried(tmp_path: Path) -> None:
    # TP2 PP2 DP1 without snapshots or a checkpoint: rank 1's state exists nowhere else.
    bare = JobSettings(job="j", world_size=4, layout=LayoutSpec(tp=2, pp=2, dp=1), rank_node=NODES,
                       snapshot_interval=0)
    history = EscalationHistory(60.0)
    history.record(event(ErrorKind.CONN_RESET, 1), Severity.SEV3, 10.0)
    repeat = incident(event(ErrorKind.CONN_RESET, 1), history=history)
    assert (repeat.severity, repeat.escalated) == (Severity.SEV2, "repeat")
    # The process that keeps failing is intact: it tries in place again instead.
    again = _restart_verdict(repeat, bare)
    assert again.action is Action.REATTEMPT and "would lose the only copy of rank 1's state" in (
        again.decision.reason)
    # A stopped process cannot try again; a dead one has lost its state already: the job stops, saying why.
    for status in ({"r1": STOPPED}, {"r1": EXITED}):
        stop = _restart_verdict(repeat, bare, **status)
        assert stop.action is Action.STOP and "rank(s) 1 cannot be restarted" in stop.stop_reason
        assert "--unicron-snapshot-interval or --save" in stop.stop_reason
    # Any other copy makes the restart worth it: snapshots, a checkpoint, a DP replica outside the restart.
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("4")
    keeps = (
        JobSettings(job="j", world_size=4, layout=bare.layout, rank_node=NODES, snapshot_interval=1),
        JobSettings(job="j", world_size=4, layout=bare.layout, rank_node=NODES, snapshot_interval=0,
                    save=str(tmp_path)),
        JobSettings(job="j", world_size=4, layout=LayoutSpec(tp=2, pp=1, dp=2), rank_node=NODES,
                    snapshot_interval=0),
        JobSettings(job="j", world_size=4, layout=bare.layout, rank_node=NODES),  # snapshots unknown
    )
    for settings in keeps:
        assert _restart_verdict(repeat, settings).action is Action.RESTART, settings
    # Both replicas of one shard restarted at once: nothing is left to copy from.
    dp2 = keeps[2]
    both = incident(event(ErrorKind.EXITED, 1), event(ErrorKind.EXITED, 3))
    assert _restart_verdict(both, dp2, r1=EXITED, r3=EXITED).action is Action.STOP
    one_each = incident(event(ErrorKind.EXITED, 0), event(ErrorKind.EXITED, 3))
    assert _restart_verdict(one_each, dp2, r0=EXITED, r3=EXITED).action is Action.RESTART
