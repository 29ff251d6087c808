"""The step guard: an optimizer step undone and redone leaves exactly the state of the first attempt."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_unicron.testing.harness import run_job

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests/workers/guard_roundtrip.py")
YAML = str(ROOT / "examples/gpt/configs/tiny_gpt.yaml")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("precision", [(), ("--bf16",)], ids=["fp32", "bf16"])
def test_an_undone_step_is_redone_bit_for_bit(precision: tuple[str, ...]) -> None:
    # fp32: the optimizer steps the model's own parameters (copied once); bf16: fp32 master copies too.
    argv = [WORKER, "--yaml-cfg", YAML, "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size",
            "1", "--unicron", *precision]  # fmt: skip
    result = run_job(argv, nproc_per_node=1, timeout_s=240)
    assert result.returncode == 0, result.output[-4000:]
    assert "GUARD OK 4" in result.stdout, result.output[-4000:]
