"""The node agent's ``--unicron`` policy: report exits, run the coordinator's commands, end with the job.

- **Exits.** A worker that exits with a non-zero code or by a signal is reported at once:
  ``FaultEvent(kind=exited, source="agent", rank=<launch rank>, node, exit_code=<code or -signal>,
  generation=<the job's newest>, t_detected=<when waitpid returned>)``. Not reported: exit 0, exits
  after the job is done or stopped, exits the agent caused, the exit of a rank a pending restart
  command names (the worker left on reading the decision that restarts it; the coordinator writes the
  command before it publishes the decision, so the agent always sees the command first), and the exit
  of a rank the newest decision excludes (not live: its device failed; it left on reading that
  decision, which is therefore published already). An excluded rank's exit never fails the node.
- **Commands** (``agent/<node>/commands``): ``{"op": "restart", "ranks": [...], "generation": g,
  "kill_first": bool}``. Each rank's process is killed (at once with ``kill_first``, otherwise after
  ``restart_grace_s`` for it to exit by itself) and started again with the same launch rank and
  ``UNICRON_GENERATION=g``, ``UNICRON_RESTARTED=1``. Commands run on the agent's thread: a worker's
  parent-death signal is bound to the thread that forked it.
- **Worker states** are published for the coordinator (``worker_states.py``).
- **The end.** Stopped (``stop`` key): once every worker is gone (after ``stop_grace_s`` the agent stops
  the rest), the attempt fails with the stop reason (exit status: the first failed worker's, else 1).
  Done: once every worker is gone, success (unless a worker's last exit failed). Every worker gone with
  exit 0: success. A failed worker with neither: wait for the coordinator's restart or stop.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from megatron_unicron.agent import Ending, ExitPolicy, NodeAgent, Outcome, Reaction
from megatron_unicron.events import Action, ErrorKind, FaultEvent
from megatron_unicron.incidents import EXITED, WorkerState
from megatron_unicron.protocol import JobChannel
from megatron_unicron.worker_states import post_states, process_status
from megatron_unicron.workers import WorkerExit

log = logging.getLogger(__name__)

STATE_REFRESH_S = 1.0
"""Worker states are republished at least this often, even unchanged."""


class UnicronPolicy(ExitPolicy):
    """Survivors keep running; exits go to the coordinator; its restart commands are carried out here."""

    def __init__(self, *, stop_grace_s: float = 10.0, restart_grace_s: float = 5.0) -> None:
        self.stop_grace_s = stop_grace_s
        self.restart_grace_s = restart_grace_s
        self._channel: JobChannel | None = None
        self._commands: list[dict[str, Any]] = []
        self._executed = 0
        self._stop_seen: float | None = None
        self._posted: list[WorkerState] | None = None
        self._posted_at = 0.0
        self._excluded: set[int] = set()

    def channel(self, agent: NodeAgent) -> JobChannel:
        """The job's channel on the agent's store connection."""
        if self._channel is None:
            self._channel = JobChannel(agent.store, agent.keys)
        return self._channel

    # ------------------------------------------------------------------------------------ exits
    def on_worker_exit(self, agent: NodeAgent, worker_exit: WorkerExit) -> Reaction:
        """Report a failed exit to the coordinator, unless it was expected."""
        channel = self.channel(agent)
        if self._restart_pending(agent, worker_exit.rank):
            log.info("%s; a restart of it is pending", worker_exit.describe())
        elif self._left_the_job(channel, worker_exit.rank):
            self._excluded.add(worker_exit.rank)
            log.info("%s; the job continues without it", worker_exit.describe())
        elif worker_exit.failed and (channel.is_done() or channel.stopped() is not None):
            log.info("%s after the job ended", worker_exit.describe())
        elif worker_exit.failed:
            agent.generation = channel.latest_generation()
            log.warning("%s; reported, the survivors keep running", worker_exit.describe())
            channel.report(FaultEvent(
                job=agent.config.job, kind=ErrorKind.EXITED, rank=worker_exit.rank, node=worker_exit.node,
                generation=agent.generation, message=worker_exit.error or worker_exit.how(), source="agent",
                t_detected=worker_exit.time, exit_code=worker_exit.returncode))
            self._publish_states(agent, force=True)
        return Reaction.CONTINUE

    def on_all_exited(self, agent: NodeAgent, failed: list[WorkerExit]) -> Ending | None:
        """Wait on: ``on_idle`` decides when this node is finished."""
        return None

    # ------------------------------------------------------------------------- commands and end
    def on_idle(self, agent: NodeAgent) -> Ending | None:
        """Run new commands, publish worker states, and end when the job is done or stopped."""
        channel = self.channel(agent)
        self._fetch(agent)
        while self._executed < len(self._commands):
            command = self._commands[self._executed]
            self._executed += 1
            self._execute(agent, command)
        self._publish_states(agent)
        alive = [w for w in agent.workers.values() if w.alive()]
        stop = channel.stopped()
        if stop is not None:
            now = time.monotonic()
            if self._stop_seen is None:
                self._stop_seen = now
                log.warning("the job was stopped: %s", stop.get("reason"))
            if not alive or now - self._stop_seen >= self.stop_grace_s:
                failed = _failed(agent, self._excluded)
                return Ending(Outcome.FAILED, failed[0] if failed else None,
                              f"the job was stopped: {stop.get('reason')}")
            return None
        if alive:
            return None
        # A rank that failed and that the newest decision left out was dealt with: the job went on
        # without it, so its exit does not fail the node.
        live = self._newest_live(channel)
        dropped = {w.rank for w in agent.workers.values() if live is not None and w.rank not in live}
        failed = _failed(agent, self._excluded | dropped)
        if not failed:
            return Ending(Outcome.SUCCEEDED)
        if channel.is_done():
            return Ending(Outcome.FAILED, failed[0])
        return None

    def _fetch(self, agent: NodeAgent) -> None:
        self._commands = self.channel(agent).agent_commands(agent.config.node)

    def _restart_pending(self, agent: NodeAgent, rank: int) -> bool:
        self._fetch(agent)
        return any(rank in command.get("ranks", ()) for command in self._commands[self._executed:])

    @staticmethod
    def _newest_live(channel: JobChannel) -> tuple[int, ...] | None:
        """The ranks the newest decision keeps alive; None before the first one or after a stop."""
        generation = channel.latest_generation()
        decision = channel.decision(generation) if generation > 0 else None
        return decision.live if decision is not None and decision.action is not Action.STOP else None

    @classmethod
    def _left_the_job(cls, channel: JobChannel, rank: int) -> bool:
        """Whether the newest decision excludes ``rank`` (its process then leaves by itself)."""
        live = cls._newest_live(channel)
        return live is not None and rank not in live

    def _execute(self, agent: NodeAgent, command: dict[str, Any]) -> None:
        op = command.get("op")
        if op not in ("restart", "kill"):
            log.error("ignoring unknown agent command %s", command)
            return
        generation = int(command["generation"])
        first = agent.config.node_rank * agent.config.nproc_per_node
        for rank in command["ranks"]:
            local = int(rank) - first
            if local not in agent.workers:
                log.error("cannot %s rank %s: it does not run on %s", op, rank, agent.config.node)
                continue
            if op == "kill":  # a hung rank the job goes on without: it cannot leave by itself
                log.info("killing rank %s: the job goes on without it (generation %d)", rank, generation)
                self._excluded.add(int(rank))
                agent.kill_worker(local, 0.0)
                continue
            agent.kill_worker(local, 0.0 if command.get("kill_first") else self.restart_grace_s)
            if command.get("join"):  # the job goes on without it: it joins a later generation
                agent.restart_worker(local, {"UNICRON_JOINING": "1"})
            else:
                agent.restart_worker(local, {"UNICRON_GENERATION": str(generation), "UNICRON_RESTARTED": "1"})
        agent.generation = generation

    def _publish_states(self, agent: NodeAgent, force: bool = False) -> None:
        states = [
            WorkerState(rank=w.rank, node=agent.config.node, pid=w.pid,
                        status=process_status(w.pid) if w.alive() else EXITED,
                        exit_code=w.exit.returncode if w.exit is not None else None)
            for w in agent.workers.values()
        ]
        now = time.monotonic()
        if force or states != self._posted or now - self._posted_at >= STATE_REFRESH_S:
            post_states(self.channel(agent), agent.config.node, states)
            self._posted, self._posted_at = states, now


def _failed(agent: NodeAgent, excluded: set[int]) -> list[WorkerExit]:
    """The current workers' failed exits, earliest first, but those of ranks the job excluded."""
    exits = [w.exit for w in agent.workers.values() if w.exit and w.exit.failed and w.rank not in excluded]
    return sorted(exits, key=lambda e: e.time)
