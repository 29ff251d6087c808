"""The profiler: metrics parsing, the subprocess path, and a table the planner reads."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from megatron_unicron.plan.errors import PlanInputError
from megatron_unicron.plan.hardware import DEVICE_PRESETS
from megatron_unicron.plan.models import PRESETS
from megatron_unicron.plan.planner import JobSpec, plan_single_job
from megatron_unicron.plan.profile import ProfileConfig, median_iteration_time, profile, read_metrics
from megatron_unicron.plan.table import load_table, save_table

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
TRAIN_SCRIPT = REPO / "examples" / "gpt" / "pretrain_gpt.py"


def _record(i, ms):
    return {
        "iteration": i,
        "lm_loss": 5.0,
        "grad_norm": 1.0,
        "lr": 1e-4,
        "consumed_samples": 8 * i,
        "global_batch_size": 8,
        "elapsed_ms": ms,
        "tokens": 8 * 32,
    }


def test_median_skips_warmup(tmp_path):
    path = tmp_path / "m.jsonl"
    times = [900.0, 400.0, 120.0, 100.0, 110.0, 105.0, 300.0]
    path.write_text("\n".join(json.dumps(_record(i + 1, t)) for i, t in enumerate(times)) + "\n")
    recs = read_metrics(path)
    assert [r["iteration"] for r in recs] == list(range(1, 8))
    assert median_iteration_time(recs, warmup_iters=2) == pytest.approx(0.110)
    with pytest.raises(PlanInputError, match="warm-up"):
        median_iteration_time(recs, warmup_iters=7)
    bad = tmp_path / "bad.jsonl"
    rec = _record(1, 1.0)
    del rec["elapsed_ms"]
    bad.write_text(json.dumps(rec) + "\n")
    with pytest.raises(PlanInputError, match=r"bad.jsonl:1: missing key 'elapsed_ms'"):
        read_metrics(bad)


FAKE_LAUNCHER = textwrap.dedent('''
    """Stands in for `megatron_unicron.launch` + pretrain_gpt.py: writes the metrics contract's records."""
    import argparse, json, sys
    p = argparse.ArgumentParser()
    p.add_argument("--nproc-per-node", type=int)
    p.add_argument("script")
    p.add_argument("--tensor-model-parallel-size", type=int)
    p.add_argument("--pipeline-model-parallel-size", type=int)
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--global-batch-size", type=int)
    p.add_argument("--train-iters", type=int)
    p.add_argument("--unicron-metrics-log")
    a, _ = p.parse_known_args()
    if a.tensor_model_parallel_size == 2 and a.nproc_per_node == 4:
        sys.exit(3)  # a failed run must not break the profile
    dp = a.nproc_per_node // (a.tensor_model_parallel_size * a.pipeline_model_parallel_size)
    # DP scales, PP pays a bubble, TP pays communication
    ms = 100.0 / dp + 40.0 * (a.pipeline_model_parallel_size - 1) + 70.0 * (a.tensor_model_parallel_size - 1)
    with open(a.unicron_metrics_log, "w") as f:
        for i in range(1, a.train_iters + 1):
            t = ms * (5 if i == 1 else 1)  # a slow warm-up iteration
            f.write(json.dumps({"iteration": i, "lm_loss": 5.0, "grad_norm": 1.0, "lr": 1e-4,
                                "consumed_samples": i * a.global_batch_size,
                                "global_batch_size": a.global_batch_size, "elapsed_ms": t,
                                "tokens": a.global_batch_size * 32}) + "\\n")
''')


def test_profiler_writes_a_table_the_planner_reads(tmp_path):
    launcher = tmp_path / "fake_launch.py"
    launcher.write_text(FAKE_LAUNCHER)
    cfg = ProfileConfig(
        model=PRESETS["tiny"],
        global_batch_size=8,
        gpu_counts=(1, 2, 3, 4),
        gpus_per_node=2,
        device=DEVICE_PRESETS["cpu"],
        train_iters=5,
        warmup_iters=1,
        top_k=3,
        launcher=(sys.executable, str(launcher)),
        script="pretrain_gpt.py",
        timeout_s=60,
    )
    table, measurements = profile(cfg, tmp_path / "work")
    assert len(measurements) >= 6  # 1 + 3 + 0 + 2 (the tp2 run on 4 GPUs failed)
    assert table.entry(3).flops == 0 and table.entry(3).layout is None
    for gpus in (1, 2, 4):
        e = table.entry(gpus)
        assert (e.layout.tp, e.layout.pp, e.layout.dp) == (1, 1, gpus)
        assert e.iteration_time_s == pytest.approx(0.1 / gpus)
        assert e.flops == pytest.approx(8 * PRESETS["tiny"].flops_per_sample() / e.iteration_time_s)
    out = tmp_path / "tiny.yaml"
    save_table(table, out)
    cluster = {
        "nodes": {"count": 2, "gpus_per_node": 2, "device": "cpu"},
        "jobs": [{"name": "tiny", "model": "tiny", "global_batch_size": 8, "table": str(out)}],
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cluster))
    res = subprocess.run(
        [sys.executable, "-m", "megatron_unicron.plan.cli", str(tmp_path / "c.yaml"), "--json"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["jobs"][0]["gpus"] == 4
    job = JobSpec(name="tiny", model=PRESETS["tiny"], global_batch_size=8, table=load_table(out))
    assert plan_single_job(job, 3, 2)[0] == 2


@pytest.mark.skipif(not TRAIN_SCRIPT.exists(), reason="examples/gpt/pretrain_gpt.py is not written yet")
@pytest.mark.timeout(600)
def test_profile_real_training_end_to_end(tmp_path):
    out = tmp_path / "tiny_cpu.yaml"
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "profile_throughput.py"),
            "--model",
            "tiny",
            "--global-batch-size",
            "8",
            "--gpus",
            "1,2",
            "--gpus-per-node",
            "2",
            "--device",
            "cpu",
            "--train-iters",
            "6",
            "--warmup-iters",
            "2",
            "--top-k",
            "1",
            "--script",
            str(TRAIN_SCRIPT),
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=580,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    table = load_table(out)
    assert table.source == "profile" and all(e.flops > 0 for e in table.entries)
