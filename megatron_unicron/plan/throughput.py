"""Analytic iteration-time model of Megatron GPT training, and analytic throughput tables.

Assumptions (each one a parameter of `AnalyticParams` or `DeviceSpec`, calibrated by `plan.calibrate`
against profiled iterations):

* Compute: model FLOPs per sample by Megatron's formula (`ModelShape.flops_per_sample`), split evenly
  over TP·PP ranks; full recomputation adds one forward (×4/3), selective recomputation is free (the
  attention recompute is small next to the GEMMs). Achieved FLOP/s = peak × `compute_efficiency` ×
  w/(w + `half_efficiency_flops`), w the FLOPs of one layer's micro-batch on one GPU: small GEMMs run
  far from peak.
* TP: 4 all-reduces (or reduce-scatter/all-gather pairs with sequence parallelism: the same volume) of
  the s·b·h activation per layer per micro-batch, forward + backward, not overlapped with compute;
  TP groups never leave a node.
* PP: 1F1B; each micro-batch sends one activation forward and one gradient back per stage boundary;
  the iteration takes m + p − 1 micro-batch slots, i.e. a bubble fraction (p−1)/(m+p−1).
* DP: one ring all-reduce of the FP32 gradients after the last micro-batch (reduce-scatter of grads
  plus all-gather of params with the distributed optimizer), `dp_overlap` of it hidden behind backward.
* Links: α-β model, ring collectives cost 2(n−1)/n·bytes/(bandwidth·`comm_efficiency`) + 2(n−1)·α.
  Megatron's rank order is TP innermost, then DP, then PP: a DP group stays in a node while TP·DP ≤
  GPUs per node, pipeline neighbours while TP·DP·PP ≤ GPUs per node; otherwise the inter-node link.
* Overheads: `microbatch_overhead_s` per micro-batch slot (kernel launches, Python: dominant on CPU) and
  `iteration_overhead_s` (optimizer step, logging).

`iteration_features` returns the time split into the six terms these assumptions produce, so that a
calibration can fit one non-negative coefficient per term by least squares.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_unicron.plan.errors import NoFeasibleLayoutError, PlanInputError
from megatron_unicron.plan.hardware import DeviceSpec
from megatron_unicron.plan.layouts import Layout, enumerate_layouts
from megatron_unicron.plan.memory import MemoryOptions, stage_parameters
from megatron_unicron.plan.models import ModelShape
from megatron_unicron.plan.table import TableEntry, ThroughputTable

__all__ = [
    "AnalyticParams",
    "iteration_features",
    "iteration_time",
    "best_layout",
    "analytic_table",
    "FEATURE_NAMES",
]

FEATURE_NAMES = ("compute", "tp_comm", "pp_comm", "microbatch_slots", "dp_comm", "constant")


@dataclass(frozen=True, kw_only=True)
class AnalyticParams:
    """Efficiency factors and calibrated coefficients of the analytic model (see module docstring)."""

    compute_efficiency: float = 0.55
    half_efficiency_flops: float = 2e9
    comm_efficiency: float = 0.7
    dp_overlap: float = 0.0
    microbatch_overhead_s: float = 0.0
    iteration_overhead_s: float = 0.0
    compute_scale: float = 1.0
    tp_comm_scale: float = 1.0
    pp_comm_scale: float = 1.0
    dp_comm_scale: float = 1.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise PlanInputError(f"analytic.{f.name}: expected a number >= 0, got {v!r}")
        if not 0 < self.compute_efficiency <= 1 or not 0 < self.comm_efficiency <= 1:
            raise PlanInputError("analytic.compute_efficiency/comm_efficiency: expected (0, 1]")
        if self.dp_overlap > 1:
            raise PlanInputError(f"analytic.dp_overlap: expected [0, 1], got {self.dp_overlap}")

    def coefficients(self) -> np.ndarray:
        """The six coefficients that multiply `iteration_features`."""
        return np.array(
            [
                self.compute_scale,
                self.tp_comm_scale,
                self.pp_comm_scale,
                self.microbatch_overhead_s,
                self.dp_comm_scale * (1 - self.dp_overlap),
                self.iteration_overhead_s,
            ]
        )

    def to_dict(self) -> dict[str, float]:
        """YAML-ready mapping."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "analytic") -> AnalyticParams:
        """Inverse of `to_dict`; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise PlanInputError(f"{where}.{key}: unknown key; expected one of {sorted(known)}")
        return cls(**dict(data))

    @classmethod
    def for_device(cls, device: DeviceSpec) -> AnalyticParams:
        """Uncalibrated defaults: GPU values, or CPU values (small-GEMM efficiency, Python overhead)."""
        if device.name == "cpu":
            # measured, see plan.hardware's `cpu` preset
            return cls(
                compute_efficiency=0.67,
                half_efficiency_flops=3.3e7,
                comm_efficiency=1.0,
                microbatch_overhead_s=2e-3,
                iteration_overhead_s=5e-3,
            )
        return cls()


def _ring(n: int, nbytes: float, bandwidth: float, latency: float, eff: float) -> float:
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / (bandwidth * eff) + 2 * (n - 1) * latency


def iteration_features(
    model: ModelShape,
    layout: Layout,
    global_batch_size: int,
    gpus_per_node: int,
    device: DeviceSpec,
    params: AnalyticParams,
    memory: MemoryOptions,
) -> np.ndarray:
    """Six time terms (seconds) whose `params.coefficients()`-weighted sum is the iteration time."""
    tp, pp, dp, mbs = layout.tp, layout.pp, layout.dp, layout.micro_batch_size
    m = layout.num_micro_batches(global_batch_size)
    slots = m + pp - 1
    act_bytes = memory.activation_bytes
    layers = model.num_layers / pp
    flops_mb = model.flops_per_sample() * mbs / (tp * pp)
    w = flops_mb / layers
    eff = params.compute_efficiency * w / (w + params.half_efficiency_flops)
    recompute = 4 / 3 if memory.recompute == "full" else 1.0
    compute = flops_mb * recompute / (device.peak_flops * eff)
    act = mbs * model.seq_length * model.hidden_size * act_bytes
    tp_comm = (
        layers
        * 4
        * _ring(tp, act, device.intra_node_bandwidth, device.intra_node_latency_s, params.comm_efficiency)
    )
    pp_comm = 0.0
    if pp > 1:
        inter = tp * dp * pp > gpus_per_node
        bw = device.inter_node_bandwidth if inter else device.intra_node_bandwidth
        lat = device.inter_node_latency_s if inter else device.intra_node_latency_s
        p2p = act / (tp if memory.sequence_parallel else 1)
        pp_comm = 2 * (p2p / (bw * params.comm_efficiency) + lat)
    dp_comm = 0.0
    if dp > 1:
        first, last = stage_parameters(model, tp, pp)
        stage_params = max(first, last)
        inter = tp * dp > gpus_per_node
        bw = device.inter_node_bandwidth if inter else device.intra_node_bandwidth
        lat = device.inter_node_latency_s if inter else device.intra_node_latency_s
        grad_bytes = 4.0
        if memory.use_distributed_optimizer:
            # reduce-scatter of grads + all-gather of params: half a ring each
            nbytes = stage_params * (grad_bytes + act_bytes) / 2
        else:
            nbytes = stage_params * grad_bytes
        dp_comm = _ring(dp, nbytes, bw, lat, params.comm_efficiency)
    return np.array([slots * compute, slots * tp_comm, slots * pp_comm, float(slots), dp_comm, 1.0])


def iteration_time(
    model: ModelShape,
    layout: Layout,
    global_batch_size: int,
    gpus_per_node: int,
    device: DeviceSpec,
    params: AnalyticParams,
    memory: MemoryOptions,
) -> float:
    """Predicted seconds per iteration."""
    feats = iteration_features(model, layout, global_batch_size, gpus_per_node, device, params, memory)
    return float(feats @ params.coefficients())


def best_layout(
    model: ModelShape,
    global_batch_size: int,
    num_gpus: int,
    gpus_per_node: int,
    device: DeviceSpec,
    params: AnalyticParams | None = None,
    memory: MemoryOptions | None = None,
    max_tp: int | None = None,
    allow_full_recompute: bool = True,
) -> TableEntry:
    """The fastest valid layout on exactly `num_gpus` (flops 0 and no layout when none is valid)."""
    params = params or AnalyticParams.for_device(device)
    memory = memory or MemoryOptions()
    best: TableEntry = TableEntry(gpus=num_gpus, flops=0.0, layout=None)
    work = global_batch_size * model.flops_per_sample()
    # Full recomputation is a fallback for layouts whose activations do not fit otherwise (it costs a
    # forward pass, so it only wins when nothing else fits).
    options = [memory]
    if allow_full_recompute and memory.recompute != "full":
        options.append(dataclasses.replace(memory, recompute="full"))
    for opts in options:
        for layout in enumerate_layouts(
            model, global_batch_size, num_gpus, gpus_per_node, device.memory_bytes, memory=opts, max_tp=max_tp
        ):
            t = iteration_time(model, layout, global_batch_size, gpus_per_node, device, params, opts)
            flops = work / t
            # strict ">" keeps the earliest layout on ties: lower TP, then lower PP (enumeration order)
            if flops > best.flops * (1 + 1e-12):
                best = TableEntry(
                    gpus=num_gpus,
                    flops=flops,
                    layout=layout,
                    iteration_time_s=t,
                    recompute="full" if opts is not memory else None,
                )
    return best


def analytic_table(
    model: ModelShape,
    global_batch_size: int,
    gpu_counts: Iterable[int],
    gpus_per_node: int,
    device: DeviceSpec,
    params: AnalyticParams | None = None,
    memory: MemoryOptions | None = None,
    max_tp: int | None = None,
    efficiency: float = 1.0,
) -> ThroughputTable:
    """T(job, x) for each x in `gpu_counts` (consecutive multiples of their step), scaled by `efficiency`."""
    counts = sorted(set(gpu_counts))
    if not counts:
        raise NoFeasibleLayoutError("analytic_table: no GPU counts given")
    step = counts[1] - counts[0] if len(counts) > 1 else counts[0]
    entries = []
    for x in counts:
        e = best_layout(model, global_batch_size, x, gpus_per_node, device, params, memory, max_tp)
        if efficiency != 1.0 and e.layout is not None:
            e = dataclasses.replace(
                e, flops=e.flops * efficiency, iteration_time_s=(e.iteration_time_s or 0.0) / efficiency
            )
        entries.append(e)
    return ThroughputTable(
        entries=tuple(entries),
        step=step,
        source="analytic",
        model=model.name,
        global_batch_size=global_batch_size,
    )
