"""Snapshot overhead on healthy iterations: off, every 10 and every iteration, in the same run.

    PYTHONPATH=. python benchmarks/snapshot_overhead.py [--json] [--rounds 30] [--block 10] [--persists 3]

Starts the tiny CPU job (``examples/gpt/configs/tiny_gpt.yaml``: TP2 PP2 on 4 gloo ranks, step guard on
as with ``--unicron``) through ``unicron-run`` and times ``Trainer.train_step`` in blocks of ``--block``
iterations with snapshots off, every 10 (N = 10) and every iteration (N = 1), the three modes
interleaved, their order rotated every round, ``--rounds`` times. Snapshots go to shared memory
(``/dev/shm``). Per mode: the mean and median iteration time (slowest rank of each iteration), the
overhead against "off" (paired: the median over rounds of each round's block mean against the same
round's "off" block, which cancels the drift of a shared machine's load; and unpaired, from the
overall means and medians); the CPU time the ranks use per iteration, every thread of theirs counted
(the writer's too), and its paired overhead (on 2 saturated cores a snapshot's cost is CPU taken from
the ranks); the time the training thread spends handing a snapshot over (after the commit), the stall
before the optimizer step waiting for the copy, and the background copy time.
Then ``--persists`` times each: a synchronous ``checkpoint.save`` and the asynchronous persist of
the snapshots (its stall: planning + finalising, plus what the iterations it overlapped lost).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import job_env

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "examples/gpt/configs/tiny_gpt.yaml"
MODES = (("off", 0), ("N=10", 10), ("N=1", 1))


def _timed(fn: Any, sink: list[float]) -> Any:
    def wrapper() -> None:
        t0 = time.perf_counter()
        fn()
        sink.append(time.perf_counter() - t0)

    return wrapper


def worker(args: argparse.Namespace) -> int:
    """One rank: train in interleaved blocks, then compare the two kinds of persistent save."""
    sys.path.insert(0, str(ROOT / "examples/gpt"))
    import megatron.core  # noqa: F401  (imported before the CPU patch, so every module gets patched)
    import torch.distributed as dist
    from pretrain_gpt import forward_step

    from megatron_unicron.megatron import checkpoint, cpu
    from megatron_unicron.megatron.args import parse_args, resolve_world
    from megatron_unicron.megatron.async_save import AsyncCheckpointer
    from megatron_unicron.megatron.train import Trainer, WorkerEnv
    from megatron_unicron.snapshot.service import SnapshotService

    cpu.apply()
    env = WorkerEnv.from_environ()
    total = args.warmup + args.rounds * args.block * len(MODES) + args.persists * 8 + 10
    margs = resolve_world(parse_args(["--yaml-cfg", str(YAML), "--train-iters", str(total), "--unicron"]),
                          env.world_size)  # fmt: skip
    trainer = Trainer(margs, forward_step, env)
    trainer.start_generation(0, env.rank, env.world_size, margs.tensor_model_parallel_size,
                             margs.pipeline_model_parallel_size)  # fmt: skip
    service = SnapshotService(trainer, directory=Path(args.snapshot_dir), job=env.job, node="node0",
                              launch_rank=env.rank)  # fmt: skip
    hook_times: list[float] = []
    trainer.after_commit_hooks[:] = [_timed(h, hook_times) for h in trainer.after_commit_hooks]
    service.interval = 0
    for _ in range(args.warmup):
        trainer.train_step()
    columns = ("iter", "hook", "stall", "copy", "cpu")
    rows: dict[str, dict[str, list[float]]] = {name: {c: [] for c in columns} for name, _ in MODES}
    for r in range(args.rounds):
        for name, interval in MODES[r % len(MODES):] + MODES[: r % len(MODES)]:
            service.interval = interval
            stalls0, copy0, hooks0 = len(service.stalls), service.writer.stats.copy_seconds, len(hook_times)
            cpu0 = time.process_time()
            for _ in range(args.block):
                t0 = time.perf_counter()
                trainer.train_step()
                rows[name]["iter"].append(time.perf_counter() - t0)
            service.before_step()  # the last copy of the block belongs to this block
            rows[name]["cpu"].append(time.process_time() - cpu0)  # every thread's: the writer's too
            rows[name]["hook"].append(sum(hook_times[hooks0:]))
            rows[name]["stall"].append(sum(service.stalls[stalls0:]))
            rows[name]["copy"].append(service.writer.stats.copy_seconds - copy0)
    service.interval = 0
    persist: dict[str, list[float]] = {"sync_s": [], "async_plan_s": [], "async_finalize_s": [],
                                       "async_overlap_extra_s": []}  # fmt: skip
    checkpointer = AsyncCheckpointer()
    for _ in range(args.persists):
        trainer.train_step()
        t0 = time.perf_counter()
        checkpoint.save(os.path.join(args.save_dir, "sync"), trainer, margs)
        persist["sync_s"].append(time.perf_counter() - t0)
        trainer.train_step()
        pending = checkpointer.start(os.path.join(args.save_dir, "async"), trainer, margs)
        persist["async_plan_s"].append(pending.plan_seconds)
        t0 = time.perf_counter()
        trainer.train_step()
        trainer.train_step()
        overlapped = time.perf_counter() - t0
        persist["async_finalize_s"].append(pending.finalize())
        t0 = time.perf_counter()
        trainer.train_step()
        trainer.train_step()
        persist["async_overlap_extra_s"].append(overlapped - (time.perf_counter() - t0))
    everything = [None] * env.world_size
    dist.all_gather_object(everything, {"rows": rows, "persist": persist})
    if env.rank == 0:
        Path(args.out).write_text(json.dumps(everything))
    service.close()
    trainer.finish()
    return 0


def _paired_pct(blocks: list[float], off: list[float]) -> float:
    """Median over rounds of each block against the same round's "off" block, in percent."""
    return statistics.median((block / base - 1) * 100 for block, base in zip(blocks, off))


def summarise(per_rank: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Per mode: iteration times (slowest rank per iteration), overheads and snapshot costs."""
    out: dict[str, Any] = {"rounds": args.rounds, "block": args.block, "persists": args.persists,
                           "nproc": args.nproc, "modes": {}}  # fmt: skip
    iterations = args.rounds * args.block
    slowest = {name: [max(r["rows"][name]["iter"][i] for r in per_rank) for i in range(iterations)]
               for name, _ in MODES}  # fmt: skip
    block_means = {name: [statistics.fmean(times[k * args.block : (k + 1) * args.block])
                          for k in range(args.rounds)] for name, times in slowest.items()}  # fmt: skip
    cpu_blocks = {name: [sum(r["rows"][name]["cpu"][k] for r in per_rank) for k in range(args.rounds)]
                  for name, _ in MODES}  # fmt: skip
    for name, interval in MODES:
        times = slowest[name]
        per_iter = {k: max(sum(r["rows"][name][k]) for r in per_rank) / iterations * 1e3
                    for k in ("hook", "stall", "copy")}  # fmt: skip
        out["modes"][name] = {
            "interval": interval,
            "overhead_paired_pct": _paired_pct(block_means[name], block_means["off"]),
            "cpu_ms_per_iter": statistics.median(cpu_blocks[name]) / args.block * 1e3,
            "cpu_overhead_paired_pct": _paired_pct(cpu_blocks[name], cpu_blocks["off"]),
            "iter_mean_ms": statistics.fmean(times) * 1e3,
            "iter_median_ms": statistics.median(times) * 1e3,
            "handover_ms_per_iter": per_iter["hook"],
            "stall_ms_per_iter": per_iter["stall"],
            "background_copy_ms_per_iter": per_iter["copy"],
        }
    off = out["modes"]["off"]
    for mode in out["modes"].values():
        mode["overhead_mean_pct"] = (mode["iter_mean_ms"] / off["iter_mean_ms"] - 1) * 100
        mode["overhead_median_pct"] = (mode["iter_median_ms"] / off["iter_median_ms"] - 1) * 100
        mode["training_thread_ms_per_iter"] = (mode["handover_ms_per_iter"] - off["handover_ms_per_iter"]
                                               + mode["stall_ms_per_iter"])  # fmt: skip
        mode["training_thread_pct"] = mode["training_thread_ms_per_iter"] / off["iter_median_ms"] * 100
    if args.persists:
        runs = range(args.persists)
        persist = {k: statistics.median(max(r["persist"][k][i] for r in per_rank) for i in runs)
                   for k in per_rank[0]["persist"]}  # fmt: skip
        persist["async_stall_s"] = persist["async_plan_s"] + persist["async_finalize_s"]
        out["persist"] = persist
    return out


def table(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table."""
    lines = [
        "| mode | mean iteration | median iteration | overhead: paired (mean / median) | CPU per "
        f"iteration ({summary['nproc']} ranks, every thread) | CPU overhead: paired | hand-over + stall on "
        "the training thread | background copy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in summary["modes"].items():
        lines.append(
            f"| {name} | {m['iter_mean_ms']:.1f} ms | {m['iter_median_ms']:.1f} ms | "
            f"{m['overhead_paired_pct']:+.1f} % "
            f"({m['overhead_mean_pct']:+.1f} % / {m['overhead_median_pct']:+.1f} %) | "
            f"{m['cpu_ms_per_iter']:.1f} ms | {m['cpu_overhead_paired_pct']:+.1f} % | "
            f"{m['training_thread_ms_per_iter']:.2f} ms/iter ({m['training_thread_pct']:.2f} %) | "
            f"{m['background_copy_ms_per_iter']:.2f} ms/iter |"
        )
    p = summary.get("persist")
    if p is None:
        return "\n".join(lines)
    lines += [
        "",
        f"persistent checkpoint (median of {summary['persists']}): synchronous "
        f"save {p['sync_s'] * 1e3:.0f} ms; asynchronous: {p['async_stall_s'] * 1e3:.0f} ms on the training "
        f"thread (plan {p['async_plan_s'] * 1e3:.0f} + finalise {p['async_finalize_s'] * 1e3:.0f}), "
        f"{p['async_overlap_extra_s'] * 1e3:+.0f} ms over the two iterations the write overlapped",
    ]
    return "\n".join(lines)


def main() -> int:
    """Parse flags; run the workers through the launcher (or be one of them)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--rounds", type=int, default=30, help="rounds of the three modes (default 30)")
    parser.add_argument("--block", type=int, default=10, help="iterations per mode and round (default 10)")
    parser.add_argument("--warmup", type=int, default=10, help="iterations before timing (default 10)")
    parser.add_argument("--persists", type=int, default=3, help="saves of each kind (default 3)")
    parser.add_argument("--nproc", type=int, default=4, help="ranks (default 4: TP2 PP2)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--snapshot-dir", help=argparse.SUPPRESS)
    parser.add_argument("--save-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.rounds, args.block, args.nproc) < 1 or min(args.warmup, args.persists) < 0:
        parser.error("--rounds, --block and --nproc must be >= 1; --warmup and --persists >= 0")
    if args.worker:
        return worker(args)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    scratch = Path(tempfile.mkdtemp(prefix="unicron_snapbench_", dir=shm))
    saves = Path(tempfile.mkdtemp(prefix="unicron_snapbench_ckpt_"))
    out = saves / "result.json"
    cmd = [sys.executable, "-m", "megatron_unicron.launch", "--nproc-per-node", str(args.nproc), __file__,
           "--worker", "--out", str(out), "--snapshot-dir", str(scratch), "--save-dir", str(saves),
           "--rounds", str(args.rounds), "--block", str(args.block), "--warmup", str(args.warmup),
           "--persists", str(args.persists)]  # fmt: skip
    env = job_env()
    try:
        done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-4000:])
            return done.returncode
        summary = summarise(json.loads(out.read_text()), args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(saves, ignore_errors=True)
    print(json.dumps(summary, indent=2) if args.json else table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
