"""Incidents: correlated fault reports grouped, their root cause found and graded (pure code).

The coordinator (``coordinator.py``) feeds this module what it reads from the store (fault reports,
the agents' view of their worker processes, lost nodes) and carries out the decisions of
``decisions.py``; nothing here touches the store or torch, so every rule is unit-testable.

Collection. The first new report of a generation opens an incident. It closes

1. at once when every member of the generation has reported, or is covered by a process- or node-level
   event (``exited`` names the rank, ``lost-node`` covers every rank of the node): nothing more can come;
2. once ``settle_window_s`` has passed, when its root is known already: an ``exited`` or ``lost-node``
   event, a member its agent sees stopped (``T``), or a SEV1 report (a bad device). Nothing a silent
   peer could still report would outrank it (peers report symptoms: resets, timeouts), and the silent
   peers learn the decision when their timed wait ends; only further exits of the same cause are
   waited for;
3. once ``grace_window_s`` has passed and every member is accounted for: reported, covered, or seen
   stopped or gone by its agent;
4. at the latest after ``collect_bound_s`` (see there): ranks still silent then are either blocked in a
   timed wait that never ended or hung.

Root cause: the most severe event (``SEV1`` first); among equal severities a process or node signal
(``exited``, ``lost-node``, or a hang the coordinator inferred from a process state) wins over in-band
symptoms, then the earliest. A SIGKILLed rank makes its peers report ``conn-reset`` (SEV3): the root
is the agent's ``exited`` (SEV2). A member that did not report, whose process its agent sees stopped,
or alive while its peers reported timeouts, is hung: the coordinator adds a ``hang`` event for it.

Escalation: the same root kind on the same rank (node, for node events) within
``escalation_window_s`` of an earlier incident is graded one severity above that incident's grade.
An incident that opens while the previous recovery has not resumed yet means that recovery failed
(nothing trains during a transition): it is graded at least one severity above the previous incident.
Above SEV1 nothing is left to try: an incident that escalates a failed SEV1 recovery is *exhausted*
and the job stops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from megatron_unicron.config import DetectionConfig
from megatron_unicron.events import ErrorKind, FaultEvent, LayoutSpec, Severity
from megatron_unicron.taxonomy import severity_of

RUNNING, STOPPED, EXITED = "running", "stopped", "exited"
"""A worker process's status as its agent sees it (``/proc/<pid>/stat``: ``T`` is stopped)."""

PROCESS_SIGNALS = frozenset({ErrorKind.EXITED, ErrorKind.LOST_NODE})


@dataclass(frozen=True, kw_only=True)
class WorkerState:
    """One worker process as its node's agent last saw it."""

    rank: int
    node: str
    pid: int | None
    status: str
    exit_code: int | None = None

    def __post_init__(self) -> None:
        if self.status not in (RUNNING, STOPPED, EXITED):
            raise ValueError(f"worker status must be {RUNNING}, {STOPPED} or {EXITED}, got {self.status!r}")

    @property
    def alive(self) -> bool:
        """Whether the process exists (running or stopped)."""
        return self.status != EXITED

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the store."""
        return {"rank": self.rank, "node": self.node, "pid": self.pid, "status": self.status,
                "exit_code": self.exit_code}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkerState:
        """Inverse of :meth:`to_dict`."""
        return cls(rank=int(data["rank"]), node=str(data["node"]), pid=data.get("pid"),
                   status=str(data["status"]), exit_code=data.get("exit_code"))


@dataclass(frozen=True, kw_only=True)
class JobSettings:
    """What the coordinator knows of a job: the worker's posted ``config`` plus the launch shape."""

    job: str
    world_size: int
    layout: LayoutSpec
    rank_node: Mapping[int, str]
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    incident_log: str | None = None
    save: str | None = None
    train_iters: int | None = None
    snapshot_interval: int | None = None
    """Iterations between in-memory snapshots (0: none); None when the job did not say (a restart is
    then assumed to find its state)."""

    def __post_init__(self) -> None:
        if self.layout.world_size != self.world_size:
            raise ValueError(f"layout {self.layout} needs {self.layout.world_size} ranks, "
                             f"but world_size is {self.world_size}")
        missing = [r for r in range(self.world_size) if r not in self.rank_node]
        if missing:
            raise ValueError(f"rank_node names no node for rank(s) {missing}")

    @classmethod
    def from_config(cls, job: str, config: Mapping[str, Any], launch_rank_node: Mapping[int, str]
                    ) -> JobSettings:
        """Parse the ``config`` record (see ``coordinator``); raise ValueError naming the bad field."""
        try:
            world = int(config["world_size"])
            layout = LayoutSpec(**{k: int(config["layout"][k]) for k in ("tp", "pp", "dp")})
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"the job config needs world_size and layout {{tp, pp, dp}}: {e}") from None
        known = {f for f in DetectionConfig.__dataclass_fields__}
        given = {k: v for k, v in dict(config.get("detection") or {}).items() if k in known}
        rank_node = {int(k): str(v) for k, v in dict(config.get("rank_node") or launch_rank_node).items()}
        iters, snapshots = config.get("train_iters"), config.get("snapshot_interval")
        return cls(job=job, world_size=world, layout=layout, rank_node=rank_node,
                   detection=DetectionConfig(**given), incident_log=config.get("incident_log"),
                   save=config.get("save"), train_iters=int(iters) if iters is not None else None,
                   snapshot_interval=int(snapshots) if snapshots is not None else None)

    def ranks_on(self, node: str) -> tuple[int, ...]:
        """Launch ranks placed on ``node``."""
        return tuple(sorted(r for r, n in self.rank_node.items() if n == node))


def collect_bound_s(detection: DetectionConfig, mean_iteration_s: float | None) -> float:
    """The longest an incident waits for silent members.

    A live member that has not reported is either hung or blocked in a timed wait that expires after
    its adaptive timeout: at most ``warmup_floor_s`` while its statistics warm up, then about
    ``slow_factor`` x the operation's mean, which an iteration's mean bounds. Twice that leaves room
    for loaded cores. A member on a node that stopped renewing its lease is accounted for once the
    lease expires, so the bound also covers ``lease_ttl_s`` plus one renewal interval.
    """
    timed_wait = max(detection.warmup_floor_s, detection.slow_factor * (mean_iteration_s or 0.0))
    lease = detection.lease_ttl_s + detection.lease_interval_s
    return max(detection.grace_window_s, lease, 2.0 * timed_wait)


def covered_ranks(events: Iterable[FaultEvent], rank_node: Mapping[int, str]) -> set[int]:
    """Ranks some event names, plus every rank of a lost node."""
    covered: set[int] = set()
    for e in events:
        if e.rank is not None:
            covered.add(e.rank)
        if e.kind is ErrorKind.LOST_NODE:
            covered |= {r for r, n in rank_node.items() if n == e.node}
    return covered


class Collector:
    """The events of one open incident, and when it closes (rules 1-4 of the module docstring)."""

    def __init__(self, *, opened_at: float, generation: int, members: Sequence[int], grace_s: float,
                 bound_s: float, settle_s: float | None = None) -> None:
        self.opened_at = opened_at
        self.generation = generation
        self.members = tuple(members)
        self.grace_s = grace_s
        self.settle_s = grace_s if settle_s is None else min(settle_s, grace_s)
        self.bound_s = bound_s
        self.events: list[FaultEvent] = []

    def add(self, event: FaultEvent) -> None:
        """Add one report."""
        self.events.append(event)

    def silent(self, rank_node: Mapping[int, str], states: Mapping[int, WorkerState]) -> list[int]:
        """Members neither covered by an event nor seen stopped or gone by their agent."""
        covered = covered_ranks(self.events, rank_node)
        return [r for r in self.members
                if r not in covered and not (r in states and states[r].status in (STOPPED, EXITED))]

    def ready(self, now: float, rank_node: Mapping[int, str], states: Mapping[int, WorkerState]) -> bool:
        """Whether the incident closes now."""
        if not self.events:
            return False
        if now >= self.opened_at + self.bound_s:
            return True
        if set(self.members) <= covered_ranks(self.events, rank_node):
            return True
        if now >= self.opened_at + self.settle_s and self.explained(states):
            return True
        return now >= self.opened_at + self.grace_s and not self.silent(rank_node, states)

    def explained(self, states: Mapping[int, WorkerState]) -> bool:
        """Whether the root is known: an exit, a lost node or a stopped member (process-level signals), or
        a SEV1 report (a bad device: nothing outranks it)."""
        if any(e.kind in PROCESS_SIGNALS or severity_of(e.kind) is Severity.SEV1 for e in self.events):
            return True
        return any(r in states and states[r].status == STOPPED for r in self.members)


# A worker's monitor thread beats every half second while its process runs Python; a live member that
# is silent but still beating is slow (a loaded machine), not stuck: it is not called hung.
BEAT_STALE_S = 2.0


def infer_hangs(events: Sequence[FaultEvent], members: Sequence[int], rank_node: Mapping[int, str],
                states: Mapping[int, WorkerState], *, job: str, generation: int, now: float,
                beat_age: Callable[[int], float | None] | None = None) -> list[FaultEvent]:
    """``hang`` events for members that did not report while alive: stopped, or running while peers
    reported collective timeouts and no longer beating (the process is there, so it is not an exit;
    it said nothing and its monitor thread fell silent too, so it is stuck). A worker's own ``hang``
    report says that worker is slow, not that its peers are.

    Their ``t_detected`` is the first peer timeout (the first in-band sign), else ``now``.
    """
    covered = covered_ranks(events, rank_node)
    timeouts = [e.t_detected for e in events if e.kind is ErrorKind.NCCL_TIMEOUT]
    detected = min(timeouts, default=now)  # the first in-band sign of the hang
    hung = []
    for rank in members:
        state = states.get(rank)
        if rank in covered or state is None or not state.alive:
            continue
        if state.status != STOPPED and beat_age is not None:
            age = beat_age(rank)
            if age is not None and age < BEAT_STALE_S:
                continue  # still beating: slow, not stuck
        if state.status == STOPPED or timeouts:
            how = "is stopped (state T)" if state.status == STOPPED else "is alive"
            hung.append(FaultEvent(
                job=job, kind=ErrorKind.TASK_HANG, rank=rank, node=state.node, generation=generation,
                source="coordinator", t_detected=detected,
                message=f"rank {rank} (pid {state.pid}) {how} but did not report while its peers failed",
            ))
    return hung


def _precedence(event: FaultEvent) -> tuple[int, int, float]:
    process_level = event.kind in PROCESS_SIGNALS or event.source == "coordinator"
    return int(severity_of(event.kind)), 0 if process_level else 1, event.t_detected


def root_cause(events: Sequence[FaultEvent]) -> FaultEvent:
    """The most severe event; a process/node signal before an in-band symptom; then the earliest."""
    if not events:
        raise ValueError("an incident needs at least one event")
    return min(events, key=_precedence)


@dataclass(frozen=True, kw_only=True)
class Strike:
    """A decided incident, remembered for escalation."""

    kind: ErrorKind
    rank: int | None
    node: str
    severity: Severity
    t: float


class EscalationHistory:
    """Grades a root cause one severity above an earlier incident of the same kind on the same rank."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.strikes: list[Strike] = []

    def previous(self, root: FaultEvent, now: float) -> Strike | None:
        """The latest strike of the same kind on the same rank (node, for node events) in the window."""
        for strike in reversed(self.strikes):
            same_place = strike.rank == root.rank if root.rank is not None else strike.node == root.node
            if strike.kind is root.kind and same_place and now - strike.t <= self.window_s:
                return strike
        return None

    def grade(self, root: FaultEvent, now: float) -> Severity:
        """The root's severity: its kind's, or one above the previous strike's."""
        base = severity_of(root.kind)
        prev = self.previous(root, now)
        if prev is None:
            return base
        return escalate(min(base, prev.severity))

    def record(self, root: FaultEvent, severity: Severity, now: float) -> None:
        """Remember a decided incident."""
        self.strikes.append(Strike(kind=root.kind, rank=root.rank, node=root.node, severity=severity, t=now))


def escalate(severity: Severity) -> Severity:
    """One severity up (SEV3 -> SEV2 -> SEV1; SEV1 stays)."""
    return Severity(max(int(Severity.SEV1), int(severity) - 1))


@dataclass(frozen=True, kw_only=True)
class Incident:
    """Correlated events of one generation, their root cause and its grade."""

    id: int
    job: str
    generation: int
    events: tuple[FaultEvent, ...]
    root: FaultEvent
    severity: Severity
    escalated: str = ""
    """Why the grade is above the root kind's: ``repeat``, ``recovery-failed`` or ``not-resumed``."""
    exhausted: bool = False
    """It escalates a SEV1 recovery that failed: nothing is left to try, the job stops."""
    iteration: int | None = None
    """The iteration in flight at the root (the event's, or the rank's committed progress + 1)."""

    def __post_init__(self) -> None:
        if self.root not in self.events:
            raise ValueError("the root cause must be one of the incident's events")
        if self.escalated not in ("", "repeat", "recovery-failed", "not-resumed"):
            raise ValueError(f"unknown escalation reason {self.escalated!r}")

    @property
    def base_severity(self) -> Severity:
        """The root kind's own severity."""
        return severity_of(self.root.kind)


def form_incident(collector: Collector, *, incident_id: int, job: str, rank_node: Mapping[int, str],
                  states: Mapping[int, WorkerState], history: EscalationHistory, now: float,
                  progress: Mapping[int, int] | None = None, failed_recovery: Severity | None = None,
                  beat_age: Callable[[int], float | None] | None = None) -> Incident:
    """Close ``collector``: add inferred hangs, pick and grade the root cause.

    ``failed_recovery`` is the grade of the previous incident when its recovery had not resumed yet.
    """
    inferred = infer_hangs(collector.events, collector.members, rank_node, states, job=job,
                           generation=collector.generation, now=now, beat_age=beat_age)
    events = tuple(collector.events) + tuple(inferred)
    root = root_cause(events)
    severity = history.grade(root, now)
    iteration = root.iteration
    if iteration is None and root.rank is not None and progress and root.rank in progress:
        iteration = progress[root.rank] + 1
    if iteration is None and progress:
        iteration = min(progress.values()) + 1
    escalated = "repeat" if severity < severity_of(root.kind) else ""
    if failed_recovery is not None and escalate(failed_recovery) < severity:
        severity, escalated = escalate(failed_recovery), "recovery-failed"
    return Incident(id=incident_id, job=job, generation=collector.generation, events=events, root=root,
                    severity=severity, escalated=escalated, exhausted=failed_recovery is Severity.SEV1,
                    iteration=iteration)


def not_resumed_incident(previous: Incident, *, incident_id: int, generation: int, waiting: Sequence[int],
                         timeout_s: float, now: float, severity: Severity) -> Incident:
    """The incident raised when ``previous``'s recovery did not resume within ``timeout_s``."""
    root = replace(previous.root, generation=generation, source="coordinator", t_detected=now, t_fault=None,
                   message=f"generation {generation} did not resume within {timeout_s:g} s "
                           f"(no good step from rank(s) {', '.join(map(str, waiting))})")
    return Incident(id=incident_id, job=previous.job, generation=generation, events=(root,), root=root,
                    severity=severity, escalated="not-resumed", exhausted=previous.severity is Severity.SEV1,
                    iteration=previous.iteration)
