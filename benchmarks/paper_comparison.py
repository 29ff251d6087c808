"""The paper's comparison: accumulated WAF of Unicron against Megatron, Oobleck, Varuna and Bamboo.

    PYTHONPATH=. python benchmarks/paper_comparison.py [--seeds 10] [--days 7] [--json]
        [--plot benchmarks/paper_comparison.png] [--no-sweep]

Setup (unicron-paper.md §8, recollected): 128 A800 GPUs as 16 x 8, four concurrent GPT-3-style jobs
(1.3B, 7B, 13B, 70B; `examples/cluster/paper_128gpu.yaml`), one simulated week, trace-a and trace-b
(`sim.traces`), every policy starting from the same nodes (Unicron's healthy plan). For each trace it
runs `--seeds` seeds and prints the mean and range of Unicron's accumulated WAF over each baseline's,
beside the paper's 1.2-1.9x (Megatron), 3.7-3.8x (Oobleck), 4.8-5.8x (Varuna), and each policy's
accumulated WAF as a fraction of its own and of Unicron's failure-free WAF. The sweep repeats the
comparison at other multiples of trace-a's failure rate, to show where the paper's ratios would fall.
Constants: `sim.params` (every one with its source); none is tuned to the paper's ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from megatron_unicron.plan.cluster_file import load_cluster
from megatron_unicron.sim.params import PolicyParams
from megatron_unicron.sim.simulate import POLICY_NAMES, ratios, simulate
from megatron_unicron.sim.traces import TRACE_A, TRACE_B, TraceSpec, generate_trace

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "examples" / "cluster" / "paper_128gpu.yaml"
PAPER = {"megatron": "1.2-1.9x", "oobleck": "3.7-3.8x", "varuna": "4.8-5.8x", "bamboo": "-"}
SWEEP = (1, 8, 32, 128, 512)


def _runs(spec: TraceSpec, seeds: int, days: float) -> list[dict[str, Any]]:
    cluster = load_cluster(CLUSTER).cluster
    out = []
    for seed in range(seeds):
        trace = generate_trace(spec, cluster.nodes, days, seed)
        res = simulate(cluster, trace, days * 86400.0, POLICY_NAMES, PolicyParams(), spec.node_mtbf_s)
        uni_ff = res["unicron"].failure_free
        out.append(
            {
                "seed": seed,
                "failures": len(res["unicron"].failures),
                "sev1": sum(1 for e in res["unicron"].failures if e.kind in _SEV1),
                "ratios": ratios(res),
                "own_failure_free": {k: r.fraction_of_failure_free for k, r in res.items()},
                "of_unicron_failure_free": {k: r.accumulated / uni_ff for k, r in res.items()},
                "results": res,
            }
        )
    return out


_SEV1 = {"ecc_error", "nvlink_error", "invalid_dma_mapping", "gpu_driver_error", "lost_connection"}


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "failures_per_run": _stats([r["failures"] for r in runs]),
        "sev1_per_run": _stats([r["sev1"] for r in runs]),
        "ratios": {k: _stats([r["ratios"][k] for r in runs]) for k in runs[0]["ratios"]},
        "own_failure_free": {k: _stats([r["own_failure_free"][k] for r in runs]) for k in POLICY_NAMES},
        "of_unicron_failure_free": {
            k: _stats([r["of_unicron_failure_free"][k] for r in runs]) for k in POLICY_NAMES
        },
    }


def _fmt(s: dict[str, float], pct: bool = False) -> str:
    if pct:
        return f"{s['mean']:.1%} [{s['min']:.1%}-{s['max']:.1%}]"
    return f"{s['mean']:.2f}x [{s['min']:.2f}-{s['max']:.2f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--days", type=float, default=7.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--plot", help="PNG of WAF over time (first seed of each trace that has a SEV1 failure)")
    ap.add_argument("--no-sweep", action="store_true")
    a = ap.parse_args(argv)
    traces = {"trace-a": TRACE_A, "trace-b": TRACE_B}
    runs = {name: _runs(spec, a.seeds, a.days) for name, spec in traces.items()}
    summary: dict[str, Any] = {name: _summarise(r) for name, r in runs.items()}
    summary["paper"] = PAPER
    summary["setup"] = {
        "cluster": str(CLUSTER.relative_to(REPO)),
        "seeds": a.seeds,
        "days": a.days,
        "node_failures_per_day": {k: v.node_failures_per_day for k, v in traces.items()},
    }
    if not a.no_sweep:
        sweep = {}
        for mult in SWEEP:
            spec = dataclasses.replace(
                TRACE_A, name=f"a x{mult}", node_failures_per_day=mult * TRACE_A.node_failures_per_day
            )
            sweep[f"x{mult}"] = _summarise(_runs(spec, max(3, a.seeds // 2), a.days))
        summary["sweep_trace_a_rate"] = sweep
    if a.plot:
        from megatron_unicron.sim.plots import plot_waf

        panels = []
        for name, rs in runs.items():
            pick = next((r for r in rs if r["sev1"] > 0), rs[0])
            panels.append(
                (
                    f"{name}, seed {pick['seed']}: {pick['failures']} failures ({pick['sev1']} SEV1)",
                    pick["results"],
                )
            )
        plot_waf({}, a.plot, panels=panels)
    if a.json:
        print(json.dumps(summary, indent=1, sort_keys=True))
        return 0
    print(f"{a.seeds} seeds x {a.days:g} days per trace; mean [min-max] over seeds")
    print(f"{'Unicron / baseline':<20} {'trace-a':>26} {'trace-b':>26} {'paper':>10}")
    for k in ("megatron", "oobleck", "varuna", "bamboo"):
        print(
            f"{k:<20} {_fmt(summary['trace-a']['ratios'][k]):>26} "
            f"{_fmt(summary['trace-b']['ratios'][k]):>26} {PAPER[k]:>10}"
        )
    print(
        f"{'failures per week':<20} {summary['trace-a']['failures_per_run']['mean']:>26.1f} "
        f"{summary['trace-b']['failures_per_run']['mean']:>26.1f}"
    )
    print("\naccumulated WAF as a fraction of the policy's own failure-free WAF (and of Unicron's)")
    for k in POLICY_NAMES:
        cells = [
            f"{_fmt(summary[t]['own_failure_free'][k], True)} "
            f"({summary[t]['of_unicron_failure_free'][k]['mean']:.1%})"
            for t in ("trace-a", "trace-b")
        ]
        print(f"{k:<20} {cells[0]:>34} {cells[1]:>34}")
    if not a.no_sweep:
        print("\nsweep: failure rate as a multiple of trace-a (trace-b = x128)")
        print(
            f"{'rate':<8} {'failures/wk':>12} {'vs megatron':>12} {'vs oobleck':>12} {'vs varuna':>12} "
            f"{'vs bamboo':>12}"
        )
        for mult, s in summary["sweep_trace_a_rate"].items():
            r = s["ratios"]
            print(
                f"{mult:<8} {s['failures_per_run']['mean']:>12.1f} {r['megatron']['mean']:>11.2f}x "
                f"{r['oobleck']['mean']:>11.2f}x {r['varuna']['mean']:>11.2f}x {r['bamboo']['mean']:>11.2f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
