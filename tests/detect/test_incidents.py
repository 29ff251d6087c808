"""Incident logic without a store: collection, root cause, hangs, escalation, decisions, log lines."""

import json
import subprocess
import sys

import pytest

from megatron_unicron.config import DetectionConfig
from megatron_unicron.decisions import JobState, decide, latest_checkpoint
from megatron_unicron.events import Action, Decision, ErrorKind, FaultEvent, LayoutSpec, Phase, Severity
from megatron_unicron.incident_log import append_line, incident_record, read_log, summary_line
from megatron_unicron.incidents import (
    EXITED,
    RUNNING,
    STOPPED,
    Collector,
    EscalationHistory,
    JobSettings,
    WorkerState,
    collect_bound_s,
    form_incident,
    infer_hangs,
    root_cause,
)

NODES = {0: "node0", 1: "node0", 2: "node1", 3: "node1"}
SETTINGS = JobSettings(job="j", world_size=4, layout=LayoutSpec(tp=1, pp=2, dp=2), rank_node=NODES)


def ev(kind, rank, t=10.0, source="worker", node=None, **kw):
    node = node or (NODES[rank] if rank is not None else "node1")
    return FaultEvent(
        job="j", kind=kind, rank=rank, node=node, generation=0, source=source, t_detected=t, **kw
    )


def states(**status):
    return {
        int(r[1:]): WorkerState(rank=int(r[1:]), node=NODES[int(r[1:])], pid=100 + int(r[1:]), status=s)
        for r, s in status.items()
    }


ALL_RUNNING = states(r0=RUNNING, r1=RUNNING, r2=RUNNING, r3=RUNNING)


def collector(*events, opened_at=10.0, grace=0.5, bound=4.0, settle=None):
    c = Collector(opened_at=opened_at, generation=0, members=range(4), grace_s=grace, bound_s=bound,
                  settle_s=settle)
    for e in events:
        c.add(e)
    return c


# ----------------------------------------------------------------------------------------- root cause
def test_a_killed_rank_is_the_root_not_its_peers_connection_resets():
    events = [
        ev(ErrorKind.CONN_RESET, 0, t=1.0),
        ev(ErrorKind.EXITED, 3, t=1.1, source="agent", exit_code=-9),
        ev(ErrorKind.CONN_RESET, 1, t=1.05),
    ]
    assert root_cause(events).kind is ErrorKind.EXITED


def test_lost_node_outranks_everything_and_sev1_device_errors_outrank_exits():
    lost = ev(ErrorKind.LOST_NODE, None, t=3.0, source="coordinator")
    ecc = ev(ErrorKind.ECC, 1, t=0.5)
    exited = ev(ErrorKind.EXITED, 2, t=0.1, source="agent")
    assert root_cause([exited, ecc]) is ecc
    assert root_cause([exited, lost, ecc]) is lost  # equal SEV1: the node signal wins over an in-band one


def test_among_equal_in_band_symptoms_the_earliest_wins():
    assert root_cause([ev(ErrorKind.NCCL_TIMEOUT, 2, t=5.0), ev(ErrorKind.CONN_REFUSED, 1, t=4.0)]).rank == 1


def test_root_cause_needs_events():
    with pytest.raises(ValueError):
        root_cause([])


# ----------------------------------------------------------------------------------------- collection
def test_closes_at_once_when_every_member_reported_or_is_covered():
    c = collector(ev(ErrorKind.CONN_RESET, 0), ev(ErrorKind.CONN_RESET, 1), ev(ErrorKind.CONN_RESET, 2))
    assert not c.ready(10.01, NODES, ALL_RUNNING)
    c.add(ev(ErrorKind.EXITED, 3, source="agent"))
    assert c.ready(10.01, NODES, ALL_RUNNING)


def test_a_lost_node_covers_its_ranks():
    c = collector(ev(ErrorKind.CONN_RESET, 0), ev(ErrorKind.CONN_RESET, 1))
    assert not c.ready(12.0, NODES, ALL_RUNNING)  # node1's ranks silent, their states stale
    c.add(ev(ErrorKind.LOST_NODE, None, node="node1", source="coordinator"))
    assert c.ready(12.0, NODES, ALL_RUNNING)


def test_a_stopped_rank_explains_the_incident_after_the_settle_window():
    c = collector(ev(ErrorKind.NCCL_TIMEOUT, 0), ev(ErrorKind.NCCL_TIMEOUT, 1), settle=0.1)
    stopped = states(r0=RUNNING, r1=RUNNING, r2=STOPPED, r3=RUNNING)
    assert not c.ready(10.05, NODES, stopped)
    assert c.ready(10.1, NODES, stopped)  # rank 3 still silent: its timeout would not change the root
    assert not c.ready(10.5, NODES, ALL_RUNNING)  # running and silent: maybe still in a timed wait
    assert c.ready(14.0, NODES, ALL_RUNNING)  # ... but not beyond the bound


def test_an_exit_explains_the_incident_after_the_settle_window_symptoms_wait_the_grace_window():
    c = collector(ev(ErrorKind.CONN_RESET, 0), settle=0.1)
    assert not c.ready(10.2, NODES, ALL_RUNNING)  # a reset alone: its cause may still be on its way
    c.add(ev(ErrorKind.EXITED, 2, source="agent", exit_code=-9))
    assert c.ready(10.1, NODES, ALL_RUNNING)  # ranks 1 and 3 silent: their symptoms cannot outrank it
    assert not c.ready(10.05, NODES, ALL_RUNNING)  # other exits of the same cause get 0.1 s to arrive
    assert collector(ev(ErrorKind.EXITED, 2, source="agent"), settle=0.9).settle_s == 0.5  # <= grace
    assert collector(ev(ErrorKind.ECC, 1), settle=0.1).ready(10.1, NODES, ALL_RUNNING)  # SEV1: the top


def test_a_stopped_rank_is_accounted_for_after_the_grace_window():
    c = collector(ev(ErrorKind.NCCL_TIMEOUT, 0), ev(ErrorKind.NCCL_TIMEOUT, 1), ev(ErrorKind.NCCL_TIMEOUT, 3))
    stopped = states(r0=RUNNING, r1=RUNNING, r2=STOPPED, r3=RUNNING)
    assert not c.ready(10.3, NODES, stopped)  # without a settle window, the grace window applies
    assert c.ready(10.5, NODES, stopped)


def test_an_empty_collector_never_closes():
    assert not collector().ready(100.0, NODES, ALL_RUNNING)


def test_the_bound_covers_lease_expiry_and_slow_timed_waits():
    d = DetectionConfig()
    assert collect_bound_s(d, None) == max(d.lease_ttl_s + d.lease_interval_s, 2 * d.warmup_floor_s)
    assert collect_bound_s(d, 10.0) == 2 * d.slow_factor * 10.0


# --------------------------------------------------------------------------------------------- hangs
def test_stopped_non_reporter_is_hung_running_one_only_when_peers_timed_out():
    timeouts = [ev(ErrorKind.NCCL_TIMEOUT, r) for r in (0, 1, 3)]
    stopped = states(r0=RUNNING, r1=RUNNING, r2=STOPPED, r3=RUNNING)
    hung = infer_hangs(timeouts, range(4), NODES, stopped, job="j", generation=0, now=11.0)
    assert [(e.kind, e.rank, e.source) for e in hung] == [(ErrorKind.TASK_HANG, 2, "coordinator")]
    assert "state T" in hung[0].message and hung[0].t_detected == 10.0  # the first timeout report
    assert [
        e.rank for e in infer_hangs(timeouts, range(4), NODES, ALL_RUNNING, job="j", generation=0, now=11.0)
    ] == [2]
    refused = [ev(ErrorKind.CONN_REFUSED, 1)]
    assert infer_hangs(refused, range(4), NODES, ALL_RUNNING, job="j", generation=0, now=11.0) == []
    gone = states(r0=RUNNING, r1=RUNNING, r2=EXITED, r3=RUNNING)
    assert infer_hangs(timeouts, range(4), NODES, gone, job="j", generation=0, now=11.0) == []


def test_the_hung_rank_beats_its_peers_own_hang_reports():
    c = collector(*(ev(ErrorKind.TASK_HANG, r, t=10.0 + r / 10) for r in (0, 1, 3)))
    incident = form_incident(
        c,
        incident_id=1,
        job="j",
        rank_node=NODES,
        states=states(r0=RUNNING, r1=RUNNING, r2=STOPPED, r3=RUNNING),
        history=EscalationHistory(60),
        now=10.6,
        progress={0: 6, 1: 6, 2: 6, 3: 6},
    )
    assert (incident.root.kind, incident.root.rank, incident.severity) == (
        ErrorKind.TASK_HANG,
        2,
        Severity.SEV2,
    )
    assert incident.iteration == 7  # committed 6: iteration 7 was in flight


# ---------------------------------------------------------------------------------------- escalation
def test_repeats_on_the_same_rank_escalate_within_the_window_only():
    history = EscalationHistory(window_s=60)
    refused = ev(ErrorKind.CONN_REFUSED, 1)
    grades = []
    for t in (0.0, 10.0, 20.0):
        grades.append(history.grade(refused, t))
        history.record(refused, grades[-1], t)
    assert grades == [Severity.SEV3, Severity.SEV2, Severity.SEV1]
    assert history.grade(ev(ErrorKind.CONN_REFUSED, 2), 25.0) is Severity.SEV3  # another rank
    assert history.grade(ev(ErrorKind.CONN_RESET, 1), 25.0) is Severity.SEV3  # another kind
    assert history.grade(refused, 200.0) is Severity.SEV3  # outside the window


def test_an_escalated_incident_says_so():
    history = EscalationHistory(60)
    history.record(ev(ErrorKind.EXITED, 3, source="agent"), Severity.SEV2, 5.0)
    incident = form_incident(
        collector(ev(ErrorKind.EXITED, 3, source="agent")),
        incident_id=2,
        job="j",
        rank_node=NODES,
        states={},
        history=history,
        now=10.0,
    )
    assert (incident.severity, incident.base_severity, incident.escalated) == (
        Severity.SEV1,
        Severity.SEV2,
        "repeat",
    )


# ----------------------------------------------------------------------------------------- decisions
def incident_of(*events, history=None, st=None, now=11.0):
    return form_incident(
        collector(*events),
        incident_id=1,
        job="j",
        rank_node=NODES,
        states=st or {},
        history=history or EscalationHistory(60),
        now=now,
        progress={r: 6 for r in range(4)},
    )


def test_sev3_reattempts_with_the_same_members_and_layout():
    incident = incident_of(ev(ErrorKind.CONN_REFUSED, 1))
    verdict = decide(
        incident,
        SETTINGS,
        generation=0,
        members=(0, 1, 2, 3),
        states=ALL_RUNNING,
        lost_nodes=frozenset(),
        progress={r: 6 for r in range(4)},
    )
    d = verdict.decision
    assert (d.action, d.generation, d.members, d.live, d.restart) == (
        Action.REATTEMPT,
        1,
        (0, 1, 2, 3),
        (0, 1, 2, 3),
        (),
    )
    assert d.layout == SETTINGS.layout and d.resume_iteration == 6 and verdict.commands == {}


def test_sev2_restarts_the_dead_rank_and_kills_a_live_one_first():
    exited = incident_of(ev(ErrorKind.EXITED, 3, source="agent", exit_code=-9), ev(ErrorKind.CONN_RESET, 0))
    dead = states(r0=RUNNING, r1=RUNNING, r2=RUNNING, r3=EXITED)
    verdict = decide(
        exited, SETTINGS, generation=2, members=(0, 1, 2, 3), states=dead, lost_nodes=frozenset(), progress={}
    )
    assert verdict.decision.action is Action.RESTART and verdict.decision.restart == (3,)
    assert verdict.commands == {
        "node1": {"op": "restart", "ranks": [3], "generation": 3, "kill_first": False}
    }
    hung_states = states(r0=RUNNING, r1=RUNNING, r2=STOPPED, r3=RUNNING)
    hang = incident_of(*(ev(ErrorKind.NCCL_TIMEOUT, r) for r in (0, 1, 3)), st=hung_states)
    verdict = decide(
        hang,
        SETTINGS,
        generation=0,
        members=(0, 1, 2, 3),
        states=hung_states,
        lost_nodes=frozenset(),
        progress={},
    )
    assert verdict.commands == {"node1": {"op": "restart", "ranks": [2], "generation": 1, "kill_first": True}}
    assert verdict.ranks == (2,)


def test_sev1_stops_naming_the_lost_node_and_the_checkpoint(tmp_path):
    lost = incident_of(
        ev(ErrorKind.LOST_NODE, None, node="node1", source="coordinator"), ev(ErrorKind.CONN_RESET, 0)
    )
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("5\n")
    with_ckpt = JobSettings(
        job="j", world_size=4, layout=SETTINGS.layout, rank_node=NODES, save=str(tmp_path)
    )
    verdict = decide(
        lost,
        with_ckpt,
        generation=0,
        members=(0, 1, 2, 3),
        states=ALL_RUNNING,
        lost_nodes=frozenset({"node1"}),
        progress={},
    )
    assert verdict.action is Action.STOP and verdict.checkpoint == str(tmp_path)
    assert "node1 was lost" in verdict.stop_reason and "rank(s) 2, 3" in verdict.stop_reason
    assert f"checkpoint of iteration 5 in {tmp_path}" in verdict.stop_reason
    assert verdict.decision.live == (0, 1) and verdict.ranks == (2, 3)
    empty = tmp_path / "empty"
    no_ckpt = JobSettings(job="j", world_size=4, layout=SETTINGS.layout, rank_node=NODES, save=str(empty))
    verdict = decide(
        lost,
        no_ckpt,
        generation=0,
        members=(0, 1, 2, 3),
        states=ALL_RUNNING,
        lost_nodes=frozenset({"node1"}),
        progress={},
    )
    assert verdict.checkpoint is None and f"no checkpoint exists in {empty}" in verdict.stop_reason
    assert latest_checkpoint(None)[0] is None and "--save" in latest_checkpoint(None)[1]


def test_a_device_error_names_the_rank():
    ecc = incident_of(ev(ErrorKind.ECC, 2, message="CUDA error: uncorrectable ECC error encountered"))
    verdict = decide(
        ecc,
        SETTINGS,
        generation=0,
        members=(0, 1, 2, 3),
        states=ALL_RUNNING,
        lost_nodes=frozenset(),
        progress={},
    )
    assert verdict.action is Action.STOP
    assert "device of rank 2 on node1 failed (ecc: CUDA error" in verdict.stop_reason
    assert "isolate node1" in verdict.stop_reason and "--save" in verdict.stop_reason


def test_sev1_asks_the_planner_first():
    seen = []

    def plan(state: JobState, lost: frozenset[str]) -> Decision:
        seen.append((state, lost))
        return Decision(
            job="j",
            generation=state.generation + 1,
            action=Action.RECONFIGURE,
            incident="1",
            layout=LayoutSpec(tp=1, pp=2, dp=1),
            members=state.live,
            live=state.live,
        )

    lost = incident_of(ev(ErrorKind.LOST_NODE, None, node="node1", source="coordinator"))
    verdict = decide(
        lost,
        SETTINGS,
        generation=0,
        members=(0, 1, 2, 3),
        states=ALL_RUNNING,
        lost_nodes=frozenset({"node1"}),
        progress={},
        plan_fn=plan,
    )
    assert verdict.action is Action.RECONFIGURE and verdict.decision.members == (0, 1)
    assert seen[0][1] == frozenset({"node1"}) and seen[0][0].live == (0, 1)


# ------------------------------------------------------------------------------------------ the log
def test_log_line_and_summary(tmp_path):
    incident = incident_of(
        ev(ErrorKind.EXITED, 3, t=100.04, source="agent", exit_code=-9),
        ev(ErrorKind.CONN_RESET, 0, t=100.05, phase=Phase.ALLREDUCE, iteration=7),
    )
    verdict = decide(
        incident, SETTINGS, generation=0, members=(0, 1, 2, 3), states={}, lost_nodes=frozenset(), progress={}
    )
    record = incident_record(verdict, t_decided=100.56, t_fault=100.0, t_resumed=102.0, outcome="resumed")
    path = tmp_path / "sub" / "incidents.jsonl"
    append_line(str(path), record)
    (line,) = read_log(str(path))
    assert json.loads(path.read_text()) == line
    assert {
        k: line[k]
        for k in (
            "job",
            "incident",
            "root_kind",
            "severity",
            "action",
            "ranks",
            "node",
            "iteration",
            "generation",
            "t_fault",
            "t_detected",
            "t_decided",
            "t_resumed",
            "outcome",
            "exit_code",
        )
    } == {
        "job": "j",
        "incident": 1,
        "root_kind": "exited",
        "severity": "SEV2",
        "action": "restart",
        "ranks": [3],
        "node": "node1",
        "iteration": 7,
        "generation": 0,
        "t_fault": 100.0,
        "t_detected": 100.04,
        "t_decided": 100.56,
        "t_resumed": 102.0,
        "outcome": "resumed",
        "exit_code": -9,
    }
    assert [e["kind"] for e in line["events"]] == ["exited", "conn-reset"]
    assert line["events"][1] == {
        "kind": "conn-reset",
        "rank": 0,
        "node": "node0",
        "source": "worker",
        "t": 100.05,
        "iteration": 7,
        "phase": "allreduce",
    }
    assert summary_line(verdict, t_decided=100.56, t_fault=100.0) == (
        "unicron: incident 1 SEV2 exited rank 3 (node1, SIGKILL) at iteration 7 -> restart rank(s) 3; "
        "detected 0.04 s after the fault, decided 0.52 s after detection"
    )
    with pytest.raises(ValueError):
        incident_record(verdict, t_decided=1.0, t_fault=None, t_resumed=None, outcome="fine")


def test_settings_from_the_posted_config():
    config = {
        "world_size": 4,
        "layout": {"tp": 1, "pp": 2, "dp": 2},
        "incident_log": "/x.jsonl",
        "save": None,
        "train_iters": 9,
        "detection": {"grace_window_s": 0.1, "future_knob": 1},
    }
    s = JobSettings.from_config("j", config, NODES)
    assert s.detection.grace_window_s == 0.1 and s.rank_node == NODES and s.train_iters == 9
    with pytest.raises(ValueError, match="layout"):
        JobSettings.from_config("j", {"world_size": 4, "layout": {"tp": 1, "pp": 1, "dp": 2}}, NODES)
    with pytest.raises(ValueError, match="world_size"):
        JobSettings.from_config("j", {"layout": {}}, NODES)


def test_incident_logic_imports_no_torch():
    code = (
        "import sys, megatron_unicron.incidents, megatron_unicron.decisions, megatron_unicron.incident_log; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
