"""A killed rank of a DistributedOptimizer job comes back from the in-memory snapshots (TP1 PP2 DP2).

Each DP rank owns 1/DP of the optimizer state, so no live process holds the dead rank's shard; its
snapshot does (as flat ranges). No ``--save`` is given: a checkpoint fallback would fail the job.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_unicron.incident_log import read_log
from megatron_unicron.snapshot.layout import ROOT_ENV
from megatron_unicron.testing.harness import JobResult, assert_no_leaks, run_job

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "examples/gpt/pretrain_gpt.py")
YAML = str(ROOT / "examples/gpt/configs/tiny_gpt.yaml")
ITERS = 12
DISTOPT = ("--use-distributed-optimizer", "--unicron-snapshot-interval", "1")


def job(tmp: Path, name: str, *inject: str) -> JobResult:
    argv = [SCRIPT, "--yaml-cfg", YAML, "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size",
            "2", "--train-iters", str(ITERS), "--unicron-metrics-log", str(tmp / f"{name}.jsonl"), *DISTOPT,
            "--unicron", "--unicron-incident-log", str(tmp / f"{name}.incidents.jsonl")]  # fmt: skip
    for spec in inject:
        argv += ["--unicron-inject", spec]
    result = run_job(argv, nproc_per_node=4, timeout_s=400, launcher_args=("--unicron",),
                     env={ROOT_ENV: str(tmp / "shm")})  # fmt: skip
    assert result.returncode == 0, result.output[-5000:]
    assert_no_leaks(result, fd_slack=6)
    return result


def losses(tmp: Path, name: str) -> dict[int, float]:
    """The loss of each iteration (a redone iteration: its last record)."""
    lines = (tmp / f"{name}.jsonl").read_text().splitlines()
    return {r["iteration"]: r["lm_loss"] for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    tmp = tmp_path_factory.mktemp("reference")
    job(tmp, "ref")
    assert read_log(str(tmp / "ref.incidents.jsonl")) == [], "the reference run was interrupted"
    return losses(tmp, "ref")


# Killed in the forward of iteration 8, rank 3's copy of snapshot 7 may still be in flight: then every
# member rolls back to snapshot 6. Killed in the optimizer step, snapshot 7 is complete (the step waits
# for it): the survivors' live state and rank 3's snapshot resume after iteration 7 together.
@pytest.mark.timeout(600)
@pytest.mark.parametrize("fault", ["kill:3:8", "kill:3:8:optimizer"])
def test_a_killed_rank_of_a_distributed_optimizer_job_comes_back_from_its_snapshot(
    reference: dict[int, float], tmp_path: Path, fault: str
) -> None:
    result = job(tmp_path, "run", fault)
    assert f"unicron-inject: fired {fault}" in result.stderr
    assert "reloads the newest checkpoint" not in result.stderr
    (incident,) = read_log(str(tmp_path / "run.incidents.jsonl"))
    outcome = (incident["root_kind"], incident["action"], incident["ranks"], incident["outcome"])
    assert outcome == ("exited", "restart", [3], "resumed")
    if fault.endswith(":optimizer"):
        assert "resumed after iteration 7" in result.stdout, result.output[-4000:]
        assert "rolls back" not in result.stderr
    run = losses(tmp_path, "run")
    assert sorted(run) == list(range(1, ITERS + 1))
    assert run == reference  # the layout was kept: bit-identical
