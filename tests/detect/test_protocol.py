"""The job channel on a real TCPStore: reports, decisions, fault claims, stop and done."""

import socket
import threading
import time
from datetime import timedelta

import pytest

from megatron_unicron.events import Action, Decision, ErrorKind, FaultEvent, LayoutSpec, Phase
from megatron_unicron.protocol import JobChannel
from megatron_unicron.store import JobKeys, StoreTimeout, connect_store, host_store


@pytest.fixture
def channel():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = host_store("127.0.0.1", port)
    client = connect_store("127.0.0.1", port, timedelta(seconds=10))
    yield JobChannel(client, JobKeys("job1"))
    client.close()
    server.close()


def event(rank, kind=ErrorKind.CONN_RESET):
    return FaultEvent(job="job1", kind=kind, rank=rank, node="node0", generation=0, iteration=4,
                      phase=Phase.ALLREDUCE, t_detected=time.time())  # fmt: skip


def test_reports_round_trip_in_order(channel):
    channel.report(event(1))
    channel.report(event(2, ErrorKind.EXITED))
    assert [(e.rank, e.kind) for e in channel.faults(0)] == [(1, ErrorKind.CONN_RESET), (2, ErrorKind.EXITED)]
    assert channel.faults(1) == []


def test_decision_wakes_a_waiting_worker(channel):
    decision = Decision(job="job1", generation=1, action=Action.REATTEMPT, incident="i1",
                        layout=LayoutSpec(tp=2, pp=1, dp=1), members=(0, 1), live=(0, 1))  # fmt: skip
    threading.Timer(0.2, channel.publish_decision, args=(decision,)).start()
    assert channel.wait_decision(1, timedelta(seconds=10)) == decision
    assert channel.latest_generation() == 1
    with pytest.raises(StoreTimeout):
        channel.wait_decision(2, timedelta(seconds=0.3))


def test_fault_claim_is_first_writer_wins(channel):
    assert channel.claim_fault(0, {"kind": "kill", "t_fault": 1.0})
    assert not channel.claim_fault(0, {"kind": "kill", "t_fault": 2.0})
    assert channel.fired_fault(0)["t_fault"] == 1.0 and len(channel.fired_faults()) == 1


def test_stop_and_done_end_a_wait(channel):
    channel.stop("node1 lost", "/ckpt")
    assert channel.wait_decision(5, timedelta(seconds=5)) is None
    assert channel.stopped() == {"reason": "node1 lost", "checkpoint": "/ckpt"}
