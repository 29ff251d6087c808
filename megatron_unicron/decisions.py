"""What the coordinator does about a graded incident (pure code: it returns, the coordinator carries out).

=========  ==========================================================================================
severity   verdict
=========  ==========================================================================================
exhausted  ``stop`` (a failed SEV1 recovery escalated: nothing is left to try), with the reason and
           the newest checkpoint as below
SEV3       ``reattempt``: generation g+1 with the same members and layout; live = every live rank
SEV2       ``restart``: generation g+1 with the same members; ``restart`` = the failed ranks (the dead,
           the hung, the rank that raised); one agent command per node,
           ``{"op": "restart", "ranks": [...], "generation": g+1, "kill_first": bool}`` (kill first
           when one of those processes is still alive, e.g. a stopped one). When that would lose the
           only copy of a rank's state (no DP replica, snapshot or checkpoint): ``reattempt`` for a
           repeated in-band failure (the process is intact), else ``stop`` saying so
SEV1       ``plan_fn(job_state, lost_nodes)`` when given (the seam for live reconfiguration), with
           ``job_state.live`` the survivors: live ranks minus the lost nodes' ranks, the dead
           processes and the root's rank (its device failed, or it kept failing); an excluded process
           that is hung or stopped is killed by its agent, ``{"op": "kill", "ranks": [...],
           "generation": g+1}`` (it could not leave by itself); without a plan_fn,
           or when it returns None: ``stop``, with a reason naming the lost node (or the failed
           device's rank) and the newest checkpoint (``<save>/latest_checkpointed_iteration.txt``)
=========  ==========================================================================================
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from megatron_unicron.events import Action, Decision, ErrorKind, LayoutSpec, Severity
from megatron_unicron.incidents import STOPPED, Incident, JobSettings, WorkerState

TRACKER = "latest_checkpointed_iteration.txt"


@dataclass(frozen=True, kw_only=True)
class JobState:
    """A job as the planner sees it when a SEV1 incident asks for a new plan."""

    job: str
    generation: int
    layout: LayoutSpec
    members: tuple[int, ...]
    live: tuple[int, ...]
    rank_node: Mapping[int, str]
    iteration: int | None
    save: str | None
    mean_iteration_s: float | None = None
    """The job's recent seconds per iteration, when known (a planned switch is announced by time)."""


PlanFn = Callable[[JobState, frozenset[str]], Decision | None]
"""``plan_fn(job_state, lost_nodes)``: a ``reconfigure`` decision for generation g+1, or None to stop."""

ShrinkFn = Callable[[JobState, tuple[int, ...]], Decision | None]
"""``shrink_fn(job_state, restarted)``: go on without the restarted ranks' DP replicas, or None (wait)."""


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """The decision for an incident and what must be sent to make it happen."""

    incident: Incident
    decision: Decision
    ranks: tuple[int, ...]
    """The ranks the incident is about (restarted, hung, lost with their node)."""
    node: str
    commands: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Agent commands by node, sent before the decision is published."""
    stop_reason: str = ""
    checkpoint: str | None = None
    """The directory to resume from, when the job stops and a checkpoint exists."""

    @property
    def action(self) -> Action:
        """The decision's action."""
        return self.decision.action


def latest_checkpoint(save: str | None) -> tuple[str | None, str]:
    """``(directory or None, how to resume)`` from Megatron's tracker file under ``save``."""
    if not save:
        return None, "relaunch from scratch (no checkpoint directory, --save, was configured)"
    try:
        with open(os.path.join(save, TRACKER), encoding="utf-8") as f:
            text = f.read().strip()
    except OSError:
        return None, f"relaunch from scratch (no checkpoint exists in {save})"
    what = "the release checkpoint" if text == "release" else f"the checkpoint of iteration {text}"
    return save, f"resume from {what} in {save} (--load {save})"


def stop_reason(incident: Incident, settings: JobSettings) -> tuple[str, str | None]:
    """Why the job stops and how to resume it: ``(reason, checkpoint directory or None)``."""
    root = incident.root
    at = at_iteration(incident)
    if incident.exhausted:
        where = f"rank {root.rank} ({root.node})" if root.rank is not None else root.node
        detail = f": {root.message[:300]}" if root.message else ""
        what = f"the SEV1 recovery, the last resort, failed ({root.kind.value} on {where}{detail}){at}"
    elif root.kind is ErrorKind.LOST_NODE:
        ranks = ", ".join(map(str, settings.ranks_on(root.node))) or "none"
        what = f"{root.node} was lost (its agent stopped renewing its lease; rank(s) {ranks}){at}"
    elif incident.escalated == "not-resumed":
        what = f"the recovery from {root.kind.value} on rank {root.rank} ({root.node}) did not resume{at}"
    elif incident.escalated:
        what = (f"rank {root.rank} on {root.node} failed again ({root.kind.value}, escalated to "
                f"{incident.severity.name}){at}")
    else:
        detail = f": {root.message}" if root.message else ""
        what = f"the device of rank {root.rank} on {root.node} failed ({root.kind.value}{detail}){at}"
    checkpoint, resume = latest_checkpoint(settings.save)
    return f"{what}; isolate {root.node}, then {resume}", checkpoint


def _alive(rank: int, states: Mapping[int, WorkerState]) -> bool:
    return rank not in states or states[rank].alive


def restart_targets(
    incident: Incident, members: Sequence[int], states: Mapping[int, WorkerState]
) -> list[int]:
    """The ranks a SEV2 incident restarts: dead members, hung ranks, and the root's rank."""
    targets = {e.rank for e in incident.events if e.rank is not None and (
        e.kind is ErrorKind.EXITED or (e.kind is ErrorKind.TASK_HANG and e.source == "coordinator"))}
    targets |= {r for r in members if r in states and not states[r].alive}
    if incident.root.rank is not None:
        targets.add(incident.root.rank)
    return sorted(targets)


def decide(
    incident: Incident, settings: JobSettings, *, generation: int, members: Sequence[int],
    states: Mapping[int, WorkerState], lost_nodes: frozenset[str], progress: Mapping[int, int],
    plan_fn: PlanFn | None = None, targets: Sequence[int] | None = None,
    shrink_fn: ShrinkFn | None = None,
) -> Verdict:
    """The verdict for ``incident`` in ``generation`` (the decision forms ``generation + 1``).

    ``targets`` overrides the ranks a restart acts on (the ranks that did not resume, when a recovery
    is escalated for not resuming).
    """
    root = incident.root
    lost_ranks = {r for r, n in settings.rank_node.items() if n in lost_nodes}
    live = tuple(sorted(set(members) | {r for r, n in settings.rank_node.items()
                                        if r not in lost_ranks and _alive(r, states)}))
    resume = min((progress[r] for r in members if r in progress), default=None)

    def make(action: Action, reason: str, restart: Sequence[int] = (), keep: Sequence[int] = members,
             alive: Sequence[int] = live) -> Decision:
        return Decision(job=settings.job, generation=generation + 1, action=action, incident=str(incident.id),
                        layout=settings.layout, members=tuple(keep), live=tuple(alive),
                        restart=tuple(restart), rank_node=dict(settings.rank_node), resume_iteration=resume,
                        reason=reason)

    if incident.exhausted:
        reason, checkpoint = stop_reason(incident, settings)
        return Verdict(incident=incident, decision=make(Action.STOP, reason, keep=()),
                       ranks=_ranks_of(incident, settings), node=root.node, stop_reason=reason,
                       checkpoint=checkpoint)
    if incident.severity is Severity.SEV3:
        reason = f"reattempt after {root.kind.value}"
        return Verdict(incident=incident, decision=make(Action.REATTEMPT, reason),
                       ranks=_ranks_of(incident, settings), node=root.node)
    if incident.severity is Severity.SEV2:
        chosen = sorted(targets) if targets is not None else restart_targets(incident, members, states)
        lost_state = state_without_copy(chosen, members, settings)
        stuck = _stuck(incident, states)
        in_band = all(_alive(r, states) and r not in stuck for r in chosen)
        if lost_state and incident.escalated == "repeat" and in_band:
            # The process that keeps failing still holds the only copy of its state: try in place again.
            reason = (f"reattempt after {root.kind.value} again: a restart of rank(s) "
                      f"{', '.join(map(str, chosen))} would lose {lost_state}")
            return Verdict(incident=incident, decision=make(Action.REATTEMPT, reason),
                           ranks=_ranks_of(incident, settings), node=root.node)
        if lost_state:
            _, resume_how = latest_checkpoint(settings.save)
            reason = (f"rank(s) {', '.join(map(str, chosen))} cannot be restarted ({root.kind.value}) "
                      f"without losing {lost_state}{at_iteration(incident)}; {resume_how}")
            return Verdict(incident=incident, decision=make(Action.STOP, reason, keep=()),
                           ranks=tuple(chosen), node=root.node, stop_reason=reason)
        commands: dict[str, dict[str, Any]] = {}
        for rank in chosen:
            cmd = commands.setdefault(settings.rank_node[rank], {
                "op": "restart", "ranks": [], "generation": generation + 1, "kill_first": False})
            cmd["ranks"].append(rank)
            cmd["kill_first"] = cmd["kill_first"] or _alive(rank, states)
        reason = f"restart rank(s) {', '.join(map(str, chosen))} after {root.kind.value}"
        decision = make(Action.RESTART, reason, restart=chosen)
        if shrink_fn is not None and targets is None:
            state = JobState(job=settings.job, generation=generation, layout=settings.layout,
                             members=tuple(members), live=tuple(r for r in live if r not in chosen),
                             rank_node=dict(settings.rank_node), iteration=resume, save=settings.save)
            shrunk = shrink_fn(state, tuple(chosen))
            if shrunk is not None:
                # The survivors go on with fewer DP replicas at once; the restarted processes join
                # again when they are up (a scale-up), instead of everyone waiting for them.
                decision = replace(shrunk, incident=str(incident.id), restart=tuple(chosen))
                for command in commands.values():
                    command["join"] = True
        return Verdict(incident=incident, decision=decision, ranks=tuple(chosen), node=root.node,
                       commands=commands)
    lost = frozenset(lost_nodes | ({root.node} if root.kind is ErrorKind.LOST_NODE else set()))
    excluded = {r for r, n in settings.rank_node.items() if n in lost}
    excluded |= {r for r in live if not _alive(r, states)}  # a dead process can neither train nor serve
    if root.rank is not None:
        excluded.add(root.rank)  # the failed device (or the process that keeps failing) is isolated
    survivors = tuple(r for r in live if r not in excluded)
    if plan_fn is not None:
        state = JobState(job=settings.job, generation=generation, layout=settings.layout,
                         members=tuple(members), live=survivors, rank_node=dict(settings.rank_node),
                         iteration=resume, save=settings.save)
        planned = plan_fn(state, lost)
        if planned is not None:
            planned = replace(planned, incident=str(incident.id))
            return Verdict(incident=incident, decision=planned, ranks=_ranks_of(incident, settings),
                           node=root.node, commands=_kill_hung(incident, settings, states, excluded,
                                                               lost, generation + 1))
    reason, checkpoint = stop_reason(incident, settings)
    return Verdict(incident=incident, decision=make(Action.STOP, reason, keep=(), alive=survivors),
                   ranks=_ranks_of(incident, settings), node=root.node, stop_reason=reason,
                   checkpoint=checkpoint)


def state_without_copy(chosen: Sequence[int], members: Sequence[int], settings: JobSettings) -> str:
    """What restarting ``chosen`` would lose for good, or "" when its state has another copy.

    A copy is a DP replica outside ``chosen`` (with the pipelines-first rank order, the member at the
    same index in another ``tp·pp`` block), an in-memory snapshot or a persistent checkpoint. Unknown
    when the job did not post its snapshot interval: then assumed to have one.
    """
    if settings.snapshot_interval is None or settings.snapshot_interval > 0:
        return ""
    if latest_checkpoint(settings.save)[0] is not None:
        return ""
    block = settings.layout.tp * settings.layout.pp
    restarted = set(chosen)
    for index, rank in enumerate(members):
        if rank in restarted and all(r in restarted for r in members[index % block :: block]):
            return (f"the only copy of rank {rank}'s state (no DP replica outside the restart, no "
                    "snapshots, no checkpoint; --unicron-snapshot-interval or --save keeps one)")
    return ""


def at_iteration(incident: Incident) -> str:
    """`` at iteration N`` when the incident knows its iteration."""
    return f" at iteration {incident.iteration}" if incident.iteration is not None else ""


def _stuck(incident: Incident, states: Mapping[int, WorkerState]) -> set[int]:
    """Ranks that cannot act by themselves: reported hung, or stopped."""
    hung = {e.rank for e in incident.events if e.kind is ErrorKind.TASK_HANG and e.rank is not None}
    return hung | {r for r, state in states.items() if state.status == STOPPED}


def _kill_hung(
    incident: Incident, settings: JobSettings, states: Mapping[int, WorkerState], excluded: set[int],
    lost: frozenset[str], generation: int,
) -> dict[str, dict[str, Any]]:
    """Agent commands killing the excluded processes that cannot leave by themselves: hung or stopped.

    A rank the new layout leaves out reads the decision and exits; a stopped or hung one never would,
    and its node's agent would wait for it forever.
    """
    commands: dict[str, dict[str, Any]] = {}
    for rank in sorted(_stuck(incident, states) & excluded):
        node = settings.rank_node.get(rank)
        if node is None or node in lost or not _alive(rank, states):
            continue
        commands.setdefault(node, {"op": "kill", "ranks": [], "generation": generation})["ranks"].append(rank)
    return commands


def _ranks_of(incident: Incident, settings: JobSettings) -> tuple[int, ...]:
    root = incident.root
    if root.rank is None:
        return settings.ranks_on(root.node)
    hung = {e.rank for e in incident.events if e.source == "coordinator" and e.rank is not None}
    return tuple(sorted(hung | {root.rank}))
