"""The snapshot rungs of a transition's ladder of sources.

After the live processes agree on the iteration the job resumes at, each one reads the snapshots it
serves, of that iteration only, verifies them (CRC32 per shard: a corrupt shard is not offered, so the
next rung serves it) and offers them with the rest of its state:

* its own snapshots when it holds no state of its own (a restarted process);
* the snapshots of its node's ranks that are not live any more, and the replicas its node received from
  a peer node, when it is the lowest live rank of its node (one server per directory).

The planner (``transition.transfer_plan``) ranks them after every live copy: a snapshot on the
destination's node, then one on another node (a replica, or a node-mate's snapshot served remotely).
The trainer-level state in a snapshot (progress, LR schedule, common optimizer state, small objects,
RNG per (TP, PP) position) stands in when no live process can give it.

Snapshots from an abandoned past are never mixed in: whenever a transition resumes at an iteration below
what some process had committed, the rollback is recorded in the store, and a snapshot written in an
earlier generation beyond a later rollback's iteration is ignored.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megatron_unicron.megatron.state import ShardMeta
from megatron_unicron.snapshot.layout import SlotDirectory, rank_dirs, replica_dirs
from megatron_unicron.snapshot.manifest import Manifest
from megatron_unicron.snapshot.reader import LoadedSnapshot, load_slot
from megatron_unicron.transition.transfer_plan import Holding, SourceKind

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
    states: list[dict[str, Any]] = field(default_factory=list)
    """Trainer-level state of each snapshot, with ``"position"`` = (tp_size, pp_size, tp_rank, pp_rank)."""

    def holdings(self, rank: int, first_index: int) -> list[Holding]:
        """The offer as planner holdings of process ``rank``, indexed after its live holdings."""
        return [
            Holding(rank, first_index + i, meta.key, meta.box, SourceKind.SNAPSHOT, node)
            for i, (meta, node) in enumerate(zip(self.metas, self.nodes))
        ]


@dataclass
class SnapshotSources:
    """This process's offer and the verified tensors behind it (its sources after its live ones)."""

    offer: SnapshotOffer
    tensors: list[torch.Tensor]
    loaded: list[LoadedSnapshot]


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
    node_directory: Path, decision: Decision, *, launch_rank: int, node: str, has_state: bool
) -> list[Path]:
    """The rank directories this process serves in a transition (see the module docstring)."""
    live = set(decision.live)
    on_node = sorted(r for r in live if decision.rank_node.get(r, node if r == launch_rank else "") == node)
    first_on_node = not on_node or on_node[0] == launch_rank
    served = []
    for rank, path in sorted(rank_dirs(node_directory).items()):
        if (rank == launch_rank and not has_state) or (rank not in live and first_on_node):
            served.append(path)
    if first_on_node:
        served += [path for _, path in sorted(replica_dirs(node_directory).items())]
    return served


def gather(
    trainer: Trainer, decision: Decision, *, launch_rank: int, node: str, target: int, has_state: bool
) -> SnapshotSources | None:
    """Read and verify the snapshots of iteration ``target`` this process serves; None without snapshots."""
    service = trainer.snapshots
    if service is None:
        return None
    rollbacks = _rollbacks(trainer.store, trainer.env.job)
    sources = SnapshotSources(offer=SnapshotOffer(), tensors=[], loaded=[])
    for path in served_directories(
        service.node_directory, decision, launch_rank=launch_rank, node=node, has_state=has_state
    ):
        directory = SlotDirectory(path)
        usable = [m for m in directory.manifests() if m.iteration == target and is_current(m, rollbacks)]
        manifest = usable[0] if usable else None
        loaded = load_slot(directory, manifest) if manifest is not None else None
        if loaded is None:
            continue
        sources.loaded.append(loaded)
        sources.tensors += loaded.tensors
        sources.offer.metas += loaded.metas
        sources.offer.nodes += [node] * len(loaded.metas)
        if loaded.state is not None:
            sources.offer.states.append(dict(loaded.state, position=manifest.position))  # type: ignore[union-attr]
    if sources.loaded:
        logger.info(
            "unicron: rank %d offers %d snapshot(s) of iteration %d (%d shards, %.1f MB)", launch_rank,
            len(sources.loaded), target, len(sources.tensors), sum(s.nbytes for s in sources.loaded) / 2**20,
        )  # fmt: skip
    return sources


def trainer_state(offers: list[SnapshotOffer | None]) -> dict[str, Any] | None:
    """Progress, LR schedule, common optimizer state and merged objects from any offered snapshot."""
    states = [s for offer in offers if offer is not None for s in offer.states]
    if not states:
        return None
    objects: dict[Any, Any] = {}
    for state in states:
        for key, value in state["objects"].items():
            objects.setdefault(key, value)
    return dict(states[0], objects=objects)


def rng_for(offers: list[SnapshotOffer | None], position: tuple[int, int, int, int]) -> Any:
    """The RNG state a snapshot of the same (TP, PP) position holds, or None."""
    for offer in offers:
        for state in offer.states if offer is not None else ():
            if tuple(state["position"]) == position:
                return state["rng"]
    return None
