"""Shared fixtures: jobs started through ``unicron-run`` with a timeout and a leak check."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from megatron_unicron.testing.harness import JobRunner

WORKERS = Path(__file__).parent / "workers"
JOB_TEST_TIMEOUT_S = 120  # per test, unless the test sets its own @pytest.mark.timeout


@pytest.fixture
def jobs() -> Iterator[JobRunner]:
    """Run jobs through the launcher; fails the test if one of its processes is still alive at the end."""
    runner = JobRunner(workers_dir=WORKERS)
    yield runner
    leftovers = runner.close()
    if leftovers:
        pytest.fail("processes still running after the test:\n  " + "\n  ".join(leftovers))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give every test that launches jobs a per-test timeout (pytest-timeout)."""
    for item in items:
        if "jobs" in getattr(item, "fixturenames", ()) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(JOB_TEST_TIMEOUT_S))
