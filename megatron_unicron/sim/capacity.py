"""Per-policy throughput tables: what each system achieves for a job on k whole nodes.

Unicron and Megatron run the same Megatron kernels and layouts (the paper: no healthy-state loss), so
they share the analytic table of `plan.throughput`. The peers are modelled by the restrictions their
papers state (no tensor parallelism; Bamboo's redundant model state) on the same analytic model, times
an efficiency factor taken from measurements where one exists (`sim.params`). Varuna's periodic
checkpoints are charged per iteration: efficiency × k·t / (k·t + checkpoint time).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_unicron.plan.planner import Cluster, JobSpec
from megatron_unicron.plan.table import ThroughputTable
from megatron_unicron.plan.throughput import analytic_table

__all__ = ["Variant", "capacity_table", "billions_of_parameters"]


@dataclass(frozen=True)
class Variant:
    """How a system differs from Megatron on the analytic model."""

    max_tp: int | None = None
    efficiency: float = 1.0
    model_state_multiplier: float = 1.0
    checkpoint_every_iterations: int = 0
    checkpoint_base_s: float = 0.0
    checkpoint_per_bparam_s: float = 0.0


def billions_of_parameters(job: JobSpec) -> float:
    """Model size in billions of parameters (the peers' recovery times scale with it)."""
    return job.model.num_parameters() / 1e9


def capacity_table(job: JobSpec, cluster: Cluster, variant: Variant) -> ThroughputTable:
    """The job's table on 1..N whole nodes of `cluster` under `variant`."""
    gpn = cluster.gpus_per_node
    memory = job.memory
    if variant.model_state_multiplier != 1.0:
        memory = dataclasses.replace(memory, model_state_multiplier=variant.model_state_multiplier)
    table = analytic_table(
        job.model,
        job.global_batch_size,
        range(gpn, len(cluster.nodes) * gpn + 1, gpn),
        gpn,
        cluster.device,
        cluster.analytic,
        memory,
        max_tp=variant.max_tp,
        efficiency=variant.efficiency,
    )
    if not variant.checkpoint_every_iterations:
        return table
    ckpt = variant.checkpoint_base_s + variant.checkpoint_per_bparam_s * billions_of_parameters(job)
    entries = []
    for e in table.entries:
        if e.layout is not None and e.iteration_time_s:
            span = variant.checkpoint_every_iterations * e.iteration_time_s
            keep = span / (span + ckpt)
            e = dataclasses.replace(e, flops=e.flops * keep, iteration_time_s=e.iteration_time_s / keep)
        entries.append(e)
    return dataclasses.replace(table, entries=tuple(entries))
