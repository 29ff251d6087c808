"""Discrete-event engine: replays a trace against one policy and integrates the cluster's WAF.

Each job has a WAF rate (weighted achieved FLOP/s, `plan.cost`) while it runs and 0 while it is down.
The engine keeps time, applies trace events (a SEV1 failure takes its node out of `alive` until the
trace's `node_back`), calls the policy, runs the callbacks the policy schedules, and integrates
Σ rates over time. A policy invalidates its own pending callbacks for a job by bumping the job's
`epoch` (`SimContext.stall`), so a second failure during a recovery supersedes the first recovery.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from megatron_unicron.plan.planner import JobSpec
from megatron_unicron.sim.taxonomy import KINDS, NODE_BACK, FailureKind
from megatron_unicron.sim.traces import TraceEvent

__all__ = ["JobState", "SimContext", "Policy", "SimResult", "run"]


@dataclass
class JobState:
    """Mutable per-job state inside one simulation."""

    spec: JobSpec
    nodes: list[str]
    rate: float = 0.0
    running: bool = False
    epoch: int = 0
    iteration_s: float = 1.0
    accumulated: float = 0.0


class Policy(Protocol):
    """What the engine calls; see `sim.policies`."""

    name: str

    def setup(self, ctx: SimContext) -> None:
        """Place the jobs and set their initial rates."""

    def on_failure(self, ctx: SimContext, node: str, failure: FailureKind) -> None:
        """React to a failure on `node` (already out of `ctx.alive` if it is SEV1)."""

    def on_node_back(self, ctx: SimContext, node: str) -> None:
        """React to `node` returning (already back in `ctx.alive`)."""


@dataclass
class SimContext:
    """The state a policy reads and changes."""

    nodes: tuple[str, ...]
    jobs: dict[str, JobState]
    now: float = 0.0
    alive: set[str] = field(default_factory=set)
    _queue: list[tuple[float, int, Callable[[], None]]] = field(default_factory=list)
    _seq: itertools.count = field(default_factory=itertools.count)

    def owner(self, node: str) -> JobState | None:
        """The job holding `node`, if any."""
        for job in self.jobs.values():
            if node in job.nodes:
                return job
        return None

    def after(self, delay: float, fn: Callable[[], None]) -> None:
        """Run `fn` `delay` seconds from now."""
        heapq.heappush(self._queue, (self.now + max(delay, 0.0), next(self._seq), fn))

    def stall(self, job: JobState) -> int:
        """Stop the job producing and cancel its pending callbacks; returns the new epoch."""
        job.running = False
        job.epoch += 1
        return job.epoch

    def resume_after(self, job: JobState, delay: float, rate: float | None = None) -> None:
        """Resume the job `delay` seconds from now (unless it is stalled again before).

        `rate` (default: unchanged) becomes the job's rate at once, so that a later recovery that
        supersedes this one resumes at the newest intended rate.
        """
        epoch = job.epoch
        if rate is not None:
            job.rate = rate

        def go() -> None:
            if job.epoch == epoch:
                job.running = job.rate > 0

        self.after(delay, go)

    @property
    def rate(self) -> float:
        """Current cluster WAF."""
        return sum(j.rate for j in self.jobs.values() if j.running)


@dataclass(frozen=True)
class SimResult:
    """Accumulated WAF (FLOP), the WAF time series and the failures of one run."""

    policy: str
    accumulated: float
    failure_free: float
    horizon_s: float
    times: tuple[float, ...]
    rates: tuple[float, ...]
    failures: tuple[TraceEvent, ...]
    per_job: dict[str, float]

    @property
    def fraction_of_failure_free(self) -> float:
        """Accumulated WAF over the WAF of the same plan running failure-free for the horizon."""
        return self.accumulated / self.failure_free if self.failure_free > 0 else 0.0


def run(
    policy: Policy,
    nodes: Sequence[str],
    jobs: Sequence[JobState],
    trace: Sequence[TraceEvent],
    horizon_s: float,
) -> SimResult:
    """Simulate `horizon_s` seconds of `trace` under `policy`."""
    ctx = SimContext(nodes=tuple(nodes), jobs={j.spec.name: j for j in jobs}, alive=set(nodes))
    policy.setup(ctx)
    initial = ctx.rate
    for ev in trace:
        if ev.time_s < horizon_s:
            ctx._queue.append((ev.time_s, next(ctx._seq), _trace_callback(ctx, policy, ev)))
    heapq.heapify(ctx._queue)
    times, rates = [0.0], [initial]
    acc = 0.0
    last = 0.0
    while ctx._queue and ctx._queue[0][0] < horizon_s:
        t, _, fn = heapq.heappop(ctx._queue)
        dt = t - last
        for job in ctx.jobs.values():
            if job.running:
                job.accumulated += job.rate * dt
        acc += ctx.rate * dt
        last = ctx.now = t
        fn()
        r = ctx.rate
        if r != rates[-1]:
            times.append(t)
            rates.append(r)
    dt = horizon_s - last
    for job in ctx.jobs.values():
        if job.running:
            job.accumulated += job.rate * dt
    acc += ctx.rate * dt
    return SimResult(
        policy=policy.name,
        accumulated=acc,
        failure_free=initial * horizon_s,
        horizon_s=horizon_s,
        times=tuple(times),
        rates=tuple(rates),
        failures=tuple(e for e in trace if e.time_s < horizon_s and e.kind != NODE_BACK),
        per_job={name: j.accumulated for name, j in ctx.jobs.items()},
    )


def _trace_callback(ctx: SimContext, policy: Policy, ev: TraceEvent) -> Callable[[], None]:
    def apply() -> None:
        if ev.kind == NODE_BACK:
            if ev.node not in ctx.alive:
                ctx.alive.add(ev.node)
                policy.on_node_back(ctx, ev.node)
            return
        if ev.node not in ctx.alive:
            return  # a node that is down cannot fail again
        failure = KINDS[ev.kind]
        if failure.takes_node_down:
            ctx.alive.discard(ev.node)
        policy.on_failure(ctx, ev.node, failure)

    return apply
