"""Cluster files: the YAML that `unicron-plan` and `unicron-sim` read.

    nodes:
      count: 16                 # or names: [n0, n1, ...]
      gpus_per_node: 8
      device: a800-80gb         # a preset, or {preset: ..., peak_flops: ..., memory_bytes: ..., ...}
    cost:                       # optional, plan.cost.CostParams
      node_mtbf_hours: 6336
      transition_s: 30
    analytic: {}                # optional, plan.throughput.AnalyticParams
    jobs:
      - name: gpt-70b
        model: gpt3-70b         # a preset, or a mapping of ModelShape fields
        global_batch_size: 1536
        weight: 1.0             # > 0
        x_min: 32               # optional, GPUs
        x_max: 64               # optional, GPUs
        table: tables/70b.yaml  # optional, relative to this file; else the analytic model
        nodes: [node0, node1]   # optional, the nodes the job holds now
        memory: {precision: bf16, use_distributed_optimizer: true}   # optional, plan.memory.MemoryOptions

Generated node names are `node0`, `node1`, ... Every error is one line naming the file and the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from megatron_unicron.plan.cost import CostParams
from megatron_unicron.plan.errors import PlanInputError
from megatron_unicron.plan.hardware import device_from_config
from megatron_unicron.plan.memory import MemoryOptions
from megatron_unicron.plan.models import model_from_config
from megatron_unicron.plan.planner import Cluster, JobSpec
from megatron_unicron.plan.table import load_table
from megatron_unicron.plan.throughput import AnalyticParams

__all__ = ["ClusterFile", "load_cluster", "parse_cluster"]

_TOP = {"nodes", "cost", "analytic", "jobs"}
_NODES = {"count", "names", "gpus_per_node", "device"}
_JOB = {"name", "model", "global_batch_size", "weight", "x_min", "x_max", "table", "nodes", "memory"}


@dataclass(frozen=True)
class ClusterFile:
    """A parsed cluster file: the cluster and the cost parameters."""

    cluster: Cluster
    cost: CostParams


def _check_keys(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise PlanInputError(f"{where}.{key}: unknown key; expected one of {sorted(allowed)}")


def _mapping(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PlanInputError(f"{where}: expected a mapping")
    return value


def _job(data: Mapping[str, Any], where: str, base: Path) -> JobSpec:
    _check_keys(data, _JOB, where)
    for req in ("name", "model", "global_batch_size"):
        if req not in data:
            raise PlanInputError(f"{where}.{req}: missing")
    weight = data.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        raise PlanInputError(f"{where}.weight: must be > 0, got {weight!r}")
    table = None
    if data.get("table") is not None:
        path = Path(str(data["table"]))
        table = load_table(path if path.is_absolute() else base / path)
    memory = MemoryOptions()
    if data.get("memory") is not None:
        mem = dict(_mapping(data["memory"], f"{where}.memory"))
        _check_keys(mem, {f.name for f in dataclasses.fields(MemoryOptions)}, f"{where}.memory")
        memory = MemoryOptions(**mem)
    nodes = data.get("nodes") or []
    if not isinstance(nodes, list):
        raise PlanInputError(f"{where}.nodes: expected a list of node names")
    try:
        return JobSpec(
            name=str(data["name"]),
            model=model_from_config(data["model"], f"{where}.model"),
            global_batch_size=data["global_batch_size"],
            weight=float(weight),
            x_min=data.get("x_min"),
            x_max=data.get("x_max"),
            table=table,
            nodes=tuple(str(n) for n in nodes),
            memory=memory,
        )
    except PlanInputError as err:
        msg = str(err)
        raise PlanInputError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def parse_cluster(data: object, base: Path = Path(".")) -> ClusterFile:
    """Build a `ClusterFile` from the parsed YAML mapping (table paths relative to `base`)."""
    top = _mapping(data, "cluster file")
    _check_keys(top, _TOP, "cluster")
    if "nodes" not in top:
        raise PlanInputError("cluster.nodes: missing")
    nodes_cfg = _mapping(top["nodes"], "nodes")
    _check_keys(nodes_cfg, _NODES, "nodes")
    if "names" in nodes_cfg:
        names = nodes_cfg["names"]
        if not isinstance(names, list) or not names:
            raise PlanInputError("nodes.names: expected a non-empty list")
        node_names = tuple(str(n) for n in names)
    else:
        count = nodes_cfg.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise PlanInputError(
                f"nodes.count: expected a positive integer (or give nodes.names), got {count!r}"
            )
        node_names = tuple(f"node{i}" for i in range(count))
    if "gpus_per_node" not in nodes_cfg:
        raise PlanInputError("nodes.gpus_per_node: missing")
    device = device_from_config(nodes_cfg.get("device", "a800-80gb"), "nodes.device")
    cost = CostParams.from_dict(_mapping(top.get("cost") or {}, "cost"))
    analytic = (
        AnalyticParams.from_dict(_mapping(top["analytic"], "analytic")) if top.get("analytic") else None
    )
    raw_jobs = top.get("jobs") or []
    if not isinstance(raw_jobs, list):
        raise PlanInputError("jobs: expected a list")
    jobs = tuple(_job(_mapping(j, f"jobs[{i}]"), f"jobs[{i}]", base) for i, j in enumerate(raw_jobs))
    cluster = Cluster(
        nodes=node_names,
        gpus_per_node=nodes_cfg["gpus_per_node"],
        device=device,
        jobs=jobs,
        analytic=analytic,
    )
    return ClusterFile(cluster=cluster, cost=cost)


def load_cluster(path: str | Path) -> ClusterFile:
    """Read and validate a cluster file; every error names the file and the field."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as err:
        raise PlanInputError(f"{p}: cannot read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise PlanInputError(f"{p}: not valid YAML ({str(err).splitlines()[0]})") from None
    try:
        return parse_cluster(data, p.parent)
    except PlanInputError as err:
        raise PlanInputError(f"{p}: {err}") from None
    except TypeError as err:  # a wrongly typed value reached a constructor
        raise PlanInputError(f"{p}: {err}") from None
