"""The training reporter: a process that becomes the reporting rank logs what its predecessor missed."""

from __future__ import annotations

import io
import json
from pathlib import Path

from megatron_unicron.megatron.progress import IterationStats, TrainingReporter


def stats(iteration: int) -> IterationStats:
    return IterationStats(
        iteration=iteration, lm_loss=1.0 / iteration, grad_norm=1.0, lr=1e-3, consumed_samples=8 * iteration,
        global_batch_size=8, elapsed_ms=10.0, tokens=256, skipped=False, loss_scale=1.0,
    )  # fmt: skip


def reporter(path: Path, out: io.StringIO) -> TrainingReporter:
    return TrainingReporter(
        train_iters=20, log_interval=1, metrics_path=str(path), is_reporting=lambda: True, out=out
    )


def iterations(path: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in path.read_text().splitlines()]


def test_catch_up_logs_an_iteration_the_previous_reporter_missed(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    first = reporter(log, io.StringIO())
    for i in (1, 2, 3):
        first.record(stats(i))
    first.close()  # that process died after finishing iteration 4, before logging it
    out = io.StringIO()
    successor = reporter(log, out)
    successor.catch_up(stats(4))
    successor.record(stats(5))
    successor.close()
    assert iterations(log) == [1, 2, 3, 4, 5]
    assert " iteration        4/      20 |" in out.getvalue()


def test_catch_up_does_not_log_an_iteration_twice(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    first = reporter(log, io.StringIO())
    for i in (1, 2, 3, 4):
        first.record(stats(i))
    first.close()
    successor = reporter(log, io.StringIO())
    successor.catch_up(stats(4))  # already in the log
    successor.catch_up(stats(3))
    successor.close()
    assert iterations(log) == [1, 2, 3, 4]
