"""`unicron-plan`: table and JSON output, and one-line errors that name the field."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_unicron.plan.cli import main

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
PAPER = REPO / "examples" / "cluster" / "paper_128gpu.yaml"


def _write(tmp_path, data, name="cluster.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def _tiny_cluster(**job_overrides):
    job = {"name": "tiny", "model": "tiny", "global_batch_size": 8, "nodes": ["node0"]}
    job.update(job_overrides)
    return {"nodes": {"count": 2, "gpus_per_node": 2, "device": "cpu"}, "jobs": [job]}


def test_prints_table_and_json(capsys):
    assert main([str(PAPER)]) == 0
    out = capsys.readouterr().out
    assert "gpt-70b" in out and "cluster WAF" in out
    assert main([str(PAPER), "--lost", "node9,node3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    used = {n for j in data["jobs"] for n in j["nodes"]}
    assert {"node9", "node3"} & used == set() and data["lost_nodes"] == ["node3", "node9"]
    assert sum(j["gpus"] for j in data["jobs"]) <= 14 * 8


def test_console_module_runs(tmp_path):
    path = _write(tmp_path, _tiny_cluster())
    res = subprocess.run(
        [sys.executable, "-m", "megatron_unicron.plan.cli", str(path), "--json"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["jobs"][0]["gpus"] >= 1


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["jobs"][0].update(wieght=2), r"jobs\[0\]\.wieght: unknown key"),
        (lambda d: d["jobs"][0].update(weight=0), r"jobs\[0\]\.weight: must be > 0"),
        (lambda d: d["jobs"][0].update(weight=-1.5), r"jobs\[0\]\.weight: must be > 0"),
        (lambda d: d["nodes"].update(gpu_per_node=2), r"nodes\.gpu_per_node: unknown key"),
        (lambda d: d.update(clusterr=1), r"cluster\.clusterr: unknown key"),
        (lambda d: d["jobs"][0].update(model="gpt5"), r"jobs\[0\]\.model: unknown preset"),
        (lambda d: d["jobs"][0].update(nodes=["node7"]), r"unknown node 'node7'"),
    ],
)
def test_bad_cluster_file_gets_one_line_error(tmp_path, capsys, mutate, message):
    data = _tiny_cluster()
    mutate(data)
    path = _write(tmp_path, data)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(path) in err
    import re

    assert re.search(message, err), err


def test_table_with_holes_and_too_many_lost_nodes(tmp_path, capsys):
    table = {
        "step": 1,
        "entries": [
            {"gpus": 1, "flops": 1e9, "layout": {"tp": 1, "pp": 1, "dp": 1}},
            {"gpus": 3, "flops": 0},
        ],
    }
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(table))
    path = _write(tmp_path, _tiny_cluster(table="t.yaml"))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "hole at 2 GPUs" in err and "t.yaml" in err
    ok = _write(tmp_path, _tiny_cluster(), "ok.yaml")
    assert main([str(ok), "--lost", "node0,node1,node2"]) == 2
    assert "3 nodes lost but the cluster has 2" in capsys.readouterr().err
    assert main([str(ok), "--lost", "nodeX"]) == 2
    assert "--lost: unknown node 'nodeX'" in capsys.readouterr().err
