"""Profile real training iterations into a throughput table (the logic behind tools/profile_throughput.py).

For every GPU count, the candidates are the valid layouts (`plan.layouts`): for each (TP, PP) the
micro-batch size the analytic model predicts fastest, and of those the `top_k` fastest (so a profile
compares DP, PP and TP). Each candidate runs for real with the project's training script:

    python -m megatron_unicron.launch --nproc-per-node N examples/gpt/pretrain_gpt.py <Megatron-LM flags>
        --unicron-metrics-log PATH

which writes one JSON object per iteration (`iteration`, `lm_loss`, `grad_norm`, `lr`, `consumed_samples`,
`global_batch_size`, `elapsed_ms`, `tokens`). The first `warmup_iters` iterations are skipped and the
median `elapsed_ms` of the rest is the layout's iteration time; achieved FLOP/s = global batch × Megatron's
FLOPs per sample / that time. The fastest layout per count becomes the table entry; a count with no
valid layout (or whose runs all failed) is listed with flops 0. The measurements can also calibrate the
analytic model (`plan.calibrate`).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_unicron.plan.calibrate import Measurement
from megatron_unicron.plan.errors import PlanInputError
from megatron_unicron.plan.hardware import DeviceSpec
from megatron_unicron.plan.layouts import Layout, enumerate_layouts
from megatron_unicron.plan.memory import MemoryOptions
from megatron_unicron.plan.models import ModelShape
from megatron_unicron.plan.table import TableEntry, ThroughputTable
from megatron_unicron.plan.throughput import AnalyticParams, iteration_time

__all__ = [
    "ProfileConfig",
    "METRIC_KEYS",
    "training_command",
    "read_metrics",
    "median_iteration_time",
    "candidate_layouts",
    "profile",
    "run_subprocess",
]

logger = logging.getLogger(__name__)

METRIC_KEYS = (
    "iteration",
    "lm_loss",
    "grad_norm",
    "lr",
    "consumed_samples",
    "global_batch_size",
    "elapsed_ms",
    "tokens",
)

Runner = Callable[[list[str], Path], None]


@dataclass(frozen=True, kw_only=True)
class ProfileConfig:
    """What to profile and how to launch it."""

    model: ModelShape
    global_batch_size: int
    gpu_counts: tuple[int, ...]
    gpus_per_node: int
    device: DeviceSpec
    memory: MemoryOptions = field(
        default_factory=lambda: MemoryOptions(precision="fp32", sequence_parallel=False)
    )
    train_iters: int = 10
    warmup_iters: int = 3
    top_k: int = 3
    lr: float = 1e-4
    launcher: tuple[str, ...] = (sys.executable, "-m", "megatron_unicron.launch")
    script: str = "examples/gpt/pretrain_gpt.py"
    extra_args: tuple[str, ...] = ()
    timeout_s: float = 900.0

    def __post_init__(self) -> None:
        if not self.gpu_counts or any(x < 1 for x in self.gpu_counts):
            raise PlanInputError("profile.gpu_counts: give positive GPU counts")
        if self.train_iters <= self.warmup_iters:
            raise PlanInputError(
                f"profile.train_iters: {self.train_iters} leaves no iteration after "
                f"{self.warmup_iters} warm-up iterations"
            )
        if self.top_k < 1:
            raise PlanInputError("profile.top_k: must be >= 1")
        counts = sorted(set(self.gpu_counts))
        step = counts[1] - counts[0] if len(counts) > 1 else counts[0]
        if counts != list(range(counts[0], counts[-1] + 1, step)) or counts[0] % step:
            raise PlanInputError(
                f"profile.gpu_counts: {counts} must be consecutive multiples of one step "
                "(e.g. 1,2,3,4 or 8,16,24) so that the table has no holes"
            )


def training_command(cfg: ProfileConfig, layout: Layout, metrics_path: Path) -> list[str]:
    """The launcher command line that trains `cfg.model` with `layout` and logs metrics to `metrics_path`."""
    m = cfg.model
    args = [
        *cfg.launcher,
        "--nproc-per-node",
        str(layout.num_gpus),
        cfg.script,
        "--num-layers",
        str(m.num_layers),
        "--hidden-size",
        str(m.hidden_size),
        "--num-attention-heads",
        str(m.num_attention_heads),
        "--ffn-hidden-size",
        str(m.ffn_hidden_size),
        "--seq-length",
        str(m.seq_length),
        "--max-position-embeddings",
        str(m.seq_length),
        "--micro-batch-size",
        str(layout.micro_batch_size),
        "--global-batch-size",
        str(cfg.global_batch_size),
        "--tensor-model-parallel-size",
        str(layout.tp),
        "--pipeline-model-parallel-size",
        str(layout.pp),
        "--train-iters",
        str(cfg.train_iters),
        "--lr",
        str(cfg.lr),
        "--mock-data",
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        str(m.vocab_size),
        "--transformer-impl",
        "local",
    ]
    if m.num_query_groups != m.num_attention_heads:
        args += ["--group-query-attention", "--num-query-groups", str(m.num_query_groups)]
    if m.gated_linear_unit:
        args += ["--swiglu"]
    if cfg.memory.precision == "bf16":
        args += ["--bf16"]
    elif cfg.memory.precision == "fp16":
        args += ["--fp16"]
    if cfg.memory.use_distributed_optimizer:
        args += ["--use-distributed-optimizer"]
    return [*args, *cfg.extra_args, "--unicron-metrics-log", str(metrics_path)]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """One record per iteration (the last line wins when several ranks log the same iteration)."""
    by_iter: dict[int, dict[str, Any]] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise PlanInputError(f"metrics {path}:{lineno}: not JSON") from None
        missing = [k for k in METRIC_KEYS if k not in rec]
        if missing:
            raise PlanInputError(f"metrics {path}:{lineno}: missing key {missing[0]!r}")
        prev = by_iter.get(int(rec["iteration"]))
        if prev is None or rec["elapsed_ms"] >= prev["elapsed_ms"]:
            by_iter[int(rec["iteration"])] = rec
    return [by_iter[i] for i in sorted(by_iter)]


def median_iteration_time(records: Sequence[dict[str, Any]], warmup_iters: int) -> float:
    """Median seconds per iteration after skipping the first `warmup_iters` iterations."""
    if not records:
        raise PlanInputError("metrics: no iterations logged")
    first = records[0]["iteration"]
    times = [float(r["elapsed_ms"]) / 1000.0 for r in records if r["iteration"] - first >= warmup_iters]
    if not times:
        raise PlanInputError(
            f"metrics: only {len(records)} iterations, all within the {warmup_iters} warm-up ones"
        )
    return statistics.median(times)


def candidate_layouts(cfg: ProfileConfig, gpus: int) -> list[Layout]:
    """Up to `top_k` layouts on `gpus`: the analytic model's fastest micro-batch size for each (TP, PP),
    ordered by predicted time, so that a profile compares DP, PP and TP rather than micro-batch sizes."""
    params = AnalyticParams.for_device(cfg.device)
    layouts = enumerate_layouts(
        cfg.model, cfg.global_batch_size, gpus, cfg.gpus_per_node, cfg.device.memory_bytes, memory=cfg.memory
    )

    def predicted(lay: Layout) -> float:
        return iteration_time(
            cfg.model, lay, cfg.global_batch_size, cfg.gpus_per_node, cfg.device, params, cfg.memory
        )

    best: dict[tuple[int, int], Layout] = {}
    for lay in sorted(layouts, key=predicted):
        best.setdefault((lay.tp, lay.pp), lay)
    return sorted(best.values(), key=predicted)[: cfg.top_k]


def run_subprocess(command: list[str], log_path: Path, timeout_s: float = 900.0) -> None:
    """Run one training command; stdout/stderr go to `log_path`; raises on a non-zero exit or timeout."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    with log_path.open("w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s, check=True)


def profile(
    cfg: ProfileConfig, workdir: Path, run: Runner | None = None
) -> tuple[ThroughputTable, list[Measurement]]:
    """Run the candidates of every GPU count; the table of the best per count and all measurements."""
    workdir.mkdir(parents=True, exist_ok=True)
    runner: Runner = run or (lambda cmd, log: run_subprocess(cmd, log, cfg.timeout_s))
    work = cfg.global_batch_size * cfg.model.flops_per_sample()
    counts = sorted(set(cfg.gpu_counts))
    step = counts[1] - counts[0] if len(counts) > 1 else counts[0]
    entries: list[TableEntry] = []
    measurements: list[Measurement] = []
    for gpus in counts:
        best = TableEntry(gpus=gpus, flops=0.0, layout=None)
        for layout in candidate_layouts(cfg, gpus):
            metrics = workdir / f"metrics_{layout}.jsonl"
            log = workdir / f"log_{layout}.txt"
            metrics.unlink(missing_ok=True)
            try:
                runner(training_command(cfg, layout, metrics), log)
                t = median_iteration_time(read_metrics(metrics), cfg.warmup_iters)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, PlanInputError, OSError) as err:
                logger.warning("layout %s failed (%s); see %s", layout, err, log)
                continue
            measurements.append(Measurement(layout=layout, iteration_time_s=t))
            logger.info("layout %s: %.4f s per iteration", layout, t)
            if work / t > best.flops:
                best = TableEntry(gpus=gpus, flops=work / t, layout=layout, iteration_time_s=t)
        entries.append(best)
    table = ThroughputTable(
        entries=tuple(entries),
        step=step,
        source="profile",
        model=cfg.model.name,
        global_batch_size=cfg.global_batch_size,
    )
    return table, measurements
