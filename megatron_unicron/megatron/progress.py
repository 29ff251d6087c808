"""Training output: Megatron-LM's log lines, a JSON-lines metrics log and a terminal progress line.

The log lines follow Megatron-LM's ``training_log`` format (printed by the last rank every
``--log-interval`` iterations, losses averaged over the interval), so tools that parse Megatron logs
keep working. The metrics log (``--unicron-metrics-log``) has one JSON object per iteration with the
exact loss, for tests and tools. On a terminal, a progress line on stderr shows where training is.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import IO


@dataclass(frozen=True)
class IterationStats:
    """What one training iteration produced (loss and grad norm as Megatron-LM reports them)."""

    iteration: int
    lm_loss: float
    grad_norm: float | None
    lr: float
    consumed_samples: int
    global_batch_size: int
    elapsed_ms: float
    tokens: int
    skipped: bool
    loss_scale: float
    time: float = 0.0  # wall clock when the iteration ended
    layout: str = ""  # the layout that trained it, e.g. "TP2PP2DP1" (it changes in a transition)


def megatron_log_line(
    *,
    iteration: int,
    train_iters: int,
    consumed_samples: int,
    elapsed_ms_per_iteration: float,
    lr: float,
    global_batch_size: int,
    lm_loss: float | None,
    loss_scale: float,
    grad_norm: float | None,
    skipped_iterations: int,
    nan_iterations: int,
) -> str:
    """One ``training_log`` line of Megatron-LM, field for field."""
    line = f" [{datetime.now().strftime('%Y-%m-%d %H:%M:%S.%f')}]"
    line += f" iteration {iteration:8d}/{train_iters:8d} |"
    line += f" consumed samples: {consumed_samples:12d} |"
    line += f" elapsed time per iteration (ms): {elapsed_ms_per_iteration:.1f} |"
    line += f" learning rate: {lr:.6E} |"
    line += f" global batch size: {global_batch_size:5d} |"
    if lm_loss is not None:  # Megatron averages over the iterations that advanced (not skipped)
        line += f" lm loss: {lm_loss:.6E} |"
    line += f" loss scale: {loss_scale:.1f} |"
    if grad_norm is not None:
        line += f" grad norm: {grad_norm:.3f} |"
    line += f" number of skipped iterations: {skipped_iterations:3d} |"
    line += f" number of nan iterations: {nan_iterations:3d} |"
    return line


def validation_lines(iteration: int, lm_loss: float, label: str = "validation") -> list[str]:
    """Megatron-LM's evaluation report: loss and perplexity between two rules."""
    ppl = math.exp(min(20.0, lm_loss))
    body = f" {label} loss at iteration {iteration} | lm loss value: {lm_loss:.6E} |"
    body += f" lm loss PPL: {ppl:.6E} | "
    rule = "-" * (len(body) + 1)
    return [rule, body, rule]


class TrainingReporter:
    """Accumulates iterations and prints Megatron's log line every ``log_interval`` iterations.

    Only the rank that reports (Megatron's last rank, which can change with the layout) prints and
    writes the metrics log: ``is_reporting()`` says whether this process is that rank now.
    """

    def __init__(
        self,
        *,
        train_iters: int,
        log_interval: int,
        metrics_path: str | None,
        is_reporting: Callable[[], bool],
        out: IO[str] | None = None,
        progress_stream: IO[str] | None = None,
    ) -> None:
        self.train_iters = train_iters
        self.log_interval = max(1, log_interval)
        self.is_reporting = is_reporting
        self.out = out or sys.stdout
        self._metrics_path = metrics_path
        self._metrics: IO[str] | None = None
        stream = progress_stream if progress_stream is not None else sys.stderr
        self._progress_stream = stream if stream.isatty() else None
        self._progress: IO[str] | None = None
        self._interval: list[IterationStats] = []
        self._last_recorded = 0
        self._skipped = 0
        self._nan = 0
        self._start = time.monotonic()

    @property
    def enabled(self) -> bool:
        """Whether this process reports (it may stop or start doing so after a change of layout)."""
        return self.is_reporting()

    def record(self, stats: IterationStats) -> None:
        """Account one finished iteration; print at log-interval boundaries."""
        if not self.enabled:
            self._interval.clear()
            return
        if self._metrics is None and self._metrics_path:
            self._metrics = open(self._metrics_path, "a", encoding="utf-8")
        self._progress = self._progress_stream
        if self._metrics is not None:
            self._metrics.write(json.dumps(asdict(stats)) + "\n")
            self._metrics.flush()
        self._last_recorded = stats.iteration
        self._interval.append(stats)
        self._skipped += int(stats.skipped)
        self._nan += int(math.isnan(stats.lm_loss))
        if stats.iteration % self.log_interval == 0 or stats.iteration == self.train_iters:
            self._print_interval()
        self._draw_progress(stats)

    def catch_up(self, stats: IterationStats) -> None:
        """Record an iteration another process finished and may not have logged (it died, or the layout
        changed which rank reports). The metrics log says whether it was; without one the line is printed,
        possibly a second time."""
        if self.enabled and stats.iteration > max(self._last_recorded, self._last_in_metrics_log()):
            self.record(stats)

    def _last_in_metrics_log(self) -> int:
        if not self._metrics_path:
            return 0
        try:
            with open(self._metrics_path, "rb") as log:
                log.seek(max(0, log.seek(0, 2) - 4096))
                lines = log.read().splitlines()
            return int(json.loads(lines[-1])["iteration"]) if lines else 0
        except (OSError, ValueError, KeyError):  # no log yet, or a line torn by a kill
            return 0

    def _print_interval(self) -> None:
        done = [s for s in self._interval if not s.skipped and not math.isnan(s.lm_loss)]
        last = self._interval[-1]
        mean_loss = sum(s.lm_loss for s in done) / len(done) if done else None
        line = megatron_log_line(
            iteration=last.iteration,
            train_iters=self.train_iters,
            consumed_samples=last.consumed_samples,
            elapsed_ms_per_iteration=sum(s.elapsed_ms for s in self._interval) / len(self._interval),
            lr=last.lr,
            global_batch_size=last.global_batch_size,
            lm_loss=mean_loss,
            loss_scale=last.loss_scale,
            grad_norm=last.grad_norm,
            skipped_iterations=self._skipped,
            nan_iterations=self._nan,
        )
        self._clear_progress()
        print(line, file=self.out, flush=True)
        self._interval.clear()
        self._skipped = 0
        self._nan = 0

    def print_lines(self, lines: list[str]) -> None:
        """Print other report lines (validation, checkpoint saves) from the reporting rank."""
        if not self.enabled:
            return
        self._clear_progress()
        for line in lines:
            print(line, file=self.out, flush=True)

    def _draw_progress(self, stats: IterationStats) -> None:
        if self._progress is None:
            return
        width = 30
        filled = int(width * stats.iteration / max(1, self.train_iters))
        elapsed = time.monotonic() - self._start
        per_it = stats.elapsed_ms / 1000.0
        eta = per_it * (self.train_iters - stats.iteration)
        bar = "#" * filled + "." * (width - filled)
        self._progress.write(
            f"\r[{bar}] {stats.iteration}/{self.train_iters} loss {stats.lm_loss:.4f} "
            f"{per_it:.2f} s/it elapsed {elapsed:.0f}s eta {eta:.0f}s "
        )
        self._progress.flush()

    def _clear_progress(self) -> None:
        if self._progress is not None:
            self._progress.write("\r\033[K")
            self._progress.flush()

    def close(self) -> None:
        """Finish the progress line and close the metrics log."""
        if self._progress is not None:
            self._progress.write("\n")
            self._progress.flush()
            self._progress = None
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
