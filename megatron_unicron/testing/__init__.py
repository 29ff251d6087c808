"""Test support shared by the project's tests: launcher harness and leak checks."""

from megatron_unicron.testing.harness import (
    JobResult,
    JobRunner,
    JobTimeout,
    RunningJob,
    assert_no_leaks,
    run_job,
    start_job,
)
from megatron_unicron.testing.leaks import ResourceSnapshot, resource_snapshot, write_report_if_requested

__all__ = [
    "JobResult",
    "JobRunner",
    "JobTimeout",
    "ResourceSnapshot",
    "RunningJob",
    "assert_no_leaks",
    "resource_snapshot",
    "run_job",
    "start_job",
    "write_report_if_requested",
]
