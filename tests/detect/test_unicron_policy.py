"""The agent's --unicron policy in this process: exit reports, restart commands, worker states, the end."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from megatron_unicron.agent import AgentConfig, AgentResult, NodeAgent, Outcome
from megatron_unicron.events import ErrorKind
from megatron_unicron.incidents import STOPPED
from megatron_unicron.protocol import JobChannel
from megatron_unicron.store import JobKeys, TCPStoreBackend, host_store
from megatron_unicron.unicron_policy import UnicronPolicy
from megatron_unicron.worker_states import read_states

pytestmark = pytest.mark.timeout(60)

# Each start of a worker appends its rank and generation to <dir>/starts; RANK 1's first start fails as asked.
WORKER = """
import json, os, signal, sys, time
rank, restarted = os.environ["RANK"], os.environ.get("UNICRON_RESTARTED")
with open(os.path.join(sys.argv[1], "starts"), "a") as f:
    f.write(json.dumps([rank, os.environ.get("UNICRON_GENERATION"), restarted]) + "\\n")
if rank == "1" and not restarted:
    if sys.argv[2] == "exit":
        sys.exit(7)
    if sys.argv[2] == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
if sys.argv[2] == "sleep":
    time.sleep(60)
"""


@pytest.fixture
def store() -> Iterator[TCPStoreBackend]:
    s = host_store("127.0.0.1", 0)
    yield s
    s.close()


def run_agent(
    store: TCPStoreBackend,
    tmp_path: Path,
    mode: str,
    coordinator: Callable[[JobChannel], None],
    **policy: float,
) -> tuple[AgentResult, JobChannel]:
    config = AgentConfig(
        job="u",
        node_rank=0,
        nnodes=1,
        nproc_per_node=2,
        mode="unicron",
        argv=(sys.executable, "-c", WORKER, str(tmp_path), mode),
        master_addr="127.0.0.1",
        master_port=store.address[1],
        shutdown_timeout_s=2.0,
    )
    channel = JobChannel(store.clone(), JobKeys("u"))
    agent = NodeAgent(config, store, UnicronPolicy(**policy))
    thread = threading.Thread(target=coordinator, args=(channel,), daemon=True)
    thread.start()
    result = agent.run()
    thread.join(10)
    return result, channel


def wait_for(what: Callable[[], object], timeout_s: float = 20.0) -> object:
    deadline = time.monotonic() + timeout_s
    while not (value := what()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return value


def starts(tmp_path: Path) -> list[list[str | None]]:
    return [json.loads(line) for line in (tmp_path / "starts").read_text().splitlines()]


def test_a_failed_exit_is_reported_and_the_restart_command_respawns_the_rank(store, tmp_path) -> None:
    def coordinator(channel: JobChannel) -> None:
        wait_for(lambda: channel.faults(0))
        channel.command_agent("node0", {"op": "restart", "ranks": [1], "generation": 1, "kill_first": False})

    result, channel = run_agent(store, tmp_path, "exit", coordinator)
    assert result.outcome is Outcome.SUCCEEDED, result
    (event,) = channel.faults(0)  # rank 0's exit 0, and the restarted rank's, are not events
    assert (event.kind, event.rank, event.exit_code, event.source, event.node) == (
        ErrorKind.EXITED,
        1,
        7,
        "agent",
        "node0",
    )
    assert sorted(starts(tmp_path), key=str) == [["0", None, None], ["1", "1", "1"], ["1", None, None]]


def test_a_stopped_worker_is_published_then_killed_first_and_restarted(store, tmp_path) -> None:
    seen: list[str] = []

    def coordinator(channel: JobChannel) -> None:
        state = wait_for(lambda: (s := read_states(channel, ["node0"]).get(1)) and s.status == STOPPED and s)
        seen.append(state.status)  # type: ignore[union-attr]
        channel.command_agent("node0", {"op": "restart", "ranks": [1], "generation": 1, "kill_first": True})

    result, channel = run_agent(store, tmp_path, "stop", coordinator)
    assert result.outcome is Outcome.SUCCEEDED and seen == [STOPPED]
    assert channel.faults(0) == []  # the agent's own kill is no fault
    assert ["1", "1", "1"] in starts(tmp_path)


def test_a_stop_ends_the_node_with_the_reason_and_a_failure_status(store, tmp_path) -> None:
    def coordinator(channel: JobChannel) -> None:
        wait_for(lambda: len(read_states(channel, ["node0"])) == 2)
        channel.stop("node1 was lost; resume from nowhere", None)

    result, channel = run_agent(store, tmp_path, "sleep", coordinator, stop_grace_s=0.5)
    assert result.outcome is Outcome.FAILED and result.returncode == 1
    assert "node1 was lost" in result.message and result.failures == ()
    assert channel.faults(0) == []  # exits after the stop are not faults


def test_done_and_clean_exits_succeed(store, tmp_path) -> None:
    result, channel = run_agent(store, tmp_path, "ok", lambda channel: channel.mark_done())
    assert result.outcome is Outcome.SUCCEEDED and channel.faults(0) == []
