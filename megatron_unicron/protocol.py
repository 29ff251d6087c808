"""How workers, agents and the coordinator of one job talk through the store (``--unicron`` mode).

Keys, under ``unicron/<job>/`` (``store.JobKeys``):

=================================  ==================  ===========================================
key                                written by          content
=================================  ==================  ===========================================
``config``                         launch rank 0       the job's settings the coordinator needs
``gen<g>/faults``                  workers, agents     appended ``FaultEvent`` JSON lines
``gen<g>/decision``                coordinator         the ``Decision`` that forms generation g
``generation``                     coordinator         the newest decided generation
``progress/<rank>``                workers             committed iterations and generation
``gen<g>/resumed/<rank>``          workers             first good step in generation g
``inject/fired/<i>``               workers             scheduled fault ``i`` fired (first writer)
``joined/<rank>``                  workers             a returning node's worker waits to join
``beat/<rank>``                    workers             the monitor thread's heartbeat (slow vs stuck)
``agent/<node>/commands``          coordinator         appended agent commands (restart ranks)
``stop``                           coordinator         the job stops: why, and how to resume
``done``                           workers             training finished (spares exit)
=================================  ==================  ===========================================

A worker that fails in generation g reports to ``gen<g>/faults`` and blocks on ``gen<g+1>/decision``.
Ranks are *launch ranks* (``RANK`` at spawn), which never change for a process or its restarts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from megatron_unicron.events import Decision, FaultEvent
from megatron_unicron.store import JobKeys, Store, StoreTimeout, append_record, read_records


@dataclass(frozen=True)
class JobChannel:
    """One job's keys on one store connection."""

    store: Store
    keys: JobKeys

    @property
    def prefix(self) -> str:
        """``unicron/<job>``."""
        return self.keys.prefix

    # ------------------------------------------------------------------ faults and decisions
    def report(self, event: FaultEvent) -> None:
        """Append a fault report to its generation's list."""
        append_record(self.store, self.keys.gen(event.generation).faults, json.loads(event.to_json()))

    def faults(self, generation: int) -> list[FaultEvent]:
        """Every fault reported in ``generation`` so far, in order."""
        return [
            FaultEvent.from_json(json.dumps(record))
            for record in read_records(self.store, self.keys.gen(generation).faults)
        ]

    def publish_decision(self, decision: Decision) -> None:
        """Publish the decision that forms ``decision.generation``."""
        self.store.set(self.keys.gen(decision.generation).decision, decision.to_json())
        self.store.set(f"{self.prefix}/generation", str(decision.generation))

    def decision(self, generation: int) -> Decision | None:
        """The decision for ``generation``, if published."""
        raw = self.store.try_get(self.keys.gen(generation).decision)
        return Decision.from_json(raw) if raw is not None else None

    def wait_decision(self, generation: int, timeout: timedelta, poll_s: float = 0.05) -> Decision | None:
        """Block until generation ``generation`` is decided or the job stops (then None)."""
        deadline = time.monotonic() + timeout.total_seconds()
        while time.monotonic() < deadline:
            decision = self.decision(generation)
            if decision is not None:
                return decision
            if self.stopped() is not None or self.is_done():
                return None
            time.sleep(poll_s)
        raise StoreTimeout(f"no decision for generation {generation} within {timeout}")

    def latest_generation(self) -> int:
        """The newest decided generation (0 before any decision)."""
        raw = self.store.try_get(f"{self.prefix}/generation")
        return int(raw) if raw is not None else 0

    # ------------------------------------------------------------------ worker state
    def post_config(self, config: dict[str, Any]) -> None:
        """The job's settings for the coordinator (written once by launch rank 0)."""
        self.store.set(f"{self.prefix}/config", json.dumps(config, sort_keys=True))

    def config(self, timeout: timedelta | None = None) -> dict[str, Any] | None:
        """The job's settings, waiting up to ``timeout`` when given."""
        key = f"{self.prefix}/config"
        raw = self.store.get(key, timeout) if timeout is not None else self.store.try_get(key)
        return json.loads(raw) if raw is not None else None

    def post_progress(self, rank: int, iteration: int, generation: int) -> None:
        """A worker's committed iterations (written every iteration)."""
        value = {"iteration": iteration, "generation": generation, "t": time.time()}
        self.store.set(f"{self.prefix}/progress/{rank}", json.dumps(value))

    def progress(self, rank: int) -> dict[str, Any] | None:
        """A worker's last posted progress."""
        raw = self.store.try_get(f"{self.prefix}/progress/{rank}")
        return json.loads(raw) if raw is not None else None

    def post_resumed(self, generation: int, rank: int, iteration: int) -> None:
        """A worker finished its first good step in ``generation``."""
        value = {"t": time.time(), "iteration": iteration}
        self.store.set(f"{self.keys.gen(generation).prefix}/resumed/{rank}", json.dumps(value))

    def resumed(self, generation: int, rank: int) -> dict[str, Any] | None:
        """When ``rank`` resumed in ``generation``, if it did."""
        raw = self.store.try_get(f"{self.keys.gen(generation).prefix}/resumed/{rank}")
        return json.loads(raw) if raw is not None else None

    def post_beat(self, rank: int) -> None:
        """A worker's monitor thread is alive (its process runs Python)."""
        self.store.set(f"{self.prefix}/beat/{rank}", f"{time.time():.6f}")

    def beat_age(self, rank: int, now: float | None = None) -> float | None:
        """Seconds since ``rank`` last beat, or None if it never did."""
        raw = self.store.try_get(f"{self.prefix}/beat/{rank}")
        return None if raw is None else (time.time() if now is None else now) - float(raw)

    def post_joined(self, rank: int) -> None:
        """A worker of a returning node is up and waits to be given a place."""
        self.store.set(f"{self.prefix}/joined/{rank}", json.dumps({"t": time.time()}))

    def joined(self, rank: int) -> float | None:
        """When ``rank``'s newest process said it waits to join (None: never)."""
        raw = self.store.try_get(f"{self.prefix}/joined/{rank}")
        return float(json.loads(raw)["t"]) if raw is not None else None

    def claim_fault(self, index: int, record: dict[str, Any]) -> bool:
        """Mark scheduled fault ``index`` fired; False when it already fired (first writer wins)."""
        key = f"{self.prefix}/inject/fired/{index}"
        desired = json.dumps(record, sort_keys=True)
        return self.store.compare_set(key, "", desired).decode() == desired

    def fired_fault(self, index: int) -> dict[str, Any] | None:
        """The record of scheduled fault ``index``, if it fired."""
        raw = self.store.try_get(f"{self.prefix}/inject/fired/{index}")
        return json.loads(raw) if raw is not None else None

    def fired_faults(self) -> list[dict[str, Any]]:
        """Records of every fired fault (indices 0, 1, ... until the first gap of 64)."""
        found = [self.fired_fault(i) for i in range(64)]
        return [f for f in found if f is not None]

    # ------------------------------------------------------------------ agents and the end
    def command_agent(self, node: str, command: dict[str, Any]) -> None:
        """Append a command for ``node``'s agent (e.g. ``{"op": "restart", "ranks": [3], ...}``)."""
        append_record(self.store, f"{self.prefix}/agent/{node}/commands", command)

    def agent_commands(self, node: str) -> list[dict[str, Any]]:
        """Every command sent to ``node``'s agent, oldest first."""
        return read_records(self.store, f"{self.prefix}/agent/{node}/commands")

    def stop(self, reason: str, checkpoint: str | None) -> None:
        """Stop the job cleanly."""
        self.store.set(f"{self.prefix}/stop", json.dumps({"reason": reason, "checkpoint": checkpoint}))

    def stopped(self) -> dict[str, Any] | None:
        """Why the job was stopped, if it was."""
        raw = self.store.try_get(f"{self.prefix}/stop")
        return json.loads(raw) if raw is not None else None

    def mark_done(self) -> None:
        """Training finished."""
        self.store.set(f"{self.prefix}/done", "1")

    def is_done(self) -> bool:
        """Whether training finished."""
        return self.store.try_get(f"{self.prefix}/done") is not None
