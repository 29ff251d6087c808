"""Small helpers shared by the benchmarks: launching a job, steady-state timing, Markdown tables."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def launch(
    script_and_args: Sequence[str], nproc: int, timeout_s: float = 600.0
) -> subprocess.CompletedProcess:
    """Run a worker script on ``nproc`` local ranks through ``unicron-run``; raise if it fails."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    argv = [sys.executable, "-m", "megatron_unicron.launch", "--nproc-per-node", str(nproc), *script_and_args]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        raise RuntimeError(f"{' '.join(argv)} failed with exit status {done.returncode}:\n{tail}")
    return done


def steady_seconds(end_times: Sequence[float], warmup: int) -> float:
    """Median time between consecutive iteration ends, skipping the first ``warmup`` iterations."""
    gaps = [b - a for a, b in zip(end_times[warmup:], end_times[warmup + 1 :])]
    if len(gaps) < 3:
        raise ValueError(f"{len(end_times)} iterations leave too few after {warmup} warm-up ones")
    return statistics.median(gaps)


def load_average() -> str:
    """The machine's 1, 5 and 15 minute load averages, for the record (the cores are shared)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
