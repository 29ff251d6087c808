"""Analytic throughput model, its calibration, and throughput tables (YAML, holes, lookups)."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_unicron.plan.calibrate import Measurement, calibrate, fit_error
from megatron_unicron.plan.errors import PlanInputError
from megatron_unicron.plan.hardware import DEVICE_PRESETS, device_from_config
from megatron_unicron.plan.layouts import Layout
from megatron_unicron.plan.memory import MemoryOptions
from megatron_unicron.plan.models import PRESETS
from megatron_unicron.plan.table import TableEntry, ThroughputTable, load_table, save_table
from megatron_unicron.plan.throughput import AnalyticParams, analytic_table, best_layout, iteration_features

A800 = DEVICE_PRESETS["a800-80gb"]
CPU = DEVICE_PRESETS["cpu"]
FP32 = MemoryOptions(precision="fp32", sequence_parallel=False)


def test_pipeline_bubble_is_p_minus_1_over_m_plus_p_minus_1():
    m = PRESETS["gpt3-7b"]
    params = AnalyticParams()
    for pp, dp, mbs in [(2, 4, 1), (4, 2, 2), (8, 1, 1)]:
        layout = Layout(1, pp, dp, mbs)
        f = iteration_features(m, layout, 64, 8, A800, params, MemoryOptions())
        micro = layout.num_micro_batches(64)
        assert f[3] == micro + pp - 1  # slots
        per_slot = f[0] / f[3]
        bubble = (pp - 1) * per_slot / f[0]
        assert bubble == pytest.approx((pp - 1) / (micro + pp - 1))


def test_communication_terms_appear_only_with_their_parallelism():
    m = PRESETS["gpt3-1.3b"]
    p, mem = AnalyticParams(), MemoryOptions()
    f = iteration_features(m, Layout(1, 1, 1, 1), 8, 8, A800, p, mem)
    assert f[1] == f[2] == f[4] == 0
    f = iteration_features(m, Layout(2, 2, 2, 1), 8, 8, A800, p, mem)
    assert f[1] > 0 and f[2] > 0 and f[4] > 0
    # a DP group that leaves the node uses the (slower) inter-node link
    inside = iteration_features(m, Layout(1, 1, 8, 1), 64, 8, A800, p, mem)[4]
    across = iteration_features(m, Layout(1, 1, 16, 1), 64, 8, A800, p, mem)[4]
    assert across > 5 * inside


def test_best_layout_on_cpu_prefers_dp_then_pp_then_tp():
    tiny = PRESETS["tiny"]
    e = best_layout(tiny, 16, 4, 2, CPU, memory=FP32)
    assert (e.layout.tp, e.layout.pp, e.layout.dp) == (1, 1, 4)
    params = AnalyticParams.for_device(CPU)
    from megatron_unicron.plan.throughput import iteration_time

    dp = iteration_time(tiny, Layout(1, 1, 2, 4), 8, 2, CPU, params, FP32)
    pp = iteration_time(tiny, Layout(1, 2, 1, 4), 8, 2, CPU, params, FP32)
    tp = iteration_time(tiny, Layout(2, 1, 1, 8), 8, 2, CPU, params, FP32)
    assert dp < pp < tp


def test_analytic_table_for_70b_needs_enough_nodes():
    t = analytic_table(PRESETS["gpt3-70b"], 1536, range(8, 65, 8), 8, A800)
    assert t.x_min is not None and t.x_min > 8
    assert t.entry(8).flops == 0 and t.entry(8).layout is None
    e = t.entry(64)
    assert e.layout.num_gpus == 64 and 0.2 < e.flops / (64 * A800.peak_flops) < 0.7


def test_calibration_recovers_known_coefficients():
    tiny = PRESETS["tiny"]
    truth = dataclasses.replace(
        AnalyticParams.for_device(CPU),
        compute_scale=1.7,
        tp_comm_scale=0.6,
        pp_comm_scale=2.0,
        microbatch_overhead_s=4e-3,
        iteration_overhead_s=1e-2,
    )
    layouts = [
        Layout(1, 1, 1, 16),
        Layout(1, 1, 1, 4),
        Layout(1, 1, 2, 8),
        Layout(1, 1, 4, 1),
        Layout(2, 1, 1, 8),
        Layout(2, 1, 2, 2),
        Layout(1, 2, 1, 8),
        Layout(1, 2, 1, 1),
        Layout(1, 4, 1, 2),
        Layout(2, 2, 1, 4),
    ]
    from megatron_unicron.plan.throughput import iteration_time

    meas = [Measurement(lay, iteration_time(tiny, lay, 16, 2, CPU, truth, FP32)) for lay in layouts]
    start = AnalyticParams.for_device(CPU)
    assert fit_error(tiny, 16, 2, CPU, meas, start, FP32) > 0.2
    fitted = calibrate(tiny, 16, 2, CPU, meas, memory=FP32, ridge=1e-6)
    assert fit_error(tiny, 16, 2, CPU, meas, fitted, FP32) < 0.01
    assert fitted.compute_scale == pytest.approx(1.7, rel=0.05)
    assert fitted.microbatch_overhead_s == pytest.approx(4e-3, rel=0.1)


def test_table_yaml_round_trip_and_lookups(tmp_path):
    t = analytic_table(PRESETS["tiny"], 8, range(1, 5), 2, CPU, memory=FP32)
    path = tmp_path / "t.yaml"
    save_table(t, path)
    back = load_table(path)
    assert back == t
    assert back.entry(3).flops == 0  # 3 does not divide the batch of 8 nor the 4 heads/layers
    assert back.best_within(3) == back.entry(2) or back.best_within(3).gpus < 3
    flops, chosen = back.curve(2, 2)  # whole nodes of 2 GPUs
    assert flops[0] == 0 and flops[2] >= flops[1] > 0 and chosen[1].gpus <= 2


def test_table_errors_name_the_problem(tmp_path):
    with pytest.raises(PlanInputError, match="hole at 16 GPUs"):
        ThroughputTable(
            entries=(TableEntry(8, 1.0, Layout(1, 1, 8)), TableEntry(24, 1.0, Layout(1, 1, 24))), step=8
        )
    with pytest.raises(PlanInputError, match="needs a layout"):
        TableEntry(8, 1.0, None)
    with pytest.raises(PlanInputError, match="uses 4"):
        TableEntry(8, 1.0, Layout(1, 1, 4))
    bad = tmp_path / "bad.yaml"
    bad.write_text("step: 1\nentries:\n  - {gpus: 1, flops: 1.0, layout: {tp: 1, pp: 1, dp: 1}, speed: 3}\n")
    with pytest.raises(PlanInputError, match=r"entries\[0\].speed: unknown key"):
        load_table(bad)
    holes = tmp_path / "holes.yaml"
    holes.write_text(
        "step: 1\nentries:\n  - {gpus: 1, flops: 1.0, layout: {tp: 1, pp: 1, dp: 1}}\n"
        "  - {gpus: 3, flops: 0}\n"
    )
    with pytest.raises(PlanInputError, match=f"{holes}.*hole at 2 GPUs"):
        load_table(holes)


def test_device_config_errors():
    assert device_from_config({"preset": "a800-80gb", "memory_bytes": 40e9}).memory_bytes == 40e9
    with pytest.raises(PlanInputError, match="nodes.device.peek_flops: unknown key"):
        device_from_config({"preset": "cpu", "peek_flops": 1}, "nodes.device")
    with pytest.raises(PlanInputError, match="device.peak_flops: expected a positive number"):
        device_from_config({"preset": "cpu", "peak_flops": -1})
    assert np.isfinite(CPU.peak_flops)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.sampled_from([0.0, 1.0, 2.0, 3.0, 5.0]), min_size=1, max_size=12),
    st.integers(1, 4),
    st.integers(0, 12),
    st.one_of(st.none(), st.integers(1, 12)),
)
def test_node_curve_matches_best_within(flops, gpn, x_min, x_max):
    table = ThroughputTable(
        entries=tuple(TableEntry(g, f, Layout(1, 1, g) if f else None) for g, f in enumerate(flops, 1))
    )
    curve, chosen = table.curve(gpn, 6, x_min, x_max)
    for k in range(7):
        ref = table.best_within(k * gpn, x_min, x_max) if k else None
        assert curve[k] == (ref.flops if ref else 0.0)
        assert chosen[k] == ref
