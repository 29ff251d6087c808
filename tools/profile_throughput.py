"""Profile real training iterations into a throughput table the planner reads.

    python tools/profile_throughput.py --model tiny --global-batch-size 8 --gpus 1,2,3,4 \
        --gpus-per-node 2 --device cpu --out examples/cluster/tables/tiny_cpu.yaml \
        [--train-iters 10 --warmup-iters 3 --top-k 3] [--calibrate-out analytic.yaml] [--dry-run | --analytic]

For every GPU count it runs the `--top-k` layouts the analytic model ranks best with
`python -m megatron_unicron.launch --nproc-per-node N examples/gpt/pretrain_gpt.py ...` (see
`megatron_unicron.plan.profile`), skips the warm-up iterations, takes the median iteration time and
writes the YAML table (`megatron_unicron.plan.table`). `--calibrate-out` also writes the analytic model's
parameters fitted to all measured layouts; `--analytic` writes the uncalibrated model's table without
running anything. On GPUs pass `--device a800-80gb --precision bf16` and the
real model (a preset name or `--model-yaml FILE`).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from megatron_unicron.plan.calibrate import calibrate, fit_error
from megatron_unicron.plan.errors import PlanInputError
from megatron_unicron.plan.hardware import device_from_config
from megatron_unicron.plan.memory import MemoryOptions
from megatron_unicron.plan.models import model_from_config
from megatron_unicron.plan.profile import ProfileConfig, candidate_layouts, profile, training_command
from megatron_unicron.plan.table import save_table
from megatron_unicron.plan.throughput import analytic_table


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="profile_throughput", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="a preset name (see megatron_unicron.plan.models.PRESETS)")
    p.add_argument("--model-yaml", help="a YAML mapping of ModelShape fields (overrides --model)")
    p.add_argument("--global-batch-size", type=int, required=True)
    p.add_argument(
        "--gpus", required=True, help="comma-separated GPU counts, consecutive multiples of a step"
    )
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--device", default="cpu", help="device preset (cpu, a800-80gb)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--use-distributed-optimizer", action="store_true")
    p.add_argument("--train-iters", type=int, default=10)
    p.add_argument("--warmup-iters", type=int, default=3)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--script", default="examples/gpt/pretrain_gpt.py")
    p.add_argument("--launcher", default=f"{shlex.quote(sys.executable)} -m megatron_unicron.launch")
    p.add_argument("--extra-args", default="", help="more Megatron-LM flags, one shell-quoted string")
    p.add_argument("--workdir", help="where metrics and logs go (default: a temporary directory)")
    p.add_argument("--timeout-s", type=float, default=900.0)
    p.add_argument("--out", required=True, help="table YAML to write")
    p.add_argument("--calibrate-out", help="also write the analytic parameters fitted to the measurements")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    p.add_argument(
        "--analytic", action="store_true", help="write the analytic model's table instead of running"
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a = _args(argv)
    try:
        model = model_from_config(yaml.safe_load(Path(a.model_yaml).read_text()) if a.model_yaml else a.model)
        device = device_from_config(a.device)
        sp = a.precision != "fp32"
        memory = MemoryOptions(
            precision=a.precision, sequence_parallel=sp, use_distributed_optimizer=a.use_distributed_optimizer
        )
        cfg = ProfileConfig(
            model=model,
            global_batch_size=a.global_batch_size,
            gpu_counts=tuple(int(x) for x in a.gpus.split(",") if x),
            gpus_per_node=a.gpus_per_node,
            device=device,
            memory=memory,
            train_iters=a.train_iters,
            warmup_iters=a.warmup_iters,
            top_k=a.top_k,
            launcher=tuple(shlex.split(a.launcher)),
            script=a.script,
            extra_args=tuple(shlex.split(a.extra_args)),
            timeout_s=a.timeout_s,
        )
        if a.analytic:
            counts = sorted(set(cfg.gpu_counts))
            table = analytic_table(
                model, cfg.global_batch_size, counts, cfg.gpus_per_node, device, memory=memory
            )
            save_table(table, a.out)
            print(
                f"wrote {a.out}: analytic model, {sum(e.flops > 0 for e in table.entries)} feasible counts"
            )
            return 0
        if a.dry_run:
            for gpus in sorted(set(cfg.gpu_counts)):
                for layout in candidate_layouts(cfg, gpus):
                    print(shlex.join(training_command(cfg, layout, Path(f"metrics_{layout}.jsonl"))))
            return 0
        workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="unicron_profile_"))
        table, measurements = profile(cfg, workdir)
    except (PlanInputError, ValueError, OSError) as err:
        print(f"profile_throughput: error: {err}", file=sys.stderr)
        return 2
    save_table(table, a.out)
    print(
        f"wrote {a.out}: {sum(1 for e in table.entries if e.flops > 0)} feasible counts, "
        f"{len(measurements)} layouts measured (logs in {workdir})"
    )
    if a.calibrate_out and measurements:
        params = calibrate(
            model, cfg.global_batch_size, cfg.gpus_per_node, device, measurements, memory=memory
        )
        worst = fit_error(
            model, cfg.global_batch_size, cfg.gpus_per_node, device, measurements, params, memory
        )
        Path(a.calibrate_out).write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
        print(f"wrote {a.calibrate_out}: worst relative error {worst:.1%} over the measured layouts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
