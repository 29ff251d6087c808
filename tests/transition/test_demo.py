"""The README's demo, as a user runs it: a node is lost, the survivors reconfigure and train on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_the_demo_loses_a_node_and_the_loss_goes_on() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    demo = [sys.executable, str(ROOT / "examples/gpt/demo.py"), "--iters", "20", "--fault-iter", "8"]
    done = subprocess.run(demo, capture_output=True, text=True, timeout=540, env=env, cwd=ROOT)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "unicron-inject: fired node:3:8" in out, out[-4000:]  # the node loss really happened
    incident = r"incident 1: SEV1 lost-node on node1 -> reconfigure; detected \+[\d.]+ s"
    assert re.search(incident, out), out[-4000:]
    transition = re.search(r"generation 1: reconfigure to (TP\d+PP\d+DP\d+) in [\d.]+ s", out)
    assert transition and transition.group(1) != "TP1PP2DP2", out[-4000:]
    losses = dict(re.findall(r"(\d+):(\d+\.\d+)", out.split("loss: ")[-1].splitlines()[0]))
    assert sorted(map(int, losses)) == list(range(1, 21)), losses  # every iteration trained, none lost
    assert float(losses["20"]) < float(losses["1"])
