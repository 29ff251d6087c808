"""The dynamic program against brute force, and plans: valid, never on a lost node, fewest moves."""

import dataclasses
import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_unicron.plan.cost import CostParams, reward_curve, waf
from megatron_unicron.plan.dp import encode_keys, solve, solve_brute_force, solve_naive
from megatron_unicron.plan.errors import NoFeasibleLayoutError, PlanInputError
from megatron_unicron.plan.hardware import DEVICE_PRESETS
from megatron_unicron.plan.layouts import Layout, explain_layout
from megatron_unicron.plan.memory import MemoryOptions
from megatron_unicron.plan.models import PRESETS
from megatron_unicron.plan.planner import Cluster, JobSpec, Plan, plan, plan_single_job
from megatron_unicron.plan.table import TableEntry, ThroughputTable

CPU = DEVICE_PRESETS["cpu"]
A800 = DEVICE_PRESETS["a800-80gb"]
TINY = PRESETS["tiny"]


def _table(flops_by_nodes, gpn):
    """A table on whole nodes from a list of FLOP/s (0 = infeasible); layouts are pure DP."""
    entries = []
    for k, f in enumerate(flops_by_nodes, 1):
        entries.append(TableEntry(k * gpn, float(f), Layout(1, 1, k * gpn) if f > 0 else None))
    return ThroughputTable(entries=tuple(entries), step=gpn)


# ---- the DP -----------------------------------------------------------------------------------------

instances = st.integers(1, 6).flatmap(
    lambda n: st.tuples(
        st.just(n),
        st.lists(
            st.tuples(st.lists(st.integers(-5, 40), min_size=n + 1, max_size=n + 1), st.integers(0, n)),
            min_size=1,
            max_size=4,
        ),
    )
)


@settings(max_examples=300, deadline=None)
@given(instances)
def test_dp_matches_brute_force_and_naive(inst):
    n, jobs = inst
    rewards = [np.array(r, dtype=float) * 1e9 for r, _ in jobs]
    current = [c for _, c in jobs]
    keys = encode_keys(rewards, current, n)
    alloc, total = solve(keys, n)
    bf_alloc, bf_total = solve_brute_force(keys, n)
    nv_alloc, nv_total = solve_naive(keys, n)
    assert sum(alloc) <= n
    assert total == bf_total == nv_total
    assert sum(keys[i][k] for i, k in enumerate(alloc)) == total
    # the primary objective alone equals brute force over rewards
    best_reward = max(
        sum(rewards[i][k] for i, k in enumerate(a))
        for a in itertools.product(*[range(n + 1)] * len(jobs))
        if sum(a) <= n
    )
    assert sum(rewards[i][k] for i, k in enumerate(alloc)) == pytest.approx(best_reward)


def test_ties_prefer_fewest_moves_then_fewest_nodes():
    # two jobs, reward flat in k >= 1: the plan keeps each where it is
    r = [np.array([0, 5, 5, 5]) * 1.0, np.array([0, 5, 5, 5]) * 1.0]
    alloc, _ = solve(encode_keys(r, [2, 1], 3), 3)
    assert alloc == [2, 1]
    alloc, _ = solve(encode_keys(r, [0, 0], 3), 3)
    assert alloc == [1, 1]


# ---- cost model -------------------------------------------------------------------------------------


def test_reward_charges_new_waf_during_transition():
    cost = CostParams(node_mtbf_s=1000.0, transition_s=10.0, start_s=100.0)
    f = np.array([0.0, 2.0, 3.0])
    d = cost.d_running(4)
    assert d == 250.0
    g = reward_curve(f, current_nodes=1, affected=False, d_running=d, cost=cost)
    assert list(g) == [0.0, 2.0 * 250, 3.0 * 250 - 3.0 * 10]
    g = reward_curve(f, current_nodes=1, affected=True, d_running=d, cost=cost)
    assert g[1] == 2.0 * 250 - 2.0 * 10
    g = reward_curve(f, current_nodes=0, affected=False, d_running=d, cost=cost)
    assert g[2] == 3.0 * 250 - 3.0 * 100  # a start from checkpoint
    assert waf(2.0, 5.0, gpus=4, x_min=8) == 0.0 and waf(2.0, 5.0, gpus=8, x_min=8) == 10.0


# ---- plans ------------------------------------------------------------------------------------------


def _cluster(n_nodes=6, gpn=2):
    nodes = tuple(f"n{i}" for i in range(n_nodes))
    jobs = (
        JobSpec(
            name="a",
            model=TINY,
            global_batch_size=8,
            table=_table([10, 18, 24, 28, 30, 31], gpn),
            nodes=("n0", "n1"),
        ),
        JobSpec(
            name="b",
            model=TINY,
            global_batch_size=8,
            weight=2.0,
            table=_table([0, 20, 20, 35, 36, 36], gpn),
            nodes=("n2", "n3", "n4"),
        ),
    )
    return Cluster(nodes=nodes, gpus_per_node=gpn, device=CPU, jobs=jobs)


def _check_valid(p: Plan, cluster: Cluster):
    seen = set()
    for jp in p.jobs:
        assert not set(jp.nodes) & cluster.lost, "a plan never uses a lost node"
        assert not set(jp.nodes) & seen
        seen |= set(jp.nodes)
        if jp.parked:
            assert jp.nodes == () and jp.layout is None and jp.waf == 0
        else:
            assert jp.layout.num_gpus == jp.gpus <= len(jp.nodes) * cluster.gpus_per_node
    assert seen | set(p.free_nodes) == set(cluster.alive)


def test_plan_keeps_jobs_in_place_when_nothing_changes():
    c = _cluster()
    p = plan(c, CostParams(node_mtbf_s=1e6))
    _check_valid(p, c)
    # b (weight 2) gets the free node n5 only if worth it: 36 vs 35 per unit weight on 4 nodes
    again = plan(c.with_plan(p), CostParams(node_mtbf_s=1e6))
    assert again.moved_nodes == 0 and not any(jp.transition for jp in again.jobs)
    assert [(jp.name, jp.gpus, jp.nodes, jp.layout) for jp in again.jobs] == [
        (jp.name, jp.gpus, jp.nodes, jp.layout) for jp in p.jobs
    ]


def test_triggers_node_lost_back_job_arrives_ends():
    c = _cluster()
    cost = CostParams(node_mtbf_s=1e6, transition_s=1.0)
    p0 = plan(c, cost)
    c = c.with_plan(p0)
    lost = c.with_lost(["n3"])
    p1 = plan(lost, cost, trigger="lost n3")
    _check_valid(p1, lost)
    assert "n3" in p1.lost_nodes and p1.job("b").transition
    c1 = lost.with_plan(p1)
    back = c1.with_node_back("n3")
    p2 = plan(back, cost)
    _check_valid(p2, back)
    assert p2.total_waf >= p1.total_waf
    arrived = back.with_plan(p2).with_job(
        JobSpec(name="c", model=TINY, global_batch_size=8, table=_table([50, 60, 60, 60, 60, 60], 2))
    )
    p3 = plan(arrived, cost)
    _check_valid(p3, arrived)
    assert p3.job("c").gpus > 0
    ended = arrived.with_plan(p3).without_job("a")
    p4 = plan(ended, cost)
    _check_valid(p4, ended)
    with pytest.raises(PlanInputError, match="no job named"):
        ended.without_job("a")


def test_job_that_fits_nowhere_is_parked():
    small = JobSpec(name="a", model=TINY, global_batch_size=8, table=_table([10, 18], 2), nodes=("n0",))
    big = JobSpec(
        name="huge", model=PRESETS["gpt3-70b"], global_batch_size=1536
    )  # analytic on CPU: never fits
    c = Cluster(nodes=("n0", "n1"), gpus_per_node=2, device=CPU, jobs=(small, big))
    p = plan(c)
    assert p.job("huge").parked and p.job("a").gpus > 0
    p = plan(c.with_lost(["n0", "n1"]))
    assert all(jp.parked for jp in p.jobs) and p.free_nodes == ()


def test_plan_json_round_trip():
    c = _cluster()
    p = plan(c.with_lost(["n0"]), trigger="lost n0")
    back = Plan.from_dict(json.loads(p.to_json()))
    assert back == p


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 30), min_size=5, max_size=5), min_size=1, max_size=3),
    st.sets(st.integers(0, 4), max_size=5),
    st.lists(st.integers(0, 3), min_size=5, max_size=5),
    st.floats(0.5, 5.0),
)
def test_random_plans_are_valid_and_optimal(tables, lost, owners, weight):
    nodes = tuple(f"n{i}" for i in range(5))
    held = {i: [] for i in range(len(tables))}
    for node, owner in zip(nodes, owners):
        if owner < len(tables):
            held[owner].append(node)
    jobs = tuple(
        JobSpec(
            name=f"j{i}",
            model=TINY,
            global_batch_size=8,
            weight=weight if i == 0 else 1.0,
            table=_table(t, 1),
            nodes=tuple(held[i]),
        )
        for i, t in enumerate(tables)
    )
    c = Cluster(nodes=nodes, gpus_per_node=1, device=CPU, jobs=jobs, lost=frozenset(f"n{i}" for i in lost))
    cost = CostParams(node_mtbf_s=1e5, transition_s=50.0, start_s=500.0)
    p = plan(c, cost)
    _check_valid(p, c)
    # optimal: no other allocation of whole nodes has a larger total reward
    n = len(c.alive)
    best = 0.0
    for alloc in itertools.product(range(n + 1), repeat=len(jobs)):
        if sum(alloc) > n:
            continue
        total = 0.0
        for job, k in zip(jobs, alloc):
            flops, _ = job.table.curve(1, n)
            h = [x for x in job.nodes if x in c.alive]
            g = reward_curve(job.weight * flops, len(h), len(h) != len(job.nodes), cost.d_running(n), cost)
            total += g[k] if (k == 0 or flops[k] > 0) else -np.inf
        best = max(best, total)
    assert p.total_reward == pytest.approx(best, rel=1e-6, abs=1e-3)


# ---- single job (the transitions part's entry point) -------------------------------------------------


@pytest.mark.parametrize("gb", [8, 12, 16])
@pytest.mark.parametrize("gpn", [1, 2])
def test_single_job_tiny_cpu_every_gpu_count(gb, gpn):
    job = JobSpec(name="tiny", model=TINY, global_batch_size=gb, memory=MemoryOptions(precision="fp32"))
    for avail in (1, 2, 3, 4):
        for more in (False, True):
            gpus, layout = plan_single_job(job, avail, gpn, prefer_more_gpus=more)
            assert 1 <= gpus <= avail and layout.num_gpus == gpus
            assert not explain_layout(
                TINY, layout, global_batch_size=gb, gpus_per_node=gpn, device_memory_bytes=4e9
            )
            assert (layout.tp, layout.pp) == (1, 1)  # DP first on CPU
    gpus, layout = plan_single_job(job, 4, gpn, prefer_more_gpus=True)
    assert gpus == 4


def test_single_job_keeps_current_layout_and_raises_when_nothing_fits():
    job = JobSpec(name="tiny", model=TINY, global_batch_size=8, memory=MemoryOptions(precision="fp32"))
    current = Layout(1, 2, 1, 4)  # a valid, slower layout: keeping it costs no transition
    cost = CostParams(node_mtbf_s=60.0, transition_s=1e3)
    assert plan_single_job(job, 2, 2, current=current, cost=cost) == (2, current)
    assert plan_single_job(job, 2, 2, current=current, cost=CostParams(transition_s=0.0))[1] != current
    picky = dataclasses.replace(job, x_min=3, x_max=3)
    with pytest.raises(NoFeasibleLayoutError, match="no layout fits 3 GPUs"):
        plan_single_job(picky, 3, 2)
