"""Device descriptions the layout enumerator and the analytic throughput model read.

A `DeviceSpec` gives one accelerator's peak FLOP/s for the training dtype, its memory and the α-β link
model (latency, bandwidth) inside a node and across nodes. Presets:

* `a800-80gb`: NVIDIA A800 SXM 80 GB (the paper's cluster, recollected [M] in notes/unicron-paper.md §8):
  312 TFLOP/s dense BF16 (NVIDIA A100/A800 datasheet), NVLink capped at 400 GB/s bidirectional on
  the A800, i.e. 200 GB/s one way per GPU; inter-node 4 × 200 Gb/s RDMA NICs per 8-GPU node = 12.5 GB/s
  per GPU (estimate: a common A800 node build; the paper's NIC count was not recovered).
* `cpu`: one gloo rank per core running fp32, measured on the project's 2-core CI-like machine (torch
  2.13 CPU, one thread): a 64-wide transformer layer's forward + backward reaches 16 GFLOP/s at
  micro-batch 1 and 48 GFLOP/s at 8 (hence peak × efficiency ≈ 67 GFLOP/s with half efficiency at
  3.3e7 FLOPs per layer and micro-batch, `AnalyticParams.for_device`); a 2-rank gloo all-reduce takes
  0.7 ms at 32 KB and moves ~1 GB/s at 8 MB (α ≈ 0.3 ms, β ≈ 1 GB/s). More ranks than cores are not
  modelled: calibrate against `tools/profile_throughput.py` on the machine that will train.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from megatron_unicron.plan.errors import PlanInputError

__all__ = ["DeviceSpec", "DEVICE_PRESETS", "device_from_config"]


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """One accelerator: peak FLOP/s, memory, and link latency/bandwidth (bytes/s, one direction)."""

    peak_flops: float
    memory_bytes: float
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    intra_node_latency_s: float = 5e-6
    inter_node_latency_s: float = 2e-5
    name: str = "custom"

    def __post_init__(self) -> None:
        for f in ("peak_flops", "memory_bytes", "intra_node_bandwidth", "inter_node_bandwidth"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise PlanInputError(f"device.{f}: expected a positive number, got {v!r}")
        for f in ("intra_node_latency_s", "inter_node_latency_s"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise PlanInputError(f"device.{f}: expected a number >= 0, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-ready mapping."""
        return dataclasses.asdict(self)


DEVICE_PRESETS: Mapping[str, DeviceSpec] = MappingProxyType(
    {
        "a800-80gb": DeviceSpec(
            name="a800-80gb",
            peak_flops=312e12,
            memory_bytes=80e9,
            intra_node_bandwidth=200e9,
            inter_node_bandwidth=12.5e9,
            intra_node_latency_s=5e-6,
            inter_node_latency_s=2e-5,
        ),
        "cpu": DeviceSpec(
            name="cpu",
            peak_flops=1e11,
            memory_bytes=4e9,
            intra_node_bandwidth=1e9,
            inter_node_bandwidth=1e9,
            intra_node_latency_s=3e-4,
            inter_node_latency_s=3e-4,
        ),
    }
)


def device_from_config(value: object, where: str = "device") -> DeviceSpec:
    """A preset name, or a mapping of `DeviceSpec` fields (optionally `preset:` plus overrides)."""
    if isinstance(value, str):
        if value not in DEVICE_PRESETS:
            raise PlanInputError(
                f"{where}: unknown preset {value!r}; expected one of {sorted(DEVICE_PRESETS)}"
            )
        return DEVICE_PRESETS[value]
    if not isinstance(value, Mapping):
        raise PlanInputError(f"{where}: expected a preset name or a mapping, got {type(value).__name__}")
    data = dict(value)
    base: dict[str, Any] = {}
    if "preset" in data:
        base = DEVICE_PRESETS[str(device_from_config(data.pop("preset"), f"{where}.preset").name)].to_dict()
    known = {f.name for f in dataclasses.fields(DeviceSpec)}
    for key in data:
        if key not in known:
            raise PlanInputError(f"{where}.{key}: unknown key; expected one of {sorted(known | {'preset'})}")
    base.update(data)
    missing = [
        f
        for f in ("peak_flops", "memory_bytes", "intra_node_bandwidth", "inter_node_bandwidth")
        if f not in base
    ]
    if missing:
        raise PlanInputError(f"{where}.{missing[0]}: missing (or give preset: NAME)")
    try:
        return DeviceSpec(**base)
    except PlanInputError as err:
        raise PlanInputError(str(err).replace("device.", f"{where}.", 1)) from None
