"""Readers against checkpoints that megatron-core wrote: every full tensor equals the live run's.

The reference tensors come from the running model's and optimizer's ``sharded_state_dict()``; the legacy
files' optimizer state is keyed by param ids, so a match of every ``optimizer.state.*`` tensor verifies the
param-group ordering rule against real megatron optimizers (Adam, Float16Optimizer, DistributedOptimizer).
"""

from __future__ import annotations

import pytest
from checks import check_dir, reference
from conftest import Saved

from megatron_unicron.ckpt.source import OptimizerKind


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["legacy", "dist"])
@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("mcore_a", OptimizerKind.ADAM),
        ("mcore_b", OptimizerKind.DISTRIBUTED),
        ("mcore_c", OptimizerKind.MIXED),
    ],
)
def test_reader_matches_live_state(
    request: pytest.FixtureRequest, name: str, kind: OptimizerKind, fmt: str
) -> None:
    saved: Saved = request.getfixturevalue(name)
    ref = reference(saved.ref)
    src = check_dir(getattr(saved, fmt), ref)
    assert src.format == ("torch" if fmt == "legacy" else "torch_dist")
    assert (src.layout.tp, src.layout.pp) == saved.layout
    assert src.iteration == 2
    assert src.common.optimizer is not None and src.common.optimizer.kind is kind
    assert float(src.common.optimizer.step) == 2.0
    assert src.common.opt_param_scheduler is not None and src.common.opt_param_scheduler["num_steps"] == 16
    assert src.common.rng is not None and len(src.common.rng) == saved.layout[0] * saved.layout[1]
    assert src.args.model_type == 1 and src.args.params_dtype in ("float32", "bfloat16")  # plain values
    assert src.layer_spec == "local"
    assert "decoder.layers.self_attention.linear_qkv._extra_state" in src.extra_states
