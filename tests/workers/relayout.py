"""Test worker: GPT training with planned in-process re-layouts at given iterations.

    RELAYOUT="3:1,2;6:2,1" unicron-run --nproc-per-node 4 tests/workers/relayout.py <Megatron flags>

At iteration 3 the job moves to TP1 PP2 (DP2), at 6 to TP2 PP1, in the same processes, through the
transition controller (all ranks stay members). Losses go to --unicron-metrics-log as usual; each
rank appends its transition reports (JSON) to $RELAYOUT_REPORT if set.
"""

import json
import os
import sys
from dataclasses import asdict
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from examples.gpt.pretrain_gpt import forward_step  # noqa: E402
from megatron_unicron.events import Action, Decision, LayoutSpec  # noqa: E402
from megatron_unicron.megatron.args import parse_args, resolve_world  # noqa: E402
from megatron_unicron.megatron.pretrain import configure_logging  # noqa: E402
from megatron_unicron.megatron.train import Trainer, WorkerEnv  # noqa: E402
from megatron_unicron.testing import leaks  # noqa: E402
from megatron_unicron.transition.controller import run_transition  # noqa: E402


def main() -> int:
    env = WorkerEnv.from_environ()
    args = resolve_world(parse_args(sys.argv[1:]), env.world_size)
    configure_logging(env.rank)
    leaks.write_report_if_requested("start")
    import megatron.core  # noqa: F401

    from megatron_unicron.megatron import cpu

    cpu.apply()
    plan = {}
    for item in filter(None, os.environ.get("RELAYOUT", "").split(";")):
        at, layout = item.split(":")
        tp, pp = map(int, layout.split(","))
        plan[int(at)] = (tp, pp)
    trainer = Trainer(args, forward_step, env)
    trainer.start_generation(
        0, env.rank, env.world_size, args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    )
    generation = 0
    reports = []

    def maybe_relayout(stats):
        nonlocal generation
        if stats.iteration not in plan:
            return
        tp, pp = plan[stats.iteration]
        generation += 1
        ranks = tuple(range(env.world_size))
        decision = Decision(
            job=env.job,
            generation=generation,
            action=Action.RECONFIGURE,
            incident="planned",
            layout=LayoutSpec(tp=tp, pp=pp, dp=env.world_size // (tp * pp)),
            members=ranks,
            live=ranks,
            rank_node={r: "node0" for r in ranks},
        )
        report = run_transition(
            trainer,
            trainer.guard,
            decision,
            launch_rank=env.rank,
            node="node0",
            broken=False,
            timeout=timedelta(seconds=60),
        )
        reports.append(asdict(report))

    trainer.train(on_iteration=maybe_relayout)
    trainer.finish()
    if os.environ.get("RELAYOUT_REPORT"):
        with open(os.environ["RELAYOUT_REPORT"], "a") as f:
            for r in reports:
                f.write(json.dumps({"rank": env.rank, **r}) + "\n")
    leaks.write_report_if_requested("end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
