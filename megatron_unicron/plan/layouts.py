"""Megatron parallel layouts: the frozen `Layout` value, why a layout is rejected, and enumeration.

Public interface (used by the transition and coordinator parts):

* `ModelShape` (re-exported from `plan.models`): num_layers, hidden_size, num_attention_heads,
  num_query_groups, ffn_hidden_size, vocab_size, seq_length, ...
* `Layout(tp, pp, dp, micro_batch_size)`: frozen, validates itself (positive ints); `num_gpus`,
  `num_micro_batches(global_batch_size)`, `to_dict()` / `from_dict()`.
* `enumerate_layouts(model, global_batch_size, num_gpus, gpus_per_node, device_memory_bytes,
  use_distributed_optimizer=False, ...) -> list[Layout]`: every valid layout for exactly `num_gpus`.
* `explain_layout(model, layout, ...) -> tuple[Rejection, ...]`: every reason a layout is invalid
  (empty when valid); `check_layout(...)` raises `PlanInputError` with the first one.

Validity rules: TP·PP·DP equals the GPU count; TP divides the attention heads and the query groups and
stays inside a node (TP divides the GPUs per node); PP divides the layers (uniform stages); DP ×
micro-batch divides the global batch; the most loaded rank fits `usable_fraction` of device memory
(`plan.memory`). `max_tp` restricts TP for systems without tensor parallelism (Oobleck, Varuna, Bamboo).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from megatron_unicron.plan.errors import PlanInputError
from megatron_unicron.plan.memory import MemoryOptions, memory_per_gpu
from megatron_unicron.plan.models import ModelShape

__all__ = [
    "ModelShape",
    "Layout",
    "Reason",
    "Rejection",
    "explain_layout",
    "check_layout",
    "enumerate_layouts",
    "divisors",
]

MAX_MICRO_BATCH_SIZE = 16


def divisors(n: int) -> list[int]:
    """Positive divisors of n in increasing order."""
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


@dataclass(frozen=True)
class Layout:
    """A (TP, PP, DP, micro-batch) layout; every degree a positive int."""

    tp: int
    pp: int
    dp: int
    micro_batch_size: int = 1

    def __post_init__(self) -> None:
        for f in ("tp", "pp", "dp", "micro_batch_size"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PlanInputError(f"layout.{f}: expected a positive integer, got {v!r}")

    @property
    def num_gpus(self) -> int:
        """TP · PP · DP."""
        return self.tp * self.pp * self.dp

    def num_micro_batches(self, global_batch_size: int) -> int:
        """Micro-batches per DP rank per iteration; raises if DP × micro-batch does not divide it."""
        per_step = self.dp * self.micro_batch_size
        if global_batch_size % per_step:
            raise PlanInputError(
                f"layout: dp {self.dp} x micro_batch_size {self.micro_batch_size} does not "
                f"divide global_batch_size {global_batch_size}"
            )
        return global_batch_size // per_step

    def to_dict(self) -> dict[str, int]:
        """JSON-ready mapping."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "layout") -> Layout:
        """Inverse of `to_dict`; unknown keys are an error."""
        known = {"tp", "pp", "dp", "micro_batch_size"}
        for key in data:
            if key not in known:
                raise PlanInputError(f"{where}.{key}: unknown key; expected one of {sorted(known)}")
        try:
            return cls(**{k: data[k] for k in data})
        except TypeError as err:
            raise PlanInputError(f"{where}: {err}") from None

    def __str__(self) -> str:
        return f"tp{self.tp}.pp{self.pp}.dp{self.dp}.mb{self.micro_batch_size}"


class Reason(str, enum.Enum):
    """Why a layout is rejected."""

    GPU_COUNT = "gpu_count"
    TP_HEADS = "tp_heads"
    TP_QUERY_GROUPS = "tp_query_groups"
    TP_NODE = "tp_node"
    TP_LIMIT = "tp_limit"
    PP_LAYERS = "pp_layers"
    BATCH = "batch"
    MEMORY = "memory"


@dataclass(frozen=True)
class Rejection:
    """One reason a layout is invalid, with a one-line message."""

    reason: Reason
    message: str


def _memory_options(memory: MemoryOptions | None, use_distributed_optimizer: bool | None) -> MemoryOptions:
    opts = memory or MemoryOptions()
    if use_distributed_optimizer is not None and use_distributed_optimizer != opts.use_distributed_optimizer:
        opts = dataclasses.replace(opts, use_distributed_optimizer=use_distributed_optimizer)
    return opts


def explain_layout(
    model: ModelShape,
    layout: Layout,
    *,
    global_batch_size: int,
    gpus_per_node: int,
    device_memory_bytes: float,
    num_gpus: int | None = None,
    use_distributed_optimizer: bool | None = None,
    memory: MemoryOptions | None = None,
    max_tp: int | None = None,
) -> tuple[Rejection, ...]:
    """Every reason `layout` is invalid for this model, batch and hardware (empty tuple: valid)."""
    out: list[Rejection] = []
    tp, pp, dp, mbs = layout.tp, layout.pp, layout.dp, layout.micro_batch_size
    if num_gpus is not None and layout.num_gpus != num_gpus:
        out.append(
            Rejection(Reason.GPU_COUNT, f"tp*pp*dp = {layout.num_gpus} is not the {num_gpus} GPUs offered")
        )
    if model.num_attention_heads % tp:
        out.append(
            Rejection(
                Reason.TP_HEADS, f"tp {tp} does not divide num_attention_heads {model.num_attention_heads}"
            )
        )
    if model.num_query_groups % tp:
        out.append(
            Rejection(
                Reason.TP_QUERY_GROUPS, f"tp {tp} does not divide num_query_groups {model.num_query_groups}"
            )
        )
    if gpus_per_node % tp:
        out.append(Rejection(Reason.TP_NODE, f"tp {tp} does not fit within a node of {gpus_per_node} GPUs"))
    if max_tp is not None and tp > max_tp:
        out.append(Rejection(Reason.TP_LIMIT, f"tp {tp} exceeds the system's limit {max_tp}"))
    if model.num_layers % pp:
        out.append(Rejection(Reason.PP_LAYERS, f"pp {pp} does not divide num_layers {model.num_layers}"))
    if global_batch_size % (dp * mbs):
        out.append(
            Rejection(
                Reason.BATCH,
                f"dp {dp} x micro_batch_size {mbs} does not divide global_batch_size {global_batch_size}",
            )
        )
    else:
        opts = _memory_options(memory, use_distributed_optimizer)
        need = memory_per_gpu(model, tp, pp, dp, mbs, global_batch_size // (dp * mbs), opts).total
        have = device_memory_bytes * opts.usable_fraction
        if need > have:
            out.append(
                Rejection(
                    Reason.MEMORY, f"needs {need / 2**30:.1f} GiB per GPU, {have / 2**30:.1f} GiB usable"
                )
            )
    return tuple(out)


def check_layout(model: ModelShape, layout: Layout, **kwargs: Any) -> None:
    """Raise `PlanInputError` naming the first reason `layout` is invalid (see `explain_layout`)."""
    rejections = explain_layout(model, layout, **kwargs)
    if rejections:
        raise PlanInputError(f"layout {layout}: {rejections[0].message}")


def enumerate_layouts(
    model: ModelShape,
    global_batch_size: int,
    num_gpus: int,
    gpus_per_node: int,
    device_memory_bytes: float,
    use_distributed_optimizer: bool | None = None,
    *,
    memory: MemoryOptions | None = None,
    max_tp: int | None = None,
    max_micro_batch_size: int = MAX_MICRO_BATCH_SIZE,
) -> list[Layout]:
    """Every valid layout on exactly `num_gpus` GPUs, ordered by (tp, pp, dp, micro_batch_size)."""
    if global_batch_size < 1 or num_gpus < 1 or gpus_per_node < 1:
        raise PlanInputError("enumerate_layouts: global_batch_size, num_gpus and gpus_per_node must be >= 1")
    opts = _memory_options(memory, use_distributed_optimizer)
    found: list[Layout] = []
    for tp in divisors(num_gpus):
        if (
            model.num_attention_heads % tp
            or model.num_query_groups % tp
            or gpus_per_node % tp
            or (max_tp is not None and tp > max_tp)
        ):
            continue
        for pp in divisors(num_gpus // tp):
            if model.num_layers % pp:
                continue
            dp = num_gpus // (tp * pp)
            if global_batch_size % dp:
                continue
            for mbs in divisors(global_batch_size // dp):
                if mbs > max_micro_batch_size:
                    break
                layout = Layout(tp, pp, dp, mbs)
                if not explain_layout(
                    model,
                    layout,
                    global_batch_size=global_batch_size,
                    gpus_per_node=gpus_per_node,
                    device_memory_bytes=device_memory_bytes,
                    memory=opts,
                    max_tp=max_tp,
                ):
                    found.append(layout)
    return found
