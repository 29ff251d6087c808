"""The simulator: deterministic, exact accounting of each policy's recovery costs, parameters from YAML."""

import dataclasses

import pytest

from megatron_unicron.plan.hardware import DEVICE_PRESETS
from megatron_unicron.plan.layouts import Layout
from megatron_unicron.plan.models import PRESETS
from megatron_unicron.plan.planner import Cluster, JobSpec
from megatron_unicron.plan.table import TableEntry, ThroughputTable
from megatron_unicron.sim.params import PolicyParams, load_params, params_from_dict
from megatron_unicron.sim.simulate import simulate
from megatron_unicron.sim.traces import TRACE_B, TraceEvent, generate_trace

A800 = DEVICE_PRESETS["a800-80gb"]
HOUR = 3600.0


def _table(flops_by_nodes, gpn=8, iteration_s=10.0):
    entries = tuple(
        TableEntry(k * gpn, f, Layout(1, 1, k * gpn) if f else None, iteration_s if f else None)
        for k, f in enumerate(flops_by_nodes, 1)
    )
    return ThroughputTable(entries=entries, step=gpn)


def _one_job_cluster(flops=(1e15, 2e15, 3e15, 3.5e15)):
    job = JobSpec(
        name="j",
        model=PRESETS["gpt3-1.3b"],
        global_batch_size=512,
        table=_table(list(flops)),
        nodes=("n0", "n1", "n2", "n3"),
    )
    return Cluster(nodes=("n0", "n1", "n2", "n3"), gpus_per_node=8, device=A800, jobs=(job,))


def _lost(results, name):
    r = results[name]
    return (r.failure_free - r.accumulated) / r.rates[0]  # seconds of full-rate work lost


def test_no_failures_every_policy_keeps_its_failure_free_waf():
    c = _one_job_cluster()
    res = simulate(c, (), 2 * HOUR, ["unicron", "megatron"], PolicyParams(), node_mtbf_s=1e7)
    assert res["unicron"].accumulated == res["unicron"].failure_free == 3.5e15 * 2 * HOUR
    assert res["megatron"].accumulated == res["unicron"].accumulated


def test_a_hang_costs_the_timeout_and_a_restart_for_megatron_seconds_for_unicron():
    c = _one_job_cluster()
    trace = (TraceEvent(1000.0, "n1", "nccl_timeout"),)
    p = PolicyParams()
    res = simulate(c, trace, 10 * HOUR, ["unicron", "megatron"], p, node_mtbf_s=1e7)
    m = p.megatron
    assert _lost(res, "megatron") == pytest.approx(m.hang_timeout_s + m.requeue_s + m.setup_s + m.recompute_s)
    # 3 x the 10 s iteration to notice the hang, then a retry in place
    assert _lost(res, "unicron") == pytest.approx(3 * 10.0 + p.unicron.reattempt_s)


def test_sev2_exception_costs():
    c = _one_job_cluster()
    trace = (TraceEvent(500.0, "n0", "cuda_error"),)
    p = PolicyParams()
    res = simulate(c, trace, 5 * HOUR, ["unicron", "megatron"], p, node_mtbf_s=1e7)
    assert _lost(res, "unicron") == pytest.approx(
        p.unicron.exception_detection_s + p.unicron.restart_process_s
    )
    m = p.megatron
    assert _lost(res, "megatron") == pytest.approx(
        m.exception_detection_s + m.requeue_s + m.setup_s + m.recompute_s
    )


def test_sev1_unicron_shrinks_then_grows_back_megatron_waits():
    c = _one_job_cluster()
    trace = (TraceEvent(1000.0, "n2", "ecc_error"), TraceEvent(1000.0 + 5 * HOUR, "n2", "node_back"))
    p = PolicyParams()
    res = simulate(c, trace, 10 * HOUR, ["unicron", "megatron"], p, node_mtbf_s=1e7)
    u = res["unicron"]
    # full -> 0 (detect + transition) -> 3 nodes -> 0 (transition) -> full
    assert [r / 1e15 for r in u.rates] == pytest.approx([3.5, 0.0, 3.0, 0.0, 3.5])
    t = p.unicron.transition_s
    det = p.unicron.exception_detection_s  # the device error is raised in the training step
    assert u.times[1:] == pytest.approx([1000.0, 1000.0 + det + t, 1000.0 + 5 * HOUR, 1000.0 + 5 * HOUR + t])
    mg = res["megatron"]
    # the operator drains after timeout-free detection + 1 h, the job restarts on 3 nodes, then at full size
    m = p.megatron
    restart = m.requeue_s + m.setup_s + m.recompute_s
    assert mg.times[1] == 1000.0 and mg.rates[1] == 0
    assert mg.times[2] == pytest.approx(1000.0 + m.exception_detection_s + m.manual_drain_s + restart)
    assert mg.rates[2] == pytest.approx(3e15)
    assert mg.accumulated < u.accumulated


def test_unicron_moves_nodes_between_jobs_megatron_does_not():
    # b cannot run on 1 node (x_min 16 GPUs): after losing one of its two, Unicron gives it one of a's
    a = JobSpec(
        name="a",
        model=PRESETS["gpt3-1.3b"],
        global_batch_size=512,
        table=_table([1e15, 1.5e15]),
        nodes=("n0", "n1"),
    )
    b = JobSpec(
        name="b",
        model=PRESETS["gpt3-1.3b"],
        global_batch_size=512,
        weight=3.0,
        x_min=16,
        table=_table([1e15, 2e15]),
        nodes=("n2", "n3"),
    )
    c = Cluster(nodes=("n0", "n1", "n2", "n3"), gpus_per_node=8, device=A800, jobs=(a, b))
    trace = (TraceEvent(100.0, "n3", "nvlink_error"),)
    res = simulate(
        c,
        trace,
        20 * HOUR,
        ["unicron", "megatron", "oobleck"],
        PolicyParams(),
        node_mtbf_s=1e7,
        initial="file",
    )
    u = res["unicron"]
    assert u.per_job["b"] > 0.9 * 2e15 * 3 * 20 * HOUR  # b kept running on a borrowed node
    assert res["megatron"].per_job["b"] < 0.5 * 2e15 * 3 * 20 * HOUR  # stays down: no repair in the trace
    assert u.accumulated > res["megatron"].accumulated


def test_deterministic_for_a_seed_and_params_from_yaml(tmp_path):
    c = _one_job_cluster()
    trace = generate_trace(TRACE_B, c.nodes, 3, seed=7)
    assert len(trace) > 0
    policies = ["unicron", "megatron", "oobleck", "varuna", "bamboo"]
    r1 = simulate(c, trace, 3 * 86400, policies, PolicyParams(), TRACE_B.node_mtbf_s)
    r2 = simulate(c, trace, 3 * 86400, policies, PolicyParams(), TRACE_B.node_mtbf_s)
    assert {k: (v.accumulated, v.times, v.rates) for k, v in r1.items()} == {
        k: (v.accumulated, v.times, v.rates) for k, v in r2.items()
    }
    path = tmp_path / "params.yaml"
    path.write_text("megatron:\n  hang_timeout_s: 60\nunicron:\n  transition_s: 5\n")
    params = load_params(path)
    assert params.megatron.hang_timeout_s == 60 and params.unicron.transition_s == 5
    assert params.oobleck == PolicyParams().oobleck
    r3 = simulate(c, trace, 3 * 86400, ["megatron"], params, TRACE_B.node_mtbf_s)
    assert r3["megatron"].accumulated >= r1["megatron"].accumulated
    with pytest.raises(ValueError, match=r"params.megatron.timeout: unknown key"):
        params_from_dict({"megatron": {"timeout": 1}})
    with pytest.raises(ValueError, match="params.slurm: unknown policy"):
        params_from_dict({"slurm": {}})


def test_peers_healthy_throughput_follows_their_restrictions():
    # 70B cannot run without tensor parallelism on 4 nodes; the peers only get the smaller job
    job70 = JobSpec(
        name="big", model=PRESETS["gpt3-70b"], global_batch_size=1536, nodes=("n0", "n1", "n2", "n3")
    )
    job1 = JobSpec(name="small", model=PRESETS["gpt3-1.3b"], global_batch_size=512, nodes=("n4", "n5"))
    c = Cluster(nodes=tuple(f"n{i}" for i in range(6)), gpus_per_node=8, device=A800, jobs=(job70, job1))
    res = simulate(
        c, (), HOUR, ["megatron", "oobleck", "varuna", "bamboo"], PolicyParams(), 1e7, initial="file"
    )
    assert res["megatron"].per_job["big"] > 0
    for peer in ("oobleck", "varuna", "bamboo"):
        assert res[peer].per_job["big"] == 0
        assert 0 < res[peer].per_job["small"] <= res["megatron"].per_job["small"]
    assert res["bamboo"].per_job["small"] == pytest.approx(
        dataclasses.replace(PolicyParams().bamboo).efficiency * res["oobleck"].per_job["small"], rel=0.35
    )


def test_a_failure_during_a_recovery_resumes_at_the_newest_plan():
    c = _one_job_cluster()
    trace = (
        TraceEvent(1000.0, "n2", "ecc_error"),
        TraceEvent(1010.0, "n0", "cuda_error"),
        TraceEvent(1100.0, "n1", "nccl_timeout"),
    )
    p = PolicyParams()
    res = simulate(c, trace, 5 * HOUR, ["unicron", "megatron"], p, node_mtbf_s=1e7)
    u = res["unicron"]
    # the restart of n0 supersedes the transition, and the job resumes on the 3-node plan, not at 4 nodes
    assert u.rates[-1] == pytest.approx(3e15) and max(u.rates[1:]) == pytest.approx(3e15)
    mg = res["megatron"]
    m = p.megatron
    # Megatron stays down until the operator drains n2; the later failures do not restart it earlier
    assert mg.times[1] == 1000.0 and mg.times[2] == pytest.approx(
        1000.0 + m.exception_detection_s + m.manual_drain_s + m.requeue_s + m.setup_s + m.recompute_s
    )
    assert mg.rates[2] == pytest.approx(3e15)
