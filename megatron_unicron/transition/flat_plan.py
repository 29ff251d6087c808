"""Transfer planning for *flat ranges* of boxes: shards of a distributed optimizer's state.

A DistributedOptimizer rank holds, for a parameter, a contiguous range of the parameter's flattened
elements, so its shard of a tensor is not a box but the elements ``[start, stop)`` (C order) of a box.
For each needed range the planner intersects the boxes, lists the elements both ranges cover with
numpy, and serves each element from the nearest source (the same ladder as
:mod:`megatron_unicron.transition.transfer_plan`); consecutive elements form runs ``(source offset,
target offset, length)``, so a piece copies a few slices however the ranges fall. :func:`plan_pieces`
plans a transition's boxes and flat ranges together. Pure code.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from megatron_unicron.transition.transfer_plan import (
    Box,
    Holding,
    Need,
    Piece,
    SourceKind,
    Tier,
    UncoveredError,
    intersect,
    plan_transfer,
    tier_of,
)

Run = tuple[int, int, int]  # (source offset, target offset, length)


@dataclass(frozen=True)
class FlatHolding:
    """Elements ``flat`` of box ``box`` of tensor ``key`` that ``rank`` can serve (a 1-D tensor)."""

    rank: int
    index: int
    key: str
    box: Box
    flat: tuple[int, int]
    kind: SourceKind
    node: str


@dataclass(frozen=True)
class FlatNeed:
    """Elements ``flat`` of box ``box`` of tensor ``key`` the new layout places on ``rank``."""

    rank: int
    index: int
    key: str
    box: Box
    flat: tuple[int, int]


@dataclass(frozen=True)
class FlatPiece:
    """Runs copied from holding ``src_index`` of ``src_rank`` into need ``dst_index`` of ``dst_rank``."""

    src_rank: int
    src_index: int
    dst_rank: int
    dst_index: int
    runs: tuple[Run, ...]
    tier: Tier

    @property
    def numel(self) -> int:
        """Elements this piece moves."""
        return sum(length for _, _, length in self.runs)

    @property
    def is_local(self) -> bool:
        """Whether the destination serves the piece itself."""
        return self.src_rank == self.dst_rank


def _flat_indices(box: Box, region: Box) -> np.ndarray:
    """C-order positions, within ``box``, of every element of ``region`` (a box inside it), in order."""
    lengths = [stop - start for start, stop in box]
    strides = np.cumprod([1, *lengths[::-1][:-1]])[::-1]
    index = np.zeros(1, dtype=np.int64)
    for (start, stop), (origin, _), stride in zip(region, box, strides):
        axis = (np.arange(start, stop, dtype=np.int64) - origin) * stride
        index = (index[:, None] + axis[None, :]).reshape(-1)
    return index


def _runs(src: np.ndarray, dst: np.ndarray) -> tuple[Run, ...]:
    if src.size == 0:
        return ()
    breaks = np.nonzero((np.diff(src) != 1) | (np.diff(dst) != 1))[0] + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [src.size]))
    return tuple((int(src[s]), int(dst[s]), int(e - s)) for s, e in zip(starts, ends))


def plan_flat(
    holdings: Sequence[FlatHolding],
    needs: Sequence[FlatNeed],
    rank_node: Mapping[int, str],
    *,
    excluded_ranks: frozenset[int] = frozenset(),
) -> tuple[FlatPiece, ...]:
    """Every flat piece, nearest source first; raises UncoveredError when an element has no source."""
    by_key: dict[str, list[FlatHolding]] = defaultdict(list)
    for holding in holdings:
        if holding.rank not in excluded_ranks:
            by_key[holding.key].append(holding)
    assigned: dict[int, int] = defaultdict(int)
    pieces: list[FlatPiece] = []
    for need in sorted(needs, key=lambda n: (n.rank, n.index)):
        node = rank_node[need.rank]
        start, stop = need.flat
        covered = np.zeros(stop - start, dtype=bool)

        def order(h: FlatHolding, rank: int = need.rank, node: str = node) -> tuple[Tier, int, int, int]:
            as_box = Holding(h.rank, h.index, h.key, h.box, h.kind, h.node)
            return (tier_of(as_box, rank, node, rank_node), assigned[h.rank], h.rank, h.index)

        for holding in sorted(by_key.get(need.key, ()), key=order):
            if holding.kind is SourceKind.CHECKPOINT and holding.rank != need.rank:
                continue
            region = intersect(need.box, holding.box)
            if region is None:
                continue
            dst = _flat_indices(need.box, region)
            src = _flat_indices(holding.box, region)
            mask = (dst >= start) & (dst < stop) & (src >= holding.flat[0]) & (src < holding.flat[1])
            mask[mask] = ~covered[dst[mask] - start]
            if not mask.any():
                continue
            covered[dst[mask] - start] = True
            src_sel, dst_sel = src[mask] - holding.flat[0], dst[mask] - start
            order_by_dst = np.argsort(dst_sel, kind="stable")
            runs = _runs(src_sel[order_by_dst], dst_sel[order_by_dst])
            tier = order(holding)[0]
            if holding.rank != need.rank:
                assigned[holding.rank] += int(mask.sum())
            pieces.append(FlatPiece(holding.rank, holding.index, need.rank, need.index, runs, tier))
            if covered.all():
                break
        if not covered.all():
            missing = int((~covered).sum())
            raise UncoveredError(
                f"no surviving copy of {missing} elements of {need.key} needed by rank {need.rank}: "
                "every holder is lost (add a snapshot or checkpoint)"
            )
    return tuple(pieces)


def plan_pieces(
    holdings: Sequence[Holding],
    flat_holdings: Sequence[FlatHolding],
    needs: Sequence[Need],
    flat_needs: Sequence[FlatNeed],
    rank_node: Mapping[int, str],
    *,
    excluded_ranks: frozenset[int] = frozenset(),
) -> list[Piece | FlatPiece]:
    """Every piece of a transition: the boxes' plan, then the flat ranges' (the exchange takes both).

    Raises UncoveredError when either leaves a hole.
    """
    pieces: list[Piece | FlatPiece] = list(
        plan_transfer(holdings, needs, rank_node, excluded_ranks=excluded_ranks).pieces
    )
    pieces.extend(plan_flat(flat_holdings, flat_needs, rank_node, excluded_ranks=excluded_ranks))
    return pieces
