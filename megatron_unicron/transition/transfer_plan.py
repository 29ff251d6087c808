"""Transfer planner: which rank sends which slice of which tensor to whom, nearest copy first.

Pure code (no torch.distributed): every rank computes the same plan from the same inputs. Tensors are
described the way megatron-core's ``sharded_state_dict()`` describes them, independently of the
layout: a key (e.g. ``decoder.layers.self_attention.linear_qkv.weight``) and, per local shard, the box
it covers in the global tensor (one ``[start, stop)`` range per axis, stacked layer axes included).

A *holding* is a copy some rank can serve: its own live state, a DP replica's live state, a node's
in-memory snapshot (served by a rank on that node), or the newest persistent checkpoint (read by the
destination itself). A *need* is a box the new layout puts on a rank. For every need the planner cuts
the target box into cells at every candidate boundary and gives each cell to the nearest source:

    own memory → live copy on the same node → live copy on another node
               → snapshot on the same node → snapshot replica on another node → checkpoint

spreading equally near sources by the bytes already assigned to them. Adjacent cells with the same
source are merged back, so a plan moves each needed element exactly once, in as few pieces as the
sources' partition allows.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum

Box = tuple[tuple[int, int], ...]


class SourceKind(str, Enum):
    """Where a holding's data lives."""

    LIVE = "live"
    SNAPSHOT = "snapshot"
    CHECKPOINT = "checkpoint"


class Tier(IntEnum):
    """Distance of a source from a destination; lower is nearer."""

    OWN_MEMORY = 0
    SAME_NODE = 1
    OTHER_NODE = 2
    SNAPSHOT_SAME_NODE = 3
    SNAPSHOT_OTHER_NODE = 4
    CHECKPOINT = 5


def box_numel(box: Box) -> int:
    """Number of elements in a box."""
    count = 1
    for start, stop in box:
        count *= stop - start
    return count


def intersect(a: Box, b: Box) -> Box | None:
    """The common part of two boxes of the same rank, or None."""
    out = []
    for (a0, a1), (b0, b1) in zip(a, b):
        lo, hi = max(a0, b0), min(a1, b1)
        if lo >= hi:
            return None
        out.append((lo, hi))
    return tuple(out)


def relative(inner: Box, outer: Box) -> Box:
    """``inner`` in coordinates local to ``outer`` (which contains it)."""
    return tuple((i0 - o0, i1 - o0) for (i0, i1), (o0, _) in zip(inner, outer))


@dataclass(frozen=True)
class Holding:
    """A copy of one shard that ``rank`` can serve (for a checkpoint: any rank can read it)."""

    rank: int
    index: int  # position in the serving rank's list of holdings
    key: str
    box: Box
    kind: SourceKind
    node: str  # node whose memory holds the data (the snapshot's node for snapshots)


@dataclass(frozen=True)
class Need:
    """A box of one tensor that the new layout places on ``rank``."""

    rank: int
    index: int  # position in the destination rank's list of needs
    key: str
    box: Box


@dataclass(frozen=True)
class Piece:
    """Copy ``src_slices`` of holding ``src_index`` (on ``src_rank``) into ``dst_slices`` of a need."""

    src_rank: int
    src_index: int
    src_slices: Box
    dst_rank: int
    dst_index: int
    dst_slices: Box
    tier: Tier

    @property
    def numel(self) -> int:
        """Elements this piece moves."""
        return box_numel(self.dst_slices)

    @property
    def is_local(self) -> bool:
        """Whether the destination serves the piece itself (no transfer between processes)."""
        return self.src_rank == self.dst_rank


@dataclass(frozen=True)
class TransferPlan:
    """Every piece of a transition, in a deterministic order (by destination, then need)."""

    pieces: tuple[Piece, ...]

    def between(self, src: int, dst: int) -> list[Piece]:
        """The pieces ``src`` sends to ``dst``, in plan order (the packing order of their buffer)."""
        return [p for p in self.pieces if p.src_rank == src and p.dst_rank == dst]

    def pairs(self) -> list[tuple[int, int]]:
        """Distinct (source, destination) pairs that exchange data between processes."""
        return sorted({(p.src_rank, p.dst_rank) for p in self.pieces if not p.is_local})

    def moved_elements(self) -> int:
        """Elements sent between processes (local copies and checkpoint reads excluded)."""
        return sum(p.numel for p in self.pieces if not p.is_local)

    def elements_by_tier(self) -> dict[Tier, int]:
        """Elements served from each tier of the ladder."""
        out: dict[Tier, int] = defaultdict(int)
        for piece in self.pieces:
            out[piece.tier] += piece.numel
        return dict(out)


class UncoveredError(RuntimeError):
    """Some needed element has no valid source at all (a shard whose every copy is lost)."""


def tier_of(holding: Holding, need_rank: int, need_node: str, rank_node: Mapping[int, str]) -> Tier:
    """How far ``holding`` is from a destination on ``need_rank`` (on ``need_node``)."""
    if holding.kind is SourceKind.CHECKPOINT:
        return Tier.CHECKPOINT
    if holding.kind is SourceKind.SNAPSHOT:
        return Tier.SNAPSHOT_SAME_NODE if holding.node == need_node else Tier.SNAPSHOT_OTHER_NODE
    if holding.rank == need_rank:
        return Tier.OWN_MEMORY
    return Tier.SAME_NODE if rank_node.get(holding.rank) == need_node else Tier.OTHER_NODE


def _cells(target: Box, boxes: Iterable[Box]) -> list[Box]:
    """Cut ``target`` at every boundary of ``boxes`` that falls inside it."""
    cuts: list[set[int]] = [{lo, hi} for lo, hi in target]
    for box in boxes:
        for axis, (lo, hi) in enumerate(box):
            t0, t1 = target[axis]
            cuts[axis].update(c for c in (lo, hi) if t0 < c < t1)
    ranges = [list(itertools.pairwise(sorted(axis_cuts))) for axis_cuts in cuts]
    return [tuple(cell) for cell in itertools.product(*ranges)]


_Choice = tuple[Holding, Tier]


def _merge_cells(cells: list[tuple[Box, _Choice]]) -> list[tuple[Box, _Choice]]:
    """Merge cells that share a source and touch along an axis (axis by axis, last axis first)."""
    merged = cells
    ndim = len(cells[0][0]) if cells else 0
    for axis in reversed(range(ndim)):

        def order(cell: tuple[Box, _Choice], axis: int = axis) -> tuple:
            box, (holding, _) = cell
            return (holding.rank, holding.index, [r for i, r in enumerate(box) if i != axis], box[axis])

        out: list[tuple[Box, _Choice]] = []
        for box, choice in sorted(merged, key=order):
            if out:
                prev_box, prev_choice = out[-1]
                same_rest = all(prev_box[i] == box[i] for i in range(ndim) if i != axis)
                if prev_choice[0] == choice[0] and same_rest and prev_box[axis][1] == box[axis][0]:
                    grown = (prev_box[axis][0], box[axis][1])
                    out[-1] = (prev_box[:axis] + (grown,) + prev_box[axis + 1 :], prev_choice)
                    continue
            out.append((box, choice))
        merged = out
    return merged


def plan_transfer(
    holdings: Sequence[Holding],
    needs: Sequence[Need],
    rank_node: Mapping[int, str],
    *,
    element_bytes: Mapping[str, int] | None = None,
    excluded_ranks: frozenset[int] = frozenset(),
) -> TransferPlan:
    """The nearest-copy plan for ``needs`` from ``holdings``; raises UncoveredError if a need has a hole.

    ``rank_node`` maps every rank to its node; ``excluded_ranks`` are ranks that cannot serve (dead);
    ``element_bytes`` weighs keys for load spreading (default 1 per element).
    """
    by_key: dict[str, list[Holding]] = defaultdict(list)
    for holding in holdings:
        if holding.rank not in excluded_ranks:
            by_key[holding.key].append(holding)
    assigned: dict[int, int] = defaultdict(int)  # bytes assigned to each serving rank so far
    pieces: list[Piece] = []
    for need in sorted(needs, key=lambda n: (n.rank, n.index)):
        need_node = rank_node[need.rank]
        candidates = []
        for holding in by_key.get(need.key, ()):
            overlap = intersect(need.box, holding.box)
            if overlap is None:
                continue
            if holding.kind is SourceKind.CHECKPOINT and holding.rank != need.rank:
                continue  # a checkpoint is read by the destination itself
            candidates.append((holding, overlap, tier_of(holding, need.rank, need_node, rank_node)))
        weight = (element_bytes or {}).get(need.key, 1)
        chosen: list[tuple[Box, _Choice]] = []
        for cell in _cells(need.box, (c[1] for c in candidates)):
            covering = [c for c in candidates if intersect(cell, c[1]) == cell]
            if not covering:
                raise UncoveredError(
                    f"no surviving copy of {need.key} cell {cell} needed by rank {need.rank}: "
                    "every holder is lost (add a snapshot or checkpoint)"
                )
            # Equally near: the destination's own copy (e.g. its own snapshot) first, then the least loaded.
            holding, _, tier = min(covering, key=lambda c: (c[2], c[0].rank != need.rank, assigned[c[0].rank],
                                                            c[0].rank, c[0].index))  # fmt: skip
            if holding.rank != need.rank:
                assigned[holding.rank] += box_numel(cell) * weight
            chosen.append((cell, (holding, tier)))
        for box, (holding, tier) in sorted(_merge_cells(chosen), key=lambda c: c[0]):
            pieces.append(
                Piece(
                    src_rank=holding.rank,
                    src_index=holding.index,
                    src_slices=relative(box, holding.box),
                    dst_rank=need.rank,
                    dst_index=need.index,
                    dst_slices=relative(box, need.box),
                    tier=tier,
                )
            )
    return TransferPlan(pieces=tuple(pieces))
