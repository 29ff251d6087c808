"""The cost-aware plan generator: which job gets how many GPUs, with which layout, on which nodes.

Public interface:

* `plan(cluster, cost=CostParams(), trigger="") -> Plan`: the multi-job plan. Maximises Σ_t G(t, x′)
  (`plan.cost`) over the live nodes with the dynamic program of `plan.dp`; whole nodes per job. Among
  optimal plans it moves the fewest nodes (jobs keep the nodes they hold), then uses the fewest nodes.
  A job that fits nowhere is parked (0 GPUs), never an error.
* `plan_single_job(job, available_gpus, gpus_per_node, current=None, ...) -> (gpu_count, Layout)`: the
  single-job decision when a job loses or regains GPUs (GPU granularity, not node granularity). Raises
  `NoFeasibleLayoutError` when no layout fits.
* Values (defined in `plan.values`, re-exported here): `JobSpec`, `Cluster` (inputs, with
  `with_lost`, `with_node_back`, `with_job`, `without_job`, `with_plan` for the four triggers: node lost,
  node back, job arrives, job ends), `JobPlan`, `Plan` (frozen, `to_dict()` / `to_json()` /
  `Plan.from_dict()`).

A job without a throughput table gets the analytic one (`plan.throughput.analytic_table`) at every
whole-node GPU count, from the cluster's device and `Cluster.analytic` parameters.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from megatron_unicron.plan.cost import CostParams, reward_curve
from megatron_unicron.plan.dp import encode_keys, solve
from megatron_unicron.plan.errors import NoFeasibleLayoutError, PlanInputError
from megatron_unicron.plan.hardware import DEVICE_PRESETS, DeviceSpec
from megatron_unicron.plan.layouts import Layout
from megatron_unicron.plan.table import TableEntry, ThroughputTable
from megatron_unicron.plan.throughput import AnalyticParams, analytic_table, iteration_time
from megatron_unicron.plan.values import Cluster, JobPlan, JobSpec, Plan

__all__ = ["JobSpec", "Cluster", "JobPlan", "Plan", "plan", "plan_single_job", "job_table"]


def job_table(job: JobSpec, cluster: Cluster, max_nodes: int | None = None) -> ThroughputTable:
    """The job's table, or its analytic table at every whole-node count up to `max_nodes`."""
    if job.table is not None:
        return job.table
    n = max_nodes if max_nodes is not None else len(cluster.nodes)
    gpn = cluster.gpus_per_node
    return analytic_table(
        job.model,
        job.global_batch_size,
        range(gpn, n * gpn + 1, gpn),
        gpn,
        cluster.device,
        cluster.analytic,
        job.memory,
    )


def plan(cluster: Cluster, cost: CostParams | None = None, trigger: str = "") -> Plan:
    """The multi-job plan over the cluster's live nodes (see module docstring)."""
    cost = cost or CostParams()
    alive = cluster.alive
    alive_set = set(alive)
    n, gpn = len(alive), cluster.gpus_per_node
    d_run = cost.d_running(n)
    rewards, current, curves = [], [], []
    for job in cluster.jobs:
        flops, chosen = job_table(job, cluster).curve(gpn, n, job.x_min or 0, job.x_max)
        waf = job.weight * flops
        held = [x for x in job.nodes if x in alive_set]
        affected = len(held) != len(job.nodes)
        g = reward_curve(waf, len(held), affected, d_run, cost)
        # nodes a job cannot run on are never given to it (it is parked instead)
        g[1:][waf[1:] <= 0] = -np.inf
        rewards.append(g)
        current.append(min(len(held), n))
        curves.append((waf, chosen, held, affected))
    alloc, _ = solve(encode_keys(rewards, current, n), n)

    # Concrete nodes: every job keeps its own (in cluster order); the pool is the free nodes first,
    # then the ones released by shrinking jobs.
    held_by = {x for job_curve in curves for x in job_curve[2]}
    pool = deque(x for x in alive if x not in held_by)
    kept: list[list[str]] = []
    for (_, _, held, _), k in zip(curves, alloc):
        kept.append(held[:k])
        pool.extend(held[k:])
    jobs_out = []
    moved = 0
    for job, (waf, chosen, held, affected), k, g, keep in zip(cluster.jobs, curves, alloc, rewards, kept):
        nodes = keep + [pool.popleft() for _ in range(k - len(keep))]
        moved += abs(k - len(held))
        entry: TableEntry | None = chosen[k] if k > 0 else None
        if entry is None:
            jobs_out.append(JobPlan(job.name, 0, (), None, 0.0, 0.0, False, float(g[0])))
            continue
        jobs_out.append(
            JobPlan(
                name=job.name,
                gpus=entry.gpus,
                nodes=tuple(nodes),
                layout=entry.layout,
                flops=entry.flops,
                waf=float(waf[k]),
                transition=affected or k != len(held),
                reward=float(g[k]),
            )
        )
    used = {x for jp in jobs_out for x in jp.nodes}
    return Plan(
        jobs=tuple(jobs_out),
        free_nodes=tuple(x for x in alive if x not in used),
        lost_nodes=tuple(x for x in cluster.nodes if x in cluster.lost),
        total_waf=float(sum(jp.waf for jp in jobs_out)),
        total_reward=float(sum(jp.reward for jp in jobs_out)),
        moved_nodes=moved,
        d_running_s=d_run,
        trigger=trigger,
    )


def plan_single_job(
    job: JobSpec,
    available_gpus: int,
    gpus_per_node: int,
    current: Layout | None = None,
    *,
    device: DeviceSpec | None = None,
    analytic: AnalyticParams | None = None,
    cost: CostParams | None = None,
    prefer_more_gpus: bool = False,
) -> tuple[int, Layout]:
    """GPU count and layout for one job on `available_gpus` GPUs (any count, not whole nodes).

    Uses the job's table when it has one, else the analytic model on `device` (default: the `cpu`
    preset). The choice maximises G = F·D_running − [transition]·F·D_transition: keeping `current`
    (when it still fits) costs no transition, any other layout is charged `cost.transition_s` at its
    WAF. Ties go to the current layout, then to fewer GPUs. With `prefer_more_gpus` the largest
    feasible GPU count wins first (useful to exercise scale-up when more GPUs do not pay on CPU).
    """
    if isinstance(available_gpus, bool) or not isinstance(available_gpus, int) or available_gpus < 1:
        raise PlanInputError(
            f"plan_single_job: available_gpus must be a positive integer, got {available_gpus!r}"
        )
    cost = cost or CostParams()
    device = device or DEVICE_PRESETS["cpu"]
    table = job.table or analytic_table(
        job.model,
        job.global_batch_size,
        range(1, available_gpus + 1),
        gpus_per_node,
        device,
        analytic,
        job.memory,
    )
    lo, hi = job.x_min or 1, min(available_gpus, job.x_max or available_gpus)
    d_run = cost.d_running(max(1, -(-available_gpus // gpus_per_node)))
    candidates: list[tuple[Layout, float, bool]] = []
    for x in range(lo, hi + 1):
        e = table.entry(x)
        if e is not None and e.layout is not None and e.flops > 0:
            candidates.append((e.layout, job.weight * e.flops, e.layout == current))
    if current is not None and lo <= current.num_gpus <= hi and not any(keep for _, _, keep in candidates):
        e = table.entry(current.num_gpus)
        if e is not None and e.flops > 0:
            # Keeping the current layout. Without a table the analytic model scores it; a table only
            # knows its best layout at that count, which then stands in for the current one.
            flops = e.flops
            if job.table is None:
                t = iteration_time(
                    job.model,
                    current,
                    job.global_batch_size,
                    gpus_per_node,
                    device,
                    analytic or AnalyticParams.for_device(device),
                    job.memory,
                )
                flops = job.global_batch_size * job.model.flops_per_sample() / t
            candidates.append((current, job.weight * flops, True))
    if not candidates:
        raise NoFeasibleLayoutError(
            f"job {job.name}: no layout fits {available_gpus} GPUs ({gpus_per_node} per node, global batch "
            f"{job.global_batch_size}, {job.model.num_layers} layers, {job.model.num_attention_heads} heads)"
        )

    def key(c: tuple[Layout, float, bool]) -> tuple[int, float, int, int]:
        layout, f, keep = c
        score = f * d_run - (0.0 if keep else f * cost.transition_s)
        return (layout.num_gpus if prefer_more_gpus else 0, score, int(keep), -layout.num_gpus)

    layout = max(candidates, key=key)[0]
    return layout.num_gpus, layout
