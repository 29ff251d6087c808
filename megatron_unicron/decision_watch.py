"""The next generation's decision, watched off the training thread.

Before every iteration a worker must know whether a planned switch (a scale-up) has been published for
the next generation. Asking the store there costs a round trip per iteration on the training thread
(about 1 ms here, 1-4 % of a CPU iteration). :class:`DecisionWatch` polls the store from a daemon thread
with its own connection instead and answers from that cache, falling back to a direct read when the
cache is older than ``stale_s``.

Why the answer is still exact enough: the coordinator announces a planned switch at least
``replan.SWITCH_AHEAD_S`` ahead of the iteration it happens at (and at least
``SWITCH_AHEAD_ITERATIONS``). At the start of any iteration a member's answer reflects the store as it
was at most ``stale_s`` (< ``SWITCH_AHEAD_S``) earlier, so every member sees the decision before the
switch's iteration and the members still switch together.

The thread polls four times a second (one store round trip each: a faster poll costs every rank CPU
for nothing). A collective that has waited on its peers for ``SUPERSEDED_AFTER_S`` asks
``cached(..., hurry=True)`` after each further slice of its wait (``timed_collectives``): the thread then
polls at once, so a rank blocked on a failed peer learns of the incident's decision within a slice or two.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from megatron_unicron.events import Decision
from megatron_unicron.protocol import JobChannel
from megatron_unicron.store import StoreError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Seen:
    generation: int
    decision: Decision | None
    at: float  # the clock when the store was read


class DecisionWatch:
    """Answers "is generation g decided?" from a background poll of the store."""

    def __init__(
        self,
        channel: JobChannel,
        poll_channel: JobChannel,
        *,
        poll_s: float = 0.25,
        stale_s: float = 0.6,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``channel`` is the caller's (training thread's) connection, ``poll_channel`` the thread's."""
        self.channel = channel
        self.poll_channel = poll_channel
        self.poll_s = poll_s
        self.stale_s = stale_s
        self.clock = clock
        self.direct_reads = 0
        self._lock = threading.Lock()
        self._wanted: int | None = None
        self._seen: _Seen | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by close() and by cached(hurry=True): poll now
        self._thread = threading.Thread(target=self._main, name="unicron-decision-watch", daemon=True)

    def start(self) -> None:
        """Start polling (for the generation last asked about)."""
        self._thread.start()

    def close(self) -> None:
        """Stop polling and wait for the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)

    def decision(self, generation: int) -> Decision | None:
        """The published decision for ``generation``, or None; read directly when the cache is stale."""
        with self._lock:
            self._wanted = generation
            seen = self._seen
        if seen is not None and seen.generation == generation and (
            seen.decision is not None or self.clock() - seen.at <= self.stale_s
        ):
            return seen.decision
        self.direct_reads += 1
        at = self.clock()
        decision = self.channel.decision(generation)
        self._remember(_Seen(generation, decision, at))
        return decision

    def cached(self, generation: int, *, hurry: bool = False) -> Decision | None:
        """The decision for ``generation`` as last polled (no store read: safe inside a wait loop);
        ``hurry`` has the thread poll again at once (a caller blocked on a peer asks again shortly)."""
        with self._lock:
            self._wanted = generation
            seen = self._seen
        if hurry:
            self._wake.set()
        return seen.decision if seen is not None and seen.generation == generation else None

    def _remember(self, seen: _Seen) -> None:
        with self._lock:
            newer = self._seen is None or self._seen.generation != seen.generation or seen.at >= self._seen.at
            if newer and seen.generation == self._wanted:
                self._seen = seen

    def _main(self) -> None:
        while True:
            self._wake.wait(self.poll_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._lock:
                wanted = self._wanted
            if wanted is None:
                continue
            at = self.clock()
            try:
                decision = self.poll_channel.decision(wanted)
            except StoreError as error:  # the store is going away (end of job): the direct read decides
                logger.debug("decision watch stops: %s", error)
                return
            self._remember(_Seen(wanted, decision, at))
