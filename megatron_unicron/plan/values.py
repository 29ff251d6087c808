"""The planner's values: jobs and the cluster it plans over (inputs), job shares and plans (outputs).

All frozen and self-validating; `JobPlan` and `Plan` round-trip through JSON (`to_dict` / `from_dict`)
for the store. The cluster's trigger helpers return new values: `with_lost` (node lost),
`with_node_back` (node back), `with_job` (job arrives), `without_job` (job ends), and `with_plan` (the
cluster after a plan was carried out).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from megatron_unicron.plan.errors import PlanInputError
from megatron_unicron.plan.hardware import DeviceSpec
from megatron_unicron.plan.layouts import Layout
from megatron_unicron.plan.memory import MemoryOptions
from megatron_unicron.plan.models import ModelShape
from megatron_unicron.plan.table import ThroughputTable
from megatron_unicron.plan.throughput import AnalyticParams

__all__ = ["JobSpec", "Cluster", "JobPlan", "Plan"]


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """A training job: model, global batch, weight w(t), optional GPU bounds, table and current nodes."""

    name: str
    model: ModelShape
    global_batch_size: int
    weight: float = 1.0
    x_min: int | None = None
    x_max: int | None = None
    table: ThroughputTable | None = None
    nodes: tuple[str, ...] = ()
    memory: MemoryOptions = field(default_factory=MemoryOptions)

    def __post_init__(self) -> None:
        if not self.name:
            raise PlanInputError("job.name: must not be empty")
        if (
            isinstance(self.global_batch_size, bool)
            or not isinstance(self.global_batch_size, int)
            or self.global_batch_size < 1
        ):
            raise PlanInputError(
                f"job {self.name}.global_batch_size: expected a positive integer, "
                f"got {self.global_batch_size!r}"
            )
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not self.weight > 0:
            raise PlanInputError(f"job {self.name}.weight: must be > 0, got {self.weight!r}")
        for f in ("x_min", "x_max"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise PlanInputError(f"job {self.name}.{f}: expected a positive integer, got {v!r}")
        if self.x_min is not None and self.x_max is not None and self.x_min > self.x_max:
            raise PlanInputError(f"job {self.name}.x_min: {self.x_min} exceeds x_max {self.x_max}")
        if len(set(self.nodes)) != len(self.nodes):
            raise PlanInputError(f"job {self.name}.nodes: a node is listed twice")
        gb = self.table.global_batch_size if self.table is not None else None
        if gb is not None and gb != self.global_batch_size:
            raise PlanInputError(
                f"job {self.name}.table: made for global_batch_size {gb}, "
                f"the job has {self.global_batch_size}"
            )


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """Homogeneous nodes, the lost ones, and the jobs with their current nodes."""

    nodes: tuple[str, ...]
    gpus_per_node: int
    device: DeviceSpec
    jobs: tuple[JobSpec, ...] = ()
    lost: frozenset[str] = frozenset()
    analytic: AnalyticParams | None = None

    def __post_init__(self) -> None:
        if not self.nodes or len(set(self.nodes)) != len(self.nodes):
            raise PlanInputError("cluster.nodes: need at least one node and unique names")
        if (
            isinstance(self.gpus_per_node, bool)
            or not isinstance(self.gpus_per_node, int)
            or self.gpus_per_node < 1
        ):
            raise PlanInputError(
                f"cluster.gpus_per_node: expected a positive integer, got {self.gpus_per_node!r}"
            )
        unknown = sorted(set(self.lost) - set(self.nodes))
        if unknown:
            raise PlanInputError(f"cluster.lost: unknown node {unknown[0]!r}")
        names = [j.name for j in self.jobs]
        if len(set(names)) != len(names):
            raise PlanInputError("cluster.jobs: job names must be unique")
        owner: dict[str, str] = {}
        for job in self.jobs:
            for node in job.nodes:
                if node not in self.nodes:
                    raise PlanInputError(f"job {job.name}.nodes: unknown node {node!r}")
                if node in owner:
                    raise PlanInputError(f"job {job.name}.nodes: node {node!r} also belongs to {owner[node]}")
                owner[node] = job.name

    @property
    def alive(self) -> tuple[str, ...]:
        """Nodes not lost, in cluster order."""
        return tuple(n for n in self.nodes if n not in self.lost)

    def with_lost(self, nodes: Iterable[str]) -> Cluster:
        """Trigger "node lost": `nodes` join the lost set (jobs keep listing them until re-planned)."""
        return dataclasses.replace(self, lost=self.lost | frozenset(nodes))

    def with_node_back(self, node: str) -> Cluster:
        """Trigger "node back": `node` is healthy and free again."""
        jobs = tuple(dataclasses.replace(j, nodes=tuple(n for n in j.nodes if n != node)) for j in self.jobs)
        return dataclasses.replace(self, lost=self.lost - {node}, jobs=jobs)

    def with_job(self, job: JobSpec) -> Cluster:
        """Trigger "job arrives"."""
        return dataclasses.replace(self, jobs=self.jobs + (job,))

    def without_job(self, name: str) -> Cluster:
        """Trigger "job ends": its nodes become free."""
        if name not in {j.name for j in self.jobs}:
            raise PlanInputError(f"cluster.jobs: no job named {name!r}")
        return dataclasses.replace(self, jobs=tuple(j for j in self.jobs if j.name != name))

    def with_plan(self, p: Plan) -> Cluster:
        """The cluster after `p` was carried out: each job holds its planned nodes."""
        nodes = {jp.name: jp.nodes for jp in p.jobs}
        jobs = tuple(dataclasses.replace(j, nodes=nodes.get(j.name, ())) for j in self.jobs)
        return dataclasses.replace(self, jobs=jobs)


@dataclass(frozen=True)
class JobPlan:
    """One job's share of a plan; `gpus == 0` means parked."""

    name: str
    gpus: int
    nodes: tuple[str, ...]
    layout: Layout | None
    flops: float
    waf: float
    transition: bool
    reward: float

    @property
    def parked(self) -> bool:
        """True when the job gets no GPUs."""
        return self.gpus == 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping."""
        d = dataclasses.asdict(self)
        d["nodes"] = list(self.nodes)
        d["layout"] = self.layout.to_dict() if self.layout else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JobPlan:
        """Inverse of `to_dict`."""
        return cls(
            name=d["name"],
            gpus=d["gpus"],
            nodes=tuple(d["nodes"]),
            layout=Layout.from_dict(d["layout"]) if d["layout"] else None,
            flops=d["flops"],
            waf=d["waf"],
            transition=d["transition"],
            reward=d["reward"],
        )


@dataclass(frozen=True)
class Plan:
    """A cluster-wide plan: per-job shares, free and lost nodes, totals."""

    jobs: tuple[JobPlan, ...]
    free_nodes: tuple[str, ...]
    lost_nodes: tuple[str, ...]
    total_waf: float
    total_reward: float
    moved_nodes: int
    d_running_s: float
    trigger: str = ""

    def job(self, name: str) -> JobPlan:
        """The share of job `name`."""
        for jp in self.jobs:
            if jp.name == name:
                return jp
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping."""
        return {
            "trigger": self.trigger,
            "total_waf": self.total_waf,
            "total_reward": self.total_reward,
            "moved_nodes": self.moved_nodes,
            "d_running_s": self.d_running_s,
            "free_nodes": list(self.free_nodes),
            "lost_nodes": list(self.lost_nodes),
            "jobs": [jp.to_dict() for jp in self.jobs],
        }

    def to_json(self) -> str:
        """Compact JSON."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        """Inverse of `to_dict`."""
        return cls(
            jobs=tuple(JobPlan.from_dict(j) for j in d["jobs"]),
            free_nodes=tuple(d["free_nodes"]),
            lost_nodes=tuple(d["lost_nodes"]),
            total_waf=d["total_waf"],
            total_reward=d["total_reward"],
            moved_nodes=d["moved_nodes"],
            d_running_s=d["d_running_s"],
            trigger=d.get("trigger", ""),
        )
