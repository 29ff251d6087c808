"""The simulated Unicron and Megatron policies (the peers are in `sim.peers`).

* **unicron**: detection by signal (exception 0.3 s, process exit, lease 5.6 s, hang 3× the iteration);
  SEV3 retries in place, SEV2 restarts the process, SEV1 isolates the node and runs the real planner
  (`plan.planner.plan`) over the whole cluster, then every job the plan changes transitions; a node that
  comes back triggers a re-plan. D_running comes from the trace's node failure rate.
* **megatron**: a hang is noticed only at the collective timeout (30 min), an exception within seconds;
  every failure restarts the job from its checkpoint (9 min re-queue + 14 min setup + 15 min lost
  progress). A lost node stalls the job until the node is back or an operator drains it (then the job
  restarts down-scaled on its healthy nodes); a node back restarts the job at full size. Jobs never
  trade nodes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from megatron_unicron.plan.cost import CostParams
from megatron_unicron.plan.planner import Cluster, plan
from megatron_unicron.plan.table import TableEntry, ThroughputTable
from megatron_unicron.sim.engine import JobState, SimContext
from megatron_unicron.sim.params import MegatronParams, UnicronParams
from megatron_unicron.sim.taxonomy import FailureKind, Signal

__all__ = ["TablePolicy", "UnicronPolicy", "MegatronPolicy"]


class TablePolicy:
    """Shared part: per-job throughput tables and the rate of a job on k healthy nodes."""

    name = "table"

    def __init__(self, cluster: Cluster, tables: Mapping[str, ThroughputTable]) -> None:
        self.cluster = cluster
        self.tables = dict(tables)

    def entry_on(self, job: JobState, nodes: int) -> TableEntry | None:
        """Best entry of the job on `nodes` whole nodes."""
        if nodes <= 0:
            return None
        spec = job.spec
        return self.tables[spec.name].best_within(
            nodes * self.cluster.gpus_per_node, spec.x_min or 0, spec.x_max
        )

    def rate_on(self, job: JobState, nodes: int) -> float:
        """WAF of the job on `nodes` whole nodes (0 when it cannot run)."""
        e = self.entry_on(job, nodes)
        return job.spec.weight * e.flops if e is not None else 0.0

    def healthy(self, ctx: SimContext, job: JobState) -> int:
        """How many of the job's nodes are alive."""
        return sum(1 for n in job.nodes if n in ctx.alive)

    def setup(self, ctx: SimContext) -> None:
        """Every job runs on its initial nodes."""
        for job in ctx.jobs.values():
            e = self.entry_on(job, len(job.nodes))
            job.rate = job.spec.weight * e.flops if e is not None else 0.0
            job.running = job.rate > 0
            job.iteration_s = (e.iteration_time_s or 1.0) if e is not None else 1.0

    def on_failure(self, ctx: SimContext, node: str, failure: FailureKind) -> None:
        """Overridden by each policy."""
        raise NotImplementedError

    def on_node_back(self, ctx: SimContext, node: str) -> None:
        """Overridden by each policy."""
        raise NotImplementedError


class UnicronPolicy(TablePolicy):
    """See module docstring."""

    name = "unicron"

    def __init__(
        self,
        cluster: Cluster,
        tables: Mapping[str, ThroughputTable],
        params: UnicronParams,
        node_mtbf_s: float,
    ) -> None:
        super().__init__(cluster, tables)
        self.p = params
        self.cost = CostParams(
            node_mtbf_s=node_mtbf_s,
            transition_s=params.transition_s,
            start_s=params.start_s + params.recompute_on_start_s,
        )
        self.replans = 0

    def detection_s(self, failure: FailureKind, job: JobState | None) -> float:
        """Seconds until the in-band detector matching the failure's signal fires."""
        if failure.signal is Signal.EXCEPTION:
            return self.p.exception_detection_s
        if failure.signal is Signal.EXIT:
            return self.p.exit_detection_s
        if failure.signal is Signal.LOST:
            return self.p.lease_detection_s
        return self.p.hang_detection_iterations * (job.iteration_s if job is not None else 1.0)

    def on_failure(self, ctx: SimContext, node: str, failure: FailureKind) -> None:
        """SEV3 retry, SEV2 restart, SEV1 isolate + re-plan."""
        job = ctx.owner(node)
        det = self.detection_s(failure, job)
        if failure.takes_node_down:
            if job is not None:
                ctx.stall(job)
            ctx.after(det, lambda: self.replan(ctx))
        elif job is not None:
            ctx.stall(job)
            action = self.p.reattempt_s if failure.severity == 3 else self.p.restart_process_s
            ctx.resume_after(job, det + action)

    def on_node_back(self, ctx: SimContext, node: str) -> None:
        """A repaired node joins the free pool: re-plan."""
        self.replan(ctx)

    def replan(self, ctx: SimContext) -> None:
        """Run the planner on the current cluster and carry out its transitions."""
        self.replans += 1
        jobs = tuple(
            dataclasses.replace(j.spec, nodes=tuple(j.nodes), table=self.tables[name])
            for name, j in ctx.jobs.items()
        )
        cluster = dataclasses.replace(self.cluster, jobs=jobs, lost=frozenset(ctx.nodes) - ctx.alive)
        p = plan(cluster, self.cost)
        for jp in p.jobs:
            job = ctx.jobs[jp.name]
            had_nodes = self.healthy(ctx, job) > 0
            if jp.gpus == 0:
                if job.nodes:
                    ctx.stall(job)
                job.nodes, job.rate = [], 0.0
                continue
            if not jp.transition:
                continue
            ctx.stall(job)
            job.nodes = list(jp.nodes)
            e = self.entry_on(job, len(jp.nodes))
            job.iteration_s = (e.iteration_time_s or 1.0) if e is not None else 1.0
            ctx.resume_after(job, self.cost.d_transition(1 if had_nodes else 0, jp.gpus), rate=jp.waf)


class MegatronPolicy(TablePolicy):
    """See module docstring."""

    name = "megatron"

    def __init__(
        self, cluster: Cluster, tables: Mapping[str, ThroughputTable], params: MegatronParams
    ) -> None:
        super().__init__(cluster, tables)
        self.p = params
        self.detect_end: dict[str, float] = {}
        self.waiting: set[str] = set()  # jobs stalled on a lost node until it is back or drained

    def _restart_s(self) -> float:
        return self.p.requeue_s + self.p.setup_s + self.p.recompute_s

    def on_failure(self, ctx: SimContext, node: str, failure: FailureKind) -> None:
        """Timeout-bound detection, then checkpoint restart; a lost node waits for repair or a drain."""
        job = ctx.owner(node)
        if job is None:
            return
        name = job.spec.name
        if name in self.waiting:
            return  # already down until a repair or a drain; the next restart covers this failure too
        hang = failure.signal in (Signal.HANG, Signal.LOST)
        det = self.p.hang_timeout_s if hang else self.p.exception_detection_s
        epoch = ctx.stall(job)
        self.detect_end[name] = ctx.now + det
        if failure.takes_node_down:
            self.waiting.add(name)
            ctx.after(det + self.p.manual_drain_s, lambda: self._drain(ctx, job, epoch))
        else:
            ctx.resume_after(job, det + self._restart_s(), rate=self.rate_on(job, self.healthy(ctx, job)))

    def _drain(self, ctx: SimContext, job: JobState, epoch: int) -> None:
        if job.epoch != epoch:
            return
        rate = self.rate_on(job, self.healthy(ctx, job))
        if rate > 0:  # down-scaled restart on the healthy nodes; otherwise wait for the repair
            self.waiting.discard(job.spec.name)
            ctx.resume_after(job, self._restart_s(), rate=rate)

    def on_node_back(self, ctx: SimContext, node: str) -> None:
        """Restart the job on its repaired nodes (a graceful restart if it was running degraded)."""
        job = ctx.owner(node)
        if job is None:
            return
        was_running = job.running
        self.waiting.discard(job.spec.name)
        ctx.stall(job)
        wait = max(self.detect_end.get(job.spec.name, ctx.now) - ctx.now, 0.0)
        restart = self.p.requeue_s + self.p.setup_s + (0.0 if was_running else self.p.recompute_s)
        ctx.resume_after(job, wait + restart, rate=self.rate_on(job, self.healthy(ctx, job)))
