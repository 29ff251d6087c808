"""A warm spare leaks nothing: DP4 at TP1 PP1, rank 3 SIGKILLed at iteration 6, the survivors go on at DP2
with rank 2 as a warm spare (alive, not a member) while rank 3 restarts.

Regression: the spare waits inside its recovery, holding the gloo error that broke generation 0. That
error's traceback frames kept generation 0's model, DDP buckets, pending work and process groups alive
after the graveyard released them (~70 sockets and pipes on rank 2 at the end of the job).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_unicron.incident_log import read_log
from megatron_unicron.testing.harness import JobResult, assert_no_leaks, run_job

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "examples/gpt/pretrain_gpt.py")
YAML = str(ROOT / "examples/gpt/configs/tiny_gpt.yaml")
UNICRON_LAUNCHER = ("--unicron",)
FD_SLACK = 6  # gloo's per-process transport device (see tests/test_pretrain.py)


def job_argv(tmp: Path, iters: int, *inject: str, extra: tuple[str, ...] = ()) -> list[str]:
    argv = [SCRIPT, "--yaml-cfg", YAML, "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size",
            "1", "--train-iters", str(iters), "--unicron-metrics-log", str(tmp / "run.jsonl"), "--unicron",
            "--unicron-incident-log", str(tmp / "run.incidents.jsonl"), *extra]  # fmt: skip
    for spec in inject:
        argv += ["--unicron-inject", spec]
    return argv


def iterations(tmp: Path) -> list[int]:
    return [r["iteration"] for r in map(json.loads, (tmp / "run.jsonl").read_text().splitlines())]


def check_kill_left_a_spare(tmp: Path, result: JobResult) -> None:
    """The first incident: rank 3 exited (SIGKILL), restarted, the job went on at DP2 without rank 2."""
    assert result.returncode == 0, result.output[-5000:]
    first = read_log(str(tmp / "run.incidents.jsonl"))[0]
    found = (first["root_kind"], first["severity"], first["action"], first["ranks"], first["outcome"])
    assert found == ("exited", "SEV2", "restart", [3], "resumed"), first
    assert first["exit_code"] == -9 and first["restart"] == [3], first
    assert (first["layout"], first["members"]) == ({"tp": 1, "pp": 1, "dp": 2}, [0, 1]), first  # 2: spare


@pytest.mark.timeout(600)
def test_a_spare_that_waits_to_the_end_of_the_job_leaks_nothing(tmp_path: Path) -> None:
    # 12 iterations: training ends before the restarted rank 3 is back (or before the switch it would
    # take), so rank 2 stays a spare to the end, with the error that broke generation 0 as the context
    # of its TrainingDone. This is the job that leaked.
    result = run_job(job_argv(tmp_path, 12, "kill:3:6:forward"), nproc_per_node=4, timeout_s=400,
                     launcher_args=UNICRON_LAUNCHER)  # fmt: skip
    check_kill_left_a_spare(tmp_path, result)
    assert iterations(tmp_path) == list(range(1, 13))
    assert_no_leaks(result, fd_slack=FD_SLACK)

