"""Trace-driven cluster simulator: Unicron's planner and severity actions against Megatron and peers.

`traces` (failure traces), `taxonomy` (failure kinds), `params` (every policy constant with its
source), `engine` (discrete-event loop), `policies` and `peers` (the five policies), `capacity`
(per-system throughput), `simulate` (runs and ratios), `plots` and `cli` (`unicron-sim`).
No torch import anywhere here.
"""

from megatron_unicron.sim.engine import SimResult
from megatron_unicron.sim.params import PolicyParams, load_params
from megatron_unicron.sim.simulate import POLICY_NAMES, ratios, simulate
from megatron_unicron.sim.traces import TRACE_A, TRACE_B, TraceEvent, TraceSpec, generate_trace, read_trace

__all__ = [
    "POLICY_NAMES",
    "PolicyParams",
    "SimResult",
    "TRACE_A",
    "TRACE_B",
    "TraceEvent",
    "TraceSpec",
    "generate_trace",
    "load_params",
    "ratios",
    "read_trace",
    "simulate",
]
