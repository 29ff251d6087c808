"""Carries out a decision in a worker: leave the old generation, form the new one, move state, resume.

Every live process of the job runs :func:`run_transition` with the same :class:`Decision`:

1. *Agree on the iteration.* Each process posts how many iterations it has committed; all resume from
   the oldest. A process one step ahead undoes its last step from its step guard; a process that was in
   the middle of an iteration rewinds that iteration's RNG.
2. *Capture* its state to CPU memory (no communication: the old groups may be broken), then leave the
   old generation (destroy healthy groups, abandon broken ones without blocking).
3. *Members* of the new generation form its world group and megatron groups and build model, DDP,
   optimizer and scheduler for the new layout; warm spares do not.
4. Every live process *posts* what it holds (and members what they need) to the store; all compute the
   same nearest-copy plan (:mod:`megatron_unicron.transition.transfer_plan`).
5. The *exchange* runs over the new world group (or, when spares serve too, a private gloo channel of
   all live processes), every piece checksummed. Every process posts which sources sent it a buffer
   that failed its checksum; if any did, all plan again without those ranks (the next replica, else
   snapshots, else the checkpoint) and exchange again. Then members load the result, and the
   trainer-level state (data position, LR schedule, RNG of the same (TP, PP) position when the TP/PP
   degrees are unchanged).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import pickle
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from megatron_unicron.events import Decision
from megatron_unicron.megatron import distopt_state
from megatron_unicron.megatron import state as mstate
from megatron_unicron.megatron.guard import RngState, restore_scheduler
from megatron_unicron.snapshot import ladder
from megatron_unicron.store import Store
from megatron_unicron.transition import exchange
from megatron_unicron.transition.flat_plan import FlatHolding, FlatNeed, plan_pieces
from megatron_unicron.transition.transfer_plan import (
    Holding,
    Need,
    SourceKind,
    Tier,
    UncoveredError,
)

if TYPE_CHECKING:
    from megatron_unicron.megatron.guard import StepGuard
    from megatron_unicron.megatron.progress import IterationStats
    from megatron_unicron.megatron.train import Trainer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransitionReport:
    """Timings (seconds) and volumes of one transition on one process."""

    generation: int
    layout: str
    member: bool
    resume_iteration: int
    seconds: dict[str, float]
    bytes_moved: int  # received by this process from other processes
    bytes_needed: int  # what this process needed and did not hold itself (the minimum to move)
    bytes_by_tier: dict[str, int] = field(default_factory=dict)


@dataclass
class _Post:
    """What one process tells the others before planning (metadata and small state only)."""

    committed: int
    node: str
    holdings: list[mstate.ShardMeta]
    needs: list[mstate.ShardMeta]
    coords: tuple[int, int, int, int] | None  # (tp_size, pp_size, tp_rank, pp_rank) of the captured state
    flat_holdings: list[distopt_state.FlatMeta] = field(default_factory=list)
    flat_needs: list[distopt_state.FlatMeta] = field(default_factory=list)
    adam_step: float | None = None
    objects: dict[tuple[str, tuple[int, ...]], Any] | None = None
    common: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None
    rng: RngState | None = None
    recent_stats: list[IterationStats] = field(default_factory=list)


class _Posts:
    """Pickled posts of one transition step on the store, one key per process."""

    def __init__(self, store: Store, prefix: str, timeout: timedelta) -> None:
        self.store = store
        self.prefix = prefix
        self.timeout = timeout

    def put(self, step: str, rank: int, value: Any) -> None:
        self.store.set(f"{self.prefix}/{step}/{rank}", pickle.dumps(value))

    def exchange(self, step: str, rank: int, count: int, value: Any) -> dict[int, Any]:
        """Post ``value`` for ``rank`` and return every one of the ``count`` processes' posts."""
        self.put(step, rank, value)
        return self.gather(step, list(range(count)))

    def gather(self, step: str, ranks: list[int]) -> dict[int, Any]:
        keys = [f"{self.prefix}/{step}/{r}" for r in ranks]
        self.store.wait(keys, self.timeout)
        return {r: pickle.loads(self.store.get(k, self.timeout)) for r, k in zip(ranks, keys)}


def _exchange_channel(trainer: Trainer, decision: Decision, prefix: str, me: int, timeout: timedelta) -> Any:
    """The process group the exchange runs on: the new world group when every live process is a member in
    the same order (its connections are up already: one full mesh less to form), else a private gloo
    group of all live processes, spares included."""
    if tuple(decision.live) == tuple(decision.members):
        return dist.distributed_c10d._get_default_group()
    store = dist.PrefixStore(prefix, trainer.store.c10d_store)
    return dist.ProcessGroupGloo(store, me, len(decision.live), timeout)


def _align(trainer: Trainer, guard: StepGuard, target: int, in_flight: bool) -> None:
    """Bring this process's state to the end of iteration ``target`` (committed count).

    ``in_flight``: an iteration was interrupted (its RNG draws are undone); a planned transition
    happens between iterations and has nothing to undo.
    """
    progress = trainer.progress
    gen = trainer.generation
    if progress.iteration == target + 1 and gen is not None and guard.can_undo_step(target):
        guard.undo_step(gen.bundle, progress)
    elif progress.iteration == target:
        if in_flight:
            guard.rewind_in_flight()
    else:
        raise RuntimeError(
            f"cannot align: this process committed {progress.iteration} iterations, the job resumes "
            f"after {target} and no step copy bridges the gap"
        )


def _clip(box: tuple[tuple[int, int], ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...] | None:
    return mstate.clip_to(box, shape)


def _from_checkpoint(
    trainer: Trainer,
    decision: Decision,
    new_rank: int | None,
    seconds: dict[str, float],
    lap: Any,
    why: str,
) -> TransitionReport:
    from megatron_unicron.megatron import checkpoint

    if trainer.snapshots is not None and decision.live and decision.live[0] == trainer.env.rank:
        target = checkpoint.read_tracker(trainer.args.save) if trainer.args.save else None
        if target is not None:  # every later snapshot is of an abandoned past
            ladder.record_rollback(trainer.store, trainer.env.job, decision.generation, target)
    save = trainer.args.save
    if not save or checkpoint.read_tracker(save) is None:
        raise RuntimeError(f"state lost and no checkpoint to fall back to ({why}); configure --save")
    logger.warning("unicron: %s; every member reloads the newest checkpoint in %s", why, save)
    if new_rank is not None:
        checkpoint.load(save, trainer, trainer.args)
    lap("checkpoint")
    return TransitionReport(
        generation=decision.generation,
        layout=str(decision.layout),
        member=new_rank is not None,
        resume_iteration=trainer.progress.iteration,
        seconds=seconds,
        bytes_moved=0,
        bytes_needed=0,
        bytes_by_tier={"checkpoint": 1},
    )


def _capture(
    trainer: Trainer, guard: StepGuard, broken: bool
) -> tuple[mstate.CapturedState | None, Any, float | None, tuple[int, int, int, int] | None, dict[str, Any]]:
    """This process's state (CPU copies), its DistributedOptimizer shards, and its trainer-level state."""
    if trainer.generation is None:
        return None, None, None, None, {}
    gen = trainer.generation
    c = gen.coords
    distopt = distopt_state.uses_distributed_optimizer(gen.bundle)
    captured = mstate.capture(gen.bundle, trainer.args, optimizer=not distopt)
    flat = None
    step = None
    if distopt:
        metas, views = distopt_state.optimizer_shards(gen.bundle, trainer.args)
        flat = (metas, [v.clone() for v in views])
        step = distopt_state.adam_step(gen.bundle)
    own = dict(
        scheduler=gen.bundle.scheduler.state_dict(),
        progress=vars(trainer.progress).copy(),
        rng=RngState.capture() if not broken else guard.iteration_start,
        recent_stats=list(trainer.recent_stats),
    )
    return captured, flat, step, (c.tp_size, c.pp_size, c.tp_rank, c.pp_rank), own


def _target_views(
    everyone: dict[int, _Post], me: int, targets: mstate.Targets | None, flat_needs: Any
) -> list[torch.Tensor]:
    """This process's target buffers by need index: model/optimizer boxes (clipped), then flat ranges."""
    views = [torch.empty(0)] * (len(targets.tensors) if targets else 0)  # placeholders for clipped-out
    if targets is not None:
        shape_of = _global_shapes(everyone)
        for j, meta in enumerate(everyone[me].needs):
            box = _clip(meta.box, shape_of.get(meta.key, meta.global_shape))
            if box is not None:
                local = tuple(slice(a - o, b - o) for (a, b), (o, _) in zip(box, meta.box))
                views[j] = targets.tensors[j][local]
    return views + (list(flat_needs[1]) if flat_needs else [])


def _global_shapes(everyone: dict[int, _Post]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for post in everyone.values():
        for meta in post.holdings:
            shapes.setdefault(meta.key, meta.global_shape)
    return shapes


def _plan_inputs(
    everyone: dict[int, _Post],
) -> tuple[list[Holding], list[Need], list[FlatHolding], list[FlatNeed]]:
    """Every process's holdings and needs: boxes (model, plain optimizer), flat ranges (DistOpt state).

    A process's flat holdings are numbered after its boxes, the order of its ``sources`` list.
    """
    shape_of = _global_shapes(everyone)
    holdings, needs, flat_holdings, flat_needs = [], [], [], []
    for r, p in everyone.items():
        for i, meta in enumerate(p.holdings):
            holdings.append(Holding(r, i, meta.key, meta.box, SourceKind.LIVE, p.node))
        for i, flat in enumerate(p.flat_holdings):
            flat_holdings.append(
                FlatHolding(r, len(p.holdings) + i, flat.key, flat.box, flat.flat, SourceKind.LIVE, p.node)
            )
        for j, meta in enumerate(p.needs):
            box = _clip(meta.box, shape_of.get(meta.key, meta.global_shape))
            if box is not None:
                needs.append(Need(r, j, meta.key, box))
        for j, flat in enumerate(p.flat_needs):
            flat_needs.append(FlatNeed(r, len(p.needs) + j, flat.key, flat.box, flat.flat))
    return holdings, needs, flat_holdings, flat_needs


def _load(
    trainer: Trainer, current: list[_Post], targets: mstate.Targets, filled: ladder.Filled | None
) -> None:
    """Load what arrived, and the trainer-level state (schedule, data position, RNG of the position).

    ``current``: the posts of the processes holding the resumed iteration's state, this process's first
    (empty on a snapshot rollback); what they lack comes from the snapshots ``filled`` read.
    """
    assert trainer.generation is not None
    bundle = trainer.generation.bundle
    new = trainer.generation.coords
    position = (new.tp_size, new.pp_size, new.tp_rank, new.pp_rank)
    offers = list(filled.offers.values()) if filled else []
    snap = ladder.trainer_state(offers, filled.resume, position) if filled else None
    objects: dict[tuple[str, tuple[int, ...]], Any] = {}
    for p in current:  # small values (e.g. layers' _extra_state): any holder will do
        for key, value in (p.objects or {}).items():
            objects.setdefault(key, value)
    for key, value in (snap.objects if snap else {}).items():
        objects.setdefault(key, value)
    donor = next((p for p in current if p.common is not None and p.scheduler is not None), None)
    if donor is not None:
        assert donor.common is not None and donor.scheduler is not None and donor.progress is not None
        common, scheduler, progress = donor.common, donor.scheduler, donor.progress
    else:
        assert snap is not None, "neither a live process nor a snapshot holds the trainer state"
        common, scheduler, progress = snap.common, snap.scheduler, snap.progress
    mstate.load_targets(bundle, targets, objects, common)
    if distopt_state.uses_distributed_optimizer(bundle):
        fallback = snap.adam_step if snap else None
        step = next((p.adam_step for p in current if p.adam_step is not None), fallback)
        assert step is not None, "neither a live process nor a snapshot holds the Adam step"
        distopt_state.set_adam_step(bundle, step)
    restore_scheduler(bundle.scheduler, scheduler)
    for name, value in progress.items():
        setattr(trainer.progress, name, value)
    # Only last-stage ranks hold the loss (elsewhere it is NaN); the reported loss is reduced over DP.
    trainer.unreported = next(
        (s for p in current for s in p.recent_stats
         if s.iteration == trainer.progress.iteration and not math.isnan(s.lm_loss)),
        None,
    )  # fmt: skip
    same_position = [p.rng for p in current if p.coords == position]
    for rng in [*same_position, snap.rng if snap else None]:
        if rng is not None:
            rng.restore()
            break


def run_transition(
    trainer: Trainer,
    guard: StepGuard,
    decision: Decision,
    *,
    launch_rank: int,
    node: str,
    broken: bool,
    timeout: timedelta,
    settled_timeout: timedelta | None = None,
) -> TransitionReport:
    """Take this process into ``decision.generation``; see the module docstring.

    ``timeout`` bounds the first step, where a restarted process may still be importing; once every
    process has posted there, each later wait (posts, the exchange's channel and its transfers) is
    bounded by ``settled_timeout`` (default ``timeout``): a process that fails after the agreement then
    holds the others for seconds, not for megatron's 10 minutes, and they report it and follow the next
    decision.
    """
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = now - clock
        clock = now

    ladder.quiesce(trainer)
    live = list(decision.live)
    me = live.index(launch_rank)
    posts = _Posts(trainer.store, f"/unicron/{trainer.env.job}/transition/gen{decision.generation}", timeout)
    has_state = trainer.generation is not None
    committed = posts.exchange("committed", me, len(live), trainer.progress.iteration if has_state else -1)
    held = [c for c in committed.values() if c >= 0]
    target = min(held) if held else None  # None: every holder of the job's state is gone
    if has_state and target is not None:
        _align(trainer, guard, target, in_flight=broken)
    lap("agree")
    if settled_timeout is not None:
        posts.timeout = timeout = settled_timeout

    captured, flat_holdings_local, adam_step, coords, own = _capture(trainer, guard, broken)
    lap("capture")
    trainer.leave_generation(broken=broken)
    lap("leave")

    new_rank = decision.new_rank(launch_rank)
    targets, flat_needs_local = None, None
    if new_rank is not None:
        layout = decision.layout
        trainer.start_generation(decision.generation, new_rank, len(decision.members), layout.tp, layout.pp)
        assert trainer.generation is not None
        seconds.update(trainer.build_seconds)
        clock += sum(trainer.build_seconds.values())  # "targets": the rest of the build, then the targets
        bundle = trainer.generation.bundle
        distopt = distopt_state.uses_distributed_optimizer(bundle)
        targets = mstate.prepare_targets(bundle, trainer.args, optimizer=not distopt)
        if distopt:  # the new optimizer's (zero) state tensors are filled in place
            flat_needs_local = distopt_state.optimizer_shards(bundle, trainer.args)
    lap("targets")
    if target is None:
        return _from_checkpoint(trainer, decision, new_rank, seconds, lap,
                                "no process holds the job's state any more")

    post = _Post(
        committed=target,
        node=node,
        holdings=captured.metas if captured else [],
        needs=targets.metas if targets else [],
        coords=coords,
        objects=captured.objects if captured else None,
        common=captured.common if captured else None,
        flat_holdings=flat_holdings_local[0] if flat_holdings_local else [],
        flat_needs=flat_needs_local[0] if flat_needs_local else [],
        adam_step=adam_step,
        **own,
    )
    everyone: dict[int, _Post] = posts.exchange("state", me, len(live), post)
    rank_node = {r: p.node for r, p in everyone.items()}
    holdings, needs, flat_holdings, flat_needs = _plan_inputs(everyone)
    views = _target_views(everyone, me, targets, flat_needs_local)
    own_sources = [*(captured.tensors if captured else []),
                   *(flat_holdings_local[1] if flat_holdings_local else [])]  # fmt: skip
    excluded: frozenset[int] = frozenset()  # ranks whose state failed its checksum in an earlier round
    received = 0
    for round_ in itertools.count():
        resume, filled = target, None
        try:
            pieces: list[Any] = plan_pieces(holdings, flat_holdings, needs, flat_needs, rank_node,
                                            excluded_ranks=excluded)  # fmt: skip
        except UncoveredError as uncovered:
            # Live copies leave a hole (e.g. a dead rank without a DP replica). Every process sees the same
            # hole and takes the same next rungs: snapshots of this iteration; else every member rolls back
            # to the newest snapshots that cover everything; else all reload the newest persistent
            # checkpoint. Snapshots hold DistributedOptimizer shards as flat ranges, planned alongside.
            share = functools.partial(posts.exchange, f"snapshots.{round_}", me, len(live))
            usable = [h for h in holdings if h.rank not in excluded]  # their snapshots may still serve
            flat_usable = [h for h in flat_holdings if h.rank not in excluded]
            first = {r: len(p.holdings) + len(p.flat_holdings) for r, p in everyone.items()}
            filled = ladder.fill_hole(trainer, decision, launch_rank=launch_rank, node=node,
                                      target=target, live=usable, needs=needs, rank_node=rank_node,
                                      first_index=first, share=share, flat_live=flat_usable,
                                      flat_needs=flat_needs)  # fmt: skip
            if filled is None:
                lap("plan")
                return _from_checkpoint(trainer, decision, new_rank, seconds, lap, str(uncovered))
            pieces, resume = list(filled.plan.pieces), filled.resume
            if resume != target:
                logger.warning("unicron: %s; every member rolls back to the snapshots of iteration %d",
                               uncovered, resume)  # fmt: skip
        if me == 0 and max(committed.values()) > resume and trainer.snapshots is not None:
            ladder.record_rollback(trainer.store, trainer.env.job, decision.generation, resume)
        lap("plan" if round_ == 0 else f"plan{round_}")

        channel: Any = None
        if exchange.pairs(pieces):
            channel = _exchange_channel(trainer, decision, f"{posts.prefix}/channel{round_}", me, timeout)
        sources = [*own_sources, *(filled.tensors if filled else [])]
        tamper, trainer.transfer_tamper = trainer.transfer_tamper, None  # an injected fault fires once
        stats = exchange.execute(pieces, me, sources, views, channel=channel, timeout=timeout, tamper=tamper)
        del channel
        received += stats.received_bytes
        lap("transfer" if round_ == 0 else f"transfer{round_}")
        # Verified before anything is loaded: every process learns which sources failed their checksum.
        verdicts = posts.exchange(f"verified.{round_}", me, len(live), stats.corrupt_sources)
        suspects = frozenset(r for bad in verdicts.values() for r in bad)
        if not suspects:
            break
        why = f"state from rank(s) {sorted(suspects)} failed its checksum"
        if filled is not None or suspects <= excluded:  # the snapshots were the fallback already
            return _from_checkpoint(trainer, decision, new_rank, seconds, lap, why)
        logger.warning("unicron: %s; planning the transfer again without them", why)
        excluded |= suspects

    if targets is not None and trainer.generation is not None:
        # Live state is of the agreed iteration: on a rollback only snapshots hold the state to resume.
        current = [post] + [p for r, p in everyone.items() if r != me] if resume == target else []
        _load(trainer, current, targets, filled)
    lap("load")

    element_bytes = {id(p): views[p.dst_index].element_size() for p in pieces if p.dst_rank == me}
    needed = sum(p.numel * element_bytes[id(p)] for p in pieces if p.dst_rank == me and not p.is_local)
    by_tier: dict[str, int] = defaultdict(int)
    for piece in pieces:
        by_tier[Tier(piece.tier).name.lower()] += piece.numel
    return TransitionReport(
        generation=decision.generation,
        layout=str(decision.layout),
        member=new_rank is not None,
        resume_iteration=resume,
        seconds=seconds,
        bytes_moved=received,
        bytes_needed=needed,
        bytes_by_tier=dict(by_tier),
    )
