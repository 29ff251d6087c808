"""`unicron-sim`: trace-driven cluster simulation of Unicron against Megatron, Oobleck, Varuna, Bamboo.

    unicron-sim --cluster CLUSTER.yaml --trace {a,b,FILE} --seed N --days D
                --policies unicron,megatron,oobleck,varuna,bamboo [--params PARAMS.yaml]
                [--initial planned|file] [--json] [--plot OUT.png] [--save-trace OUT.txt]

Prints, per policy, the accumulated WAF (EFLOP, i.e. 1e18 FLOP), its fraction of the failure-free WAF
of the same plan, and the ratio of Unicron's accumulated WAF to it; `--json` prints the same as one
JSON object. Bad input prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_unicron.plan.cluster_file import load_cluster
from megatron_unicron.plan.errors import PlanInputError
from megatron_unicron.sim.engine import SimResult
from megatron_unicron.sim.params import PolicyParams, load_params
from megatron_unicron.sim.simulate import POLICY_NAMES, ratios, simulate
from megatron_unicron.sim.traces import TRACE_A, TRACE_B, generate_trace, read_trace, write_trace

__all__ = ["main", "summary", "format_summary"]


def summary(results: dict[str, SimResult], reference: str = "unicron") -> dict[str, Any]:
    """Per-policy accumulated WAF, fraction of failure-free, ratio of `reference` to it."""
    rat = ratios(results, reference) if reference in results else {}
    ref_ff = results[reference].failure_free if reference in results else None
    out: dict[str, Any] = {"policies": {}}
    for name, r in results.items():
        out["policies"][name] = {
            "accumulated_waf_eflop": r.accumulated / 1e18,
            "failure_free_waf_eflop": r.failure_free / 1e18,
            "fraction_of_own_failure_free": r.fraction_of_failure_free,
            "fraction_of_unicron_failure_free": r.accumulated / ref_ff if ref_ff else None,
            "unicron_ratio": rat.get(name),
            "per_job_eflop": {k: v / 1e18 for k, v in r.per_job.items()},
        }
    first = next(iter(results.values()))
    out["failures"] = len(first.failures)
    out["horizon_s"] = first.horizon_s
    return out


def format_summary(s: dict[str, Any]) -> str:
    """Text table of `summary`."""
    lines = [
        f"failures in trace: {s['failures']}   horizon: {s['horizon_s'] / 86400:.1f} days",
        f"{'policy':<10} {'acc. WAF (EFLOP)':>17} {'of own failure-free':>20} {'of unicron f-free':>18} "
        f"{'unicron ratio':>14}",
    ]
    for name, p in s["policies"].items():
        ratio = "-" if p["unicron_ratio"] is None else f"{p['unicron_ratio']:.2f}x"
        vs = (
            "-"
            if p["fraction_of_unicron_failure_free"] is None
            else f"{p['fraction_of_unicron_failure_free']:.1%}"
        )
        lines.append(
            f"{name:<10} {p['accumulated_waf_eflop']:>17.1f} {p['fraction_of_own_failure_free']:>20.1%} "
            f"{vs:>18} {ratio:>14}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `unicron-sim`."""
    parser = argparse.ArgumentParser(prog="unicron-sim", description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", required=True, help="cluster YAML file")
    parser.add_argument("--trace", default="a", help="a, b, or a trace file (time node kind per line)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--days", type=float, default=7.0)
    parser.add_argument("--policies", default=",".join(POLICY_NAMES))
    parser.add_argument("--params", help="YAML overrides of the policy constants (sim.params)")
    parser.add_argument("--initial", choices=("planned", "file"), default="planned")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--plot", help="write a PNG of WAF over time")
    parser.add_argument("--save-trace", help="write the trace used to this file")
    args = parser.parse_args(argv)
    try:
        if not args.days > 0:
            raise ValueError(f"--days: must be > 0, got {args.days}")
        cf = load_cluster(args.cluster)
        nodes = cf.cluster.nodes
        policies = [p for p in args.policies.split(",") if p]
        if not policies:
            raise ValueError("--policies: give at least one policy")
        for p in policies:
            if p not in POLICY_NAMES:
                raise ValueError(
                    f"--policies: unknown policy {p!r}; expected some of {', '.join(POLICY_NAMES)}"
                )
        if args.trace in ("a", "b"):
            spec = TRACE_A if args.trace == "a" else TRACE_B
            trace = generate_trace(spec, nodes, args.days, args.seed)
            mtbf = spec.node_mtbf_s
        else:
            trace = read_trace(args.trace, nodes)
            mtbf = cf.cost.node_mtbf_s
        params = load_params(args.params) if args.params else PolicyParams()
        results = simulate(cf.cluster, trace, args.days * 86400.0, policies, params, mtbf, args.initial)
    except (PlanInputError, ValueError) as err:
        print(f"unicron-sim: error: {err}", file=sys.stderr)
        return 2
    if args.save_trace:
        write_trace(trace, args.save_trace)
    s = summary(results, "unicron" if "unicron" in results else policies[0])
    if args.plot:
        from megatron_unicron.sim.plots import plot_waf

        plot_waf(results, Path(args.plot), title=f"trace {args.trace}, seed {args.seed}")
    print(json.dumps(s, sort_keys=True) if args.json else format_summary(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
