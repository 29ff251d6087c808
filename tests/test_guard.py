"""The step guard: an optimizer step undone and redone leaves exactly the state of the first attempt."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from megatron_unicron.testing.harness import run_job

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests/workers/guard_roundtrip.py")
YAML = str(ROOT / "examples/gpt/configs/tiny_gpt.yaml")


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "flags",
    [(), ("--bf16",), ("--unicron-snapshot-interval", "1"), ("--bf16", "--unicron-snapshot-interval", "1"),
     ("--use-distributed-optimizer", "--unicron-snapshot-interval", "1")],
    ids=["fp32", "bf16", "fp32-kept", "bf16-kept", "distopt-kept"],
)  # fmt: skip
def test_an_undone_step_is_redone_bit_for_bit(flags: tuple[str, ...]) -> None:
    # fp32: the optimizer steps the model's own parameters (copied once); bf16: fp32 master copies too.
    # With a snapshot every iteration the copy comes from the snapshot's slot instead.
    argv = [WORKER, "--yaml-cfg", YAML, "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size",
            "1", "--unicron", *flags]  # fmt: skip
    result = run_job(argv, nproc_per_node=1, timeout_s=240)
    assert result.returncode == 0, result.output[-4000:]
    found = re.search(r"GUARD OK 4 kept=(\d+)", result.stdout)
    assert found is not None, result.output[-4000:]
    kept = int(found.group(1))
    assert (kept > 0) == ("--unicron-snapshot-interval" in flags), kept
