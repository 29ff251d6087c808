"""The node agent in this process, with tiny workers: policies, restart_worker, stop, SIGKILL after grace."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from megatron_unicron.agent import (
    AgentConfig,
    AgentResult,
    ExitPolicy,
    NodeAgent,
    Outcome,
    Reaction,
)
from megatron_unicron.node_group import AgentError, NodeGroup
from megatron_unicron.store import JobKeys, TCPStoreBackend, host_store
from megatron_unicron.workers import WorkerExit

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def store() -> Iterator[TCPStoreBackend]:
    s = host_store("127.0.0.1", 0)
    yield s
    s.close()


def _config(store: TCPStoreBackend, code: str, **kw: object) -> AgentConfig:
    args: dict[str, object] = dict(job="t", node_rank=0, nnodes=1, nproc_per_node=2,
                                   argv=(sys.executable, "-c", code), master_addr="127.0.0.1",
                                   master_port=store.address[1])
    args.update(kw)
    return AgentConfig(**args)  # type: ignore[arg-type]


class RestartOnce(ExitPolicy):
    """Restarts a failed worker once with RESTARTED=1 (what a process-level restart will do)."""

    def __init__(self) -> None:
        self.seen: list[WorkerExit] = []

    def on_worker_exit(self, agent: NodeAgent, worker_exit: WorkerExit) -> Reaction:
        self.seen.append(worker_exit)
        if worker_exit.failed:
            agent.restart_worker(worker_exit.local_rank, {"RESTARTED": "1"})
        return Reaction.CONTINUE


def test_policy_can_restart_one_worker_with_the_same_rank(store: TCPStoreBackend) -> None:
    code = ("import os, sys; print('rank', os.environ['RANK'], os.environ.get('RESTARTED'), flush=True); "
            "sys.exit(7 if os.environ['RANK'] == '1' and not os.environ.get('RESTARTED') else 0)")
    policy = RestartOnce()
    agent = NodeAgent(_config(store, code), store, policy)
    result = agent.run()
    assert result.outcome is Outcome.SUCCEEDED and result.returncode == 0
    failed = [e for e in policy.seen if e.failed]
    assert [(e.rank, e.returncode) for e in failed] == [(1, 7)]  # the fault fired, once
    assert sorted((e.rank, e.returncode) for e in policy.seen) == [(0, 0), (1, 0), (1, 7)]
    assert agent.workers[1].pid != failed[0].pid


def test_restart_worker_refuses_a_live_worker(store: TCPStoreBackend) -> None:
    errors: list[Exception] = []

    class RestartTheOther(ExitPolicy):
        def on_worker_exit(self, agent: NodeAgent, worker_exit: WorkerExit) -> Reaction:
            try:
                agent.restart_worker(1 - worker_exit.local_rank)
            except RuntimeError as e:
                errors.append(e)
            agent.stop()
            return Reaction.CONTINUE

    code = "import os, time; time.sleep(0 if os.environ['RANK'] == '0' else 30)"
    result = NodeAgent(_config(store, code), store, RestartTheOther()).run()
    assert result.outcome is Outcome.STOPPED
    assert len(errors) == 1 and "still running" in str(errors[0])


def test_stop_from_another_thread_ends_the_workers(store: TCPStoreBackend) -> None:
    agent = NodeAgent(_config(store, "import time; time.sleep(60)"), store)
    threading.Timer(1.0, agent.stop, args=(signal.SIGTERM,)).start()
    t0 = time.monotonic()
    result = agent.run()
    assert time.monotonic() - t0 < 15
    assert (result.outcome, result.returncode) == (Outcome.STOPPED, 128 + signal.SIGTERM)
    assert all(w.exit is not None and w.exit.returncode == -signal.SIGTERM for w in agent.workers.values())


def test_worker_ignoring_sigterm_is_killed_after_the_grace(store: TCPStoreBackend) -> None:
    code = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ignoring', flush=True); time.sleep(60)")
    agent = NodeAgent(_config(store, code, nproc_per_node=1, shutdown_timeout_s=1.0), store)
    threading.Timer(2.0, agent.stop).start()
    result = agent.run()
    assert result.outcome is Outcome.STOPPED and result.returncode == 1
    exit_ = agent.workers[0].exit
    assert exit_ is not None and exit_.returncode == -signal.SIGKILL


def test_failure_summary_names_rank_node_and_recorded_error(store: TCPStoreBackend) -> None:
    code = ("import os\nfrom torch.distributed.elastic.multiprocessing.errors import record\n"
            "@record\ndef main():\n    if os.environ['RANK'] == '1':\n        raise ValueError('bad batch')\n"
            "    import time; time.sleep(30)\nmain()\n")
    result = NodeAgent(_config(store, code), store).run()
    assert result.outcome is Outcome.FAILED and result.returncode == 1
    assert [f.rank for f in result.failures] == [1]  # rank 0 was stopped by the agent: not a failure
    lines = result.summary("t")
    assert len(lines) == 2 and "failed with exit status 1" in lines[0]
    assert "rank 1 (local_rank 1, node0" in lines[1] and "exited with code 1" in lines[1]
    assert lines[1].endswith("ValueError: bad batch")


def test_returncode_conventions() -> None:
    def exit_(code: int) -> WorkerExit:
        return WorkerExit(rank=0, local_rank=0, node="node0", pid=1, attempt=0, returncode=code, time=0.0)

    assert AgentResult(outcome=Outcome.FAILED, attempts=1, failures=(exit_(3),)).returncode == 3
    assert AgentResult(outcome=Outcome.FAILED, attempts=1, failures=(exit_(-9),)).returncode == 137
    assert AgentResult(outcome=Outcome.STOPPED, attempts=1, signum=2).returncode == 130
    assert AgentResult(outcome=Outcome.ERROR, attempts=1).returncode == 1
    assert exit_(-9).how() == "killed by SIGKILL" and exit_(3).how() == "exited with code 3"


@pytest.mark.parametrize(
    "bad",
    [dict(nnodes=0), dict(node_rank=1), dict(nproc_per_node=0), dict(max_restarts=-1), dict(mode="x"),
     dict(argv=())],
)
def test_config_validates_itself(store: TCPStoreBackend, bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _config(store, "pass", **bad)


def _group(store: TCPStoreBackend, node_rank: int, nnodes: int = 2, join_timeout_s: float = 10) -> NodeGroup:
    return NodeGroup(store, JobKeys("g"), node_rank=node_rank, nnodes=nnodes, join_timeout_s=join_timeout_s,
                     lease_interval_s=0.2, lease_timeout_s=5.0, poll_interval_s=0.05, idle=time.sleep)


def test_node_group_rejects_a_second_launcher_for_the_same_node(store: TCPStoreBackend) -> None:
    first = _group(store, 0)
    first.register({"nproc_per_node": 2})
    with pytest.raises(AgentError, match="node0 .* is already registered"):
        _group(store, 0).register({"nproc_per_node": 2})
    first.leave("succeeded", 0.0)


def test_node_group_rejects_a_node_launched_differently(store: TCPStoreBackend) -> None:
    node0, node1 = _group(store, 0), _group(store, 1)
    node0.register({"nproc_per_node": 2})
    with pytest.raises(AgentError, match=r"nproc_per_node=3 \(node0 has 2\)"):
        node1.register({"nproc_per_node": 3})
    node1.leave("error", 0.0)
    node0.leave("error", 0.0)


def test_node_group_join_timeout_names_the_missing_node(store: TCPStoreBackend) -> None:
    node0 = _group(store, 0, nnodes=3, join_timeout_s=0.5)
    node0.register({})
    node2 = _group(store, 2, nnodes=3)
    node2.register({})
    store.set(JobKeys("g").attempt(0).ready("node2"), "1")
    with pytest.raises(AgentError, match=r"timed out after 0.5s .* \(missing: node1\)"):
        node0.open_attempt(0)
    node2.leave("error", 0.0)
    node0.leave("error", 0.0)


def test_node_group_attempt_protocol_and_root_cause(store: TCPStoreBackend) -> None:
    node0, node1 = _group(store, 0), _group(store, 1)
    store.set("default_pg/0//cpu//0/0", "stale address")
    for g in (node0, node1):
        g.register({})
    opener = threading.Thread(target=node1.open_attempt, args=(0,))
    opener.start()
    node0.open_attempt(0)
    opener.join()
    assert not store.check(["default_pg/0//cpu//0/0"])  # the old attempt's worker keys are gone

    def exit_(rank: int) -> WorkerExit:
        return WorkerExit(rank=rank, local_rank=0, node=f"node{rank}", pid=rank, attempt=0, returncode=3,
                          time=float(rank))

    assert node1.publish_failure(0, exit_(1)).rank == 1
    assert node0.publish_failure(0, exit_(0)).rank == 1  # first published failure is the root cause
    assert node0.failure(0) == exit_(1)
    node1.abort("node1 was stopped by SIGINT")
    with pytest.raises(AgentError, match="aborted"):
        node0.failure(0)
    node1.leave("stopped", 0.0)
    node0.leave("stopped", 0.0)
