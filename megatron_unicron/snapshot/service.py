"""In-memory snapshots in a worker: every N iterations, without stalling training; persisted every M.

:class:`SnapshotService` hooks into the :class:`~megatron_unicron.megatron.train.Trainer`:

* after an iteration commits (every ``--unicron-snapshot-interval`` N iterations) it hands this rank's
  live shards (``state.live_shards``: views, no copy; listed once per generation) and the small
  trainer-level state (progress, LR schedule, RNG, sharded objects, common optimizer state) to the
  background :class:`~megatron_unicron.snapshot.writer.SnapshotWriter`; with
  ``--use-distributed-optimizer`` the optimizer's shards are this rank's flat ranges
  (``distopt_state.optimizer_shards``, described locally: no collective) plus its Adam step;
* before the next optimizer step it waits for that copy to finish: the only stall, measured in
  :attr:`SnapshotService.stalls`; the step guard then takes its pre-step copy from that snapshot
  (:meth:`SnapshotService.kept_copy`) instead of copying the same tensors again;
* every ``--unicron-persist-interval`` M snapshots (iteration N·M, the same on every rank) it starts an
  asynchronous torch_dist checkpoint to ``--save`` and finalises it (collectively) N iterations later or
  at the last iteration, so ``latest_checkpointed_iteration.txt`` advances without a synchronous save.

A transition calls :meth:`quiesce` before it changes any state; the shard list is rebuilt for the new
generation. Snapshots need ``--unicron``.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_unicron.errors import ConfigError
from megatron_unicron.megatron import distopt_state
from megatron_unicron.megatron.state import CapturedState, live_shards
from megatron_unicron.snapshot.layout import DIR_ENV, SlotDirectory, node_dir, rank_dir
from megatron_unicron.snapshot.writer import SnapshotRequest, SnapshotWriter

if TYPE_CHECKING:
    from megatron_unicron.megatron.args import MegatronArgs
    from megatron_unicron.megatron.async_save import AsyncCheckpoint, AsyncCheckpointer
    from megatron_unicron.megatron.guard import KeptCopy
    from megatron_unicron.megatron.train import Generation, Trainer

logger = logging.getLogger(__name__)


def check_config(args: MegatronArgs) -> bool:
    """Whether snapshots run for ``args``; raises ConfigError for settings that cannot work."""
    config = args.unicron
    if config.persist_interval and not config.snapshot_interval:
        raise ConfigError(
            f"--unicron-persist-interval {config.persist_interval} persists every M snapshots: "
            "also set --unicron-snapshot-interval N"
        )
    if config.persist_interval and not args.save:
        raise ConfigError(
            f"--unicron-persist-interval {config.persist_interval} writes checkpoints to --save: "
            "give --save DIR"
        )
    if not config.snapshot_interval:
        return False
    if not config.enabled:
        raise ConfigError(
            f"--unicron-snapshot-interval {config.snapshot_interval} needs --unicron "
            "(snapshots are restored by its transitions)"
        )
    return True


@dataclass
class _LiveState:
    generation: weakref.ref[Generation]  # not a strong reference: it holds the layout's process groups
    live: CapturedState
    layout: tuple[int, int, int]
    coords: tuple[int, int, int]
    flat: tuple[list[distopt_state.FlatMeta], list[Any]] | None = None
    """The DistributedOptimizer's shards (flat ranges) and their live views, when it is one."""


def start_service(trainer: Trainer, *, launch_rank: int, node: str) -> SnapshotService | None:
    """The worker's snapshot service, or None when snapshots are off (raises ConfigError on bad settings).

    The directory is the node's, as the agent publishes it (``UNICRON_SNAPSHOT_DIR``); without an agent
    (another launcher) it is ``<root>/<job>/<node>``, which nothing removes at the end.
    """
    if not check_config(trainer.args):
        return None
    given = os.environ.get(DIR_ENV)
    if not given:
        logger.warning(
            "unicron: %s is not set (not started by unicron-run): snapshots stay in %s after the job",
            DIR_ENV, node_dir(trainer.env.job, node),
        )  # fmt: skip
    directory = Path(given) if given else node_dir(trainer.env.job, node)
    job = trainer.env.job
    return SnapshotService(trainer, directory=directory, job=job, node=node, launch_rank=launch_rank)


class SnapshotService:
    """One worker's snapshots (and their asynchronous persistence); see the module docstring."""

    def __init__(
        self, trainer: Trainer, *, directory: Path, job: str, node: str, launch_rank: int
    ) -> None:
        args = trainer.args
        self.trainer = trainer
        self.interval = args.unicron.snapshot_interval
        """Snapshot every this many iterations (0: none); may be changed between iterations."""
        self.persist_every = args.unicron.persist_interval
        self.node_directory = directory
        self.directory = SlotDirectory(rank_dir(directory, launch_rank))
        self.writer = SnapshotWriter(self.directory, job=job, node=node, launch_rank=launch_rank)
        self.stalls: list[float] = []
        """Seconds the optimizer step waited for a snapshot copy, one entry per snapshot."""
        self.persisted: list[int] = []
        self._live: _LiveState | None = None
        self._persist: AsyncCheckpoint | None = None
        self._checkpointer: AsyncCheckpointer | None = None
        self._waited = True
        trainer.before_step_hooks.append(self.before_step)
        trainer.after_commit_hooks.append(self.after_commit)
        trainer.guard.copy_source = self.kept_copy
        trainer.snapshots = self
        logger.info(
            "unicron: in-memory snapshot every %d iteration(s)%s in %s", self.interval,
            f", persisted every {self.persist_every} snapshot(s) to {args.save}" * bool(self.persist_every),
            self.directory.path,
        )  # fmt: skip

    # ------------------------------------------------------------------ trainer hooks
    def after_commit(self) -> None:
        """After iteration i committed: finalise a due persist, snapshot if N divides i, persist if due."""
        args = self.trainer.args
        iteration = self.trainer.progress.iteration
        last = iteration >= args.train_iters or bool(
            args.exit_interval and iteration % args.exit_interval == 0
        )
        pending = self._persist
        if pending is not None and (last or iteration >= pending.iteration + max(self.interval, 1)):
            self._finalize(pending)
        if not self.interval or iteration % self.interval:
            return
        self._snapshot(iteration)
        regular_save = bool(args.save and args.save_interval and iteration % args.save_interval == 0)
        if self.persist_every and (iteration // self.interval) % self.persist_every == 0 and not (
                last or regular_save or self._persist is not None):
            self._start_persist()

    def before_step(self) -> None:
        """Wait for the snapshot copy (the optimizer is about to change what it reads)."""
        if not self._waited:
            self.stalls.append(self.writer.wait())
            self._waited = True

    def kept_copy(self, iteration: int) -> KeptCopy | None:
        """The step guard's source: the finished snapshot of ``iteration`` (committed count), if any."""
        newest = self.writer.newest
        if not self._waited or newest is None or newest.iteration != iteration:
            return None
        return newest

    # ------------------------------------------------------------------ transitions and the end
    def quiesce(self) -> None:
        """Before a transition changes any state: finish the copy; drop an unfinished persist."""
        self.before_step()
        self.writer.newest = None  # the state is about to change under it
        self._live = None
        self._abandon_persist("a transition started")

    def close(self) -> None:
        """End of training: finish the copy, stop the writer (the files stay for the agent)."""
        self.before_step()
        self._live = None
        self._abandon_persist("training ended first")
        self.writer.close()

    # ------------------------------------------------------------------ internals
    def _live_state(self) -> _LiveState:
        gen = self.trainer.generation
        assert gen is not None, "snapshot without a generation"
        if self._live is None or self._live.generation() is not gen:
            c = gen.coords
            distopt = distopt_state.uses_distributed_optimizer(gen.bundle)
            live = live_shards(gen.bundle, self.trainer.args, optimizer=not distopt)
            flat = distopt_state.optimizer_shards(gen.bundle, self.trainer.args) if distopt else None
            layout, coords = (c.tp_size, c.pp_size, c.dp_size), (c.tp_rank, c.pp_rank, c.dp_rank)
            self._live = _LiveState(weakref.ref(gen), live, layout, coords, flat)
        return self._live

    def _snapshot(self, iteration: int) -> None:
        from megatron_unicron.megatron.guard import RngState

        current = self._live_state()
        gen = self.trainer.generation
        assert gen is not None
        state: dict[str, Any] = {
            "progress": vars(self.trainer.progress).copy(),
            "scheduler": gen.bundle.scheduler.state_dict(),
            "rng": RngState.capture(),
            "objects": current.live.objects,
            "common": current.live.common,  # its optimizer step aliases the live one: pickled before the step
        }
        flat_metas, flat_tensors = current.flat if current.flat is not None else ((), ())
        if current.flat is not None:
            state["adam_step"] = distopt_state.adam_step(gen.bundle)
        self.writer.submit(SnapshotRequest(
            iteration=iteration, generation=gen.number, layout=current.layout, coords=current.coords,
            metas=current.live.metas, tensors=current.live.tensors, state=state,
            flat_metas=flat_metas, flat_tensors=flat_tensors,
        ))  # fmt: skip
        self._waited = False

    def _start_persist(self) -> None:
        from megatron_unicron.megatron.async_save import AsyncCheckpointer

        if self._checkpointer is None:
            self._checkpointer = AsyncCheckpointer()
        assert self.trainer.args.save is not None
        self._persist = self._checkpointer.start(self.trainer.args.save, self.trainer, self.trainer.args)
        logger.info(
            "unicron: persisting iteration %d to %s in the background (planned in %.3fs)",
            self._persist.iteration, self.trainer.args.save, self._persist.plan_seconds,
        )  # fmt: skip

    def _finalize(self, pending: AsyncCheckpoint) -> None:
        started = time.perf_counter()
        self._persist = None
        from megatron_unicron.megatron.async_save import PersistFailed

        try:
            pending.finalize()
        except PersistFailed as error:  # a failed write: the checkpoint stays incomplete, training goes on
            logger.error("unicron: %s", error)
            return
        self.persisted.append(pending.iteration)
        logger.info(
            "unicron: persisted iteration %d to %s (finalised in %.3fs)",
            pending.iteration, pending.root, time.perf_counter() - started,
        )  # fmt: skip

    def _abandon_persist(self, why: str) -> None:
        pending, self._persist = self._persist, None
        if pending is not None:
            pending.wait()  # its own files only; the checkpoint never becomes the newest
            logger.warning("unicron: checkpoint of iteration %d abandoned: %s", pending.iteration, why)
