"""pretrain_gpt.py --load takes a Megatron-LM checkpoint in either format, at any layout, exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_unicron.testing.harness import assert_no_leaks, run_job

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "examples/gpt/pretrain_gpt.py")
YAML = str(ROOT / "examples/gpt/configs/tiny_gpt.yaml")


def train(tmp: Path, name: str, nproc: int, *extra: str) -> dict[int, dict]:
    metrics = tmp / f"{name}.jsonl"
    argv = [SCRIPT, "--yaml-cfg", YAML, "--train-iters", "8", "--unicron-metrics-log", str(metrics), *extra]
    result = run_job(argv, nproc_per_node=nproc, timeout_s=300)
    assert result.returncode == 0, result.output[-4000:]
    assert_no_leaks(result, fd_slack=6)
    return {r["iteration"]: r for r in map(json.loads, metrics.read_text().splitlines())}


@pytest.mark.timeout(900)
def test_legacy_and_torch_dist_checkpoints_load_at_other_layouts(tmp_path: Path) -> None:
    full = train(tmp_path, "full", 4, "--save", str(tmp_path / "td"), "--save-interval", "4")
    # A legacy (--ckpt-format torch) TP1 PP1 checkpoint of iteration 4, as Megatron-LM would write it.
    convert = [
        sys.executable, str(ROOT / "tools/convert_checkpoint.py"), "--load-dir", str(tmp_path / "td"),
        "--iteration", "4", "--save-dir", str(tmp_path / "legacy"), "--target-tensor-parallel-size", "1",
        "--target-pipeline-parallel-size", "1", "--ckpt-format", "torch",
    ]  # fmt: skip
    done = subprocess.run(convert, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (tmp_path / "legacy/iter_0000004/mp_rank_00/model_optim_rng.pt").is_file()
    # Loaded at TP2 PP2 (resharded on load): the same iterations 5-8, bit for bit.
    legacy = train(tmp_path, "from_legacy", 4, "--load", str(tmp_path / "legacy"))
    assert sorted(legacy) == [5, 6, 7, 8]
    for it, record in legacy.items():
        assert (record["lm_loss"], record["lr"]) == (full[it]["lm_loss"], full[it]["lr"])
    # The torch_dist checkpoint of iteration 8 loaded at TP1 PP2 DP2: training goes on from 8.
    (tmp_path / "td/latest_checkpointed_iteration.txt").write_text("4")
    resharded = train(
        tmp_path, "from_td", 4, "--load", str(tmp_path / "td"), "--tensor-model-parallel-size", "1"
    )
    assert sorted(resharded) == [5, 6, 7, 8]
    assert [resharded[i]["lm_loss"] for i in range(5, 9)] == pytest.approx(
        [full[i]["lm_loss"] for i in range(5, 9)], rel=1e-5, abs=1e-5
    )


@pytest.mark.timeout(900)
def test_a_legacy_distributed_optimizer_checkpoint_loads_and_trains_on(tmp_path: Path) -> None:
    distopt = ("--use-distributed-optimizer", "--tensor-model-parallel-size", "1")  # TP1 PP2 DP2
    full = train(tmp_path, "full", 4, *distopt, "--save", str(tmp_path / "td"), "--save-interval", "4")
    # Megatron-LM's legacy distributed-optimizer files: model_optim_rng.pt plus distrib_optim.pt per rank.
    convert = [
        sys.executable, str(ROOT / "tools/convert_checkpoint.py"), "--load-dir", str(tmp_path / "td"),
        "--iteration", "4", "--save-dir", str(tmp_path / "legacy"), "--ckpt-format", "torch",
    ]  # fmt: skip
    done = subprocess.run(convert, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    legacy = tmp_path / "legacy"
    written = sorted(p.relative_to(legacy).as_posix() for p in legacy.rglob("*.pt"))
    assert "iter_0000004/mp_rank_00_001/distrib_optim.pt" in written, written
    # Loaded by a distributed-optimizer run at the same layout, then at TP2 PP1 DP2 (resharded on load).
    same = train(tmp_path, "same", 4, *distopt, "--load", str(tmp_path / "legacy"))
    assert sorted(same) == [5, 6, 7, 8]
    assert [same[i]["lm_loss"] for i in range(5, 9)] == [full[i]["lm_loss"] for i in range(5, 9)]
    other = ("--use-distributed-optimizer", "--pipeline-model-parallel-size", "1")
    moved = train(tmp_path, "moved", 4, *other, "--load", str(tmp_path / "legacy"))
    assert [moved[i]["lm_loss"] for i in range(5, 9)] == pytest.approx(
        [full[i]["lm_loss"] for i in range(5, 9)], rel=1e-5, abs=1e-5
    )
