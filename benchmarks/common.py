"""Small helpers shared by the benchmarks: launching a job, steady-state timing, Markdown tables.

On 2 shared cores the wall-clock time of an iteration depends on whatever else runs. :func:`launch`
therefore also samples the CPU time the job's processes have used (launcher and workers, via
``/proc`` through psutil), so a benchmark can report CPU seconds per iteration next to wall-clock
time: a figure that other load on the machine barely changes.
"""

from __future__ import annotations

import bisect
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class JobRun:
    """What a launched job printed, and its CPU use over time."""

    stdout: str
    stderr: str
    cpu_samples: tuple[tuple[float, float], ...]
    """(wall-clock time, CPU seconds used so far by the job's processes), in time order."""

    def cpu_seconds_at(self, t: float) -> float:
        """The job's cumulative CPU seconds at wall-clock time ``t`` (linear between samples)."""
        times = [s[0] for s in self.cpu_samples]
        i = bisect.bisect_left(times, t)
        if i == 0:
            return self.cpu_samples[0][1]
        if i == len(times):
            return self.cpu_samples[-1][1]
        (t0, c0), (t1, c1) = self.cpu_samples[i - 1], self.cpu_samples[i]
        return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c1


def _drain(stream: IO[str], into: list[str]) -> None:
    into.extend(stream)


def job_env() -> dict[str, str]:
    """The environment of a benchmark's job: this checkout first on ``PYTHONPATH``, one OpenMP thread
    per process unless set."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def launch(
    script_and_args: Sequence[str], nproc: int, timeout_s: float = 900.0, sample_s: float = 0.05
) -> JobRun:
    """Run a worker script on ``nproc`` local ranks through ``unicron-run``; raise if it fails."""
    env = job_env()
    argv = [sys.executable, "-m", "megatron_unicron.launch", "--nproc-per-node", str(nproc), *script_and_args]
    pipe = subprocess.PIPE
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=pipe, stderr=pipe, text=True)
    out: list[str] = []
    err: list[str] = []
    streams = ((proc.stdout, out), (proc.stderr, err))
    drains = [threading.Thread(target=_drain, args=(stream, into)) for stream, into in streams]
    for thread in drains:
        thread.start()
    root = psutil.Process(proc.pid)
    used: dict[int, float] = {}  # CPU seconds per process; an exited process keeps its last reading
    samples: list[tuple[float, float]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{' '.join(argv)} ran longer than {timeout_s:.0f} s")
            now = time.time()
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    cpu = p.cpu_times()
                    used[p.pid] = cpu.user + cpu.system
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            samples.append((now, sum(used.values())))
            time.sleep(sample_s)
    finally:
        if proc.poll() is None:
            proc.terminate()  # the launcher forwards it to its workers
        proc.wait()
        for thread in drains:
            thread.join()
    if proc.returncode != 0:
        tail = "\n".join(("".join(out) + "".join(err)).splitlines()[-30:])
        raise RuntimeError(f"{' '.join(argv)} failed with exit status {proc.returncode}:\n{tail}")
    return JobRun(stdout="".join(out), stderr="".join(err), cpu_samples=tuple(samples))


def steady_seconds(end_times: Sequence[float], warmup: int) -> float:
    """Median time between consecutive iteration ends, skipping the first ``warmup`` iterations."""
    gaps = [b - a for a, b in zip(end_times[warmup:], end_times[warmup + 1 :])]
    if len(gaps) < 3:
        raise ValueError(f"{len(end_times)} iterations leave too few after {warmup} warm-up ones")
    return statistics.median(gaps)


def steady_cpu_seconds(run: JobRun, end_times: Sequence[float], warmup: int) -> float:
    """CPU seconds the whole job used per iteration after the first ``warmup`` iterations."""
    start, end = end_times[warmup], end_times[-1]
    return (run.cpu_seconds_at(end) - run.cpu_seconds_at(start)) / (len(end_times) - 1 - warmup)


def load_average() -> str:
    """The machine's 1, 5 and 15 minute load averages, for the record (the cores are shared)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_layout(text: str, nproc: int, program: str) -> tuple[int, int]:
    """``TP2PP1`` as (2, 1); exit with a message naming ``program`` if it is malformed or does not divide
    ``nproc`` ranks."""
    match = re.fullmatch(r"TP(\d+)PP(\d+)", text.upper())
    if not match:
        raise SystemExit(f"{program}: layout {text!r} must look like TP2PP1")
    tp, pp = int(match.group(1)), int(match.group(2))
    if nproc % (tp * pp):
        raise SystemExit(f"{program}: {text} does not fit {nproc} ranks")
    return tp, pp


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
