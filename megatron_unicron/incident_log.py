"""The incident log: one JSON line per incident, and the launcher's one-line summaries.

A line is appended once the incident's outcome is known, so every incident has exactly one line:

- ``resumed``: every member of the new generation reported a good step (``t_resumed`` is the latest);
- ``stopped``: the job was stopped (SEV1 without a plan); ``t_resumed`` is null;
- ``superseded``: a newer incident was decided before the generation resumed;
- ``not-resumed``: the generation did not resume within ``resume_timeout_s`` (an escalated incident
  follows);
- ``unfinished``: the job ended (done, stopped, or the launcher left) before any of the above.

Fields: ``job``, ``incident`` (1, 2, ... per job), ``generation`` (where the fault happened),
``new_generation`` (the one the decision forms), ``root_kind``, ``severity`` and ``base_severity``
(``"SEV2"``), ``escalated`` (``""``, ``"repeat"``, ``"recovery-failed"``, ``"not-resumed"``), ``action``,
``ranks``, ``restart``, ``layout`` (``{"tp", "pp", "dp"}`` of the new generation) and ``members`` (its
launch ranks in new-rank order; empty when the job stops), ``node``, ``iteration``, ``phase``,
``exit_code``, ``message``, ``t_fault`` (when the injected fault fired, else null), ``t_detected`` (the
root event's), ``t_decided``, ``t_resumed``, ``outcome``, ``reason`` (why the job stopped),
``checkpoint``, ``events`` (compact: kind, rank, node, source, t, and iteration, phase, exit_code,
message when known). Times are wall-clock seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from collections.abc import Mapping
from typing import Any

from megatron_unicron.decisions import Verdict
from megatron_unicron.events import ErrorKind, FaultEvent

OUTCOMES = ("resumed", "stopped", "superseded", "not-resumed", "unfinished")


def compact_event(event: FaultEvent) -> dict[str, Any]:
    """The fields of an event worth keeping in the log."""
    record: dict[str, Any] = {"kind": event.kind.value, "rank": event.rank, "node": event.node,
                              "source": event.source, "t": round(event.t_detected, 6)}
    if event.iteration is not None:
        record["iteration"] = event.iteration
    if event.phase is not None:
        record["phase"] = event.phase.value
    if event.exit_code is not None:
        record["exit_code"] = event.exit_code
    if event.message:
        record["message"] = event.message[:160]
    return record


def incident_record(verdict: Verdict, *, t_decided: float, t_fault: float | None, t_resumed: float | None,
                    outcome: str) -> dict[str, Any]:
    """The log line of a decided incident."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
    incident, root = verdict.incident, verdict.incident.root
    return {
        "job": incident.job, "incident": incident.id, "generation": incident.generation,
        "new_generation": verdict.decision.generation, "root_kind": root.kind.value,
        "severity": incident.severity.name, "base_severity": incident.base_severity.name,
        "escalated": incident.escalated, "action": verdict.action.value, "ranks": list(verdict.ranks),
        "restart": list(verdict.decision.restart), "layout": dataclasses.asdict(verdict.decision.layout),
        "members": list(verdict.decision.members), "node": verdict.node, "iteration": incident.iteration,
        "phase": root.phase.value if root.phase is not None else None, "exit_code": root.exit_code,
        "message": root.message, "t_fault": t_fault, "t_detected": root.t_detected, "t_decided": t_decided,
        "t_resumed": t_resumed, "outcome": outcome, "reason": verdict.stop_reason,
        "checkpoint": verdict.checkpoint, "events": [compact_event(e) for e in incident.events],
    }


def append_line(path: str, record: Mapping[str, Any]) -> None:
    """Append one record to the log at ``path`` (directories are created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(dict(record), sort_keys=True) + "\n")


def read_log(path: str) -> list[dict[str, Any]]:
    """Every record of the log at ``path``, oldest first (empty when it does not exist)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def _exit_text(code: int | None) -> str:
    if code is None:
        return ""
    if code < 0:
        try:
            return f", {signal.Signals(-code).name}"
        except ValueError:
            return f", signal {-code}"
    return f", exit code {code}"


def summary_line(verdict: Verdict, *, t_decided: float, t_fault: float | None) -> str:
    """``unicron: incident 3 SEV2 exited rank 3 (node0, SIGKILL) at iteration 7 -> restart; ...``."""
    incident, root = verdict.incident, verdict.incident.root
    grade = incident.severity.name
    if incident.escalated:
        grade += f" (escalated from {incident.base_severity.name}: {incident.escalated})"
    if root.kind is ErrorKind.LOST_NODE or root.rank is None:
        subject = f"{root.node} (rank(s) {', '.join(map(str, verdict.ranks)) or 'none'})"
    else:
        subject = f"rank {root.rank} ({root.node}{_exit_text(root.exit_code)})"
    at = f" at iteration {incident.iteration}" if incident.iteration is not None else ""
    action = verdict.action.value
    if verdict.decision.restart:
        action += f" rank(s) {', '.join(map(str, verdict.decision.restart))}"
    detected = f"detected {root.t_detected - t_fault:.2f} s after the fault, " if t_fault is not None else ""
    return (f"unicron: incident {incident.id} {grade} {root.kind.value} {subject}{at} -> {action}; "
            f"{detected}decided {t_decided - root.t_detected:.2f} s after detection")


def resumed_line(record: Mapping[str, Any]) -> str:
    """``unicron: incident 3 resumed: generation 1 trained again 1.90 s after the decision``."""
    return (f"unicron: incident {record['incident']} resumed: generation {record['new_generation']} "
            f"trained again {record['t_resumed'] - record['t_decided']:.2f} s after the decision")
