"""`unicron-sim`: summary, JSON, PNG, trace files, one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_unicron.sim.cli import main

REPO = Path(__file__).resolve().parents[2]
PAPER = REPO / "examples" / "cluster" / "paper_128gpu.yaml"
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def test_json_plot_and_saved_trace(tmp_path, capsys):
    png, saved = tmp_path / "waf.png", tmp_path / "trace.txt"
    args = [
        "--cluster",
        str(PAPER),
        "--trace",
        "b",
        "--seed",
        "2",
        "--days",
        "2",
        "--policies",
        "unicron,megatron,varuna",
        "--json",
        "--plot",
        str(png),
        "--save-trace",
        str(saved),
    ]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    pol = data["policies"]
    assert set(pol) == {"unicron", "megatron", "varuna"} and data["failures"] > 0
    assert pol["megatron"]["unicron_ratio"] == pytest.approx(
        pol["unicron"]["accumulated_waf_eflop"] / pol["megatron"]["accumulated_waf_eflop"], rel=1e-12
    )
    assert 0 < pol["megatron"]["fraction_of_own_failure_free"] <= 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # replaying the saved trace gives the same numbers (Unicron's D_running then comes from the cluster
    # file's MTBF instead of trace-b's rate, so its plans may differ slightly)
    assert (
        main(
            [
                "--cluster",
                str(PAPER),
                "--trace",
                str(saved),
                "--days",
                "2",
                "--policies",
                "unicron,megatron,varuna",
                "--json",
            ]
        )
        == 0
    )
    again = json.loads(capsys.readouterr().out)["policies"]
    for name, tol in (("megatron", 1e-6), ("varuna", 1e-6), ("unicron", 0.05)):
        assert abs(again[name]["accumulated_waf_eflop"] / pol[name]["accumulated_waf_eflop"] - 1) < tol


def test_text_summary_via_module(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_unicron.sim.cli",
            "--cluster",
            str(PAPER),
            "--trace",
            "a",
            "--seed",
            "0",
            "--days",
            "1",
            "--policies",
            "unicron,megatron",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
    assert "unicron ratio" in res.stdout and "megatron" in res.stdout


def test_errors_are_one_line(tmp_path, capsys):
    for args, msg in [
        (["--policies", "unicron,slurm"], "--policies: unknown policy 'slurm'"),
        (["--days", "0"], "--days: must be > 0"),
        (["--trace", str(tmp_path / "missing.txt")], "cannot read"),
    ]:
        assert main(["--cluster", str(PAPER), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1
    bad = tmp_path / "p.yaml"
    bad.write_text("megatron: {hang_timeout: 1}\n")
    assert main(["--cluster", str(PAPER), "--params", str(bad), "--days", "1"]) == 2
    assert "megatron.hang_timeout: unknown key" in capsys.readouterr().err
