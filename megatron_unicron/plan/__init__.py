"""Cost-aware plan generation: layouts, throughput tables, the WAF cost model and the multi-job planner.

Pure Python + numpy (no torch): `layouts` (what layouts are valid), `memory` and `throughput` (what they
cost and achieve), `table` (T(job, x) tables), `cost` (the paper's WAF and reward), `dp` and `planner`
(the dynamic program and the plans), `cluster_file` and `cli` (`unicron-plan`).
"""

from megatron_unicron.plan.cost import CostParams
from megatron_unicron.plan.errors import NoFeasibleLayoutError, PlanInputError
from megatron_unicron.plan.hardware import DEVICE_PRESETS, DeviceSpec
from megatron_unicron.plan.layouts import Layout, enumerate_layouts, explain_layout
from megatron_unicron.plan.memory import MemoryOptions
from megatron_unicron.plan.models import PRESETS, ModelShape
from megatron_unicron.plan.planner import Cluster, JobPlan, JobSpec, Plan, plan, plan_single_job
from megatron_unicron.plan.table import TableEntry, ThroughputTable, load_table, save_table
from megatron_unicron.plan.throughput import AnalyticParams, analytic_table

__all__ = [
    "AnalyticParams",
    "Cluster",
    "CostParams",
    "DEVICE_PRESETS",
    "DeviceSpec",
    "JobPlan",
    "JobSpec",
    "Layout",
    "MemoryOptions",
    "ModelShape",
    "NoFeasibleLayoutError",
    "PRESETS",
    "Plan",
    "PlanInputError",
    "TableEntry",
    "ThroughputTable",
    "analytic_table",
    "enumerate_layouts",
    "explain_layout",
    "load_table",
    "plan",
    "plan_single_job",
    "save_table",
]
