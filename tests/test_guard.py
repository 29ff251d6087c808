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


def test_the_copied_tensors_are_found_again_when_the_optimizer_state_changes() -> None:
    import copy
    from types import SimpleNamespace

    import torch

    from megatron_unicron.megatron.guard import StepGuard, _optimizer_tensors

    model = torch.nn.Linear(3, 2)
    adam = torch.optim.Adam(model.parameters())
    bundle = SimpleNamespace(optimizer=SimpleNamespace(optimizer=adam), gpt=model)
    guard = StepGuard()

    def found() -> list[torch.Tensor]:
        return guard._sources_of(bundle).tensors

    before_first_step = found()
    assert len(before_first_step) == 2 and found() is before_first_step  # cached while nothing changes
    model(torch.ones(1, 3)).sum().backward()
    adam.step()  # Adam creates its state at the first step
    stepped = found()
    assert stepped is not before_first_step and len(stepped) == 8
    adam.load_state_dict(copy.deepcopy(adam.state_dict()))  # a new state dict holding new tensors
    loaded = found()
    assert [t.data_ptr() for t in loaded] == [t.data_ptr() for t in _optimizer_tensors(bundle.optimizer)]
    assert [t.data_ptr() for t in loaded] != [t.data_ptr() for t in stepped]
    adam.add_param_group({"params": [torch.nn.Parameter(torch.zeros(4))]})
    assert len(found()) == 9
