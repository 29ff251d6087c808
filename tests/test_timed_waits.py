"""Timed collectives on real gloo ranks: sliced waits complete, and a decided generation ends a wait."""

import re

from megatron_unicron.testing.harness import JobRunner


def test_sliced_waits_complete_and_a_decision_ends_a_wait_early(jobs: JobRunner) -> None:
    result = jobs.run([jobs.worker("superseded_wait.py")], nproc_per_node=2, timeout_s=120)
    assert result.returncode == 0, result.output[-3000:]
    late = re.search(r"late-collective (\S+) (\S+)", result.stdout)
    assert late is not None and float(late.group(1)) == 3.0, result.output[-3000:]
    assert float(late.group(2)) >= 0.2  # waited across several 50 ms slices, then completed
    p2p = re.search(r"late-p2p (\S+) (\S+)", result.stdout)
    assert p2p is not None and float(p2p.group(1)) == 3.0, result.output[-3000:]  # rank 1 sent its sum
    left = re.search(r"superseded (\S+) (.*)", result.stdout)
    assert left is not None and left.group(1) != "never", result.output[-3000:]
    assert 0.35 <= float(left.group(1)) < 3.0  # left once decided (0.4 s), not at its 10 s timeout
    assert "the next generation is decided" in left.group(2)
