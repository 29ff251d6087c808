"""Run several policies on the same cluster and trace, and compare their accumulated WAF.

`simulate(cluster, trace, horizon_s, policies, params, node_mtbf_s)` returns one `SimResult` per policy.
Every policy starts from the same nodes per job: by default (`initial="planned"`) the Unicron planner's
plan for the healthy cluster, so that Unicron and Megatron have the same failure-free WAF and every
difference comes from failure handling; `initial="file"` keeps the nodes the cluster file lists.
Unicron and Megatron use the jobs' tables (profiled, or analytic); the peers always use the analytic
model under their own restrictions (`sim.capacity`), since a profiled Megatron table says nothing
about a system without tensor parallelism.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

from megatron_unicron.plan.cost import CostParams
from megatron_unicron.plan.planner import Cluster, job_table, plan
from megatron_unicron.plan.table import ThroughputTable
from megatron_unicron.sim.capacity import Variant, capacity_table
from megatron_unicron.sim.engine import JobState, SimResult, run
from megatron_unicron.sim.params import PolicyParams
from megatron_unicron.sim.peers import BambooPolicy, OobleckPolicy, VarunaPolicy
from megatron_unicron.sim.policies import MegatronPolicy, TablePolicy, UnicronPolicy
from megatron_unicron.sim.traces import TraceEvent

__all__ = ["POLICY_NAMES", "simulate", "ratios", "initial_nodes"]

POLICY_NAMES = ("unicron", "megatron", "oobleck", "varuna", "bamboo")


def _variant(name: str, params: PolicyParams) -> Variant:
    if name == "oobleck":
        return Variant(max_tp=params.oobleck.max_tp, efficiency=params.oobleck.efficiency)
    if name == "varuna":
        v = params.varuna
        return Variant(
            max_tp=v.max_tp,
            efficiency=v.efficiency,
            checkpoint_every_iterations=v.checkpoint_every_iterations,
            checkpoint_base_s=v.checkpoint_base_s,
            checkpoint_per_bparam_s=v.checkpoint_per_bparam_s,
        )
    if name == "bamboo":
        b = params.bamboo
        return Variant(
            max_tp=b.max_tp, efficiency=b.efficiency, model_state_multiplier=b.model_state_multiplier
        )
    return Variant()


def _tables(name: str, cluster: Cluster, params: PolicyParams) -> dict[str, ThroughputTable]:
    if name in ("unicron", "megatron"):
        return {j.name: job_table(j, cluster) for j in cluster.jobs}
    variant = _variant(name, params)
    return {j.name: capacity_table(j, cluster, variant) for j in cluster.jobs}


def _policy(
    name: str, cluster: Cluster, tables: dict[str, ThroughputTable], params: PolicyParams, node_mtbf_s: float
) -> TablePolicy:
    if name == "unicron":
        return UnicronPolicy(cluster, tables, params.unicron, node_mtbf_s)
    if name == "megatron":
        return MegatronPolicy(cluster, tables, params.megatron)
    if name == "oobleck":
        return OobleckPolicy(cluster, tables, params.oobleck)
    if name == "varuna":
        return VarunaPolicy(cluster, tables, params.varuna)
    if name == "bamboo":
        return BambooPolicy(cluster, tables, params.bamboo)
    raise ValueError(f"unknown policy {name!r}; expected some of {', '.join(POLICY_NAMES)}")


def initial_nodes(
    cluster: Cluster, node_mtbf_s: float, initial: Literal["planned", "file"] = "planned"
) -> dict[str, list[str]]:
    """The nodes every policy starts each job on."""
    if initial == "file":
        missing = [j.name for j in cluster.jobs if not j.nodes]
        if missing:
            raise ValueError(f"initial=file: job {missing[0]} lists no nodes in the cluster file")
        return {j.name: list(j.nodes) for j in cluster.jobs}
    jobs = tuple(dataclasses.replace(j, table=job_table(j, cluster)) for j in cluster.jobs)
    p = plan(dataclasses.replace(cluster, jobs=jobs, lost=frozenset()), CostParams(node_mtbf_s=node_mtbf_s))
    return {jp.name: list(jp.nodes) for jp in p.jobs}


def simulate(
    cluster: Cluster,
    trace: Sequence[TraceEvent],
    horizon_s: float,
    policies: Sequence[str],
    params: PolicyParams,
    node_mtbf_s: float,
    initial: Literal["planned", "file"] = "planned",
) -> dict[str, SimResult]:
    """One run per policy over the same trace (see module docstring)."""
    for name in policies:
        if name not in POLICY_NAMES:
            raise ValueError(f"unknown policy {name!r}; expected some of {', '.join(POLICY_NAMES)}")
    start = initial_nodes(cluster, node_mtbf_s, initial)
    tables_by_variant: dict[Variant, dict[str, ThroughputTable]] = {}
    out: dict[str, SimResult] = {}
    for name in policies:
        key = _variant(name, params)
        if key not in tables_by_variant:
            tables_by_variant[key] = _tables(name, cluster, params)
        policy = _policy(name, cluster, tables_by_variant[key], params, node_mtbf_s)
        jobs = [JobState(spec=j, nodes=list(start[j.name])) for j in cluster.jobs]
        out[name] = run(policy, cluster.nodes, jobs, trace, horizon_s)
    return out


def ratios(results: dict[str, SimResult], reference: str = "unicron") -> dict[str, float]:
    """Accumulated WAF of `reference` over each other policy's (inf when the other accumulated none)."""
    ref = results[reference].accumulated
    return {
        name: (ref / r.accumulated if r.accumulated > 0 else float("inf"))
        for name, r in results.items()
        if name != reference
    }
