"""Re-planning a running job: the new layout and members after a lost node, or when a node returns.

The coordinator asks for a plan when an incident is SEV1 (``decisions.PlanFn``). The GPU count comes
from the cost-aware plan generator (``plan.planner.plan_single_job``: throughput from the analytic model
on the job's shape, transition cost charged against staying put); among the layouts of that size the
fastest one that keeps the job's micro-batch size (``--micro-batch-size`` is part of the job, and the
global batch must split into whole micro-batches on every DP rank) is taken. Members are the surviving
processes in node order, so that the consecutive ranks of a tensor-parallel group share a node as
Megatron's rank order expects; the other survivors stay as warm spares.

Pure code: no torch, no megatron. The job's shape is read from the ``config`` the worker of launch
rank 0 posts (``model``, ``global_batch_size``, ``micro_batch_size``, ``gpus_per_node``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from megatron_unicron.decisions import JobState, PlanFn, ShrinkFn
from megatron_unicron.events import Action, Decision, LayoutSpec
from megatron_unicron.plan.errors import NoFeasibleLayoutError, PlanInputError
from megatron_unicron.plan.hardware import DEVICE_PRESETS
from megatron_unicron.plan.layouts import Layout, enumerate_layouts
from megatron_unicron.plan.memory import MemoryOptions
from megatron_unicron.plan.models import ModelShape
from megatron_unicron.plan.planner import plan_single_job
from megatron_unicron.plan.throughput import AnalyticParams, iteration_time
from megatron_unicron.plan.values import JobSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobShape:
    """What the planner needs to know about a training job."""

    model: ModelShape
    global_batch_size: int
    micro_batch_size: int
    gpus_per_node: int
    use_distributed_optimizer: bool = False
    precision: str = "fp32"
    device_memory_bytes: float | None = None
    """The memory a layout must fit on each device (None: the CPU preset's)."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> JobShape:
        """From the job config the worker posts (its ``model`` section and batch sizes)."""
        model = config["model"]
        return cls(
            model=ModelShape(
                num_layers=model["num_layers"],
                hidden_size=model["hidden_size"],
                num_attention_heads=model["num_attention_heads"],
                num_query_groups=model["num_query_groups"],
                ffn_hidden_size=model["ffn_hidden_size"],
                vocab_size=model["vocab_size"],
                seq_length=model["seq_length"],
                gated_linear_unit=model.get("swiglu", False),
                untie_embeddings_and_output_weights=model.get("untie_embeddings_and_output_weights", False),
                make_vocab_size_divisible_by=model.get("make_vocab_size_divisible_by", 128),
            ),
            global_batch_size=config["global_batch_size"],
            micro_batch_size=config["micro_batch_size"],
            gpus_per_node=config["gpus_per_node"],
            use_distributed_optimizer=config.get("use_distributed_optimizer", False),
            precision=config.get("precision", "fp32"),
            device_memory_bytes=config.get("device_memory_bytes"),
        )


def _fits_micro_batch(layout: Layout, shape: JobShape) -> bool:
    return shape.global_batch_size % (shape.micro_batch_size * layout.dp) == 0


def choose_layout(
    shape: JobShape, available: int, current: LayoutSpec | None = None, prefer_more_gpus: bool = False
) -> LayoutSpec | None:
    """The layout for ``available`` processes, or None when the job fits on none of them."""
    device = DEVICE_PRESETS["cpu"]
    if shape.device_memory_bytes is not None:
        device = replace(device, memory_bytes=shape.device_memory_bytes)
    memory = MemoryOptions(
        precision=shape.precision,  # type: ignore[arg-type]
        use_distributed_optimizer=shape.use_distributed_optimizer,
        sequence_parallel=False,
    )
    job = JobSpec(name="job", model=shape.model, global_batch_size=shape.global_batch_size, memory=memory)
    current_layout = (
        Layout(tp=current.tp, pp=current.pp, dp=current.dp, micro_batch_size=shape.micro_batch_size)
        if current is not None
        else None
    )
    try:
        count, _ = plan_single_job(
            job,
            available,
            shape.gpus_per_node,
            current_layout,
            device=device,
            prefer_more_gpus=prefer_more_gpus,
        )
    except (NoFeasibleLayoutError, PlanInputError):
        return None
    params = AnalyticParams()
    for gpus in range(count, 0, -1):
        layouts = [
            layout
            for layout in enumerate_layouts(
                shape.model,
                shape.global_batch_size,
                gpus,
                shape.gpus_per_node,
                device.memory_bytes,
                memory=memory,
            )  # fmt: skip
            if layout.micro_batch_size == shape.micro_batch_size and _fits_micro_batch(layout, shape)
        ]
        if layouts:

            def seconds(layout: Layout) -> float:
                return iteration_time(
                    shape.model, layout, shape.global_batch_size, shape.gpus_per_node, device, params, memory
                )

            best = min(layouts, key=lambda lay: (seconds(lay), lay.tp, lay.pp))
            return LayoutSpec(tp=best.tp, pp=best.pp, dp=best.dp)
    return None


def choose_members(
    survivors: Sequence[int], layout: LayoutSpec, rank_node: Mapping[int, str]
) -> tuple[int, ...]:
    """The processes that train in ``layout``, in new-rank order: node by node, then launch rank."""
    ordered = sorted(survivors, key=lambda r: (rank_node.get(r, ""), r))
    return tuple(ordered[: layout.world_size])


# A planned switch is announced this many iterations and at least this many seconds ahead, so every
# member reads the decision before it reaches that iteration (members move in lockstep: they are at
# most one iteration apart; a member's view of the store may be ``DecisionWatch.stale_s`` old).
SWITCH_AHEAD_ITERATIONS = 3
SWITCH_AHEAD_S = 1.0


def switch_iteration(iteration: int | None, mean_iteration_s: float | None) -> int:
    """The iteration a switch planned now happens after, ``iteration`` being the furthest member's."""
    ahead = SWITCH_AHEAD_ITERATIONS
    if mean_iteration_s is not None and mean_iteration_s > 0:
        ahead = max(ahead, math.ceil(SWITCH_AHEAD_S / mean_iteration_s) + 1)
    return (iteration or 0) + ahead


def make_scale_up_fn(config_of: Callable[[], Mapping[str, Any] | None]) -> PlanFn:
    """A ``PlanFn`` for nodes coming back: the largest feasible layout over every live process.

    The analytic model can prefer fewer CPU ranks for a tiny model; a returning node is taken back
    whenever a larger layout is valid (the capacity the job had before the loss), at an iteration a few
    steps ahead, as a planned transition (nothing failed, nothing is redone).
    """

    def scale_fn(state: JobState, nodes_back: frozenset[str]) -> Decision | None:
        config = config_of()
        if config is None or "model" not in config:
            return None
        shape = JobShape.from_config(config)
        layout = choose_layout(shape, len(state.live), state.layout, prefer_more_gpus=True)
        if layout is None or layout.world_size <= state.layout.world_size:
            return None
        members = choose_members(state.live, layout, state.rank_node)
        at = switch_iteration(state.iteration, state.mean_iteration_s)
        return Decision(
            job=state.job,
            generation=state.generation + 1,
            action=Action.SCALE_UP,
            incident=f"{', '.join(sorted(nodes_back))} back",
            layout=layout,
            members=members,
            live=tuple(state.live),
            rank_node=dict(state.rank_node),
            resume_iteration=at,
            at_iteration=at,
            reason=f"{', '.join(sorted(nodes_back))} back: {state.layout} -> {layout} after iteration {at}",
        )

    return scale_fn


def make_shrink_fn(config_of: Callable[[], Mapping[str, Any] | None]) -> ShrinkFn:
    """A ``ShrinkFn``: after a SEV2 restart, go on with the intact DP replicas (same TP and PP).

    With the pipelines-first rank order, DP replica ``d`` is the launch-rank block
    ``[d·tp·pp, (d+1)·tp·pp)`` of the members; the replicas without a restarted rank keep training
    (the global batch is split over fewer of them), the surviving ranks of broken replicas wait as
    spares, and the restarted processes join again later. The largest number of intact replicas over
    which the global batch splits trains; None when that is fewer than the job's ``restart_min_replicas``
    (default 2; then everyone waits for the restart). Two keep a live copy of every shard, so that one
    more fault before the restarted ranks are back still has a replica to restore from (the spares'
    copies go stale as soon as the shrunk layout trains); 1 trades that for training on at once.
    """

    def shrink_fn(state: JobState, restarted: tuple[int, ...]) -> Decision | None:
        config = config_of()
        layout = state.layout
        batch, micro = (config or {}).get("global_batch_size"), (config or {}).get("micro_batch_size")
        if not batch or not micro or layout.dp < 2:  # a script that posts no batch: nothing to split
            return None
        block = layout.tp * layout.pp
        replicas = [state.members[d * block : (d + 1) * block] for d in range(layout.dp)]
        intact = [r for r in replicas if not set(r) & set(restarted)]
        least = int((config or {}).get("restart_min_replicas", 2))
        splits = [d for d in range(len(intact), least - 1, -1) if d >= 1 and batch % (micro * d) == 0]
        if not splits:
            return None
        dp = splits[0]
        intact = intact[:dp]
        new = LayoutSpec(tp=layout.tp, pp=layout.pp, dp=dp)
        members = tuple(rank for replica in intact for rank in replica)
        return Decision(
            job=state.job,
            generation=state.generation + 1,
            action=Action.RESTART,
            incident="",
            layout=new,
            members=members,
            live=tuple(state.live),
            rank_node=dict(state.rank_node),
            resume_iteration=state.iteration,
            reason=f"restart rank(s) {', '.join(map(str, restarted))}; meanwhile {layout} -> {new}",
        )

    return shrink_fn


def make_plan_fn(config_of: Callable[[], Mapping[str, Any] | None]) -> PlanFn:
    """A ``PlanFn`` for the coordinator; ``config_of()`` returns the job config when it is known."""

    def plan_fn(state: JobState, lost_nodes: frozenset[str]) -> Decision | None:
        config = config_of()
        if config is None or "model" not in config:
            logger.warning("no job shape in the config: cannot re-plan, the job stops")
            return None
        shape = JobShape.from_config(config)
        layout = choose_layout(shape, len(state.live), state.layout)
        if layout is None:
            return None
        members = choose_members(state.live, layout, state.rank_node)
        lost = ", ".join(sorted(lost_nodes)) or "a device"
        return Decision(
            job=state.job,
            generation=state.generation + 1,
            action=Action.RECONFIGURE,
            incident="",
            layout=layout,
            members=members,
            live=tuple(state.live),
            rank_node=dict(state.rank_node),
            resume_iteration=state.iteration,
            reason=f"lost {lost}: {state.layout} on {len(state.members)} ranks -> {layout} on "
            f"{len(members)} of {len(state.live)} survivors",
        )

    return plan_fn
