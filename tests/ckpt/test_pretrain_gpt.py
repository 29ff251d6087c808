"""Checkpoints written by the project's ``examples/gpt/pretrain_gpt.py``: convert, resume, same losses.

The example trains 6 iterations at TP2PP2 and saves torch_dist at iteration 4; the converter takes that to
legacy TP1PP1 and back to torch_dist TP4PP1, and the example resumes from it at TP4PP1 (``--no-load-rng``: RNG
streams belong to TP/PP ranks and are not carried across a layout change). Iterations 5 and 6 must log the
losses of the uninterrupted run. Skipped where the example is not part of the tree.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

import helpers
import pytest

from megatron_unicron.ckpt.convert import convert

EXAMPLE = os.path.join(helpers.ROOT, "examples", "gpt", "pretrain_gpt.py")
CONFIG = os.path.join(helpers.ROOT, "examples", "gpt", "configs", "tiny_gpt.yaml")


def _run(*flags: str) -> list[float]:
    cmd = [
        sys.executable,
        "-m",
        "megatron_unicron.launch",
        "--nproc-per-node",
        "4",
        EXAMPLE,
        "--yaml-cfg",
        CONFIG,
        *flags,
    ]
    p = subprocess.run(cmd, cwd=helpers.ROOT, env=helpers.env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return [
        float(x)
        for x in re.findall(r"iteration\s+\d+/\s*\d+ \|.*?lm loss: ([0-9.E+-]+)", p.stdout + p.stderr)
    ]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(EXAMPLE), reason="examples/gpt/pretrain_gpt.py is not in this tree")
def test_resume_from_converted_pretrain_checkpoint(tmp_path: Any) -> None:
    saved = str(tmp_path / "saved")
    uninterrupted = _run("--train-iters", "6", "--save", saved, "--save-interval", "4")
    assert len(uninterrupted) == 6, uninterrupted
    legacy = str(tmp_path / "legacy11")
    assert convert(saved, legacy, tp=1, pp=1, fmt="torch", iteration=4).ok
    dist = str(tmp_path / "dist41")
    assert convert(legacy, dist, tp=4, pp=1, fmt="torch_dist").ok
    resumed = _run(
        "--train-iters",
        "6",
        "--load",
        dist,
        "--tensor-model-parallel-size",
        "4",
        "--pipeline-model-parallel-size",
        "1",
        "--no-load-rng",
    )
    assert len(resumed) == 2, resumed
    for a, b in zip(resumed, uninterrupted[4:]):
        assert abs(a - b) <= 2e-6 * abs(b), (resumed, uninterrupted)
