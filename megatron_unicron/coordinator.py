"""The coordinator: one per job, a thread in node rank 0's launcher in ``--unicron`` mode.

It watches the store, forms incidents from fault reports (``incidents.py``), decides
(``decisions.py``), carries the decision out and records every incident (``incident_log.py``).

**The job config** (``unicron/<job>/config``), posted once by the worker of launch rank 0 before its
first iteration; nothing is decided before it exists (an incident waits up to ``CONFIG_WAIT_S`` for it,
or until every worker is gone, then the job is stopped)::

    {"incident_log": "/path/incidents.jsonl" | null,   # where incident lines go (none: not written)
     "save": "/path/to/checkpoints" | null,            # --save (latest_checkpointed_iteration.txt)
     "detection": {"lease_interval_s": 1.0, "lease_ttl_s": 3.0, "slow_factor": 3.0,
                   "warmup_floor_s": 2.0, "grace_window_s": 0.5, "settle_window_s": 0.1,
                   "escalation_window_s": 60.0, "resume_timeout_s": 120.0},
                                                       # UnicronConfig.detection; missing keys: defaults
     "world_size": 4,                                  # members of generation 0: launch ranks 0..n-1
     "layout": {"tp": 1, "pp": 2, "dp": 2},            # tp * pp * dp == world_size
     "train_iters": 20,                                # optional
     "rank_node": {"0": "node0", ...}}                 # optional; default: the launch shape

**What a worker does for it.** Post ``progress`` after every committed iteration (the coordinator
takes the iteration in flight of an agent-reported exit and the mean iteration time from it). On a
failure, report a ``FaultEvent`` to its current generation ``g`` (``iteration`` = the one in flight,
1-based) and block in ``wait_decision(g + 1)``. Survivors blocked in a timed wait report when it
expires: an incident waits for every member up to ``incidents.collect_bound_s``. Then follow the
decision: ``stop`` or None (the job stopped) -> exit; own rank in ``decision.restart`` -> exit (any
code) or keep waiting to be killed; otherwise rebuild the groups of ``decision.generation`` and redo
from ``decision.resume_iteration`` (the smallest committed iteration among the members). After the
first good step of generation g >= 1 post ``resumed(g, rank)`` (restarted ranks too). A restarted
process sees ``UNICRON_RESTARTED=1`` and ``UNICRON_GENERATION=g``. Launch rank 0 calls ``mark_done``
when training is finished. Injected faults are claimed with ``claim_fault`` (their ``t_fault``).

**Reads**: ``gen<g>/faults`` of the current generation, node leases (``nodes/<node>/lease``, ``left``),
the agents' worker states (``worker_states.py``), ``progress/<rank>``, ``gen<g>/resumed/<rank>``,
``inject/fired/*``, ``done`` and ``stop``. **Writes**: lost-node reports (into ``gen<g>/faults``),
agent commands (before the decision), ``stop`` (before a STOP decision), ``gen<g+1>/decision``,
``generation``, and the incident log.

A node whose lease is older than ``lease_ttl_s`` (at least two renewal intervals of the agents), and
that did not leave, is lost: a ``lost-node`` event (SEV1). A decided generation that does not resume
within ``resume_timeout_s`` raises an escalated incident (one severity up) on the ranks that did not;
an incident while a recovery has not resumed is graded one severity above it; escalating a failed
SEV1 recovery stops the job (``incidents``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from megatron_unicron.config import DetectionConfig
from megatron_unicron.decisions import JobState, PlanFn, ShrinkFn, Verdict, decide
from megatron_unicron.events import Action, ErrorKind, FaultEvent
from megatron_unicron.incident_log import append_line, incident_record, resumed_line, summary_line
from megatron_unicron.incidents import (
    EXITED,
    Collector,
    EscalationHistory,
    Incident,
    JobSettings,
    WorkerState,
    collect_bound_s,
    escalate,
    form_incident,
    not_resumed_incident,
)
from megatron_unicron.protocol import JobChannel
from megatron_unicron.store import StoreError, lease_age
from megatron_unicron.worker_states import read_states

log = logging.getLogger(__name__)

POLL_S = 0.05
CONFIG_WAIT_S = 60.0
"""How long an incident waits for the job config before the job is stopped for want of it."""
SLOW_POLL_S = 0.2
"""Period of the checks that may lag a little (leases, progress, resumption, the job's end)."""


@dataclass
class _Pending:
    """A decided recovery waiting for its generation to resume."""

    verdict: Verdict
    t_decided: float
    t_fault: float | None


class Coordinator:
    """Incident formation and decisions for one job; call ``poll()`` repeatedly (or ``run``).

    ``nodes`` and ``rank_node`` are the launch shape (the config's ``rank_node`` overrides the latter);
    ``host_node`` runs this coordinator (its own lease is not watched); ``lease_renewal_s`` is how often
    the agents renew their leases; ``plan_fn`` is asked first for SEV1 incidents (``decisions.PlanFn``);
    ``emit`` receives the one-line summaries (default: the log).
    """

    def __init__(
        self, channel: JobChannel, *, nodes: Sequence[str], rank_node: Mapping[int, str],
        host_node: str = "node0", plan_fn: PlanFn | None = None, lease_renewal_s: float = 1.0,
        emit: Callable[[str], None] | None = None, clock: Callable[[], float] = time.time,
        scale_fn: PlanFn | None = None, shrink_fn: ShrinkFn | None = None,
    ) -> None:
        self.channel = channel
        self.job = channel.keys.job
        self.nodes = tuple(nodes)
        self.launch_rank_node = dict(rank_node)
        self.host_node = host_node
        self.plan_fn = plan_fn
        self.scale_fn = scale_fn
        self.shrink_fn = shrink_fn
        self.lease_renewal_s = lease_renewal_s
        self.emit = emit if emit is not None else log.info
        self.clock = clock
        self.settings: JobSettings | None = None
        self.generation = channel.latest_generation()
        self.members: tuple[int, ...] = tuple(sorted(rank_node))
        self.live: tuple[int, ...] = self.members  # members and warm spares
        self._joining: dict[int, float] = {}  # restarted ranks the job goes on without: when asked
        self.lost: set[str] = set()
        self.history = EscalationHistory(DetectionConfig().escalation_window_s)
        self.finished = False
        self.records: list[dict[str, Any]] = []
        """Every incident line written (or that would be, without an incident log)."""
        self._open: Collector | None = None
        self._pending: _Pending | None = None
        self._seen = 0
        self._next_id = 1
        self._used_faults: set[tuple[str, float]] = set()
        self._slow_at = 0.0
        self._iter_samples: dict[int, tuple[tuple[int, float], tuple[int, float]]] = {}

    # ------------------------------------------------------------------------------------- loop
    @property
    def detection(self) -> DetectionConfig:
        """The job's detection settings (defaults until the config arrives)."""
        return self.settings.detection if self.settings is not None else DetectionConfig()

    @property
    def rank_node(self) -> Mapping[int, str]:
        """Launch rank -> node."""
        return self.settings.rank_node if self.settings is not None else self.launch_rank_node

    def run(self, stop: threading.Event, poll_s: float = POLL_S) -> None:
        """Poll until ``stop`` is set, then ``close()``."""
        try:
            while not stop.wait(poll_s):
                self.poll()
        finally:
            self.close()

    def poll(self) -> None:
        """One pass: config, leases, new reports, closing an incident, resumption."""
        if self.finished:
            return
        now = self.clock()
        slow = now >= self._slow_at
        if slow:
            self._slow_at = now + SLOW_POLL_S
            if self.channel.is_done() or self.channel.stopped() is not None:
                self._finish()
                return
            self._load_config()
            if self.finished:
                return
            self._check_leases(now)
            self._check_rejoined()
            self._sample_progress()
        self._collect(now)
        if slow and not self.finished:
            self._check_resumed(now)

    def close(self) -> None:
        """Record a recovery still waiting to resume (the job is ending)."""
        self._finish()

    # ---------------------------------------------------------------------------------- inputs
    def _load_config(self) -> None:
        if self.settings is not None:
            return
        raw = self.channel.config()
        if raw is None:
            return
        try:
            self.settings = JobSettings.from_config(self.job, raw, self.launch_rank_node)
        except (ValueError, TypeError) as e:
            self._give_up(f"its unicron config is invalid ({e})")
            return
        if self.generation == 0:
            self.members = tuple(range(self.settings.world_size))
        self.history.window_s = self.settings.detection.escalation_window_s
        log.debug("job config: %s", raw)

    def _check_leases(self, now: float) -> None:
        store, keys = self.channel.store, self.channel.keys
        # The agents renew every lease_renewal_s (a launcher setting): a shorter TTL would lose every node.
        ttl = max(self.detection.lease_ttl_s, 2 * self.lease_renewal_s)
        for node in self.nodes:
            if node in self.lost:
                self._check_back(node, now, ttl)
                continue
            if node == self.host_node or store.check([keys.left(node)]):
                continue
            age = lease_age(store, keys.lease(node), now)
            if age is not None and age > ttl:
                self.lost.add(node)
                log.warning("%s lost: its lease was not renewed for %.1f s", node, age)
                self.channel.report(FaultEvent(
                    job=self.job, kind=ErrorKind.LOST_NODE, rank=None, node=node, generation=self.generation,
                    source="coordinator", t_detected=now,
                    message=f"lease not renewed for {age:.1f} s (ttl {ttl:g} s)"))

    def _check_back(self, node: str, now: float, ttl: float) -> None:
        """A lost node whose new launcher renews its lease and whose workers wait to join: re-plan larger."""
        age = lease_age(self.channel.store, self.channel.keys.lease(node), now)
        ranks = [r for r, n in self.rank_node.items() if n == node]
        if age is None or age > ttl or not all(self.channel.joined(r) for r in ranks):
            return
        if self._open is not None or self._pending is not None or self.settings is None:
            return  # one change at a time: finish the recovery in progress first
        self.lost.discard(node)
        log.warning("%s is back (ranks %s)", node, ranks)
        self._scale_up(node, ranks)

    def _check_rejoined(self) -> None:
        """Restarted processes the job went on without are up again: take them back."""
        if not self._joining or self._open is not None or self._pending is not None or self.settings is None:
            return
        ready = [r for r, asked in self._joining.items() if (self.channel.joined(r) or 0.0) > asked]
        if ready and len(ready) == len(self._joining):
            self._joining.clear()
            self._scale_up(f"rank(s) {', '.join(map(str, ready))}", ready)

    def _scale_up(self, what: str, ranks: Sequence[int]) -> None:
        """Plan a larger layout with ``ranks`` back (``what`` names them in the log)."""
        assert self.settings is not None
        if self.scale_fn is None:
            return
        progress = self._progress()
        state = JobState(job=self.job, generation=self.generation, layout=self.settings.layout,
                         members=self.members, live=tuple(sorted(set(self.live) | set(ranks))),
                         rank_node=dict(self.rank_node), iteration=max(progress.values(), default=None),
                         save=self.settings.save, mean_iteration_s=self.mean_iteration_s())
        decision = self.scale_fn(state, frozenset({what}))
        if decision is None:
            self.emit(f"unicron: {what} back; the job keeps {self.settings.layout} (no larger layout)")
            return
        last = self.settings.train_iters
        if last is not None and decision.at_iteration is not None and decision.at_iteration >= last:
            # Members switch before an iteration; after the last one there is none to switch before.
            self.emit(f"unicron: {what} back; the job keeps {self.settings.layout} (training ends at "
                      f"iteration {last}, before a switch after iteration {decision.at_iteration})")
            return
        self.channel.publish_decision(decision)
        self.emit(f"unicron: {what} back -> {decision.action.value} to {decision.layout} on "
                  f"{len(decision.members)} ranks after iteration {decision.at_iteration}")
        self.generation, self.members, self.live, self._seen = (
            decision.generation, decision.members, decision.live, 0)
        self.settings = replace(self.settings, layout=decision.layout, world_size=len(decision.members))

    def _sample_progress(self) -> None:
        """Keep the first and latest progress of the lowest member, for the mean iteration time."""
        if not self.members:
            return
        raw = self.channel.progress(self.members[0])
        if raw is None or int(raw.get("generation", -1)) != self.generation:
            return
        sample = (int(raw["iteration"]), float(raw["t"]))
        first, _ = self._iter_samples.get(self.generation, (sample, sample))
        self._iter_samples[self.generation] = (first, sample)

    def mean_iteration_s(self) -> float | None:
        """Mean iteration time of the current generation, from the progress posts; until it has two
        posts, that of the newest generation that had (None: unknown)."""
        for generation in sorted(self._iter_samples, reverse=True):
            (i0, t0), (i1, t1) = self._iter_samples[generation]
            if generation <= self.generation and i1 > i0:
                return (t1 - t0) / (i1 - i0)
        return None

    def _states(self) -> dict[int, WorkerState]:
        live_nodes = [n for n in self.nodes if n not in self.lost]
        return read_states(self.channel, live_nodes)

    def _progress(self) -> dict[int, int]:
        found = {}
        for rank in self.members:
            raw = self.channel.progress(rank)
            if raw is not None:
                found[rank] = int(raw["iteration"])
        return found

    # ------------------------------------------------------------------------------- incidents
    def _collect(self, now: float) -> None:
        events = self.channel.faults(self.generation)
        for event in events[self._seen:]:
            if self._open is None:
                bound = collect_bound_s(self.detection, self.mean_iteration_s())
                self._open = Collector(opened_at=now, generation=self.generation, members=self.members,
                                       grace_s=self.detection.grace_window_s, bound_s=bound,
                                       settle_s=self.detection.settle_window_s)
                log.info("incident opened by %s on rank %s (%s)", event.kind.value, event.rank, event.node)
            self._open.add(event)
        self._seen = len(events)
        if self._open is None or self._slow_not_hung():
            return
        states = self._states()
        if not self._open.ready(now, self.rank_node, states):
            return
        if self.settings is None:
            everyone_gone = bool(states) and all(s.status == EXITED for s in states.values())
            if everyone_gone or now - self._open.opened_at > CONFIG_WAIT_S:
                self._give_up("launch rank 0 never posted the job's unicron config "
                              f"({self.channel.prefix}/config), so its faults cannot be handled")
            return
        if self._pending is not None:
            self._check_resumed(now)  # resumed meanwhile (its check runs on the slow polls): not a failure
        failed = self._pending.verdict.incident.severity if self._pending is not None else None
        incident = form_incident(self._open, incident_id=self._next_id, job=self.job,
                                 rank_node=self.rank_node, states=states, history=self.history, now=now,
                                 progress=self._progress(), failed_recovery=failed,
                                 beat_age=lambda rank: self.channel.beat_age(rank, now))
        self._decide(incident, states)

    def _slow_not_hung(self) -> bool:
        """Drop the open incident when it is only iteration-monitor hang reports whose ranks have since
        committed the iteration they flagged: those ranks were slow (loaded cores), not hung."""
        assert self._open is not None
        progress = self._progress()
        for event in self._open.events:
            done = progress.get(event.rank, -1) if event.rank is not None else -1
            if event.kind is not ErrorKind.TASK_HANG or event.source != "worker" or event.iteration is None \
                    or done < event.iteration:
                return False
        flagged = "; ".join(f"rank {e.rank} flagged iteration {e.iteration} as hung, then finished it"
                            for e in self._open.events)
        log.warning("incident dropped: %s", flagged)
        self._open = None
        return True

    def _decide(self, incident: Incident, states: Mapping[int, WorkerState],
                targets: Sequence[int] | None = None) -> None:
        assert self.settings is not None
        verdict = decide(incident, self.settings, generation=self.generation, members=self.members,
                         states=states, lost_nodes=frozenset(self.lost), progress=self._progress(),
                         plan_fn=self.plan_fn, targets=targets, shrink_fn=self.shrink_fn)
        t_fault = self._fault_time(incident)
        for node, command in verdict.commands.items():
            self.channel.command_agent(node, dict(command))
            if command.get("join"):
                self._joining.update({rank: self.clock() for rank in command["ranks"]})
        if verdict.action is Action.STOP:
            self.channel.stop(verdict.stop_reason, verdict.checkpoint)
        self.channel.publish_decision(verdict.decision)
        t_decided = self.clock()
        self.history.record(incident.root, incident.severity, t_decided)
        self.emit(summary_line(verdict, t_decided=t_decided, t_fault=t_fault))
        self._next_id += 1
        self._open = None
        if self._pending is not None:
            self._write(self._pending, outcome="superseded")
        pending = _Pending(verdict=verdict, t_decided=t_decided, t_fault=t_fault)
        if verdict.action is Action.STOP:
            self.emit(f"unicron: job {self.job} stopped: {verdict.stop_reason}")
            self._write(pending, outcome="stopped")
            self.finished = True
            return
        decision = verdict.decision
        self._pending = pending
        self.generation, self.members, self.live, self._seen = (
            decision.generation, decision.members, decision.live, 0)
        if decision.layout != self.settings.layout:
            self.settings = replace(self.settings, layout=decision.layout, world_size=len(decision.members))

    def _fault_time(self, incident: Incident) -> float | None:
        """``t_fault`` of the injected fault behind the root, if one fired (each record serves once).

        A fault fired on the root's rank (its node's, for a node event) comes first; else one fired on
        another rank of the incident: a rank that dropped its links may report after the peers it cut off.
        """
        root = incident.root
        ranks = {root.rank} if root.rank is not None else set(
            self.settings.ranks_on(root.node) if self.settings is not None else ())
        fired = [
            record for record in self.channel.fired_faults()
            if _fault_key(record) not in self._used_faults
            and float(record["t_fault"]) <= root.t_detected + 0.5  # later: another fault's record
        ]
        involved = {e.rank for e in incident.events if e.rank is not None}
        candidates = ([r for r in fired if r.get("rank") in ranks]
                      or [r for r in fired if r.get("rank") in involved])
        if not candidates:
            return None
        matching = [r for r in candidates if r.get("iteration") == incident.iteration]
        best = max(matching or candidates, key=lambda r: float(r["t_fault"]))
        self._used_faults.add(_fault_key(best))
        return float(best["t_fault"])

    # ------------------------------------------------------------------------------ resumption
    def _check_resumed(self, now: float) -> None:
        pending = self._pending
        if pending is None or self.settings is None:
            return
        decision = pending.verdict.decision
        times = {r: self.channel.resumed(decision.generation, r) for r in decision.members}
        waiting = [r for r, t in times.items() if t is None]
        if not waiting:
            t_resumed = max(float(t["t"]) for t in times.values() if t is not None)
            record = self._write(pending, outcome="resumed", t_resumed=t_resumed)
            self.emit(resumed_line(record))
            self._pending = None
            return
        timeout = self.settings.detection.resume_timeout_s
        if self._open is not None or now - pending.t_decided <= timeout:
            return
        self._write(pending, outcome="not-resumed")
        self._pending = None
        previous = pending.verdict.incident
        incident = not_resumed_incident(previous, incident_id=self._next_id, generation=self.generation,
                                        waiting=waiting, timeout_s=timeout, now=now,
                                        severity=escalate(previous.severity))
        self._decide(incident, self._states(), targets=waiting)

    # --------------------------------------------------------------------------------- the end
    def _write(self, pending: _Pending, *, outcome: str, t_resumed: float | None = None) -> dict[str, Any]:
        record = incident_record(pending.verdict, t_decided=pending.t_decided, t_fault=pending.t_fault,
                                 t_resumed=t_resumed, outcome=outcome)
        self.records.append(record)
        path = self.settings.incident_log if self.settings is not None else None
        if path:
            try:
                append_line(path, record)
            except OSError as e:
                log.error("cannot write the incident log %s: %s", path, e)
        return record

    def _finish(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            decision = pending.verdict.decision
            try:
                times = [self.channel.resumed(decision.generation, r) for r in decision.members]
            except StoreError:  # the store may be going away with the launcher
                times = [None]
            if all(t is not None for t in times):
                self._write(pending, outcome="resumed", t_resumed=max(float(t["t"]) for t in times if t))
            else:
                self._write(pending, outcome="unfinished")
        self.finished = True

    def _give_up(self, reason: str) -> None:
        self.channel.stop(reason, None)
        self.emit(f"unicron: job {self.job} stopped: {reason}")
        self.finished = True


def _fault_key(record: Mapping[str, Any]) -> tuple[str, float]:
    return str(record.get("fault")), float(record["t_fault"])


class CoordinatorThread:
    """Runs a ``Coordinator`` on a daemon thread; a failure of the coordinator stops the job cleanly."""

    def __init__(self, coordinator: Coordinator, poll_s: float = POLL_S) -> None:
        self.coordinator = coordinator
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="unicron-coordinator", daemon=True)

    def start(self) -> None:
        """Start polling."""
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop polling and wait for the thread (it writes what is still pending)."""
        self._stop.set()
        self._thread.join(timeout_s)

    def _main(self) -> None:
        try:
            self.coordinator.run(self._stop, self.poll_s)
        except Exception as e:
            log.exception("the coordinator failed")
            try:
                self.coordinator.channel.stop(f"the unicron coordinator failed: {e}", None)
            except Exception:
                log.debug("could not publish the stop", exc_info=True)
