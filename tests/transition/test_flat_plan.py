"""Flat-range planning (distributed-optimizer shards): every element once, right values, nearest first."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_unicron.transition.flat_plan import FlatHolding, FlatNeed, plan_flat
from megatron_unicron.transition.transfer_plan import SourceKind, Tier, UncoveredError


def split(size, parts):
    edges = [size * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in itertools.pairwise(edges) if a < b]


def boxes(shape, splits):
    return [tuple(b) for b in itertools.product(*(split(n, k) for n, k in zip(shape, splits)))]


def box_values(full, box):
    return full[tuple(slice(a, b) for a, b in box)].reshape(-1)


@st.composite
def layouts(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 6)) for _ in range(ndim))
    old = boxes(shape, [draw(st.integers(1, 2)) for _ in range(ndim)])
    new = boxes(shape, [draw(st.integers(1, 2)) for _ in range(ndim)])
    old_dp, new_dp = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return shape, old, new, old_dp, new_dp


def shards(layout_boxes, dp):
    """DistOpt-like: every box's flattened elements split in dp contiguous ranges, one per rank."""
    out = []
    for b, box in enumerate(layout_boxes):
        numel = int(np.prod([hi - lo for lo, hi in box]))
        for d, flat in enumerate(split(numel, dp)):
            out.append((b * dp + d, box, flat))
    return out


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_every_element_arrives_once_with_its_value(layout):
    shape, old, new, old_dp, new_dp = layout
    full = np.arange(np.prod(shape), dtype=float).reshape(shape)
    holdings = [
        FlatHolding(r, 0, "m", box, flat, SourceKind.LIVE, "n0") for r, box, flat in shards(old, old_dp)
    ]
    needs = [FlatNeed(r, 0, "m", box, flat) for r, box, flat in shards(new, new_dp)]
    ranks = {h.rank for h in holdings} | {n.rank for n in needs}
    pieces = plan_flat(holdings, needs, {r: "n0" for r in ranks})
    src = {h.rank: box_values(full, h.box)[h.flat[0] : h.flat[1]] for h in holdings}
    for need in needs:
        out = np.full(need.flat[1] - need.flat[0], np.nan)
        count = np.zeros_like(out)
        for piece in (p for p in pieces if p.dst_rank == need.rank):
            for s, d, length in piece.runs:
                out[d : d + length] = src[piece.src_rank][s : s + length]
                count[d : d + length] += 1
        assert (count == 1).all()
        np.testing.assert_array_equal(out, box_values(full, need.box)[need.flat[0] : need.flat[1]])


def test_own_copy_first_and_runs_are_merged():
    holdings = [
        FlatHolding(0, 0, "m", ((0, 4), (0, 4)), (0, 16), SourceKind.LIVE, "n0"),
        FlatHolding(1, 0, "m", ((0, 4), (0, 4)), (0, 16), SourceKind.LIVE, "n0"),
    ]
    needs = [FlatNeed(1, 0, "m", ((0, 4), (0, 4)), (4, 12))]
    (piece,) = plan_flat(holdings, needs, {0: "n0", 1: "n0"})
    assert (piece.src_rank, piece.tier, piece.runs) == (1, Tier.OWN_MEMORY, ((4, 0, 8),))


def test_a_lost_shard_is_reported():
    holdings = [FlatHolding(0, 0, "m", ((0, 8),), (0, 4), SourceKind.LIVE, "n0")]
    with pytest.raises(UncoveredError, match="4 elements of m"):
        plan_flat(holdings, [FlatNeed(1, 0, "m", ((0, 8),), (0, 8))], {0: "n0", 1: "n0"})
