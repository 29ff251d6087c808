"""No false alarm: 200 healthy iterations with one rank slowed 1.5x from iteration 20 open no incident.

A slow rank is not a hang: its peers wait for it in every pipeline exchange, so their waits grow, but
the adaptive timeouts follow each operation's running mean (and never drop below their minimum), so
neither a timed collective nor the iteration monitor fires. A 2-layer model on 2 ranks (TP1 PP2) keeps
the 200 iterations to seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e_helpers import assert_clean, assert_fired, train

SLOW = "slow=1.5:1:20:forward"


@pytest.mark.timeout(600)
def test_a_rank_slowed_one_and_a_half_times_for_200_iterations_is_no_hang(tmp_path: Path) -> None:
    small = ["--num-layers", "2", "--global-batch-size", "4", "--log-interval", "50",
             "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2"]  # fmt: skip
    run = train(tmp_path, "slow", *small, nproc=2, injects=(SLOW,), iters=200)
    assert_fired(run, SLOW)
    assert run.incidents == [], run.incidents
    assert "unicron: incident" not in run.output and "detected" not in run.output
    assert len(run.curve(200)) == 200
    assert_clean(run)
