"""The planner and the simulator import no torch (they run in the coordinator, without GPUs)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def test_plan_and_sim_do_not_import_torch():
    code = (
        "import sys, megatron_unicron.plan, megatron_unicron.plan.cli, megatron_unicron.plan.profile, "
        "megatron_unicron.sim, megatron_unicron.sim.cli; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_example_params_file_loads():
    from megatron_unicron.sim.params import load_params

    p = load_params(REPO / "examples" / "cluster" / "sim_params.yaml")
    assert p.unicron.transition_s == 30.0 and p.megatron.manual_drain_s == 3600
