"""The next decision, watched off the training thread: no store round trip per iteration, never stale."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from megatron_unicron.decision_watch import DecisionWatch
from megatron_unicron.events import Action, Decision, LayoutSpec
from megatron_unicron.protocol import JobChannel
from megatron_unicron.replan import SWITCH_AHEAD_ITERATIONS, switch_iteration
from megatron_unicron.store import JobKeys, TCPStoreBackend, host_store

KEYS = JobKeys("w")


@pytest.fixture
def store() -> Iterator[TCPStoreBackend]:
    server = host_store("127.0.0.1", 0)
    yield server
    server.close()


def planned(generation: int) -> Decision:
    return Decision(job="w", generation=generation, action=Action.SCALE_UP, incident="node1 back",
                    layout=LayoutSpec(tp=1, pp=1, dp=2), members=(0, 1), live=(0, 1), at_iteration=9)


def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_answers_come_from_the_poller_and_a_published_decision_is_seen(store: TCPStoreBackend) -> None:
    watch = DecisionWatch(JobChannel(store.clone(), KEYS), JobChannel(store.clone(), KEYS), poll_s=0.01)
    watch.start()
    try:
        assert watch.decision(1) is None and watch.direct_reads == 1  # nothing polled yet: read directly
        time.sleep(0.1)
        for _ in range(50):  # a training loop's checks: all from the fresh cache
            assert watch.decision(1) is None
        assert watch.direct_reads == 1
        JobChannel(store.clone(), KEYS).publish_decision(planned(1))
        wait_until(lambda: watch.decision(1) is not None)
        assert watch.decision(1) == planned(1) and watch.direct_reads == 1
    finally:
        watch.close()


def test_a_stale_cache_is_not_trusted(store: TCPStoreBackend) -> None:
    now = [100.0]
    watch = DecisionWatch(JobChannel(store.clone(), KEYS), JobChannel(store.clone(), KEYS),
                          stale_s=0.3, clock=lambda: now[0])  # never started: nothing refreshes the cache
    assert watch.decision(1) is None and watch.direct_reads == 1
    JobChannel(store.clone(), KEYS).publish_decision(planned(1))
    now[0] += 0.2
    assert watch.decision(1) is None and watch.direct_reads == 1  # within stale_s: the cached answer
    now[0] += 0.2
    assert watch.decision(1) == planned(1) and watch.direct_reads == 2  # older: read again, and seen
    assert watch.decision(2) is None and watch.direct_reads == 3  # another generation: not cached
    watch.close()


def test_a_switch_is_announced_at_least_a_second_and_three_iterations_ahead() -> None:
    assert switch_iteration(10, None) == 10 + SWITCH_AHEAD_ITERATIONS
    assert switch_iteration(10, 2.0) == 13  # slow iterations: three of them are 6 s
    assert switch_iteration(10, 0.05) == 10 + 21  # fast ones: 20 iterations make the second, plus one
    assert switch_iteration(None, 0.5) == 3


def test_a_hurried_watch_polls_at_once(store: TCPStoreBackend) -> None:
    # A rank blocked on a failed peer asks with hurry=True after each slice of its wait: the published
    # decision is seen long before the (here 10 s) regular poll.
    watch = DecisionWatch(JobChannel(store.clone(), KEYS), JobChannel(store.clone(), KEYS), poll_s=10.0)
    watch.start()
    try:
        assert watch.cached(1) is None
        JobChannel(store.clone(), KEYS).publish_decision(planned(1))
        time.sleep(0.3)
        assert watch.cached(1) is None  # not hurried: the next regular poll is seconds away
        started = time.monotonic()
        watch.cached(1, hurry=True)
        wait_until(lambda: watch.cached(1, hurry=True) is not None, timeout_s=2.0)
        assert watch.cached(1) == planned(1) and time.monotonic() - started < 2.0
    finally:
        watch.close()
