"""Failure traces: deterministic per seed, the documented rates and shares, the file format."""

import pytest

from megatron_unicron.sim.taxonomy import KINDS, NODE_BACK
from megatron_unicron.sim.traces import (
    LLAMA3_NODE_FAILURES_PER_DAY,
    TRACE_A,
    TRACE_B,
    TraceEvent,
    generate_trace,
    read_trace,
    write_trace,
)

NODES = [f"node{i}" for i in range(16)]


def test_same_seed_same_trace():
    assert generate_trace(TRACE_B, NODES, 7, seed=3) == generate_trace(TRACE_B, NODES, 7, seed=3)
    assert generate_trace(TRACE_B, NODES, 7, seed=3) != generate_trace(TRACE_B, NODES, 7, seed=4)


def test_rates_shares_and_repairs():
    assert TRACE_A.node_failures_per_day == pytest.approx(419 * 8 / (16384 * 54))
    assert TRACE_B.node_failures_per_day == 128 * LLAMA3_NODE_FAILURES_PER_DAY
    days = 60
    trace = generate_trace(TRACE_B, NODES, days, seed=0)
    failures = [e for e in trace if e.kind != NODE_BACK]
    # nodes are down part of the time, so a little fewer than rate x nodes x days
    expected = TRACE_B.node_failures_per_day * len(NODES) * days
    assert 0.75 * expected < len(failures) < 1.1 * expected
    sev1 = sum(1 for e in failures if KINDS[e.kind].severity == 1) / len(failures)
    assert sev1 == pytest.approx(12.2 / 43.4, abs=0.05)
    down: dict[str, float] = {}
    for e in trace:  # a SEV1 node is back later, and never fails while it is down
        if e.kind == NODE_BACK:
            assert e.node in down
            del down[e.node]
        else:
            assert e.node not in down
            if KINDS[e.kind].severity == 1:
                down[e.node] = e.time_s
    assert all(e.time_s < days * 86400 for e in trace)


def test_file_round_trip_and_errors(tmp_path):
    trace = generate_trace(TRACE_B, NODES[:4], 3, seed=1)
    path = tmp_path / "trace.txt"
    write_trace(trace, path)
    back = read_trace(path, NODES[:4])
    assert [(e.node, e.kind) for e in back] == [(e.node, e.kind) for e in trace]
    assert [e.time_s for e in back] == pytest.approx([e.time_s for e in trace], abs=1e-3)
    path.write_text("# comment\n10, node0, ecc_error\n20 node0 node_back\n")
    assert read_trace(path) == (TraceEvent(10.0, "node0", "ecc_error"), TraceEvent(20.0, "node0", NODE_BACK))
    for text, msg in [
        ("10 node0\n", ":1: expected 'time node kind'"),
        ("x node0 ecc_error\n", "is not a number"),
        ("10 node0 meltdown\n", "unknown failure kind 'meltdown'"),
        ("10 node9 ecc_error\n", "unknown node 'node9'"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError, match=msg):
            read_trace(path, NODES[:4])
