"""The snapshot rungs in planning: nearest source first, rollback to the newest covering iteration."""

from __future__ import annotations

import torch

from megatron_unicron.megatron.distopt_state import FlatMeta
from megatron_unicron.megatron.state import ShardMeta
from megatron_unicron.snapshot.ladder import (
    SnapshotOffer,
    flat_holdings,
    holdings,
    plan_rollback,
    plan_with,
    trainer_state,
)
from megatron_unicron.transition.flat_plan import FlatHolding, FlatNeed
from megatron_unicron.transition.transfer_plan import Holding, Need, SourceKind, Tier, plan_transfer

LEFT, RIGHT = ((0, 4), (0, 8)), ((4, 8), (0, 8))


def meta(box: tuple) -> ShardMeta:
    return ShardMeta("w", box, (8, 8), torch.float32)


def offer(node: str, *entries: tuple[tuple, int]) -> SnapshotOffer:
    o = SnapshotOffer()
    for box, iteration in entries:
        o.metas.append(meta(box))
        o.nodes.append(node)
        o.iterations.append(iteration)
    o.states = [{"iteration": it, "position": (2, 1, i, 0), "progress": {"iteration": it}, "scheduler": {},
                 "common": {}, "objects": {("x", (i,)): i}, "rng": f"rng{i}@{it}"}
                for i, (_, it) in enumerate(entries)]  # fmt: skip
    return o


def test_live_copies_come_before_snapshots_and_a_local_snapshot_before_a_remote_one() -> None:
    rank_node = {0: "node0", 1: "node0", 2: "node1"}
    offers = {0: (1, offer("node0", (RIGHT, 5))), 2: (0, offer("node1", (RIGHT, 5))), 1: (0, None)}
    live = [Holding(0, 0, "w", LEFT, SourceKind.LIVE, "node0")]
    needs = [Need(1, 0, "w", ((0, 8), (0, 8)))]
    plan = plan_transfer(live + holdings(offers, 5), needs, rank_node)
    by_source = {(p.src_rank, p.src_index): p.tier for p in plan.pieces}
    assert by_source == {(0, 0): Tier.SAME_NODE, (0, 1): Tier.SNAPSHOT_SAME_NODE}
    assert holdings(offers, 4) == []  # snapshots of another iteration are never mixed in


def test_rollback_goes_to_the_newest_iteration_the_snapshots_cover() -> None:
    rank_node = {0: "node0", 1: "node0"}
    # rank 0 holds both halves at iteration 4 and the left half at 5; rank 1 the right half at 3 and 4.
    offers = {0: (0, offer("node0", (LEFT, 5), (LEFT, 4), (RIGHT, 4))),
              1: (0, offer("node0", (RIGHT, 3), (RIGHT, 4)))}  # fmt: skip
    needs = [Need(0, 0, "w", ((0, 8), (0, 8))), Need(1, 0, "w", ((2, 6), (0, 8)))]
    iteration, plan = plan_rollback(offers, needs, rank_node, below=5)  # type: ignore[misc]
    assert iteration == 4
    assert {p.src_index for p in plan.pieces if p.src_rank == 0} <= {1, 2}  # never the iteration-5 shard
    assert plan_rollback(offers, needs, rank_node, below=4) is None  # iteration 3 has no left half


def test_trainer_state_of_an_iteration_with_the_rng_of_the_same_position() -> None:
    offers = [offer("node0", (LEFT, 4), (RIGHT, 4)), None, offer("node1", (LEFT, 3))]
    state = trainer_state(offers, 4, (2, 1, 1, 0))
    assert state is not None and state.progress == {"iteration": 4} and state.rng == "rng1@4"
    assert state.objects == {("x", (0,)): 0, ("x", (1,)): 1}
    assert trainer_state(offers, 3, (2, 1, 1, 0)).rng is None  # type: ignore[union-attr]
    assert trainer_state(offers, 2, (2, 1, 0, 0)) is None


# DistributedOptimizer state: rank r's shard is the flat range HALVES[r] of the whole (8, 8) box.
WHOLE, HALVES = ((0, 8), (0, 8)), ((0, 32), (32, 64))


def flat_offer(node: str, *entries: tuple[tuple[int, int], int], boxes: int = 0) -> SnapshotOffer:
    o = offer(node, *[(LEFT, 99)] * boxes)  # snapshot boxes come first in a process's sources
    for flat, iteration in entries:
        o.flat_metas.append(FlatMeta("optimizer.state.exp_avg.w", WHOLE, (8, 8), torch.float32, flat))
        o.flat_nodes.append(node)
        o.flat_iterations.append(iteration)
    o.states.append({"iteration": 5, "position": (1, 1, 0, 0), "progress": {}, "scheduler": {}, "common": {},
                     "objects": {}, "rng": None, "adam_step": 5.0})  # fmt: skip
    return o


def flat_needs() -> list[FlatNeed]:
    return [FlatNeed(r, 0, "optimizer.state.exp_avg.w", WHOLE, HALVES[r]) for r in (0, 1)]


def test_flat_snapshot_shards_are_indexed_after_the_boxes_and_the_own_node_comes_first() -> None:
    rank_node = {0: "node0", 1: "node1", 2: "node1"}
    # rank 1's shard is lost: its own node (rank 2, replica of a node-mate) before rank 0's remote copy
    offers = {0: (3, flat_offer("node0", (HALVES[1], 5), boxes=2)),
              2: (0, flat_offer("node1", (HALVES[1], 5))), 1: (1, None)}  # fmt: skip
    (first,) = flat_holdings(offers, 5)[:1]
    assert (first.rank, first.index, first.kind, first.flat) == (0, 5, SourceKind.SNAPSHOT, HALVES[1])
    live = [FlatHolding(0, 0, "optimizer.state.exp_avg.w", WHOLE, HALVES[0], SourceKind.LIVE, "node0")]
    plan = plan_with([], live, offers, 5, [], flat_needs(), rank_node)
    assert {(p.src_rank, p.src_index, p.dst_rank, p.tier) for p in plan.pieces} == {
        (0, 0, 0, Tier.OWN_MEMORY), (2, 0, 1, Tier.SNAPSHOT_SAME_NODE)}
    assert flat_holdings(offers, 4) == []


def test_rollback_covers_flat_needs_too() -> None:
    rank_node = {0: "node0", 1: "node0"}
    # iteration 5 lacks rank 1's range (its copy was in flight when it died); iteration 4 has both
    offers = {0: (0, flat_offer("node0", (HALVES[0], 5), (HALVES[0], 4))),
              1: (0, flat_offer("node0", (HALVES[1], 4)))}  # fmt: skip
    iteration, plan = plan_rollback(offers, [], rank_node, below=6, flat_needs=flat_needs())  # type: ignore[misc]
    assert iteration == 4
    assert {(p.src_rank, p.src_index) for p in plan.pieces} == {(0, 1), (1, 0)}
    assert plan_rollback(offers, [], rank_node, below=4, flat_needs=flat_needs()) is None
    state = trainer_state([offers[0][1]], 5, (1, 1, 0, 0))
    assert state is not None and state.adam_step == 5.0
