"""`unicron-plan CLUSTER.yaml [--lost NODE,...] [--json]`: print the plan for a cluster file.

Without `--json` it prints a table (job, GPUs, nodes, layout, FLOP/s, transition) and the free and lost
nodes; with `--json` the plan as one JSON object (`Plan.to_dict()`). Bad input prints one line on
stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from megatron_unicron.plan.cluster_file import load_cluster
from megatron_unicron.plan.errors import PlanInputError
from megatron_unicron.plan.planner import Plan, plan

__all__ = ["main", "format_plan"]


def _node_list(nodes: Sequence[str]) -> str:
    if not nodes:
        return "-"
    return ",".join(nodes) if len(nodes) <= 4 else f"{nodes[0]},...,{nodes[-1]} ({len(nodes)})"


def _si(flops: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.1f} {unit}"
    return f"{flops:.0f} "


def format_plan(p: Plan) -> str:
    """Human-readable table of a plan."""
    rows = [("job", "gpus", "nodes", "layout", "FLOP/s", "transition")]
    for jp in p.jobs:
        rows.append(
            (
                jp.name,
                str(jp.gpus),
                _node_list(jp.nodes),
                str(jp.layout) if jp.layout else "parked",
                _si(jp.flops),
                "yes" if jp.transition else "no",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(
        f"free: {_node_list(p.free_nodes)}   lost: {_node_list(p.lost_nodes)}   "
        f"moved nodes: {p.moved_nodes}   cluster WAF: {_si(p.total_waf)}FLOP/s"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `unicron-plan`."""
    parser = argparse.ArgumentParser(prog="unicron-plan", description=__doc__.splitlines()[0])
    parser.add_argument("cluster", help="cluster YAML file")
    parser.add_argument("--lost", default="", help="comma-separated nodes to treat as lost")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    try:
        cf = load_cluster(args.cluster)
        lost = [x for x in args.lost.split(",") if x] if args.lost else []
        if len(lost) > len(cf.cluster.nodes):
            raise PlanInputError(
                f"--lost: {len(lost)} nodes lost but the cluster has {len(cf.cluster.nodes)}"
            )
        for node in lost:
            if node not in cf.cluster.nodes:
                raise PlanInputError(
                    f"--lost: unknown node {node!r} (nodes are {_node_list(cf.cluster.nodes)})"
                )
        cluster = cf.cluster.with_lost(lost)
        p = plan(cluster, cf.cost, trigger="lost " + ",".join(lost) if lost else "initial")
    except PlanInputError as err:
        print(f"unicron-plan: error: {err}", file=sys.stderr)
        return 2
    print(p.to_json() if args.json else format_plan(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
