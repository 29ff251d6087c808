"""Statistical monitoring: running statistics of iteration and collective times, and adaptive timeouts.

A collective (or an iteration) is a hang when it takes more than ``slow_factor`` × its running mean.
Each kind of operation (op name, group, size) keeps its own mean, so a pipeline receive that normally
waits for a whole stage is not compared with a small tensor-parallel all-reduce. Until an operation has
``warmup_samples`` samples its timeout is the warm-up floor; afterwards it never drops below
``min_timeout_s``, so scheduler noise on loaded cores (tens of milliseconds) is not a hang, while a
stopped peer is noticed within about ``slow_factor`` × the operation's usual time plus that minimum.

The monitor thread is the backstop for a hang outside any timed wait (the main thread stuck in compute):
when the iteration in flight exceeds ``slow_factor`` × the mean iteration time while no timed wait is in
progress, it calls ``on_hang`` once.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class TimeoutPolicy:
    """How timeouts follow the statistics."""

    slow_factor: float = 3.0
    min_timeout_s: float = 0.5
    warmup_floor_s: float = 10.0
    warmup_samples: int = 3

    def __post_init__(self) -> None:
        if self.slow_factor <= 1.0:
            raise ValueError(f"slow_factor must be > 1, got {self.slow_factor}")
        if self.min_timeout_s <= 0 or self.warmup_floor_s <= 0:
            raise ValueError("timeouts must be positive")
        if self.warmup_samples < 1:
            raise ValueError("warmup_samples must be >= 1")


class RunningMean:
    """Mean of the samples so far; a sample above the hang threshold is not folded in."""

    __slots__ = ("count", "mean")

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0

    def add(self, value: float) -> None:
        """Fold one sample into the mean."""
        self.count += 1
        self.mean += (value - self.mean) / self.count


class AdaptiveTimeouts:
    """Per-operation running means and the timeout each operation gets next."""

    def __init__(self, policy: TimeoutPolicy) -> None:
        self.policy = policy
        self._stats: dict[Hashable, RunningMean] = {}
        self._lock = threading.Lock()
        self._relaxed_s = 0.0
        self.epoch = 0
        """Counts the resets: statistics kept from an earlier epoch are no longer the live ones."""

    def timeout_for(self, key: Hashable) -> float:
        """Seconds the next occurrence of ``key`` may take before it is a hang."""
        return self.timeout_of(self._stats.get(key))

    def timeout_of(self, stats: RunningMean | None) -> float:
        """Seconds the next occurrence may take, given its statistics (``None``: none yet)."""
        policy = self.policy
        if stats is None or stats.count < policy.warmup_samples:
            timeout = policy.warmup_floor_s
        else:
            timeout = max(policy.min_timeout_s, policy.slow_factor * stats.mean)
        return max(timeout, self._relaxed_s)

    def stats(self, key: Hashable) -> RunningMean:
        """The live statistics of ``key``, created empty if new. A caller may keep them and ``add`` to
        them directly (the hot path of a timed collective) until :attr:`epoch` changes. ``add`` takes no
        lock: each key is recorded by one thread (the training thread's collectives and iterations)."""
        with self._lock:
            stats = self._stats.get(key)
            if stats is None:
                stats = self._stats[key] = RunningMean()
            return stats

    @contextlib.contextmanager
    def relaxed(self, seconds: float) -> Iterator[None]:
        """Give every wait at least ``seconds`` inside the block (saves and evaluations: rare, uneven)."""
        previous, self._relaxed_s = self._relaxed_s, seconds
        try:
            yield
        finally:
            self._relaxed_s = previous

    def record(self, key: Hashable, seconds: float) -> None:
        """Account one completed occurrence."""
        self.stats(key).add(seconds)

    def reset(self) -> None:
        """Forget every statistic (a new layout: other groups, other sizes, other times; warm up again)."""
        with self._lock:
            self._stats.clear()
            self.epoch += 1

    def mean(self, key: Hashable) -> float | None:
        """The running mean of ``key``, if any."""
        stats = self._stats.get(key)
        return stats.mean if stats is not None and stats.count else None

    def samples(self, key: Hashable) -> int:
        """How many occurrences of ``key`` were recorded."""
        stats = self._stats.get(key)
        return stats.count if stats is not None else 0


class IterationMonitor:
    """A CPU thread that flags an iteration taking longer than ``slow_factor`` × the mean iteration."""

    KEY = "iteration"

    def __init__(
        self,
        timeouts: AdaptiveTimeouts,
        on_hang: Callable[[int, float], None],
        poll_interval_s: float = 0.05,
        in_timed_wait: Callable[[], bool] = lambda: False,
        beat: Callable[[], None] | None = None,
        beat_interval_s: float = 0.5,
    ) -> None:
        self.timeouts = timeouts
        self.on_hang = on_hang
        self.in_timed_wait = in_timed_wait
        self.beat = beat
        self.beat_interval_s = beat_interval_s
        self._next_beat = 0.0
        self.poll_interval_s = poll_interval_s
        self._started_at: float | None = None
        self._iteration = -1
        self._flagged = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="unicron-iteration-monitor", daemon=True)
        self._thread.start()

    def iteration_started(self, iteration: int) -> None:
        """The main thread began an iteration."""
        self._iteration = iteration
        self._flagged = False
        self._started_at = time.monotonic()

    def iteration_finished(self) -> None:
        """The main thread finished the iteration: record its time."""
        if self._started_at is not None:
            self.timeouts.record(self.KEY, time.monotonic() - self._started_at)
        self._started_at = None

    def pause(self) -> None:
        """No iteration in flight (recovering, evaluating, saving)."""
        self._started_at = None

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            if self.beat is not None and time.monotonic() >= self._next_beat:
                self._next_beat = time.monotonic() + self.beat_interval_s
                try:
                    self.beat()
                except Exception:  # a heartbeat lost to a store hiccup is retried at the next beat
                    pass
            started = self._started_at
            if started is None or self._flagged:
                continue
            elapsed = time.monotonic() - started
            if self.in_timed_wait():
                continue  # a stuck collective times out by itself, with a better diagnosis
            if elapsed > self.timeouts.timeout_for(self.KEY):
                self._flagged = True
                self.on_hang(self._iteration, elapsed)

    def close(self) -> None:
        """Stop the thread."""
        self._stop.set()
        self._thread.join(timeout=2.0)
