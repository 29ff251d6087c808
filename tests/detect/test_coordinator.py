"""The coordinator on a real TCPStore, driven by synthetic reports and a hand-moved clock."""

import pytest

from megatron_unicron.coordinator import Coordinator
from megatron_unicron.events import Action, Decision, ErrorKind, FaultEvent, LayoutSpec
from megatron_unicron.incident_log import read_log
from megatron_unicron.incidents import RUNNING, STOPPED, WorkerState
from megatron_unicron.protocol import JobChannel
from megatron_unicron.store import JobKeys, host_store, renew_lease
from megatron_unicron.worker_states import post_states

NODES = {0: "node0", 1: "node0", 2: "node1", 3: "node1"}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def store():
    server = host_store("127.0.0.1", 0)  # its own connection is enough: the coordinator runs in the host
    yield server
    server.close()


class Rig:
    """A coordinator plus the store view a test pokes at."""

    def __init__(self, store, tmp_path, **config) -> None:
        self.clock = Clock()
        self.channel = JobChannel(store, JobKeys("job"))
        self.lines: list[str] = []
        self.log = str(tmp_path / "incidents.jsonl")
        detection = {"grace_window_s": 0.5, "resume_timeout_s": 30.0, **config.pop("detection", {})}
        self.config = {
            "world_size": 4,
            "layout": {"tp": 1, "pp": 2, "dp": 2},
            "incident_log": self.log,
            "save": None,
            "train_iters": 20,
            "detection": detection,
            **config,
        }
        self.channel.post_config(self.config)
        self.coordinator = Coordinator(
            self.channel, nodes=["node0", "node1"], rank_node=NODES, clock=self.clock, emit=self.lines.append
        )
        self.states(r0=RUNNING, r1=RUNNING, r2=RUNNING, r3=RUNNING)
        for node in ("node0", "node1"):
            renew_lease(store, self.channel.keys.lease(node), self.clock.t)

    def step(self, dt: float = 0.25) -> None:
        self.clock.t += dt
        for node in ("node0", "node1"):
            if node not in getattr(self, "dead_nodes", ()):
                renew_lease(self.channel.store, self.channel.keys.lease(node), self.clock.t)
        self.coordinator.poll()

    def states(self, **status: str) -> None:
        for node in ("node0", "node1"):
            post_states(
                self.channel,
                node,
                [
                    WorkerState(rank=int(r[1:]), node=node, pid=100 + int(r[1:]), status=s)
                    for r, s in status.items()
                    if NODES[int(r[1:])] == node
                ],
            )

    def report(self, kind, rank, generation=0, **kw) -> None:
        node = kw.pop("node", NODES.get(rank, "node1") if rank is not None else "node1")
        self.channel.report(
            FaultEvent(
                job="job",
                kind=kind,
                rank=rank,
                node=node,
                generation=generation,
                t_detected=self.clock.t,
                **kw,
            )
        )

    def resume(self, generation: int, ranks=range(4)) -> None:
        for r in ranks:
            self.channel.post_resumed(generation, r, 7)


@pytest.fixture
def rig(store, tmp_path):
    return Rig(store, tmp_path)


def test_sigkilled_rank_one_incident_restart_then_resumed_line(rig):
    t_fault = rig.clock.t - 0.05
    rig.channel.claim_fault(
        0, {"fault": "kill:3:7:forward", "kind": "kill", "rank": 3, "iteration": 7, "t_fault": t_fault}
    )
    for r in range(3):
        rig.channel.post_progress(r, 6, 0)
    rig.channel.post_progress(3, 6, 0)
    rig.states(r0=RUNNING, r1=RUNNING, r2=RUNNING, r3="exited")
    rig.report(ErrorKind.EXITED, 3, source="agent", exit_code=-9)
    for r in range(3):
        rig.report(ErrorKind.CONN_RESET, r, iteration=7)
    rig.step()
    decision = rig.channel.decision(1)
    assert decision is not None and decision.action is Action.RESTART and decision.restart == (3,)
    assert rig.channel.agent_commands("node1") == [
        {"op": "restart", "ranks": [3], "generation": 1, "kill_first": False}
    ]
    assert rig.channel.agent_commands("node0") == []
    assert rig.lines == [
        "unicron: incident 1 SEV2 exited rank 3 (node1, SIGKILL) at iteration 7 -> restart "
        "rank(s) 3; detected 0.05 s after the fault, decided 0.25 s after detection"
    ]
    assert read_log(rig.log) == []  # the line is written once the outcome is known
    rig.resume(1, ranks=(0, 1, 2))
    rig.step()
    assert read_log(rig.log) == []
    rig.resume(1, ranks=(3,))
    rig.step()
    (line,) = read_log(rig.log)
    assert (line["root_kind"], line["severity"], line["action"], line["outcome"]) == (
        "exited",
        "SEV2",
        "restart",
        "resumed",
    )
    assert line["t_fault"] == t_fault and line["t_resumed"] is not None
    assert line["iteration"] == 7 and line["generation"] == 0 and line["new_generation"] == 1
    assert sorted(e["kind"] for e in line["events"]) == ["conn-reset"] * 3 + ["exited"]
    assert "resumed: generation 1" in rig.lines[-1]


def test_stopped_silent_rank_is_the_hung_root_and_is_killed_first(rig):
    rig.states(r0=RUNNING, r1=RUNNING, r2=STOPPED, r3=RUNNING)
    for r in (0, 1, 3):
        rig.report(ErrorKind.NCCL_TIMEOUT, r, message="Timed out waiting 2000ms for recv operation")
    rig.step(0.05)
    assert rig.channel.decision(1) is None  # still in the grace window
    rig.step(0.5)
    decision = rig.channel.decision(1)
    assert decision.action is Action.RESTART and decision.restart == (2,)
    assert rig.channel.agent_commands("node1") == [
        {"op": "restart", "ranks": [2], "generation": 1, "kill_first": True}
    ]
    assert "SEV2 hang rank 2" in rig.lines[0]


def test_running_silent_rank_waits_for_the_bound_then_is_hung(rig):
    for r in (0, 1, 3):
        rig.report(ErrorKind.NCCL_TIMEOUT, r)
    rig.step(0.05)
    for _ in range(10):
        rig.step(0.3)
    assert rig.channel.decision(1) is None  # rank 2 may still be in a timed wait: 3.05 s < 4 s bound
    rig.step(1.1)
    assert rig.channel.decision(1).restart == (2,)


def test_in_band_fault_reattempts_once_peers_report(rig):
    rig.report(ErrorKind.CONN_REFUSED, 1)
    rig.step(0.05)
    rig.step(0.6)
    assert rig.channel.decision(1) is None  # peers still blocked in their collectives
    for r in (0, 2, 3):
        rig.report(ErrorKind.NCCL_TIMEOUT, r)
    rig.step(0.05)
    decision = rig.channel.decision(1)
    assert decision.action is Action.REATTEMPT and decision.members == (0, 1, 2, 3)
    assert rig.channel.agent_commands("node0") == []
    assert "SEV3 conn-refused rank 1" in rig.lines[0]


def test_repeated_fault_escalates_to_restart_then_stop(rig):
    for generation in range(3):
        rig.report(ErrorKind.CONN_REFUSED, 1, generation=generation)
        for r in (0, 2, 3):
            rig.report(ErrorKind.NCCL_TIMEOUT, r, generation=generation)
        rig.step(0.05)
        if generation < 2:
            rig.resume(generation + 1)
            rig.step()
    actions = [line["action"] for line in read_log(rig.log)]
    severities = [line["severity"] for line in read_log(rig.log)]
    assert actions == ["reattempt", "restart", "stop"] and severities == ["SEV3", "SEV2", "SEV1"]
    assert [line["escalated"] for line in read_log(rig.log)] == ["", "repeat", "repeat"]
    assert rig.channel.agent_commands("node0") == [
        {"op": "restart", "ranks": [1], "generation": 2, "kill_first": True}
    ]
    assert "rank 1 on node0 failed again" in rig.channel.stopped()["reason"]


def test_lost_node_within_the_ttl_stops_with_the_checkpoint(store, tmp_path):
    save = tmp_path / "ckpt"
    save.mkdir()
    (save / "latest_checkpointed_iteration.txt").write_text("4")
    rig = Rig(store, tmp_path, save=str(save))
    rig.channel.claim_fault(
        0, {"fault": "node:2:5:forward", "kind": "node", "rank": 2, "iteration": 5, "t_fault": rig.clock.t}
    )
    rig.dead_nodes = ("node1",)
    rig.report(ErrorKind.CONN_RESET, 0)
    rig.report(ErrorKind.CONN_RESET, 1)
    t_dead = rig.clock.t
    while rig.channel.stopped() is None:
        rig.step(0.25)
        assert rig.clock.t - t_dead < 3.6, "lease expiry not detected"
    (line,) = read_log(rig.log)
    assert (line["root_kind"], line["severity"], line["action"], line["outcome"], line["node"]) == (
        "lost-node",
        "SEV1",
        "stop",
        "stopped",
        "node1",
    )
    assert line["ranks"] == [2, 3] and line["checkpoint"] == str(save) and line["t_fault"] == t_dead
    stop = rig.channel.stopped()
    assert "node1 was lost" in stop["reason"] and f"checkpoint of iteration 4 in {save}" in stop["reason"]
    assert stop["checkpoint"] == str(save) and rig.channel.decision(1).action is Action.STOP


def test_a_node_that_left_is_not_lost(rig):
    rig.dead_nodes = ("node1",)
    rig.channel.store.set(rig.channel.keys.left("node1"), "succeeded")
    for _ in range(20):
        rig.step(0.5)
    assert rig.channel.faults(0) == [] and rig.channel.stopped() is None


def test_a_recovery_that_does_not_resume_is_escalated(store, tmp_path):
    rig = Rig(store, tmp_path, detection={"resume_timeout_s": 2.0})
    rig.report(ErrorKind.CONN_RESET, 1)
    for r in (0, 2, 3):
        rig.report(ErrorKind.NCCL_TIMEOUT, r)
    rig.step(0.05)
    assert rig.channel.decision(1).action is Action.REATTEMPT
    rig.resume(1, ranks=(0, 1, 3))
    for _ in range(10):
        rig.step(0.25)
    assert [line["outcome"] for line in read_log(rig.log)] == ["not-resumed"]
    decision = rig.channel.decision(2)
    assert decision.action is Action.RESTART and decision.restart == (2,)  # the rank that did not resume
    rig.resume(2)
    rig.step()
    second = read_log(rig.log)[1]
    assert (second["severity"], second["escalated"], second["outcome"]) == ("SEV2", "not-resumed", "resumed")


def test_a_new_incident_supersedes_an_unresumed_one(rig):
    rig.report(ErrorKind.EXITED, 3, source="agent", exit_code=1)
    for r in range(3):
        rig.report(ErrorKind.CONN_RESET, r)
    rig.step()
    rig.report(ErrorKind.EXITED, 3, generation=1, source="agent", exit_code=1)  # the restart failed at once
    rig.step(0.6)
    assert len(read_log(rig.log)) == 0  # the silent peers may still report until the bound
    rig.step(4.0)
    lines = read_log(rig.log)
    assert [line["outcome"] for line in lines] == ["superseded", "stopped"]
    assert lines[1]["severity"] == "SEV1" and lines[1]["generation"] == 1


def test_late_symptoms_of_a_decided_generation_are_ignored(rig):
    rig.report(ErrorKind.CONN_REFUSED, 1)
    for r in (0, 2, 3):
        rig.report(ErrorKind.NCCL_TIMEOUT, r)
    rig.step()
    rig.report(ErrorKind.NCCL_TIMEOUT, 0)  # generation 0 again
    rig.resume(1)
    for _ in range(5):
        rig.step()
    assert rig.channel.decision(2) is None and [line["outcome"] for line in read_log(rig.log)] == ["resumed"]


def test_without_config_the_job_stops_once_every_worker_is_gone(store, tmp_path):
    channel = JobChannel(store, JobKeys("noconf"))
    lines: list[str] = []
    coordinator = Coordinator(channel, nodes=["node0"], rank_node={0: "node0", 1: "node0"}, emit=lines.append)
    post_states(channel, "node0", [WorkerState(rank=r, node="node0", pid=1, status="exited") for r in (0, 1)])
    for r in (0, 1):
        channel.report(
            FaultEvent(
                job="noconf",
                kind=ErrorKind.EXITED,
                rank=r,
                node="node0",
                generation=0,
                source="agent",
                exit_code=1,
            )
        )
    coordinator.poll()
    assert "never posted the job's unicron config" in channel.stopped()["reason"] and coordinator.finished


def test_an_invalid_config_stops_the_job(store):
    channel = JobChannel(store, JobKeys("bad"))
    channel.post_config({"world_size": 3, "layout": {"tp": 2, "pp": 1, "dp": 1}})
    Coordinator(channel, nodes=["node0"], rank_node={0: "node0"}).poll()
    assert "config is invalid" in channel.stopped()["reason"]


@pytest.mark.parametrize("iteration, switches", [(10, True), (18, False)])
def test_a_rank_back_too_late_for_a_switch_before_the_last_iteration_is_not_planned_in(
    rig, iteration: int, switches: bool
) -> None:
    # Members switch before an iteration: a switch after iteration 21 of a 20-iteration job would leave
    # the returning rank waiting for members that have finished.
    def scale_fn(state, what):
        at = state.iteration + 3
        return Decision(job=state.job, generation=state.generation + 1, action=Action.SCALE_UP,
                        incident="back", layout=LayoutSpec(tp=1, pp=2, dp=2), members=(0, 1, 2, 3),
                        live=(0, 1, 2, 3), resume_iteration=at, at_iteration=at)  # fmt: skip

    rig.coordinator.scale_fn = scale_fn
    rig.step()
    for rank in range(4):
        rig.channel.post_progress(rank, iteration, 0)
    rig.coordinator._scale_up("rank(s) 3", [3])
    assert (rig.channel.decision(1) is not None) is switches
    if not switches:
        assert any("training ends at iteration 20" in line for line in rig.lines), rig.lines
