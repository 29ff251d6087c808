"""Oobleck-, Varuna- and Bamboo-like policies (constants and their sources in `sim.params`).

All three are single-job systems: a job keeps the nodes it was given and never borrows another job's.
None has in-band hang detection, so a hang costs the collective timeout, like Megatron.

* **oobleck**: after a lost node (or a failed process, whose node it drops until the process restarts
  and rejoins) it re-instantiates pipeline templates on the remaining nodes from in-memory replicas:
  down for detection + reconfiguration, then it runs at its throughput on the healthy nodes; every
  rejoin is another reconfiguration.
* **varuna**: every failure and every rejoin is a morph = checkpoint + restart by the manager: down for
  the restart time plus, after a failure, the work since the last checkpoint (half a checkpoint interval
  on average); its healthy throughput pays for periodic checkpoints (`sim.capacity`).
* **bamboo**: the pipeline neighbour already holds the lost stage (redundant computation), so a lost
  node costs only detection and the job continues `failover_slowdown` times slower; a second loss before
  the repair, and every rejoin, is a reconfiguration.
"""

from __future__ import annotations

from collections.abc import Mapping

from megatron_unicron.plan.planner import Cluster
from megatron_unicron.plan.table import ThroughputTable
from megatron_unicron.sim.capacity import billions_of_parameters
from megatron_unicron.sim.engine import JobState, SimContext
from megatron_unicron.sim.params import BambooParams, OobleckParams, VarunaParams
from megatron_unicron.sim.policies import TablePolicy
from megatron_unicron.sim.taxonomy import FailureKind, Signal

__all__ = ["OobleckPolicy", "VarunaPolicy", "BambooPolicy"]


class OobleckPolicy(TablePolicy):
    """See module docstring."""

    name = "oobleck"

    def __init__(
        self, cluster: Cluster, tables: Mapping[str, ThroughputTable], params: OobleckParams
    ) -> None:
        super().__init__(cluster, tables)
        self.p = params

    def reconfigure_s(self, job: JobState) -> float:
        """Re-instantiating pipelines: grows with the model (artifact's linear fit)."""
        return self.p.reconfigure_base_s + self.p.reconfigure_per_bparam_s * billions_of_parameters(job.spec)

    def on_failure(self, ctx: SimContext, node: str, failure: FailureKind) -> None:
        """Drop the node, reconfigure; a transient failure's node rejoins after the process restarts."""
        job = ctx.owner(node)
        if job is None:
            return
        det = self.p.hang_timeout_s if failure.signal is Signal.HANG else self.p.detection_s
        ctx.stall(job)
        healthy = self.healthy(ctx, job)
        if failure.takes_node_down:
            ctx.resume_after(job, det + self.reconfigure_s(job), rate=self.rate_on(job, healthy))
            return
        first = det + self.reconfigure_s(job)
        ctx.resume_after(job, first, rate=self.rate_on(job, healthy - 1))
        epoch = job.epoch

        def rejoin() -> None:
            if job.epoch == epoch:
                ctx.stall(job)
                ctx.resume_after(job, self.reconfigure_s(job), rate=self.rate_on(job, self.healthy(ctx, job)))

        ctx.after(first + self.p.process_restart_s, rejoin)

    def on_node_back(self, ctx: SimContext, node: str) -> None:
        """A repaired node rejoins: one more reconfiguration."""
        job = ctx.owner(node)
        if job is not None:
            ctx.stall(job)
            ctx.resume_after(job, self.reconfigure_s(job), rate=self.rate_on(job, self.healthy(ctx, job)))


class VarunaPolicy(TablePolicy):
    """See module docstring."""

    name = "varuna"

    def __init__(self, cluster: Cluster, tables: Mapping[str, ThroughputTable], params: VarunaParams) -> None:
        super().__init__(cluster, tables)
        self.p = params

    def restart_s(self, job: JobState) -> float:
        """Checkpoint-restart by the manager (artifact's linear fit in model size)."""
        return self.p.restart_base_s + self.p.restart_per_bparam_s * billions_of_parameters(job.spec)

    def on_failure(self, ctx: SimContext, node: str, failure: FailureKind) -> None:
        """Morph: restart from the last checkpoint on the healthy nodes."""
        job = ctx.owner(node)
        if job is None:
            return
        det = self.p.hang_timeout_s if failure.signal is Signal.HANG else self.p.detection_s
        lost_work = self.p.checkpoint_every_iterations / 2 * job.iteration_s
        ctx.stall(job)
        ctx.resume_after(
            job, det + self.restart_s(job) + lost_work, rate=self.rate_on(job, self.healthy(ctx, job))
        )

    def on_node_back(self, ctx: SimContext, node: str) -> None:
        """Grow back: an on-demand checkpoint, then a restart."""
        job = ctx.owner(node)
        if job is not None:
            ctx.stall(job)
            ckpt = self.p.checkpoint_base_s + self.p.checkpoint_per_bparam_s * billions_of_parameters(
                job.spec
            )
            ctx.resume_after(job, ckpt + self.restart_s(job), rate=self.rate_on(job, self.healthy(ctx, job)))


class BambooPolicy(TablePolicy):
    """See module docstring."""

    name = "bamboo"

    def __init__(self, cluster: Cluster, tables: Mapping[str, ThroughputTable], params: BambooParams) -> None:
        super().__init__(cluster, tables)
        self.p = params
        self.degraded: set[str] = set()

    def reconfigure_s(self, job: JobState) -> float:
        """Pipeline reconfiguration (artifact's linear fit in model size)."""
        return self.p.reconfigure_base_s + self.p.reconfigure_per_bparam_s * billions_of_parameters(job.spec)

    def on_failure(self, ctx: SimContext, node: str, failure: FailureKind) -> None:
        """Fail over to the redundant copy; a second loss while degraded needs a reconfiguration."""
        job = ctx.owner(node)
        if job is None:
            return
        det = self.p.hang_timeout_s if failure.signal is Signal.HANG else self.p.detection_s
        name = job.spec.name
        full = self.rate_on(job, len(job.nodes))
        ctx.stall(job)
        if name in self.degraded:
            ctx.resume_after(
                job,
                det + self.reconfigure_s(job),
                rate=self.rate_on(job, self.healthy(ctx, job) - (0 if failure.takes_node_down else 1)),
            )
        else:
            self.degraded.add(name)
            ctx.resume_after(job, det, rate=full / self.p.failover_slowdown)
        if not failure.takes_node_down:
            epoch = job.epoch

            def rejoin() -> None:
                if job.epoch == epoch:
                    self._reconfigure(ctx, job)

            ctx.after(det + self.p.process_restart_s, rejoin)

    def _reconfigure(self, ctx: SimContext, job: JobState) -> None:
        ctx.stall(job)
        if self.healthy(ctx, job) == len(job.nodes):
            self.degraded.discard(job.spec.name)
        ctx.resume_after(job, self.reconfigure_s(job), rate=self.rate_on(job, self.healthy(ctx, job)))

    def on_node_back(self, ctx: SimContext, node: str) -> None:
        """A repaired node rejoins: reconfigure back to the full pipeline."""
        job = ctx.owner(node)
        if job is not None:
            self._reconfigure(ctx, job)
