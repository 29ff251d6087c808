"""The snapshot rungs of a transition's ladder of sources.

When the live copies leave a hole in the new layout (every process sees the same hole), each live process
reads the snapshots it serves (both slots of each directory, iterations up to the agreed one), verifies
them (CRC-32C per shard: a corrupt shard is not offered, so the next rung serves it) and offers them to
the others (:func:`fill_hole`):

* its own snapshots;
* the snapshots of its node's ranks that are not live any more, and the replicas its node received from
  a peer node, when it is the lowest live rank of its node (one server per directory).

A DistributedOptimizer's shards (flat ranges of boxes, with no DP replica) are offered the same way,
as flat holdings for ``transition.flat_plan``. The planners (``transition.transfer_plan``,
``transition.flat_plan``) rank snapshots of the agreed iteration after every live copy: a snapshot on
the destination's node, then one on another node (a replica, or a node-mate's snapshot served
remotely). When live copies and those snapshots leave a hole (e.g. a worker died while
copying its newest snapshot), every member rolls back to the newest older iteration whose snapshots
alone cover the new layout (:func:`plan_rollback`), before falling back to the persistent checkpoint.
The trainer-level state in a snapshot (progress, LR schedule, common optimizer state, small objects,
the DistributedOptimizer's Adam step, RNG per (TP, PP) position) stands in when no live process can
give it, and always on a rollback.

Snapshots from an abandoned past are never mixed in: whenever a transition resumes at an iteration below
what some process had committed, the rollback is recorded in the store, and a snapshot written in an
earlier generation beyond a later rollback's iteration is ignored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megatron_unicron.megatron.distopt_state import FlatMeta
from megatron_unicron.megatron.state import ShardMeta
from megatron_unicron.snapshot.layout import SlotDirectory, rank_dirs, replica_dirs
from megatron_unicron.snapshot.manifest import Manifest
from megatron_unicron.snapshot.reader import LoadedSnapshot, load_slot
from megatron_unicron.transition.flat_plan import FlatHolding, FlatNeed, FlatPiece, plan_pieces
from megatron_unicron.transition.transfer_plan import (
    Holding,
    Need,
    Piece,
    SourceKind,
    UncoveredError,
)

if TYPE_CHECKING:
    from megatron_unicron.events import Decision
    from megatron_unicron.megatron.train import Trainer
    from megatron_unicron.store import Store

logger = logging.getLogger(__name__)


@dataclass
class SnapshotOffer:
    """What one process offers from snapshots (sent to every other process before planning)."""

    metas: list[ShardMeta] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    """The node whose memory holds each shard (the serving process's node)."""
    iterations: list[int] = field(default_factory=list)
    """The iteration of the snapshot each shard comes from."""
    states: list[dict[str, Any]] = field(default_factory=list)
    """Trainer-level state of each snapshot, plus ``"iteration"`` and ``"position"`` =
    (tp_size, pp_size, tp_rank, pp_rank)."""
    flat_metas: list[FlatMeta] = field(default_factory=list)
    """DistributedOptimizer shards (flat ranges), indexed after ``metas``."""
    flat_nodes: list[str] = field(default_factory=list)
    flat_iterations: list[int] = field(default_factory=list)

    def holdings(self, rank: int, first_index: int, iteration: int) -> list[Holding]:
        """The shards of ``iteration`` as holdings of process ``rank``, indexed after its live holdings."""
        return [
            Holding(rank, first_index + i, meta.key, meta.box, SourceKind.SNAPSHOT, node)
            for i, (meta, node, it) in enumerate(zip(self.metas, self.nodes, self.iterations))
            if it == iteration
        ]

    def flat_holdings(self, rank: int, first_index: int, iteration: int) -> list[FlatHolding]:
        """The flat shards of ``iteration`` as holdings of ``rank``, indexed after its snapshot boxes."""
        first = first_index + len(self.metas)
        return [
            FlatHolding(rank, first + i, meta.key, meta.box, meta.flat, SourceKind.SNAPSHOT, node)
            for i, (meta, node, it) in enumerate(zip(self.flat_metas, self.flat_nodes, self.flat_iterations))
            if it == iteration
        ]

    @property
    def all_iterations(self) -> set[int]:
        """Every iteration some offered shard is of."""
        return {*self.iterations, *self.flat_iterations}


Offers = Mapping[int, tuple[int, "SnapshotOffer | None"]]
"""Every process's offer by its transition rank, with the index its snapshot holdings start at."""


def holdings(offers: Offers, iteration: int) -> list[Holding]:
    """Every offered snapshot shard of ``iteration``."""
    return [h for rank, (first, offer) in offers.items() if offer is not None
            for h in offer.holdings(rank, first, iteration)]  # fmt: skip


def flat_holdings(offers: Offers, iteration: int) -> list[FlatHolding]:
    """Every offered flat snapshot shard (DistributedOptimizer state) of ``iteration``."""
    return [h for rank, (first, offer) in offers.items() if offer is not None
            for h in offer.flat_holdings(rank, first, iteration)]  # fmt: skip


@dataclass(frozen=True)
class SnapshotPlan:
    """A transfer that needs snapshots: box pieces first, then flat-range pieces."""

    pieces: tuple[Piece | FlatPiece, ...]


def plan_with(
    live: Sequence[Holding], flat_live: Sequence[FlatHolding], offers: Offers, iteration: int,
    needs: Sequence[Need], flat_needs: Sequence[FlatNeed], rank_node: Mapping[int, str],
) -> SnapshotPlan:
    """Plan ``needs`` and ``flat_needs`` from live holdings and the snapshots of ``iteration``.

    Raises UncoveredError when they leave a hole.
    """
    return SnapshotPlan(tuple(plan_pieces([*live, *holdings(offers, iteration)],
                                          [*flat_live, *flat_holdings(offers, iteration)],
                                          needs, flat_needs, rank_node)))  # fmt: skip


def plan_rollback(
    offers: Offers, needs: Sequence[Need], rank_node: Mapping[int, str], *, below: int,
    flat_needs: Sequence[FlatNeed] = (),
) -> tuple[int, SnapshotPlan] | None:
    """The newest iteration before ``below`` whose snapshots alone cover ``needs`` and ``flat_needs``."""
    iterations = {it for _, offer in offers.values() if offer is not None for it in offer.all_iterations}
    for iteration in sorted((it for it in iterations if it < below), reverse=True):
        try:
            return iteration, plan_with((), (), offers, iteration, needs, flat_needs, rank_node)
        except UncoveredError:
            continue
    return None


@dataclass
class SnapshotSources:
    """This process's offer and the verified tensors behind it (its sources after its live ones)."""

    offer: SnapshotOffer
    tensors: list[torch.Tensor]
    loaded: list[LoadedSnapshot]
    flat_tensors: list[torch.Tensor] = field(default_factory=list)

    @property
    def sources(self) -> list[torch.Tensor]:
        """Every verified tensor, in the order of the offer's holding indices (boxes, then flat ranges)."""
        return [*self.tensors, *self.flat_tensors]


def quiesce(trainer: Trainer) -> None:
    """Before a transition changes any state: let the snapshot copy in flight finish."""
    if trainer.snapshots is not None:
        trainer.snapshots.quiesce()


def _rollbacks_key(job: str) -> str:
    return f"unicron/{job}/snapshot/rollbacks"


def record_rollback(store: Store, job: str, generation: int, iteration: int) -> None:
    """Generation ``generation`` resumed at ``iteration``, below what some process had committed."""
    store.append(_rollbacks_key(job), json.dumps({"generation": generation, "iteration": iteration}) + "\n")


def _rollbacks(store: Store, job: str) -> list[tuple[int, int]]:
    raw = store.try_get(_rollbacks_key(job)) or b""
    out = []
    for line in raw.decode().splitlines():
        if line.strip():
            record = json.loads(line)
            out.append((int(record["generation"]), int(record["iteration"])))
    return out


def is_current(manifest: Manifest, rollbacks: list[tuple[int, int]]) -> bool:
    """False for a snapshot of a past that a later rollback abandoned."""
    return not any(generation > manifest.generation and manifest.iteration > iteration
                   for generation, iteration in rollbacks)  # fmt: skip


def served_directories(
    node_directory: Path, decision: Decision, *, launch_rank: int, node: str
) -> list[Path]:
    """The rank directories this process serves in a transition (see the module docstring)."""
    live = set(decision.live)
    on_node = sorted(r for r in live if decision.rank_node.get(r, node if r == launch_rank else "") == node)
    first_on_node = not on_node or on_node[0] == launch_rank
    served = []
    for rank, path in sorted(rank_dirs(node_directory).items()):
        if rank == launch_rank or (rank not in live and first_on_node):
            served.append(path)
    if first_on_node:
        served += [path for _, path in sorted(replica_dirs(node_directory).items())]
    return served


def gather(trainer: Trainer, decision: Decision, *, launch_rank: int, node: str, target: int
           ) -> SnapshotSources | None:  # fmt: skip
    """Read and verify the snapshots up to iteration ``target`` this process serves (None: snapshots off)."""
    service = trainer.snapshots
    if service is None:
        return None
    rollbacks = _rollbacks(trainer.store, trainer.env.job)
    sources = SnapshotSources(offer=SnapshotOffer(), tensors=[], loaded=[])
    offer = sources.offer
    for path in served_directories(service.node_directory, decision, launch_rank=launch_rank, node=node):
        directory = SlotDirectory(path)
        for manifest in directory.manifests():
            if manifest.iteration > target or not is_current(manifest, rollbacks):
                continue
            loaded = load_slot(directory, manifest)
            if loaded is None:
                continue
            sources.loaded.append(loaded)
            sources.tensors += loaded.tensors
            offer.metas += loaded.metas
            offer.nodes += [node] * len(loaded.metas)
            offer.iterations += [manifest.iteration] * len(loaded.metas)
            sources.flat_tensors += loaded.flat_tensors
            offer.flat_metas += loaded.flat_metas
            offer.flat_nodes += [node] * len(loaded.flat_metas)
            offer.flat_iterations += [manifest.iteration] * len(loaded.flat_metas)
            if loaded.state is not None:
                extra = {"iteration": manifest.iteration, "position": manifest.position}
                offer.states.append(dict(loaded.state, **extra))
    if sources.loaded:
        replicas = sorted({s.manifest.node for s in sources.loaded if s.manifest.node != node})
        logger.info(
            "unicron: rank %d offers %d snapshot(s)%s of iteration(s) %s (%d shards, %.1f MB)", launch_rank,
            len(sources.loaded), f" with replicas from {', '.join(replicas)}" if replicas else "",
            sorted({s.manifest.iteration for s in sources.loaded}), len(sources.sources),
            sum(s.nbytes for s in sources.loaded) / 2**20,
        )  # fmt: skip
    return sources


Share = Callable[["SnapshotOffer | None"], Mapping[int, "SnapshotOffer | None"]]
"""Posts this process's offer to the others and returns everyone's, by transition rank (collective)."""


@dataclass
class Filled:
    """A plan that needed snapshots, and what the exchange and the load need from them."""

    plan: SnapshotPlan
    resume: int
    """The agreed iteration, or the older one every member rolls back to."""
    offers: dict[int, SnapshotOffer | None]
    tensors: list[torch.Tensor]
    """This process's snapshot sources (indexed after its live holdings)."""


def fill_hole(
    trainer: Trainer, decision: Decision, *, launch_rank: int, node: str, target: int,
    live: Sequence[Holding], needs: Sequence[Need], rank_node: Mapping[int, str],
    first_index: Mapping[int, int], share: Share,
    flat_live: Sequence[FlatHolding] = (), flat_needs: Sequence[FlatNeed] = (),
) -> Filled | None:
    """Plan with the snapshots after the live copies left a hole; None when they do not cover it either.

    Every live process calls it (``share`` posts this process's offer and returns everyone's, by
    transition rank); ``first_index`` is each process's number of live holdings (boxes and flat ranges).
    ``flat_live``/``flat_needs``: the DistributedOptimizer's flat ranges, planned alongside the boxes.
    """
    if trainer.snapshots is None:  # the same on every process: snapshots are a job-wide setting
        return None
    sources = gather(trainer, decision, launch_rank=launch_rank, node=node, target=target)
    offers = dict(share(sources.offer if sources is not None else None))
    indexed = {r: (first_index[r], offer) for r, offer in offers.items()}
    tensors = sources.sources if sources is not None else []
    try:
        plan = plan_with(live, flat_live, indexed, target, needs, flat_needs, rank_node)
        return Filled(plan, target, offers, tensors)
    except UncoveredError:
        rollback = plan_rollback(indexed, needs, rank_node, below=target, flat_needs=flat_needs)
    return Filled(rollback[1], rollback[0], offers, tensors) if rollback is not None else None


@dataclass(frozen=True)
class TrainerState:
    """The trainer-level state of one iteration, from snapshots."""

    progress: dict[str, Any]
    scheduler: dict[str, Any]
    common: dict[str, Any]
    objects: dict[Any, Any]
    rng: Any
    """The RNG of a snapshot written at the same (TP, PP) position, or None."""
    adam_step: float | None = None
    """The DistributedOptimizer's Adam step count (None: not a DistributedOptimizer snapshot)."""


def trainer_state(
    offers: Sequence[SnapshotOffer | None], iteration: int, position: tuple[int, int, int, int]
) -> TrainerState | None:
    """Progress, LR schedule, common optimizer state, objects (merged) and RNG of ``iteration``."""
    states = [s for offer in offers if offer is not None for s in offer.states if s["iteration"] == iteration]
    if not states:
        return None
    objects: dict[Any, Any] = {}
    for state in states:
        for key, value in state["objects"].items():
            objects.setdefault(key, value)
    rng = next((s["rng"] for s in states if tuple(s["position"]) == position), None)
    first = states[0]
    return TrainerState(progress=first["progress"], scheduler=first["scheduler"], common=first["common"],
                        objects=objects, rng=rng, adam_step=first.get("adam_step"))  # fmt: skip
