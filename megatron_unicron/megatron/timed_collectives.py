"""Timed collectives: every collective and point-to-point wait of a step gets an adaptive timeout.

On gloo nothing aborts a blocked operation (not ``abort()``, not destroying the group): a rank waiting
for a stopped peer blocks until the process group's own timeout, 10-30 minutes by default. This patch
issues megatron's collectives (and the project's own) asynchronously and waits for them with a timeout
that follows the statistics of that operation (``detect.watchdog``): a wait that expires raises
:class:`CollectiveTimeout` in the training thread, in-band, within seconds; the recovery then abandons
the group without blocking (``groups.abandon_world``). Operations inside megatron's coalescing manager
are waited as one, through a timed version of ``_coalescing_manager``.

A wait also ends early once the job has decided the next generation (``apply``'s ``superseded``): a
rank blocked on a peer that failed then follows the decision within a slice (``SLICE_S``) instead of
waiting out its timeout, and raises :class:`Superseded`, which it does not report (the incident is
decided already). Collectives are waited in slices; point-to-point works are not: a gloo send or recv
whose wait times out closes its connection (measured), so a slice would break a healthy pipeline.

Gloo's reduce-scatter (alone or coalesced, as the DistributedOptimizer issues it) ignores the timeout
given to ``wait``: its work runs inside ``wait`` and blocks until the group's own timeout (measured). Such
a work is waited on a helper thread while the training thread keeps the adaptive timeout; after a
timeout the helper stays blocked, holding the abandoned work, until the group's timeout ends it.

With NCCL the wait is not timed here (a CUDA stream cannot be waited for from the CPU without a
synchronize); the iteration monitor reports the hang and aborts the communicators instead
(``groups.abort_communicators``).

Patched: ``torch.distributed.{all_reduce, all_gather_into_tensor, reduce_scatter_tensor, all_gather,
broadcast, barrier, batch_isend_irecv}`` (megatron's pipeline uses batched p2p by default;
``isend``/``irecv`` themselves stay untouched because ``P2POp`` checks their identity) and
``megatron.core.distributed.param_and_grad_buffer._coalescing_manager``. Revertible.

The wrapper runs on every collective of a step (some 50 per iteration at TP 2), so its path is kept
short: each kind of operation's key and statistics are found in one lookup (``_Kinds``), a synchronous
caller's first slice is waited inline, and a plain synchronous ``all_reduce`` (most of them) is issued
to the group's backend directly, as torch's ``all_reduce`` does after its checks, instead of through
that front-end as well as this one.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from megatron_unicron.detect.watchdog import AdaptiveTimeouts, RunningMean
from megatron_unicron.megatron.patching import PatchSet, PatchSite

COLLECTIVES = (
    "all_reduce",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_gather",
    "broadcast",
    "barrier",
)

SITES: tuple[PatchSite, ...] = (
    *(PatchSite("torch.distributed", name, "waited with an adaptive timeout") for name in COLLECTIVES),
    PatchSite("torch.distributed", "batch_isend_irecv", "pipeline p2p: each request waited with a timeout"),
    PatchSite(
        "megatron.core.distributed.param_and_grad_buffer",
        "_coalescing_manager",
        "DDP bucket reductions are waited as one coalesced work",
    ),
)

_PATCHES = PatchSet("megatron_unicron timed collectives")
_waiting = [0]  # how many timed waits are in progress (read by the iteration monitor's thread)
_superseded: list[Callable[[], bool] | None] = [None]  # set by apply: is the next generation decided?

SLICE_S = 0.05
"""How often a collective's wait checks whether the next generation was decided meanwhile."""

SUPERSEDED_AFTER_S = 0.2
"""A wait asks only once it has lasted this long: a healthy wait for a pipeline's other stages often
outlasts a slice, and an incident is not decided sooner than this after its fault (the settle window)."""

_FIRST_SLICE = timedelta(seconds=SLICE_S)

# c10d's own message when ``Work.wait(timeout)`` expires; the work is still pending and can be waited again.
_WAIT_EXPIRED = "operation timed out"


def in_timed_wait() -> bool:
    """Whether some thread is inside a timed wait now (it will time out by itself if stuck)."""
    return _waiting[0] > 0


class CollectiveTimeout(RuntimeError):
    """A collective or point-to-point operation exceeded its adaptive timeout (a hang or a lost peer)."""

    def __init__(self, op: str, group_ranks: tuple[int, ...], waited_s: float, timeout_s: float) -> None:
        super().__init__(
            f"Timed out waiting {timeout_s * 1000:.0f}ms for {op} on ranks {list(group_ranks)} "
            f"(waited {waited_s:.2f}s; adaptive timeout)"
        )
        self.op = op
        self.group_ranks = group_ranks


class Superseded(RuntimeError):
    """A wait left early because the job decided the next generation meanwhile (not a new fault)."""

    def __init__(self, op: str, group_ranks: tuple[int, ...], waited_s: float) -> None:
        super().__init__(
            f"left the wait for {op} on ranks {list(group_ranks)} after {waited_s:.2f}s: "
            "the next generation is decided"
        )
        self.op = op
        self.group_ranks = group_ranks


def _group_ranks(group: Any) -> tuple[int, ...]:
    try:
        if group is None or group is dist.group.WORLD:
            return tuple(range(dist.get_world_size()))
        return tuple(dist.get_process_group_ranks(group))
    except (RuntimeError, ValueError):
        return ()


class _Slot:
    """One kind of timed operation (name, group, size): its statistics key and live statistics."""

    __slots__ = ("epoch", "group", "key", "stats")

    def __init__(self, group: weakref.ref[Any], key: tuple[Any, ...], timeouts: AdaptiveTimeouts) -> None:
        self.group = group
        self.key = key
        self.epoch = timeouts.epoch
        self.stats = timeouts.stats(key)


class _Kinds:
    """The slot of each kind of operation, found on every timed operation without rebuilding its key.

    Keyed by the group object's identity and the size; a slot holds its group weakly (an abandoned group
    is not kept alive by it) and leaves the table when the group is collected. A slot from before the
    statistics' last reset, or of an earlier group that had the same identity, is replaced.
    """

    def __init__(self, timeouts: AdaptiveTimeouts) -> None:
        self.timeouts = timeouts
        self.slots: dict[tuple[str, int, int], _Slot] = {}

    def find(self, name: str, group: Any, numel: int) -> _Slot | None:
        """The slot of ``name`` on ``group`` (``None``: the default group) for ``numel`` elements;
        ``None`` without a process group, or when this rank is not a member of ``group``."""
        target = dist.distributed_c10d._world.default_pg if group is None else group
        if not isinstance(target, dist.ProcessGroup):  # no world yet, or not a member of ``group``
            return None
        index = (name, id(target), numel)
        slot = self.slots.get(index)
        if slot is None or slot.epoch != self.timeouts.epoch or slot.group() is not target:
            slots = self.slots
            reference = weakref.ref(target, lambda _: slots.pop(index, None))
            slot = slots[index] = _Slot(reference, (name, _group_ranks(target), numel), self.timeouts)
        return slot


def _numel(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    if args and isinstance(args[0], torch.Tensor):  # the common case, asked first: it is asked per call
        return args[0].numel()
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.numel()
        if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            return sum(t.numel() for t in value)
    return 0


def _in_coalescing(group: Any) -> bool:
    state = dist.distributed_c10d._world.pg_coalesce_state
    if not state:
        return False
    target = dist.distributed_c10d._get_default_group() if group is None else group
    return target in state


class TimedWork:
    """A ``Work`` whose ``wait()`` uses the adaptive timeout and records the operation's duration.

    ``blocking``: the works' own ``wait(timeout)`` does not return at the timeout (gloo's reduce-scatter);
    they are waited on a helper thread.
    """

    def __init__(
        self, works: list[Any], key: tuple[Any, ...], timeouts: AdaptiveTimeouts, *, sliced: bool = True,
        blocking: bool = False, stats: RunningMean | None = None, issued: float | None = None,
    ) -> None:
        self._works = [w for w in works if w is not None]
        self._key = key
        self._timeouts = timeouts
        self._stats = timeouts.stats(key) if stats is None else stats
        self._issued = time.monotonic() if issued is None else issued
        self._done = False
        self._sliced = sliced
        self._blocking = blocking

    def wait(self, timeout: timedelta | None = None) -> bool:
        """Wait for completion; raise CollectiveTimeout when the adaptive timeout expires first."""
        if self._done:
            return True
        limit = self._timeouts.timeout_of(self._stats)
        if timeout is not None:
            limit = min(limit, timeout.total_seconds())
        deadline = self._issued + limit
        superseded = _superseded[0] if self._sliced else None
        _waiting[0] += 1
        try:
            if self._blocking:
                self._wait_on_helper(deadline, limit, superseded)
            else:
                for work in self._works:
                    self._wait_one(work, deadline, limit, superseded)
        finally:
            _waiting[0] -= 1
        self._done = True
        self._stats.add(time.monotonic() - self._issued)
        return True

    def _wait_one(
        self, work: Any, deadline: float, limit: float, superseded: Callable[[], bool] | None
    ) -> None:
        while True:
            remaining = max(deadline - time.monotonic(), 0.001)
            chunk = remaining if superseded is None else min(remaining, SLICE_S)
            try:
                work.wait(timedelta(seconds=chunk))
                return
            except RuntimeError as error:
                self._raise_unless_expired(error, limit)
                self._leave_if_due(deadline, limit, superseded, cause=error)

    def resume(self, error: RuntimeError) -> None:
        """Go on waiting after a first slice that the caller waited itself and that ended with ``error``."""
        self._raise_unless_expired(error, self._timeouts.timeout_of(self._stats))
        self.wait()

    def _raise_unless_expired(self, error: RuntimeError, limit: float) -> None:
        """Return when ``error`` says only that a slice of the wait expired (the work still pending)."""
        message = str(error).lower()
        if "timed out" not in message:
            raise error
        if _WAIT_EXPIRED not in message:  # gloo's own timeout: the work is over
            waited = time.monotonic() - self._issued
            raise CollectiveTimeout(self._key[0], self._key[1], waited, limit) from error

    def _leave_if_due(
        self, deadline: float, limit: float, superseded: Callable[[], bool] | None,
        cause: BaseException | None = None,
    ) -> None:
        """Raise CollectiveTimeout once ``deadline`` has passed, Superseded once the next generation is
        decided (asked only after ``SUPERSEDED_AFTER_S``); else return to wait another slice."""
        waited = time.monotonic() - self._issued
        if time.monotonic() >= deadline:
            raise CollectiveTimeout(self._key[0], self._key[1], waited, limit) from cause
        if superseded is not None and waited >= SUPERSEDED_AFTER_S and superseded():
            raise Superseded(self._key[0], self._key[1], waited) from cause

    def _wait_on_helper(self, deadline: float, limit: float, superseded: Callable[[], bool] | None) -> None:
        finished = threading.Event()
        failures: list[Exception] = []

        def wait_all(works: list[Any]) -> None:
            try:
                for work in works:
                    work.wait()
            except Exception as error:  # handed to the training thread, or dropped once it has left
                failures.append(error)
            finally:
                finished.set()

        helper = threading.Thread(target=wait_all, args=(self._works,), name="unicron-blocking-wait")
        helper.daemon = True  # a work abandoned at its timeout may block until the group's timeout
        helper.start()
        while True:
            remaining = deadline - time.monotonic()
            if finished.wait(max(0.0, min(remaining, SLICE_S) if superseded else remaining)):
                break
            self._leave_if_due(deadline, limit, superseded)
        if failures:
            raise failures[0]

    def is_completed(self) -> bool:
        """Whether every underlying work completed."""
        return all(w.is_completed() for w in self._works)

    def get_future(self) -> Any:
        """The underlying work's future (single-work only)."""
        return self._works[0].get_future()

    def result(self) -> Any:
        """The underlying work's result (single-work only)."""
        return self._works[0].result()


def _wait_inline(work: Any, slot: _Slot, timeouts: AdaptiveTimeouts, issued: float) -> None:
    """Wait for a synchronous caller's work: its first slice here, without a TimedWork (nearly every call
    of a step comes this way, some 50 per iteration, and on loaded cores each line of it counts); the
    rest, if it takes longer, through a TimedWork."""
    _waiting[0] += 1
    try:
        work.wait(_FIRST_SLICE)
    except RuntimeError as error:
        TimedWork([work], slot.key, timeouts, stats=slot.stats, issued=issued).resume(error)
        return
    finally:
        _waiting[0] -= 1
    slot.stats.add(time.monotonic() - issued)


def _inline_waits(timeouts: AdaptiveTimeouts) -> bool:
    """Whether a first slice never outlasts a timeout of ``timeouts`` (else every wait goes through a
    TimedWork)."""
    return min(timeouts.policy.min_timeout_s, timeouts.policy.warmup_floor_s) >= SLICE_S


def _timed_collective(
    name: str, original: Callable[..., Any], timeouts: AdaptiveTimeouts, kinds: _Kinds
) -> Callable[..., Any]:
    # Positions of ``group`` and ``async_op`` in the signature, read once: ``inspect.Signature.bind`` on
    # every call would cost more than the gloo call itself for a small tensor.
    names = list(inspect.signature(original).parameters)
    group_at, async_at = names.index("group"), names.index("async_op")
    blocking = name == "reduce_scatter_tensor"
    inline = _inline_waits(timeouts) and not blocking
    coalescing = dist.distributed_c10d._world.pg_coalesce_state  # one dict for the life of the process

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        group = args[group_at] if len(args) > group_at else kwargs.get("group")
        if coalescing and _in_coalescing(group):
            return original(*args, **kwargs)
        slot = kinds.find(name, group, _numel(args, kwargs))
        if slot is None:  # no process group, or not a member of it: torch's own answer
            return original(*args, **kwargs)
        if len(args) > async_at:
            caller_async = bool(args[async_at])
            args = (*args[:async_at], True, *args[async_at + 1 :])
        else:
            caller_async = bool(kwargs.get("async_op", False))
            kwargs["async_op"] = True
        work = original(*args, **kwargs)
        issued = time.monotonic()
        if caller_async or not inline or work is None:
            timed = TimedWork([work], slot.key, timeouts, blocking=blocking, stats=slot.stats, issued=issued)
            if caller_async:
                return timed
            timed.wait()
            return None
        _wait_inline(work, slot, timeouts, issued)
        return None

    return wrapper


def _timed_all_reduce(
    timed: Callable[..., Any], timeouts: AdaptiveTimeouts, kinds: _Kinds
) -> Callable[..., Any]:
    """``all_reduce`` of a synchronous caller, the bulk of a step's collectives (tensor-parallel layers,
    losses, gradient norms), issued to the group's backend here, as torch's own ``all_reduce`` issues it
    after its checks; that front-end and this wrapper's would otherwise both run on every call. Any
    other call (asynchronous, inside a coalescing block, a tensor subclass or complex tensor, no group or
    not a member) goes through ``timed``, the general timed collective."""
    inline = _inline_waits(timeouts)
    coalescing = dist.distributed_c10d._world.pg_coalesce_state
    says_async = hasattr(dist.AllreduceOptions(), "asyncOp")  # an older torch has no such field

    @functools.wraps(timed)
    def all_reduce(
        tensor: Any, op: Any = dist.ReduceOp.SUM, group: Any = None, async_op: bool = False
    ) -> Any:
        if async_op or coalescing or not inline or type(tensor) is not torch.Tensor or tensor.is_complex():
            return timed(tensor, op, group, async_op)
        slot = kinds.find("all_reduce", group, tensor.numel())
        target = slot.group() if slot is not None else None
        if slot is None or target is None:
            return timed(tensor, op, group, async_op)
        options = dist.AllreduceOptions()
        options.reduceOp = op
        if says_async:
            options.asyncOp = True  # waited here, not inside the backend's call
        work = target.allreduce([tensor], options)
        _wait_inline(work, slot, timeouts, time.monotonic())

    return all_reduce


def _p2p_key(p2p_op_list: list[Any]) -> tuple[Any, ...]:
    kinds = ",".join(op.op.__name__ for op in p2p_op_list)
    peers = tuple(sorted({op.peer for op in p2p_op_list}))
    return (f"p2p[{kinds}] with", peers, sum(op.tensor.numel() for op in p2p_op_list))


def _timed_batch(original: Callable[..., Any], timeouts: AdaptiveTimeouts) -> Callable[..., Any]:
    # Each kind of batch (its operations, peers and sizes) keeps its statistics key and running mean
    # from the statistics' current epoch, found in one lookup per call as the collectives' slots are.
    known: dict[tuple[Any, ...], tuple[tuple[Any, ...], RunningMean]] = {}
    epoch = [timeouts.epoch]

    @functools.wraps(original)
    def wrapper(p2p_op_list: list[Any]) -> list[Any]:
        works = original(p2p_op_list)
        if epoch[0] != timeouts.epoch:
            known.clear()
            epoch[0] = timeouts.epoch
        index = tuple((op.op, op.peer, op.tensor.numel()) for op in p2p_op_list)
        found = known.get(index)
        if found is None:
            key = _p2p_key(p2p_op_list)
            found = known[index] = (key, timeouts.stats(key))
        return [TimedWork(list(works), found[0], timeouts, sliced=False, stats=found[1])]

    return wrapper


class _TimedCoalescing:
    """Stand-in for torch's ``_CoalescingManager``: its ``wait()`` is timed."""

    def __init__(self, timeouts: AdaptiveTimeouts, key: tuple[Any, ...]) -> None:
        self.works: list[Any] = []
        self._timeouts = timeouts
        self._key = key
        self._timed: TimedWork | None = None
        self.blocking = True

    def append(self, work: Any) -> None:
        self.works.append(work)

    def wait(self) -> None:
        if self._timed is None:
            self._timed = TimedWork(self.works, self._key, self._timeouts, blocking=self.blocking)
        self._timed.wait()


def _coalesces_reduce_scatter(group: Any) -> bool:
    """Whether the coalescing block open on ``group`` holds a reduce-scatter (True when it cannot tell:
    ops issued straight to the backend leave no record)."""
    target = dist.distributed_c10d._get_default_group() if group is None else group
    ops = dist.distributed_c10d._world.pg_coalesce_state.get(target) or []
    return not ops or any(op.op.__name__.startswith("reduce_scatter") for op in ops)


def _timed_coalescing_manager(
    original: Callable[..., Any], timeouts: AdaptiveTimeouts, kinds: _Kinds
) -> Callable[..., Any]:
    @contextlib.contextmanager
    def manager(group: Any = None, device: Any = None, async_ops: bool = False) -> Iterator[Any]:
        slot = kinds.find("coalesced", group, 0)
        proxy = _TimedCoalescing(timeouts, slot.key if slot is not None else ("coalesced", (), 0))
        with original(group, device, async_ops=True) as inner:
            yield proxy
            proxy.blocking = _coalesces_reduce_scatter(group)
        proxy.works = list(inner.works)
        if not async_ops:
            proxy.wait()

    return manager


def apply(timeouts: AdaptiveTimeouts, superseded: Callable[[], bool] | None = None) -> None:
    """Time every collective and p2p wait with ``timeouts`` (idempotent: re-applying swaps the policy).

    ``superseded``, when given, is asked every ``SLICE_S`` by a collective still waiting: True ends the
    wait with :class:`Superseded`. It must answer from memory (it runs on the training thread).
    """
    if torch.cuda.is_available():
        return
    revert()
    _superseded[0] = superseded
    import megatron.core.distributed.param_and_grad_buffer as buffers

    kinds = _Kinds(timeouts)  # one table for every timed operation of this policy
    timed = {name: _timed_collective(name, getattr(dist, name), timeouts, kinds) for name in COLLECTIVES}
    timed["all_reduce"] = _timed_all_reduce(timed["all_reduce"], timeouts, kinds)
    for name, wrapper in timed.items():
        _PATCHES.replace(dist, name, wrapper)
    _PATCHES.replace(dist, "batch_isend_irecv", _timed_batch(dist.batch_isend_irecv, timeouts))
    manager = _timed_coalescing_manager(buffers._coalescing_manager, timeouts, kinds)
    _PATCHES.replace(buffers, "_coalescing_manager", manager)


def revert() -> int:
    """Restore the original functions."""
    _superseded[0] = None
    return _PATCHES.revert()


def is_applied() -> bool:
    """Whether collectives are currently timed."""
    return _PATCHES.applied
