"""Failure traces: generated from the production statistics, or read from a file.

A trace is a time-ordered tuple of `TraceEvent(time_s, node, kind)`; `kind` is a failure kind of
`sim.taxonomy` or `node_back` (a repaired node returns). File format, one event per line (comma or
whitespace separated, `#` starts a comment):

    3600.0  node3  ecc_error
    90000   node3  node_back

Generation (`generate_trace`): each node fails as a Poisson process at `node_failures_per_day`; the
kind is drawn with the paper's Figure 1 shares (`sim.taxonomy`); a SEV1 failure takes the node down
until a `node_back` event: with probability `drain_probability` the node needs draining and repair,
log-uniform between `drain_hours` ("hours to days", failures.md §4), otherwise it is back after a
reset/reboot uniform in `reboot_minutes`. A node that is down does not fail again.

The two named traces:

* **trace-a** (production statistics): Figure 1's mix at the interruption rate of Meta's Llama 3 405B
  run, the only public production rate in the notes (failures.md §6: 419 unexpected interruptions in 54
  days on 16,384 GPUs): 419 · 8 / (16,384 · 54) = 3.79e-3 failures per 8-GPU node per day, i.e. about
  0.42 failures a week on 128 GPUs.
* **trace-b** (higher frequency, standing in for larger scale): the same mix at the rate the whole Llama
  3 job saw (one every 3.1 hours), replayed on 16 nodes: 128 × trace-a per node.

Both are the project's reading of the paper's two traces (unicron-paper.md §8 [M]); the paper's own
rates were not recovered. The drain probability is the paper's 37% (failures.md §4); the repair and
reboot ranges are estimates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_unicron.sim.taxonomy import KINDS, NODE_BACK, kind

__all__ = [
    "TraceEvent",
    "TraceSpec",
    "TRACE_A",
    "TRACE_B",
    "generate_trace",
    "read_trace",
    "write_trace",
    "LLAMA3_NODE_FAILURES_PER_DAY",
]

# failures.md §6: 419 unexpected interruptions, 54 days, 16,384 GPUs in 8-GPU nodes.
LLAMA3_NODE_FAILURES_PER_DAY = 419 * 8 / (16384 * 54)


@dataclass(frozen=True, order=True)
class TraceEvent:
    """At `time_s`, `node` fails with `kind` (or comes back: kind `node_back`)."""

    time_s: float
    node: str
    kind: str

    def __post_init__(self) -> None:
        if not self.time_s >= 0:
            raise ValueError(f"trace event: time must be >= 0, got {self.time_s}")
        if self.kind != NODE_BACK:
            kind(self.kind)


@dataclass(frozen=True, kw_only=True)
class TraceSpec:
    """How to generate a trace (see module docstring)."""

    name: str
    node_failures_per_day: float
    drain_probability: float = 0.37
    drain_hours: tuple[float, float] = (2.0, 72.0)
    reboot_minutes: tuple[float, float] = (5.0, 30.0)

    def __post_init__(self) -> None:
        if not self.node_failures_per_day > 0:
            raise ValueError(f"trace {self.name}: node_failures_per_day must be > 0")
        if not 0 <= self.drain_probability <= 1:
            raise ValueError(f"trace {self.name}: drain_probability must be in [0, 1]")

    @property
    def node_mtbf_s(self) -> float:
        """Mean time between failures of one node, seconds."""
        return 86400.0 / self.node_failures_per_day


TRACE_A = TraceSpec(name="a", node_failures_per_day=LLAMA3_NODE_FAILURES_PER_DAY)
TRACE_B = TraceSpec(name="b", node_failures_per_day=128 * LLAMA3_NODE_FAILURES_PER_DAY)


def generate_trace(spec: TraceSpec, nodes: Sequence[str], days: float, seed: int) -> tuple[TraceEvent, ...]:
    """A random trace over `days` for `nodes`; the same seed gives the same trace."""
    rng = np.random.default_rng(seed)
    names = [k.name for k in KINDS.values() if k.share > 0]
    shares = np.array([KINDS[n].share for n in names])
    probs = shares / shares.sum()
    horizon = days * 86400.0
    rate = spec.node_failures_per_day / 86400.0
    events: list[TraceEvent] = []
    for node in nodes:
        t = 0.0
        while True:
            t += rng.exponential(1.0 / rate)
            if t >= horizon:
                break
            name = names[int(rng.choice(len(names), p=probs))]
            events.append(TraceEvent(t, node, name))
            if KINDS[name].takes_node_down:
                if rng.random() < spec.drain_probability:
                    lo, hi = spec.drain_hours
                    down = 3600.0 * math.exp(rng.uniform(math.log(lo), math.log(hi)))
                else:
                    down = 60.0 * rng.uniform(*spec.reboot_minutes)
                t += down
                if t < horizon:
                    events.append(TraceEvent(t, node, NODE_BACK))
    return tuple(sorted(events))


def read_trace(path: str | Path, nodes: Sequence[str] | None = None) -> tuple[TraceEvent, ...]:
    """Parse a trace file; a bad line raises ValueError naming the file and line."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise ValueError(f"trace {p}: cannot read ({err.strerror})") from None
    events = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].replace(",", " ").strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3:
            raise ValueError(f"trace {p}:{lineno}: expected 'time node kind', got {raw.strip()!r}")
        try:
            t = float(parts[0])
        except ValueError:
            raise ValueError(f"trace {p}:{lineno}: time {parts[0]!r} is not a number") from None
        if nodes is not None and parts[1] not in nodes:
            raise ValueError(f"trace {p}:{lineno}: unknown node {parts[1]!r}")
        try:
            events.append(TraceEvent(t, parts[1], parts[2]))
        except ValueError as err:
            raise ValueError(f"trace {p}:{lineno}: {err}") from None
    return tuple(sorted(events))


def write_trace(events: Sequence[TraceEvent], path: str | Path) -> None:
    """Write events in the file format `read_trace` reads."""
    lines = [f"{e.time_s:.3f} {e.node} {e.kind}" for e in events]
    Path(path).write_text("# time_s node kind\n" + "\n".join(lines) + ("\n" if lines else ""))
