"""Timed collectives on real gloo ranks: sliced waits complete, decisions end waits, reduce-scatters time out.

Gloo ignores the timeout given to a reduce-scatter's own wait; the timed version keeps it."""

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
    assert re.search(r"p2p-samples 2 1\b", result.stdout), result.output[-3000:]
    left = re.search(r"superseded (\S+) (.*)", result.stdout)
    assert left is not None and left.group(1) != "never", result.output[-3000:]
    assert 0.35 <= float(left.group(1)) < 3.0  # left once decided (0.4 s), not at its 10 s timeout
    assert "the next generation is decided" in left.group(2)


def test_reduce_scatters_keep_the_adaptive_timeout_that_gloo_ignores(jobs: JobRunner) -> None:
    result = jobs.run([jobs.worker("blocking_waits.py")], nproc_per_node=2, timeout_s=120)
    assert result.returncode == 0, result.output[-3000:]
    for op, value in (("plain", "3"), ("coalesced", "6")):  # 1 + 2, and that from two reduce-scatters
        late = re.search(rf"late {op} (\S+) (\S+)", result.stdout)
        assert late is not None and late.group(1) == value, result.output[-3000:]
        stuck = re.search(rf"stuck {op} (\S+) (.*)", result.stdout)
        assert stuck is not None and stuck.group(1) != "never", result.output[-3000:]
        assert 0.9 <= float(stuck.group(1)) < 10.0  # the 1 s adaptive timeout, not the group's 20 s
        assert "adaptive timeout" in stuck.group(2)
