"""Helpers of the end-to-end fault tests: real GPT pretraining through ``unicron-run``, read back.

A run trains ``examples/gpt/pretrain_gpt.py`` with the tiny YAML model, writes Megatron-style metrics
(one JSON line per iteration) and, with ``--unicron``, an incident log; the helpers read both and check
what every fault test checks: the launcher's outcome, that each injected fault fired, that the incident
timeline is complete and ordered, and that no process or resource leaked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_unicron.incident_log import read_log
from megatron_unicron.testing.harness import JobResult, assert_no_leaks, run_job

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "examples/gpt/pretrain_gpt.py")
YAML = str(ROOT / "examples/gpt/configs/tiny_gpt.yaml")
ITERS = 20
# Abandoned (broken) groups are released once their pending op has timed out: a job that recovered waits
# for that at its end, so the groups' own op timeout is kept short here (the default is 30 s).
UNICRON = ["--unicron", "--unicron-detection-pg-timeout-s", "3"]
# gloo keeps one transport device per process once a group existed (an event loop, its wake-up pipe and a
# listening socket: 4 descriptors, replaced, never accumulated, by later groups); 2 more of slack.
FD_SLACK = 6
TP1PP2DP2 = ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2"]


@dataclass(frozen=True)
class Run:
    """One finished job: the launcher's result, its incident lines and its loss curve."""

    result: JobResult
    incidents: list[dict[str, Any]]
    records: list[dict[str, Any]]

    @property
    def output(self) -> str:
        """Everything the launchers and workers printed."""
        return self.result.output

    def curve(self, iters: int = ITERS) -> list[float]:
        """The loss of iterations 1..iters; an iteration logged twice (undone and redone) logged the same."""
        by_iteration: dict[int, list[float]] = {}
        for record in self.records:
            by_iteration.setdefault(record["iteration"], []).append(record["lm_loss"])
        assert sorted(by_iteration) == list(range(1, iters + 1)), sorted(by_iteration)
        for iteration, values in by_iteration.items():
            assert len(set(values)) == 1, f"iteration {iteration} was redone with another loss: {values}"
        return [by_iteration[i][0] for i in range(1, iters + 1)]


def train(
    tmp: Path, name: str, *flags: str, nproc: int = 4, nnodes: int = 1, unicron: bool = True,
    injects: tuple[str, ...] = (), iters: int = ITERS,
) -> Run:
    """Run the tiny GPT job with ``flags`` and the injected faults; the job may end however it ends."""
    metrics, incidents = tmp / f"{name}.metrics.jsonl", tmp / f"{name}.incidents.jsonl"
    argv = [SCRIPT, "--yaml-cfg", YAML, "--train-iters", str(iters), "--unicron-metrics-log", str(metrics),
            *flags]  # fmt: skip
    if unicron:
        argv += [*UNICRON, "--unicron-incident-log", str(incidents)]
    for spec in injects:
        argv += ["--unicron-inject", spec]
    launcher = ["--unicron", "--shutdown-timeout", "5"] if unicron else []
    result = run_job(argv, nproc_per_node=nproc, nnodes=nnodes, launcher_args=launcher, timeout_s=300)
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return Run(result=result, incidents=read_log(str(incidents)), records=records)


def assert_fired(run: Run, *specs: str) -> None:
    """Each fault logged that it fired (``KIND:RANK:ITER:PHASE`` as the injector prints it)."""
    for spec in specs:
        assert f"unicron-inject: fired {spec} " in run.output, f"{spec} did not fire\n{run.output[-3000:]}"


def assert_timeline(line: dict[str, Any], *, resumed: bool = True) -> None:
    """t_fault <= t_detected <= t_decided <= t_resumed, all present (t_resumed unless the job stopped)."""
    assert line["t_fault"] is not None, f"incident {line['incident']}: no injected fault matched"
    assert line["t_fault"] <= line["t_detected"] <= line["t_decided"], line
    if resumed:
        assert line["outcome"] == "resumed" and line["t_resumed"] is not None, line
        assert line["t_decided"] <= line["t_resumed"], line


def assert_clean(run: Run, ranks: list[int] | None = None) -> None:
    """The job succeeded and nothing leaked in the ranks that trained to the end."""
    assert run.result.returncode == 0, run.output[-6000:]
    assert_no_leaks(run.result, ranks=ranks, fd_slack=FD_SLACK)
