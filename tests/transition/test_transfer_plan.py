"""The nearest-copy transfer planner: exact coverage, nearest source, exclusion, determinism."""

import itertools
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_unicron.transition.transfer_plan import (
    Holding,
    Need,
    SourceKind,
    Tier,
    UncoveredError,
    intersect,
    plan_transfer,
)


def split(size, parts):
    edges = [size * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in itertools.pairwise(edges) if a < b]


def partition(shape, splits):
    return [tuple(box) for box in itertools.product(*(split(n, k) for n, k in zip(shape, splits)))]


def to_slices(box):
    return tuple(slice(a, b) for a, b in box)


@st.composite
def scenarios(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 7)) for _ in range(ndim))
    old_splits = [draw(st.integers(1, 3)) for _ in range(ndim)]
    new_splits = [draw(st.integers(1, 3)) for _ in range(ndim)]
    replicas = draw(st.integers(1, 3))
    old_boxes = partition(shape, old_splits)
    new_boxes = partition(shape, new_splits)
    n_ranks = max(len(old_boxes) * replicas, len(new_boxes))
    ranks_per_node = draw(st.integers(1, 4))
    rank_node = {r: f"node{r // ranks_per_node}" for r in range(n_ranks)}
    holdings = []
    per_rank_index = {}
    for replica in range(replicas):
        for i, box in enumerate(old_boxes):
            rank = replica * len(old_boxes) + i
            idx = per_rank_index.get(rank, 0)
            per_rank_index[rank] = idx + 1
            holdings.append(Holding(rank, idx, "w", box, SourceKind.LIVE, rank_node[rank]))
    needs = [Need(rank, 0, "w", box) for rank, box in enumerate(new_boxes)]
    seed = draw(st.integers(0, 10_000))
    return shape, holdings, needs, rank_node, seed


def execute(plan, holdings, needs, full):
    src = {(h.rank, h.index): full[to_slices(h.box)].copy() for h in holdings}
    out = {(n.rank, n.index): np.full([b - a for a, b in n.box], np.nan) for n in needs}
    count = {(n.rank, n.index): np.zeros([b - a for a, b in n.box], dtype=int) for n in needs}
    for piece in plan.pieces:
        data = src[(piece.src_rank, piece.src_index)][to_slices(piece.src_slices)]
        out[(piece.dst_rank, piece.dst_index)][to_slices(piece.dst_slices)] = data
        count[(piece.dst_rank, piece.dst_index)][to_slices(piece.dst_slices)] += 1
    return out, count


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_every_needed_element_arrives_exactly_once_and_correct(scenario):
    shape, holdings, needs, rank_node, seed = scenario
    full = np.arange(np.prod(shape), dtype=float).reshape(shape)
    plan = plan_transfer(holdings, needs, rank_node)
    out, count = execute(plan, holdings, needs, full)
    for need in needs:
        assert (count[(need.rank, need.index)] == 1).all()
        np.testing.assert_array_equal(out[(need.rank, need.index)], full[to_slices(need.box)])


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_nearest_copy_is_chosen(scenario):
    _, holdings, needs, rank_node, _ = scenario
    plan = plan_transfer(holdings, needs, rank_node)
    for piece in plan.pieces:
        need = next(n for n in needs if (n.rank, n.index) == (piece.dst_rank, piece.dst_index))
        cell = tuple((need.box[i][0] + a, need.box[i][0] + b) for i, (a, b) in enumerate(piece.dst_slices))
        own = [h for h in holdings if h.rank == need.rank and intersect(h.box, cell) == cell]
        same_node = [
            h
            for h in holdings
            if rank_node[h.rank] == rank_node[need.rank] and intersect(h.box, cell) == cell
        ]
        if own:
            assert piece.tier is Tier.OWN_MEMORY and piece.is_local
        elif same_node:
            assert piece.tier is Tier.SAME_NODE
        else:
            assert piece.tier is Tier.OTHER_NODE


@settings(max_examples=80, deadline=None)
@given(scenarios())
def test_plan_is_independent_of_input_order(scenario):
    _, holdings, needs, rank_node, seed = scenario
    shuffled_h, shuffled_n = list(holdings), list(needs)
    rng = random.Random(seed)
    rng.shuffle(shuffled_h)
    rng.shuffle(shuffled_n)
    assert plan_transfer(holdings, needs, rank_node) == plan_transfer(shuffled_h, shuffled_n, rank_node)


def test_excluded_rank_never_serves_and_replica_takes_over():
    # two DP replicas of a 2-way split; rank 1 (replica 0, second half) is dead
    holdings = [
        Holding(0, 0, "w", ((0, 4),), SourceKind.LIVE, "n0"),
        Holding(1, 0, "w", ((4, 8),), SourceKind.LIVE, "n0"),
        Holding(2, 0, "w", ((0, 4),), SourceKind.LIVE, "n1"),
        Holding(3, 0, "w", ((4, 8),), SourceKind.LIVE, "n1"),
    ]
    needs = [Need(0, 0, "w", ((0, 8),))]
    plan = plan_transfer(holdings, needs, {0: "n0", 1: "n0", 2: "n1", 3: "n1"}, excluded_ranks=frozenset({1}))
    assert {(p.src_rank, p.tier) for p in plan.pieces} == {(0, Tier.OWN_MEMORY), (3, Tier.OTHER_NODE)}
    assert plan.moved_elements() == 4


def test_load_is_spread_over_equally_near_sources():
    # four replicas of one tensor on another node: the 4 new ranks' needs are served by different ranks
    holdings = [Holding(r, 0, "w", ((0, 8),), SourceKind.LIVE, "n0") for r in range(4)]
    needs = [Need(r, 0, "w", ((0, 8),)) for r in range(4, 8)]
    rank_node = {**{r: "n0" for r in range(4)}, **{r: "n1" for r in range(4, 8)}}
    plan = plan_transfer(holdings, needs, rank_node)
    assert sorted(p.src_rank for p in plan.pieces) == [0, 1, 2, 3]


def test_ladder_snapshot_then_checkpoint():
    rank_node = {0: "n0", 1: "n1"}
    checkpoint = Holding(0, 0, "w", ((0, 4),), SourceKind.CHECKPOINT, "fs")
    local_snapshot = Holding(0, 1, "w", ((0, 4),), SourceKind.SNAPSHOT, "n0")  # n0's memory, read by rank 0
    peer_replica = Holding(1, 0, "w", ((0, 4),), SourceKind.SNAPSHOT, "n1")  # its replica on node n1
    need = [Need(0, 0, "w", ((0, 4),))]
    plan = plan_transfer([checkpoint, local_snapshot, peer_replica], need, rank_node)
    assert [p.tier for p in plan.pieces] == [Tier.SNAPSHOT_SAME_NODE]
    plan = plan_transfer([checkpoint, peer_replica], need, rank_node)
    assert [(p.tier, p.src_rank) for p in plan.pieces] == [(Tier.SNAPSHOT_OTHER_NODE, 1)]
    plan = plan_transfer([checkpoint, peer_replica], need, rank_node, excluded_ranks=frozenset({1}))
    assert [p.tier for p in plan.pieces] == [Tier.CHECKPOINT]
    assert plan.moved_elements() == 0  # the destination reads the checkpoint itself


def test_lost_shard_is_reported():
    holdings = [Holding(0, 0, "w", ((0, 4),), SourceKind.LIVE, "n0")]
    with pytest.raises(UncoveredError, match="no surviving copy of w"):
        plan_transfer(holdings, [Need(1, 0, "w", ((0, 8),))], {0: "n0", 1: "n0"})
