"""The node agent: starts this node's workers torchrun-style, supervises them, reacts to their exits.

One agent runs per node (inside ``unicron-run``). It meets the other nodes' agents through the store
(``node_group.NodeGroup``: registration, lease, the start of every launch attempt), starts
``nproc_per_node`` workers with torchrun's environment, and sees each exit the moment it happens. What
an exit means is a pluggable ``ExitPolicy``: ``FailFastPolicy`` is torchrun (any failure ends the group
on every node, which may then be restarted up to ``max_restarts`` times); ``unicron_policy.UnicronPolicy``
is the ``--unicron`` mode (the survivors keep running, the death is reported to the coordinator, whose
restart commands the agent carries out, until the job is done or stopped).
"""

from __future__ import annotations

import enum
import logging
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field

from megatron_unicron.node_group import AgentError, NodeGroup
from megatron_unicron.protocol import JobChannel
from megatron_unicron.snapshot.node_store import NodeSnapshots
from megatron_unicron.spare import WarmSpare, spare_target
from megatron_unicron.store import JobKeys, Store, StoreError
from megatron_unicron.workers import WorkerExit, WorkerProcess, bound_to_this_process, stop_workers

log = logging.getLogger(__name__)

MODES = ("torchrun", "unicron")
SPARE_RESPAWN_DELAY_S = 10.0
"""After a spare became a worker, wait this long before starting the next (not to slow the recovery)."""
SPARE_CHECK_S = 0.5
"""How often to look whether training runs yet: the first spare starts after the workers' own start-up,
not to compete with their imports for the node's cores."""


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
    lease_timeout_s: float = 3.0
    """A peer whose lease is older than this is treated as gone while waiting for it."""
    poll_interval_s: float = 0.1
    """How often the store is polled for other nodes' news (local exits are seen at once)."""
    base_env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    warm_spare: bool = True
    """In ``unicron`` mode, keep one pre-imported interpreter to restart a failed worker in (``spare``)."""

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

    @property
    def keeps_a_spare(self) -> bool:
        """Whether this node keeps a warm spare: ``unicron`` mode, a Python worker, not switched off."""
        return self.warm_spare and self.mode == "unicron" and spare_target(self.argv) is not None


class Reaction(enum.Enum):
    """What the agent does after a worker exit."""

    CONTINUE = "continue"
    """Keep the other workers running."""
    FAIL_GROUP = "fail_group"
    """End the worker group on every node (and restart it if restarts remain)."""


class Outcome(enum.Enum):
    """How an agent's run ended."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"
    ERROR = "error"


@dataclass(frozen=True)
class Ending:
    """How a launch attempt ended on this node: the outcome, its root-cause exit, and why."""

    outcome: Outcome
    root: WorkerExit | None = None
    message: str = ""


class ExitPolicy(ABC):
    """Decides what a worker's exit means; called on the agent's thread for every exit it did not cause."""

    @abstractmethod
    def on_worker_exit(self, agent: NodeAgent, worker_exit: WorkerExit) -> Reaction:
        """React to ``worker_exit`` (it may call ``agent.restart_worker`` or ``agent.kill_worker``)."""

    def on_idle(self, agent: NodeAgent) -> Ending | None:
        """Called on the agent's thread at least every poll interval; an ``Ending`` ends the attempt."""
        return None

    def on_all_exited(self, agent: NodeAgent, failed: list[WorkerExit]) -> Ending | None:
        """Every current worker has exited (``failed``: those that failed, earliest first); None waits on."""
        return Ending(Outcome.FAILED, failed[0]) if failed else Ending(Outcome.SUCCEEDED)


class FailFastPolicy(ExitPolicy):
    """torchrun's behaviour: any failed worker ends the whole group."""

    def on_worker_exit(self, agent: NodeAgent, worker_exit: WorkerExit) -> Reaction:
        """``FAIL_GROUP`` on a failure, else ``CONTINUE``."""
        return Reaction.FAIL_GROUP if worker_exit.failed else Reaction.CONTINUE


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
            why = f" ({self.message})" if self.message else ""
            lines = [f"job {job} failed with exit status {rc}{why}; failed rank(s), root cause first:"]
            return lines + [f"  {f.describe()}" for f in self.failures]
        return [f"job {job} ended: {self.message or self.outcome.value} (exit status {rc})"]


@dataclass(frozen=True)
class _Exited:
    worker: WorkerProcess
    exit: WorkerExit


_WAKE = object()


class NodeAgent:
    """Runs one node's workers for a job; ``run()`` returns when the job ends for this node.

    Policies run on the agent's thread and may call ``report_fault`` and ``restart_worker``; ``stop``
    may be called from anywhere (a signal handler, another thread).
    """

    def __init__(self, config: AgentConfig, store: Store, policy: ExitPolicy | None = None) -> None:
        self.config = config
        self.store = store
        self.policy = policy if policy is not None else FailFastPolicy()
        self.keys = JobKeys(config.job)
        self.generation = 0
        """The job's current generation (advanced by reconfigurations, not by restarts)."""
        self.attempt = 0
        self.group = NodeGroup(
            store, self.keys, node_rank=config.node_rank, nnodes=config.nnodes,
            join_timeout_s=config.join_timeout_s, lease_interval_s=config.lease_interval_s,
            lease_timeout_s=config.lease_timeout_s, poll_interval_s=config.poll_interval_s, idle=self._idle,
            tolerate_lost_nodes=config.mode == "unicron",
        )
        self._workers: dict[int, WorkerProcess] = {}
        self._events: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._stop_signum: int | None = None
        self._stop_requested = False
        self._owner: threading.Thread | None = None
        self._error_dir = ""
        self._spawns = 0
        self._spare: WarmSpare | None = None
        self._spare_due: float | None = None
        """When (monotonic) to start the next warm spare, if one is wanted."""
        self._training_seen = False
        self.snapshots: NodeSnapshots | None = None
        """The node's in-memory snapshots (``--unicron``): they outlive worker crashes."""

    # ------------------------------------------------------------------ API for policies and callers

    @property
    def workers(self) -> Mapping[int, WorkerProcess]:
        """This node's current workers by local rank."""
        return dict(self._workers)

    def stop(self, signum: int | None = None) -> None:
        """Ask ``run()`` to stop the workers and return; safe from any thread and from signal handlers."""
        self._stop_signum = signum
        self._stop_requested = True
        self._events.put(_WAKE)  # SimpleQueue.put is reentrant: safe in a signal handler

    def restart_worker(self, local_rank: int, extra_env: Mapping[str, str] | None = None) -> WorkerProcess:
        """Start a new process for an exited worker, with the same rank (for process-level restarts)."""
        old = self._workers.get(local_rank)
        if old is None:
            raise ValueError(f"no worker with local rank {local_rank} on {self.config.node}")
        if old.alive():
            raise RuntimeError(f"rank {old.rank} (pid {old.pid}) is still running; stop it first")
        spare, self._spare = self._spare, None
        if spare is not None and spare.usable():
            self._spare_due = time.monotonic() + SPARE_RESPAWN_DELAY_S
            env, error_file = self._worker_env(local_rank, extra_env or {})
            try:
                process = spare.hand_over(env)
            except OSError as error:
                log.warning("%s; restarting rank %d in a new process", error, old.rank)
            else:
                log.info("restarting rank %d in the warm spare (pid %d)", old.rank, spare.pid)
                return self._adopt(local_rank, env, error_file, process)
        if spare is not None:
            spare.close()
            self._spare_due = time.monotonic()
        log.info("restarting rank %d", old.rank)
        return self._spawn(local_rank, extra_env or {})

    def kill_worker(self, local_rank: int, grace_s: float = 0.0) -> None:
        """Stop one worker (SIGKILL after ``grace_s`` for it to exit by itself) and wait until it is gone.

        Its exit counts as caused by the agent (not reported). SIGKILL also ends a stopped process.
        """
        worker = self._workers.get(local_rank)
        if worker is None or not worker.alive():
            return
        worker.stopped_at = time.time()
        if grace_s > 0 and worker.wait(grace_s):
            return
        worker.signal(signal.SIGKILL)
        worker.wait()

    # -------------------------------------------------------------------------------------- main loop

    def run(self) -> AgentResult:
        """Register, then start, supervise and (on failure) restart the workers until the job ends."""
        cfg = self.config
        self._owner = threading.current_thread()
        self._error_dir = tempfile.mkdtemp(prefix=f"unicron_{cfg.job}_{cfg.node}_")
        result: AgentResult | None = None
        if cfg.mode == "unicron":
            self.snapshots = NodeSnapshots(job=cfg.job, node_rank=cfg.node_rank, nnodes=cfg.nnodes,
                                           store=self.store, master_addr=cfg.master_addr)  # fmt: skip
        try:
            if self.snapshots is not None:
                self.snapshots.start()
            self.group.register({"nnodes": cfg.nnodes, "nproc_per_node": cfg.nproc_per_node,
                                 "max_restarts": cfg.max_restarts, "mode": cfg.mode})
            while result is None:
                result = self._run_attempt()
        except _Stopped:
            how = f"by {signal.Signals(self._stop_signum).name}" if self._stop_signum else "on request"
            result = AgentResult(outcome=Outcome.STOPPED, attempts=self.attempt + 1,
                                 signum=self._stop_signum, message=f"{cfg.node} was stopped {how}")
            self.group.abort(result.message)
        except (AgentError, StoreError) as e:
            result = AgentResult(outcome=Outcome.ERROR, attempts=self.attempt + 1, message=str(e))
            self.group.abort(f"{cfg.node}: {e}")
        finally:
            self._close_spare()
            stop_workers(list(self._workers.values()), cfg.shutdown_timeout_s)
            shutil.rmtree(self._error_dir, ignore_errors=True)
            if self.snapshots is not None:  # the job ended for this node: no worker needs them any more
                self.snapshots.close()
        self.group.leave(result.outcome.value, cfg.shutdown_timeout_s)
        log.debug("left the job: %s", result.outcome.value)
        return result

    def _run_attempt(self) -> AgentResult | None:
        """One launch attempt; None means: restart the group."""
        if self.group.rejoined:
            # A lost node back in a running job: its workers join the next generation the coordinator
            # plans for them, state from their peers (the job's attempt opened long ago).
            log.info("rejoining a running job: starting %d worker(s)", self.config.nproc_per_node)
            for local_rank in range(self.config.nproc_per_node):
                self._spawn(local_rank, {"UNICRON_JOINING": "1"})
        else:
            self.group.open_attempt(self.attempt)
            log.info("starting %d worker(s), attempt %d", self.config.nproc_per_node, self.attempt)
            for local_rank in range(self.config.nproc_per_node):
                self._spawn(local_rank, {})
        self._spare_due = time.monotonic() if self.config.keeps_a_spare else None
        ending = self._supervise()
        outcome, root = ending.outcome, ending.root
        self._close_spare()
        stop_workers(list(self._workers.values()), self.config.shutdown_timeout_s)
        log.debug("attempt %d ended here: %s", self.attempt, outcome.value)
        if outcome is Outcome.SUCCEEDED and self.config.nnodes > 1:
            root = self.group.finish_attempt(self.attempt)
            outcome = Outcome.FAILED if root is not None else Outcome.SUCCEEDED
        if outcome is Outcome.SUCCEEDED:
            return AgentResult(outcome=outcome, attempts=self.attempt + 1)
        if ending.message:  # ended by the policy (e.g. the job was stopped)
            failures = self._failures(root) if root is not None else ()
            return AgentResult(outcome=outcome, attempts=self.attempt + 1, failures=failures,
                               message=ending.message)
        failures = self._failures(root)
        if self.attempt < self.config.max_restarts and self.config.mode == "torchrun":
            cause = failures[0].describe() if failures else "failure"
            self.attempt += 1
            log.warning("worker group failed (%s); restarting, attempt %d of %d", cause, self.attempt,
                        self.config.max_restarts)
            return None
        return AgentResult(outcome=Outcome.FAILED, attempts=self.attempt + 1, failures=failures)

    def _supervise(self) -> Ending:
        """Until the attempt ends here: react to local exits, watch the store for the group's failure."""
        seen: set[int] = set()  # id() of the workers whose exit was handled
        next_poll = 0.0
        while True:
            item = self._next_event(self.config.poll_interval_s)
            if isinstance(item, _Exited) and self._workers.get(item.worker.local_rank) is item.worker:
                seen.add(id(item.worker))
                if not item.worker.stopped_by_agent and (
                        self.policy.on_worker_exit(self, item.exit) is Reaction.FAIL_GROUP):
                    return Ending(Outcome.FAILED, self.group.publish_failure(self.attempt, item.exit))
            if all(id(w) in seen for w in self._workers.values()):
                # Judged on the current workers: a failed worker the policy restarted does not count.
                failed = sorted((w.exit for w in self._workers.values() if w.exit and w.exit.failed),
                                key=lambda e: e.time)
                ending = self.policy.on_all_exited(self, failed)
                if ending is not None:
                    return ending
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + self.config.poll_interval_s
                root = self.group.failure(self.attempt)
                if root is not None:
                    return Ending(Outcome.FAILED, root)
                self._tend_spare()
                ending = self.policy.on_idle(self)
                if ending is not None:
                    return ending

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

    def _idle(self, seconds: float) -> None:
        """Wait between polls of the store; exits seen meanwhile belong to stopped workers."""
        self._next_event(seconds)

    def _on_worker_exit(self, worker: WorkerProcess, worker_exit: WorkerExit) -> None:
        self._events.put(_Exited(worker, worker_exit))  # called on the worker's waiter thread

    def _check_thread(self) -> None:
        if threading.current_thread() is not self._owner:
            raise RuntimeError("workers must be started on the agent's thread (their parent-death signal "
                               "is bound to the thread that forks them)")

    def _worker_env(self, local_rank: int, extra_env: Mapping[str, str]) -> tuple[dict[str, str], str]:
        """A new worker's environment and the error file it reports a crash in."""
        self._spawns += 1
        error_dir = os.path.join(self._error_dir, f"attempt_{self.attempt}", f"{local_rank}.{self._spawns}")
        os.makedirs(error_dir, exist_ok=True)
        error_file = os.path.join(error_dir, "error.json")
        env = self.config.worker_env(local_rank, self.attempt, error_file)
        env.update(self.snapshots.worker_env() if self.snapshots is not None else {})
        env.update(extra_env)
        return env, error_file

    def _spawn(self, local_rank: int, extra_env: Mapping[str, str]) -> WorkerProcess:
        self._check_thread()
        env, error_file = self._worker_env(local_rank, extra_env)
        try:
            return self._adopt(local_rank, env, error_file, None)
        except OSError as e:
            raise AgentError(f"cannot start {self.config.argv[0]!r}: {e}") from None

    def _adopt(self, local_rank: int, env: Mapping[str, str], error_file: str,
               process: subprocess.Popen[bytes] | None) -> WorkerProcess:  # fmt: skip
        """Supervise a worker: a new process (``process`` None) or a spare that took ``env``."""
        worker = WorkerProcess(
            argv=self.config.argv, env=env, rank=int(env["RANK"]), local_rank=local_rank,
            node=self.config.node, attempt=self.attempt, error_file=error_file,
            on_exit=self._on_worker_exit, process=process,
        )
        self._workers[local_rank] = worker
        log.debug("started rank %d as pid %d", worker.rank, worker.pid)
        return worker

    def _tend_spare(self) -> None:
        """Start the warm spare when one is due (on the agent's thread, as workers)."""
        if self._spare_due is None or time.monotonic() < self._spare_due or self._spare is not None:
            return
        if not self._training_seen:
            first_rank = self.config.node_rank * self.config.nproc_per_node
            try:
                self._training_seen = JobChannel(self.store, self.keys).progress(first_rank) is not None
            except StoreError:  # the store's trouble is the supervision loop's to report
                self._training_seen = False
            if not self._training_seen:
                self._spare_due = time.monotonic() + SPARE_CHECK_S
                return
        self._check_thread()
        self._spare_due = None
        # Its environment is a worker's (as read at import time); the handover replaces all of it.
        env = self.config.worker_env(0, self.attempt, os.devnull)
        env.update(self.snapshots.worker_env() if self.snapshots is not None else {})
        try:
            self._spare = WarmSpare(self.config.argv, env, bound_to_this_process())
        except OSError as error:
            log.warning("no warm spare: %s", error)
            return
        log.info("started a warm spare (pid %d) to restart a failed worker in", self._spare.pid)

    def _close_spare(self) -> None:
        self._spare_due = None
        spare, self._spare = self._spare, None
        if spare is not None:
            spare.close()

    def _failures(self, root: WorkerExit | None) -> tuple[WorkerExit, ...]:
        """The attempt's own failures (exits the agent did not cause), root cause first."""
        own = sorted(
            (w.exit for w in self._workers.values() if w.exit and w.exit.failed and not w.stopped_by_agent),
            key=lambda e: e.time,
        )
        if root is None:
            return tuple(own)
        same = (root.node, root.rank, root.pid)
        return (root, *(e for e in own if (e.node, e.rank, e.pid) != same))


def default_policy(mode: str) -> ExitPolicy:
    """The exit policy of a launcher mode."""
    if mode == "unicron":
        from megatron_unicron.unicron_policy import UnicronPolicy  # it builds on this module

        return UnicronPolicy()
    return FailFastPolicy()


SIGNALS_TO_FORWARD = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
