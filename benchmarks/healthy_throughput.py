"""Healthy throughput: pretrain_gpt.py against a plain megatron-core loop, same model, layout and run.

For each TP/PP/DP layout of the tiny demo GPT on 4 CPU ranks, both are launched through
``unicron-run``: ``examples/gpt/pretrain_gpt.py --yaml-cfg examples/gpt/configs/tiny_gpt.yaml``
(without ``--unicron``) and ``benchmarks/plain_mcore_loop.py`` with the model, batch and schedule
of that YAML file. An iteration's time is the wall-clock time between the ends of two consecutive
iterations on the last rank (pretrain_gpt.py's Megatron log line per iteration carries it; the
baseline writes it); the first ``--warmup`` iterations are skipped and the median of the rest is
the run's figure. The pair runs ``--rounds`` times, alternating which of the two goes first, and
the table gives the median over rounds. Target: pretrain_gpt.py within 2 % of the baseline.

Because the 2 cores are shared, each run also reports the CPU seconds its processes used per
steady-state iteration (sampled from ``/proc``): wall-clock time grows with other load on the
machine, CPU time per iteration much less.

    PYTHONPATH=. python benchmarks/healthy_throughput.py [--rounds 3] [--iters 60] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from common import (
    REPO,
    JobRun,
    launch,
    load_average,
    markdown_table,
    parse_layout,
    steady_cpu_seconds,
    steady_seconds,
)

CONFIG = "examples/gpt/configs/tiny_gpt.yaml"
LAYOUTS = ("TP1PP1", "TP2PP1", "TP1PP2", "TP2PP2", "TP1PP4", "TP4PP1")
NPROC = 4
LOG_LINE = re.compile(r"^ \[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\] iteration\s+(\d+)/", re.M)


def job_shape(config: dict[str, Any], tp: int) -> list[str]:
    """The baseline's flags for the model, batch and schedule of the YAML job config."""
    lm = config["language_model"]
    multiple = config["make_vocab_size_divisible_by"] * tp
    padded = math.ceil((config["vocab_size"] + 1) / multiple) * multiple  # + the end-of-document id
    values = {
        "--num-layers": lm["num_layers"], "--hidden-size": lm["hidden_size"],
        "--num-attention-heads": lm["num_attention_heads"], "--seq-length": config["seq_length"],
        "--vocab-size": config["vocab_size"], "--padded-vocab-size": padded,
        "--micro-batch-size": config["micro_batch_size"], "--global-batch-size": config["global_batch_size"],
        "--lr": config["lr"], "--min-lr": config["min_lr"], "--lr-warmup-iters": config["lr_warmup_iters"],
        "--weight-decay": config["weight_decay"], "--clip-grad": config["clip_grad"],
        "--seed": config["seed"],
    }  # fmt: skip
    assert config["lr_decay_style"] == "cosine" and lm["hidden_dropout"] == lm["attention_dropout"] == 0
    return [str(x) for item in values.items() for x in item]


def run_pretrain(tp: int, pp: int, iters: int) -> tuple[JobRun, list[float]]:
    """The run and the end times of pretrain_gpt.py's iterations, from its Megatron log lines."""
    done = launch(
        ["examples/gpt/pretrain_gpt.py", "--yaml-cfg", CONFIG, "--tensor-model-parallel-size", str(tp),
         "--pipeline-model-parallel-size", str(pp), "--train-iters", str(iters), "--log-interval", "1"],
        NPROC,
    )  # fmt: skip
    stamps = [stamp for stamp, _ in LOG_LINE.findall(done.stdout)]
    times = [datetime.strptime(t, "%Y-%m-%d %H:%M:%S.%f").timestamp() for t in stamps]
    if len(times) != iters:
        tail = done.stdout[-2000:]
        raise RuntimeError(f"pretrain_gpt.py logged {len(times)} of {iters} iterations:\n{tail}")
    return done, times


def run_baseline(
    tp: int, pp: int, iters: int, config: dict[str, Any], reduce_loss: bool = False
) -> tuple[JobRun, list[float]]:
    """The run and the end times of the plain loop's iterations."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.jsonl"
        done = launch(
            ["benchmarks/plain_mcore_loop.py", "--tp", str(tp), "--pp", str(pp), "--iters", str(iters),
             "--out", str(out), *job_shape(config, tp), *(["--reduce-loss"] if reduce_loss else [])],
            NPROC,
        )  # fmt: skip
        return done, [json.loads(line)["t"] for line in out.read_text().splitlines()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated, e.g. TP2PP1,TP1PP2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline-reduces-loss", action="store_true",
                   help="the plain loop all-reduces its loss over DP each iteration, as Megatron-LM does")
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="iterations skipped before timing")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args()
    layouts = [parse_layout(t, NPROC, "healthy_throughput") for t in args.layouts.split(",")]
    config = yaml.safe_load((REPO / CONFIG).read_text())
    tokens = config["global_batch_size"] * config["seq_length"]
    load_before = load_average()
    wall: dict[tuple[int, int], dict[str, list[float]]] = {lay: {"ours": [], "base": []} for lay in layouts}
    cpu: dict[tuple[int, int], dict[str, list[float]]] = {lay: {"ours": [], "base": []} for lay in layouts}
    for r in range(args.rounds):
        for i, (tp, pp) in enumerate(layouts):
            order = ["ours", "base"] if (r + i) % 2 == 0 else ["base", "ours"]
            for which in order:
                if which == "ours":
                    run, times = run_pretrain(tp, pp, args.iters)
                else:
                    run, times = run_baseline(tp, pp, args.iters, config, args.baseline_reduces_loss)
                wall[(tp, pp)][which].append(steady_seconds(times, args.warmup))
                cpu[(tp, pp)][which].append(steady_cpu_seconds(run, times, args.warmup))
                print(f"round {r + 1} TP{tp}PP{pp} {'pretrain_gpt' if which == 'ours' else 'baseline'}: "
                      f"{wall[(tp, pp)][which][-1] * 1000:.1f} ms/it, "
                      f"CPU {cpu[(tp, pp)][which][-1] * 1000:.1f} ms/it; load {load_average()}",
                      file=sys.stderr, flush=True)  # fmt: skip
    results = []
    for tp, pp in layouts:
        ours, base = (statistics.median(wall[(tp, pp)][w]) for w in ("ours", "base"))
        cpu_ours, cpu_base = (statistics.median(cpu[(tp, pp)][w]) for w in ("ours", "base"))
        results.append({
            "layout": f"TP{tp}PP{pp}DP{NPROC // (tp * pp)}",
            "pretrain_gpt_it_s": 1 / ours, "pretrain_gpt_tokens_s": tokens / ours,
            "baseline_it_s": 1 / base, "baseline_tokens_s": tokens / base, "ratio": base / ours,
            "pretrain_gpt_cpu_ms": cpu_ours * 1000, "baseline_cpu_ms": cpu_base * 1000,
            "cpu_ratio": cpu_base / cpu_ours,
            "pretrain_gpt_ms_rounds": [s * 1000 for s in wall[(tp, pp)]["ours"]],
            "baseline_ms_rounds": [s * 1000 for s in wall[(tp, pp)]["base"]],
            "pretrain_gpt_cpu_ms_rounds": [s * 1000 for s in cpu[(tp, pp)]["ours"]],
            "baseline_cpu_ms_rounds": [s * 1000 for s in cpu[(tp, pp)]["base"]],
        })  # fmt: skip
    summary = (f"{args.rounds} rounds x {args.iters} iterations ({args.warmup} warm-up), {tokens} tokens per "
               f"iteration; load average before {load_before}, after {load_average()}")  # fmt: skip
    if args.json:
        print(json.dumps({"results": results, "iters": args.iters, "warmup": args.warmup,
                          "rounds": args.rounds, "summary": summary}, indent=2))  # fmt: skip
        return 0
    rows = [
        [r["layout"], f"{r['pretrain_gpt_it_s']:.2f}", f"{r['pretrain_gpt_tokens_s']:.0f}",
         f"{r['baseline_it_s']:.2f}", f"{r['baseline_tokens_s']:.0f}", f"{r['ratio']:.3f}",
         f"{r['pretrain_gpt_cpu_ms']:.0f}", f"{r['baseline_cpu_ms']:.0f}", f"{r['cpu_ratio']:.3f}"]
        for r in results
    ]  # fmt: skip
    headers = ["layout", "pretrain_gpt it/s", "tokens/s", "baseline it/s", "tokens/s", "ratio",
               "pretrain_gpt CPU ms/it", "baseline CPU ms/it", "CPU ratio"]  # fmt: skip
    print(markdown_table(headers, rows))
    print(f"\n{summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
