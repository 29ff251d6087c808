"""The node agent: starts this node's workers torchrun-style, supervises them, reacts to their exits.

One agent runs per node (inside ``unicron-run``). It registers its node in the job's store, keeps a
lease alive, meets the other nodes' agents at the start of every launch attempt, starts
``nproc_per_node`` workers with torchrun's environment, and sees each exit the moment it happens. What
an exit means is a pluggable ``ExitPolicy``: ``FailFastPolicy`` is torchrun (any failure ends the group
on every node, which may then be restarted up to ``max_restarts`` times); ``KeepSurvivorsPolicy`` is the
``--unicron`` mode's placeholder (the survivors keep running, the death is recorded in the store).

Attempt protocol (keys in ``store.AttemptKeys``): every agent sets ``ready/<node>``; node 0 waits for
all of them, clears the workers' rendezvous keys and sets ``go``; the others wait for ``go``. A failing
agent publishes its root cause under ``failure`` (first writer wins) and every agent polls that key.
An agent whose workers all succeeded sets ``done/<node>`` and waits for the others. An agent leaving
the job sets ``nodes/<node>/left``; node 0, which hosts the store, leaves last.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import queue
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from megatron_unicron.store import (
    AttemptKeys,
    JobKeys,
    Store,
    StoreError,
    append_record,
    clear_worker_keys,
    lease_age,
    renew_lease,
)
from megatron_unicron.workers import WorkerExit, WorkerProcess, stop_workers

log = logging.getLogger(__name__)

MODES = ("torchrun", "unicron")


class AgentError(RuntimeError):
    """The agent cannot go on (a peer node is missing or inconsistent); the message says why."""


class _Stopped(Exception):
    """Raised inside the agent's loops when ``stop()`` was requested."""


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """Everything one node's agent needs to run its share of a job."""

    job: str
    node_rank: int
    nnodes: int
    nproc_per_node: int
    argv: tuple[str, ...]
    """The worker command line (interpreter included)."""
    master_addr: str
    master_port: int
    """Port of the job's store (the workers' ``MASTER_PORT``)."""
    max_restarts: int = 0
    mode: str = "torchrun"
    shutdown_timeout_s: float = 30.0
    """Grace between SIGTERM and SIGKILL when stopping workers."""
    join_timeout_s: float = 600.0
    """How long to wait for the other nodes at registration and at each attempt's start."""
    lease_interval_s: float = 1.0
    lease_timeout_s: float = 5.0
    """A peer whose lease is older than this is treated as gone while waiting for it."""
    poll_interval_s: float = 0.1
    """How often the store is polled for other nodes' news (local exits are seen at once)."""
    base_env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ValueError(f"nnodes must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node rank must be in [0, {self.nnodes - 1}], got {self.node_rank}")
        if self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be >= 1, got {self.nproc_per_node}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.argv:
            raise ValueError("the worker command line is empty")
        for name in ("shutdown_timeout_s", "join_timeout_s", "lease_interval_s", "poll_interval_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def node(self) -> str:
        """This node's id, ``node<rank>``."""
        return f"node{self.node_rank}"

    @property
    def world_size(self) -> int:
        """Number of workers in the job."""
        return self.nnodes * self.nproc_per_node

    def worker_env(self, local_rank: int, attempt: int, error_file: str) -> dict[str, str]:
        """The environment of one worker: torchrun's variables plus the project's ``UNICRON_*``."""
        rank = self.node_rank * self.nproc_per_node + local_rank
        env = dict(self.base_env)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(local_rank),
            GROUP_RANK=str(self.node_rank),
            ROLE_RANK=str(rank),
            ROLE_NAME="default",
            LOCAL_WORLD_SIZE=str(self.nproc_per_node),
            WORLD_SIZE=str(self.world_size),
            GROUP_WORLD_SIZE=str(self.nnodes),
            ROLE_WORLD_SIZE=str(self.world_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
            TORCHELASTIC_RESTART_COUNT=str(attempt),
            TORCHELASTIC_MAX_RESTARTS=str(self.max_restarts),
            TORCHELASTIC_RUN_ID=self.job,
            # env:// then connects to the agent's store as a client instead of hosting one in rank 0.
            TORCHELASTIC_USE_AGENT_STORE="True",
            TORCHELASTIC_ERROR_FILE=error_file,
            TORCH_NCCL_ASYNC_ERROR_HANDLING=self.base_env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
            UNICRON_JOB=self.job,
            UNICRON_NODE=self.node,
        )
        if self.mode == "unicron":
            env["UNICRON_MODE"] = "unicron"
        else:
            env.pop("UNICRON_MODE", None)
        return env


class Reaction(enum.Enum):
    """What the agent does after a worker exit."""

    CONTINUE = "continue"
    """Keep the other workers running."""
    FAIL_GROUP = "fail_group"
    """End the worker group on every node (and restart it if restarts remain)."""


class ExitPolicy(ABC):
    """Decides what a worker's exit means; called on the agent's thread for every exit it did not cause."""

    @abstractmethod
    def on_worker_exit(self, agent: NodeAgent, worker_exit: WorkerExit) -> Reaction:
        """React to ``worker_exit`` (it may call ``agent.report_fault`` or ``agent.restart_worker``)."""


class FailFastPolicy(ExitPolicy):
    """torchrun's behaviour: any failed worker ends the whole group."""

    def on_worker_exit(self, agent: NodeAgent, worker_exit: WorkerExit) -> Reaction:
        """``FAIL_GROUP`` on a failure, else ``CONTINUE``."""
        return Reaction.FAIL_GROUP if worker_exit.failed else Reaction.CONTINUE


class KeepSurvivorsPolicy(ExitPolicy):
    """``--unicron`` placeholder: log a death, record it as a fault report, keep the survivors running."""

    def on_worker_exit(self, agent: NodeAgent, worker_exit: WorkerExit) -> Reaction:
        """Report failures to the store; never end the group."""
        if worker_exit.failed:
            log.warning("%s; survivors keep running", worker_exit.describe())
            agent.report_fault(worker_exit)
        return Reaction.CONTINUE


class Outcome(enum.Enum):
    """How an agent's run ended."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"
    ERROR = "error"


@dataclass(frozen=True, kw_only=True)
class AgentResult:
    """The end of an agent's run, with the launcher's exit status."""

    outcome: Outcome
    attempts: int
    """Launch attempts started (1 + restarts)."""
    failures: tuple[WorkerExit, ...] = ()
    """Workers that failed on their own in the last attempt, root cause (first observed) first."""
    signum: int | None = None
    message: str = ""

    @property
    def returncode(self) -> int:
        """0; the root cause's exit code (128 + signal if killed); 128 + signal if stopped by one; else 1."""
        if self.outcome is Outcome.SUCCEEDED:
            return 0
        if self.outcome is Outcome.FAILED and self.failures:
            return self.failures[0].shell_code
        if self.outcome is Outcome.STOPPED and self.signum:
            return 128 + self.signum
        return 1

    def summary(self, job: str) -> list[str]:
        """The exit summary: one line for the outcome, then one line per failed rank, root cause first."""
        rc = self.returncode
        if self.outcome is Outcome.SUCCEEDED:
            restarts = self.attempts - 1
            return [f"job {job} succeeded after {restarts} restart(s)"] if restarts else []
        if self.outcome is Outcome.FAILED and self.failures:
            lines = [f"job {job} failed with exit status {rc}; failed rank(s), root cause first:"]
            return lines + [f"  {f.describe()}" for f in self.failures]
        return [f"job {job} ended: {self.message or self.outcome.value} (exit status {rc})"]


@dataclass(frozen=True)
class _Exited:
    worker: WorkerProcess
    exit: WorkerExit


_WAKE = object()


class NodeAgent:
    """Runs one node's workers for a job; ``run()`` returns when the job ends for this node."""

    def __init__(self, config: AgentConfig, store: Store, policy: ExitPolicy | None = None) -> None:
        self.config = config
        self.store = store
        self.policy = policy if policy is not None else FailFastPolicy()
        self.keys = JobKeys(config.job)
        self.generation = 0
        """The job's current generation (advanced by reconfigurations, not by restarts)."""
        self.attempt = 0
        self._workers: dict[int, WorkerProcess] = {}
        self._events: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._stop_signum: int | None = None
        self._stop_requested = False
        self._owner: threading.Thread | None = None
        self._error_dir = ""
        self._spawns = 0
        self._lease_stop = threading.Event()

    # ------------------------------------------------------------------ API for policies and callers

    @property
    def workers(self) -> Mapping[int, WorkerProcess]:
        """This node's current workers by local rank."""
        return dict(self._workers)

    def stop(self, signum: int | None = None) -> None:
        """Ask ``run()`` to stop the workers and return; safe from any thread and from signal handlers."""
        self._stop_signum = signum
        self._stop_requested = True
        self._events.put(_WAKE)

    def restart_worker(self, local_rank: int, extra_env: Mapping[str, str] | None = None) -> WorkerProcess:
        """Start a new process for an exited worker, with the same rank (for process-level restarts)."""
        old = self._workers.get(local_rank)
        if old is None:
            raise ValueError(f"no worker with local rank {local_rank} on {self.config.node}")
        if old.alive():
            raise RuntimeError(f"rank {old.rank} (pid {old.pid}) is still running; stop it first")
        return self._spawn(local_rank, self.attempt, extra_env or {})

    def report_fault(self, worker_exit: WorkerExit) -> None:
        """Append a fault report for ``worker_exit`` to the current generation's fault list in the store."""
        record = {"kind": "process_exit", "job": self.config.job, "t_detected": time.time()}
        record.update(json.loads(worker_exit.to_json()))
        append_record(self.store, self.keys.gen(self.generation).faults, record)

    # -------------------------------------------------------------------------------------- main loop

    def run(self) -> AgentResult:
        """Register, then start, supervise and (on failure) restart the workers until the job ends."""
        self._owner = threading.current_thread()
        self._error_dir = tempfile.mkdtemp(prefix=f"unicron_{self.config.job}_{self.config.node}_")
        lease = threading.Thread(target=self._renew_lease, name="unicron-lease", daemon=True)
        result: AgentResult | None = None
        try:
            self._register()
            lease.start()
            while result is None:
                result = self._run_attempt()
        except _Stopped:
            how = f"by {signal.Signals(self._stop_signum).name}" if self._stop_signum else "on request"
            result = AgentResult(outcome=Outcome.STOPPED, attempts=self.attempt + 1,
                                 signum=self._stop_signum, message=f"{self.config.node} was stopped {how}")
            self._abort(result.message)
        except (AgentError, StoreError) as e:
            result = AgentResult(outcome=Outcome.ERROR, attempts=self.attempt + 1, message=str(e))
            self._abort(f"{self.config.node}: {e}")
        finally:
            stop_workers(list(self._workers.values()), self.config.shutdown_timeout_s)
        self._leave(result)
        log.debug("left the job: %s", result.outcome.value)
        self._lease_stop.set()
        if lease.is_alive():
            lease.join()
        shutil.rmtree(self._error_dir, ignore_errors=True)
        return result

    def _run_attempt(self) -> AgentResult | None:
        """One launch attempt; None means: restart the group."""
        keys = self.keys.attempt(self.attempt)
        self._rendezvous(keys)
        log.info("starting %d worker(s), attempt %d", self.config.nproc_per_node, self.attempt)
        for local_rank in range(self.config.nproc_per_node):
            self._spawn(local_rank, self.attempt, {})
        outcome, root = self._supervise(keys)
        stop_workers(list(self._workers.values()), self.config.shutdown_timeout_s)
        log.debug("attempt %d ended here: %s", self.attempt, outcome.value)
        if outcome is Outcome.SUCCEEDED and self.config.nnodes > 1:
            self.store.set(keys.done(self.config.node), "1")
            root = self._wait_for_peers(keys, keys.done, "finish")
            outcome = Outcome.FAILED if root is not None else Outcome.SUCCEEDED
        if outcome is Outcome.SUCCEEDED:
            return AgentResult(outcome=outcome, attempts=self.attempt + 1)
        failures = self._failures(root)
        if self.attempt < self.config.max_restarts and self.config.mode == "torchrun":
            cause = failures[0].describe() if failures else "failure"
            self.attempt += 1
            log.warning("worker group failed (%s); restarting, attempt %d of %d", cause, self.attempt,
                        self.config.max_restarts)
            return None
        return AgentResult(outcome=Outcome.FAILED, attempts=self.attempt + 1, failures=failures)

    def _supervise(self, keys: AttemptKeys) -> tuple[Outcome, WorkerExit | None]:
        """Until the attempt ends here: react to local exits, watch the store for the group's failure."""
        seen: set[int] = set()  # id() of the workers whose exit was handled
        next_poll = 0.0
        while True:
            item = self._next_event(self.config.poll_interval_s)
            if isinstance(item, _Exited) and self._workers.get(item.worker.local_rank) is item.worker:
                seen.add(id(item.worker))
                if self.policy.on_worker_exit(self, item.exit) is Reaction.FAIL_GROUP:
                    return Outcome.FAILED, self._publish_failure(keys, item.exit)
            if all(id(w) in seen for w in self._workers.values()):
                # Judged on the current workers: a failed worker the policy restarted does not count.
                failed = sorted((w.exit for w in self._workers.values() if w.exit and w.exit.failed),
                                key=lambda e: e.time)
                return (Outcome.FAILED, failed[0]) if failed else (Outcome.SUCCEEDED, None)
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + self.config.poll_interval_s
                self._check_abort()
                raw = self.store.try_get(keys.failure)
                if raw:
                    return Outcome.FAILED, WorkerExit.from_json(raw)

    def _next_event(self, timeout: float) -> object:
        if self._stop_requested:
            raise _Stopped
        try:
            item = self._events.get(timeout=timeout)
        except queue.Empty:
            return None
        if self._stop_requested:
            raise _Stopped
        return item

    def _on_worker_exit(self, worker: WorkerProcess, worker_exit: WorkerExit) -> None:
        self._events.put(_Exited(worker, worker_exit))  # called on the worker's waiter thread

    def _spawn(self, local_rank: int, attempt: int, extra_env: Mapping[str, str]) -> WorkerProcess:
        if threading.current_thread() is not self._owner:
            raise RuntimeError("workers must be started on the agent's thread (their parent-death signal "
                               "is bound to the thread that forks them)")
        self._spawns += 1
        error_dir = os.path.join(self._error_dir, f"attempt_{attempt}", f"{local_rank}.{self._spawns}")
        os.makedirs(error_dir, exist_ok=True)
        error_file = os.path.join(error_dir, "error.json")
        env = self.config.worker_env(local_rank, attempt, error_file)
        env.update(extra_env)
        worker = WorkerProcess(
            argv=self.config.argv, env=env, rank=int(env["RANK"]), local_rank=local_rank,
            node=self.config.node, attempt=attempt, error_file=error_file, on_exit=self._on_worker_exit,
        )
        self._workers[local_rank] = worker
        log.debug("started rank %d as pid %d", worker.rank, worker.pid)
        return worker

    def _failures(self, root: WorkerExit | None) -> tuple[WorkerExit, ...]:
        """The attempt's own failures (exits the agent did not cause), root cause first."""
        own = [
            w.exit for w in self._workers.values()
            if w.exit is not None and w.exit.failed and not w.stopped_by_agent
        ]
        own.sort(key=lambda e: e.time)
        if root is not None:
            own = [root] + [e for e in own if (e.node, e.rank, e.pid) != (root.node, root.rank, root.pid)]
        return tuple(own)

    def _publish_failure(self, keys: AttemptKeys, worker_exit: WorkerExit) -> WorkerExit:
        held = self.store.compare_set(keys.failure, "", worker_exit.to_json())
        return WorkerExit.from_json(held)

    # -------------------------------------------------------------------------- talking to the peers

    def _register(self) -> None:
        cfg = self.config
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        held = self.store.compare_set(self.keys.node_owner(cfg.node), "", token).decode()
        if held != token:
            raise AgentError(f"{cfg.node} of job {cfg.job!r} is already registered (by {held}); "
                             "give every launcher its own --node-rank")
        renew_lease(self.store, self.keys.lease(cfg.node))
        spec = {"nnodes": cfg.nnodes, "nproc_per_node": cfg.nproc_per_node,
                "max_restarts": cfg.max_restarts, "mode": cfg.mode}
        if cfg.node_rank == 0:
            self.store.set(self.keys.spec, json.dumps(spec, sort_keys=True))
            return
        self._poll(lambda: self.store.check([self.keys.spec]), cfg.join_timeout_s, "node0 to register")
        theirs = json.loads(self.store.get(self.keys.spec, timedelta(seconds=10)))
        diff = [f"{k}={spec[k]} (node0 has {theirs.get(k)})" for k in spec if theirs.get(k) != spec[k]]
        if diff:
            raise AgentError(f"{cfg.node} is launched differently from node0: {', '.join(diff)}")

    def _rendezvous(self, keys: AttemptKeys) -> None:
        cfg = self.config
        self.store.set(keys.ready(cfg.node), "1")
        if cfg.node_rank != 0:
            self._poll(lambda: self.store.check([keys.go]), cfg.join_timeout_s,
                       f"node0 to open attempt {self.attempt}")
            return
        nodes = [f"node{k}" for k in range(cfg.nnodes)]

        def all_ready() -> bool:
            self._check_peers_alive(nodes, keys.ready)
            return self.store.check([keys.ready(n) for n in nodes])

        def missing() -> str:
            return ", ".join(n for n in nodes if not self.store.check([keys.ready(n)]))

        self._poll(all_ready, cfg.join_timeout_s, f"{cfg.nnodes} nodes to join attempt {self.attempt}",
                   missing)
        cleared = clear_worker_keys(self.store)
        log.debug("cleared %d worker key(s) before attempt %d", cleared, self.attempt)
        self.store.set(keys.go, "1")

    def _wait_for_peers(
        self, keys: AttemptKeys, key_of: Callable[[str], str], what: str
    ) -> WorkerExit | None:
        """Wait until every node set ``key_of(node)``; return the group's failure if one is published."""
        nodes = [f"node{k}" for k in range(self.config.nnodes)]
        failure: list[WorkerExit] = []

        def settled() -> bool:
            raw = self.store.try_get(keys.failure)
            if raw:
                failure.append(WorkerExit.from_json(raw))
                return True
            self._check_peers_alive(nodes, key_of)
            return self.store.check([key_of(n) for n in nodes])

        self._poll(settled, self.config.join_timeout_s, f"every node to {what} attempt {self.attempt}")
        return failure[0] if failure else None

    def _check_peers_alive(self, nodes: list[str], key_of: Callable[[str], str]) -> None:
        """Raise if a node we still wait for has left the job or let its lease expire."""
        for node in nodes:
            if node == self.config.node or self.store.check([key_of(node)]):
                continue
            left = self.store.try_get(self.keys.left(node))
            if left is not None:
                raise AgentError(f"{node} left the job: {left.decode()}")
            age = lease_age(self.store, self.keys.lease(node))
            if age is not None and age > self.config.lease_timeout_s:
                raise AgentError(f"{node} is gone (its lease expired {age:.1f}s ago)")

    def _poll(self, ready: Callable[[], bool], timeout_s: float, what: str,
              missing: Callable[[], str] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_abort()
            if ready():
                return
            if time.monotonic() >= deadline:
                detail = f" (missing: {missing()})" if missing is not None else ""
                raise AgentError(f"timed out after {timeout_s:g}s waiting for {what}{detail}")
            self._next_event(self.config.poll_interval_s)

    def _check_abort(self) -> None:
        reason = self.store.try_get(self.keys.abort)
        if reason is not None:
            raise AgentError(f"the job was aborted ({reason.decode()})")

    def _abort(self, reason: str) -> None:
        """Tell every node to stop (first reason wins)."""
        try:
            self.store.compare_set(self.keys.abort, "", reason)
        except StoreError as e:
            log.debug("could not publish the abort: %s", e)

    def _leave(self, result: AgentResult) -> None:
        """Tell the peers this node is out; node 0 (the store's host) waits for the others to leave first."""
        cfg = self.config
        try:
            self.store.set(self.keys.left(cfg.node), result.outcome.value)
            if cfg.node_rank != 0 or cfg.nnodes == 1:
                return
            nodes = [f"node{k}" for k in range(1, cfg.nnodes)]
            deadline = time.monotonic() + cfg.shutdown_timeout_s + 2 * cfg.lease_timeout_s
            while time.monotonic() < deadline:
                waiting = [n for n in nodes if not self.store.check([self.keys.left(n)])]
                waiting = [n for n in waiting
                           if (lease_age(self.store, self.keys.lease(n)) or 0.0) <= cfg.lease_timeout_s]
                if not waiting:
                    return
                time.sleep(cfg.poll_interval_s)
            log.warning("leaving while %s may still use the store", ", ".join(waiting))
        except StoreError as e:
            log.debug("could not announce leaving: %s", e)

    def _renew_lease(self) -> None:
        try:
            store = self.store.clone()
        except StoreError:
            return
        try:
            while not self._lease_stop.wait(self.config.lease_interval_s):
                renew_lease(store, self.keys.lease(self.config.node))
        except StoreError as e:
            log.debug("lease renewal stopped: %s", e)
        finally:
            store.close()


def default_policy(mode: str) -> ExitPolicy:
    """The exit policy of a launcher mode."""
    return KeepSurvivorsPolicy() if mode == "unicron" else FailFastPolicy()


SIGNALS_TO_FORWARD = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
