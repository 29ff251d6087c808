"""Monitoring overhead on healthy iterations: --unicron's worker machinery on and off in the same processes.

    PYTHONPATH=. python benchmarks/monitoring_overhead.py [--json] [--rounds 20] [--block 10]
        [--nproc 4 --layout TP2PP2] [--per-op]

Starts the tiny CPU job (``examples/gpt/configs/tiny_gpt.yaml``: TP2 PP2 on 4 gloo ranks; ``--nproc``
and ``--layout`` choose others, e.g. ``--nproc 2 --layout TP2PP1``, whose ranks do not share a core) through
``unicron-run --unicron`` and times iterations in blocks of ``--block`` with each mode in turn, the
order rotated every round, ``--rounds`` times:

* ``off``: a plain megatron-core iteration (no step guard, collectives untimed, no monitor threads);
* ``timed``: only the collectives and pipeline waits timed (``timed_collectives``);
* ``guard``: only the step guard's pre-step copy;
* ``on``: everything ``--unicron`` runs in a worker: a :class:`~megatron_unicron.healing.Healer` (timed
  collectives, its iteration monitor and decision watch threads, the progress posts) around each step,
  and the step guard.

Each block sets its mode up (a new Healer for "on", new statistics for "timed") and first runs
``--settle`` iterations untimed (default 1): a job sets these up once, so what its first iteration in a
mode pays (slots and keys of every operation, the Healer's threads starting, their first store round
trips) is not the cost of a healthy iteration.

Per mode: the mean iteration time (slowest rank of each iteration) and the overhead against ``off``,
paired (the median over rounds of each block's mean against the same round's ``off`` block, which
cancels the drift of a shared machine's load); the same for the CPU time the 4 processes use per
iteration (all their threads), which scheduling on 2 shared cores disturbs less than wall time; and the
training thread's own CPU time per iteration and rank (the median over blocks, and the median of each
block's difference from the same round's "off" block), which says how much of an overhead is the
Python and C++ path of the training thread itself (the timed collectives' wrappers run there).
Comparing separate runs (``detection_latency.py --overhead-rounds``) cannot resolve a percent here:
the same job's speed drifts by 10-30 % between runs minutes apart. The launcher's agent and
coordinator run in every mode; their CPU use is measured separately, against the same launcher
without ``--unicron``.

``--per-op`` also meters every ``torch.distributed`` operation the training thread calls, outermost, in
every mode: calls per iteration and the thread's CPU time per call. A block's total moves by a
millisecond or two from block to block; the same operation's cost per call, over thousands of calls,
does not, so the difference per call between "timed" and "off" is what timing an operation costs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
from common import job_env, parse_layout

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "examples/gpt/configs/tiny_gpt.yaml"
MODES = ("off", "timed", "guard", "on")
METERED = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather", "broadcast",
           "barrier", "batch_isend_irecv")  # fmt: skip


class OpMeter:
    """``--per-op``: counts each ``torch.distributed`` operation the training thread calls, and the CPU time
    the thread spends inside it, per mode. Installed outermost (over the timed wrappers, when a mode has
    them), so the difference between modes per call is what timing an operation costs."""

    def __init__(self) -> None:
        self.totals: dict[str, dict[str, list[float]]] = {mode: {} for mode in MODES}

    @contextlib.contextmanager
    def installed(self, mode: str) -> Iterator[None]:
        """Meter every operation of ``METERED`` inside the block as ``mode``'s."""
        import torch.distributed as dist

        inner = {name: getattr(dist, name) for name in METERED}
        for name, function in inner.items():
            setattr(dist, name, self._metered(self.totals[mode].setdefault(name, [0, 0.0]), function))
        try:
            yield
        finally:
            for name, function in inner.items():
                setattr(dist, name, function)

    @staticmethod
    def _metered(total: list[float], function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)  # the timed wrappers read the signature of what they wrap
        def metered(*args: Any, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                total[0] += 1
                total[1] += time.thread_time() - started

        return metered


def worker(args: argparse.Namespace) -> int:
    """One rank: train in interleaved blocks of the four modes."""
    sys.path.insert(0, str(ROOT / "examples/gpt"))
    import megatron.core  # noqa: F401  (imported before the CPU patch, so every module gets patched)
    import torch.distributed as dist
    from pretrain_gpt import forward_step

    from megatron_unicron.detect.watchdog import AdaptiveTimeouts, TimeoutPolicy
    from megatron_unicron.healing import Healer
    from megatron_unicron.megatron import cpu, timed_collectives
    from megatron_unicron.megatron.args import parse_args, resolve_world
    from megatron_unicron.megatron.pretrain import job_config
    from megatron_unicron.megatron.train import Trainer, WorkerEnv
    from megatron_unicron.protocol import JobChannel
    from megatron_unicron.store import JobKeys

    cpu.apply()
    env = WorkerEnv.from_environ()
    total = args.warmup + args.rounds * (args.block + args.settle) * len(MODES) + 10
    margs = resolve_world(parse_args(["--yaml-cfg", str(YAML), "--train-iters", str(total), "--unicron",
                                      *_layout_flags(args)]), env.world_size)  # fmt: skip
    trainer = Trainer(margs, forward_step, env)
    channel = JobChannel(trainer.store, JobKeys(env.job))
    if env.rank == 0:
        channel.post_config(job_config(margs, env, trainer.tokenizer.vocab_size))
    trainer.start_generation(0, env.rank, env.world_size, margs.tensor_model_parallel_size,
                             margs.pipeline_model_parallel_size)  # fmt: skip
    trainer.ensure_datasets()
    detection = margs.unicron.detection
    policy = TimeoutPolicy(slow_factor=detection.slow_factor, warmup_floor_s=detection.warmup_floor_s,
                           min_timeout_s=detection.min_timeout_s)  # fmt: skip

    meter = OpMeter() if args.per_op else None

    def block(mode: str, measured: bool = True) -> tuple[list[float], float, float]:
        healer = None
        trainer.guard.enabled = mode in ("guard", "on")
        if mode == "timed":
            timed_collectives.apply(AdaptiveTimeouts(policy))
        if mode == "on":
            healer = Healer(trainer, channel, launch_rank=env.rank, node="node0", generation=0)
        step: Callable[[], Any] = trainer.train_step
        if healer is not None:
            attempt = healer.attempt
            step = lambda: attempt(trainer.train_step)  # noqa: E731
        times = []
        metering = meter.installed(mode) if meter is not None and measured else contextlib.nullcontext()
        try:
            for _ in range(args.settle):
                step()
            dist.barrier()
            cpu0, main0 = time.process_time(), time.thread_time()
            with metering:
                for _ in range(args.block):
                    t0 = time.perf_counter()
                    step()
                    times.append(time.perf_counter() - t0)
            cpu = (time.process_time() - cpu0) / args.block
            main = (time.thread_time() - main0) / args.block
        finally:
            if healer is not None:
                healer.close()
            timed_collectives.revert()
        return times, cpu, main

    for _ in range(args.warmup // 2):
        block("off", measured=False)
        block("on", measured=False)
    rows: dict[str, dict[str, list[float]]] = {mode: {"iter": [], "cpu": [], "main": []} for mode in MODES}
    for r in range(args.rounds):
        for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:
            times, cpu_s, main_s = block(mode)
            rows[mode]["iter"].extend(times)
            rows[mode]["cpu"].append(cpu_s)
            rows[mode]["main"].append(main_s)
    everything: list[Any] = [None] * env.world_size
    dist.all_gather_object(everything, {"rows": rows, "ops": meter.totals if meter is not None else None})
    if env.rank == 0:
        Path(args.out).write_text(json.dumps(everything))
        channel.mark_done()
    trainer.finish()
    return 0


def _layout_flags(args: argparse.Namespace) -> list[str]:
    tp, pp = parse_layout(args.layout, args.nproc, "monitoring_overhead")
    return ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]


def _paired(blocks: list[float], off: list[float]) -> tuple[float, list[float]]:
    """Median and quartiles of each block against the same round's ``off`` block, in percent."""
    ratios = [(b / o - 1) * 100 for b, o in zip(blocks, off)]
    return statistics.median(ratios), statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [0.0] * 3


def summarise(per_rank: list[dict[str, dict[str, list[float]]]], args: argparse.Namespace) -> dict[str, Any]:
    """Per mode: iteration times (slowest rank per iteration), CPU per iteration (all ranks), and the
    overheads against ``off``."""
    n = args.rounds * args.block
    slowest = {mode: [max(r[mode]["iter"][i] for r in per_rank) for i in range(n)] for mode in MODES}
    blocks = {mode: [statistics.fmean(t[k * args.block : (k + 1) * args.block]) for k in range(args.rounds)]
              for mode, t in slowest.items()}  # fmt: skip
    cpu = {mode: [sum(r[mode]["cpu"][k] for r in per_rank) for k in range(args.rounds)] for mode in MODES}
    main = {mode: [sum(r[mode]["main"][k] for r in per_rank) / len(per_rank) for k in range(args.rounds)]
            for mode in MODES}  # fmt: skip
    out: dict[str, Any] = {"rounds": args.rounds, "block": args.block, "settle": args.settle,
                           "nproc": args.nproc, "layout": args.layout.upper(), "modes": {}}  # fmt: skip
    for mode in MODES:
        wall, wall_q = _paired(blocks[mode], blocks["off"])
        cpu_pct, cpu_q = _paired(cpu[mode], cpu["off"])
        out["modes"][mode] = {
            "iter_mean_ms": statistics.fmean(slowest[mode]) * 1e3,
            "iter_median_ms": statistics.median(slowest[mode]) * 1e3,
            "overhead_paired_pct": wall,
            "paired_quartiles_pct": wall_q,
            "cpu_ms_per_iter": statistics.median(cpu[mode]) * 1e3,
            "cpu_overhead_paired_pct": cpu_pct,
            "cpu_paired_quartiles_pct": cpu_q,
            # Medians: a block that caught a full garbage collection (several ms) would move a mean.
            "training_thread_cpu_ms_per_iter": statistics.median(main[mode]) * 1e3,
            "training_thread_cpu_extra_ms": statistics.median(
                m - o for m, o in zip(main[mode], main["off"])
            ) * 1e3,
        }
    return out


def launcher_cpu(unicron: bool, args: argparse.Namespace, tmp: Path) -> float:
    """Percent of a core the launcher process (agent, coordinator, store) uses while a job trains."""
    argv = [sys.executable, "-m", "megatron_unicron.launch", "--nproc-per-node", str(args.nproc),
            *(["--unicron", "--no-warm-spare"] if unicron else []),
            str(ROOT / "examples/gpt/pretrain_gpt.py"), "--yaml-cfg", str(YAML), "--train-iters", "100000",
            *_layout_flags(args),
            *(["--unicron", "--unicron-incident-log", str(tmp / "incidents.jsonl")] if unicron else [])]
    # fmt: skip
    env = job_env()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # training has started once an iteration is logged
            if " iteration " in line and "/" in line:
                break
        launcher = psutil.Process(proc.pid)
        start = launcher.cpu_times()
        time.sleep(args.launcher_seconds)
        end = launcher.cpu_times()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return ((end.user + end.system) - (start.user + start.system)) / args.launcher_seconds * 100


def per_op(per_rank: list[dict[str, dict[str, list[float]]]], args: argparse.Namespace) -> dict[str, Any]:
    """Per operation: calls per iteration and rank, and the training thread's CPU per call in each mode."""
    iterations = args.rounds * args.block * len(per_rank)
    out: dict[str, Any] = {}
    for name in METERED:
        calls = {mode: sum(r[mode].get(name, [0, 0.0])[0] for r in per_rank) for mode in MODES}
        if not calls["off"]:
            continue
        cpu = {mode: sum(r[mode].get(name, [0, 0.0])[1] for r in per_rank) for mode in MODES}
        out[name] = {"calls_per_iter": calls["off"] / iterations,
                     "cpu_us_per_call": {m: cpu[m] / calls[m] * 1e6 if calls[m] else None for m in MODES}}
    return out


def per_op_table(ops: dict[str, Any]) -> str:
    """The per-operation figures as Markdown."""
    lines = ["| operation | calls per iteration and rank | " + " | ".join(
             f"training thread's CPU per call: {m}" for m in MODES) + " |", "|---|---|" + "---|" * len(MODES)]
    for name, o in ops.items():
        off = o["cpu_us_per_call"]["off"]
        cells = []
        for mode in MODES:
            value = o["cpu_us_per_call"][mode]
            if value is None:  # the mode never called it
                cells.append("")
            else:
                cells.append(f"{value:.1f} µs" + ("" if mode == "off" else f" ({value - off:+.1f})"))
        lines.append(f"| {name} | {o['calls_per_iter']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(summary: dict[str, Any]) -> str:
    """The summary as Markdown."""
    lines = ["| mode | mean iteration | median iteration | overhead: paired median [quartiles] | "
             f"CPU per iteration ({summary['nproc']} ranks) | CPU overhead: paired median [quartiles] | "
             "training thread's CPU per iteration and rank (extra) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for mode, m in summary["modes"].items():
        q, c = m["paired_quartiles_pct"], m["cpu_paired_quartiles_pct"]
        lines.append(f"| {mode} | {m['iter_mean_ms']:.1f} ms | {m['iter_median_ms']:.1f} ms | "
                     f"{m['overhead_paired_pct']:+.2f} % [{q[0]:+.2f}, {q[2]:+.2f}] | "
                     f"{m['cpu_ms_per_iter']:.1f} ms | "
                     f"{m['cpu_overhead_paired_pct']:+.2f} % [{c[0]:+.2f}, {c[2]:+.2f}] | "
                     f"{m['training_thread_cpu_ms_per_iter']:.2f} ms "
                     f"({m['training_thread_cpu_extra_ms']:+.2f} ms) |")  # fmt: skip
    cpu = summary.get("launcher_cpu_pct")
    if cpu:
        lines += ["", f"launcher (agent, coordinator, store) while training: {cpu['on']:.2f} % of a core "
                      f"with --unicron, {cpu['off']:.2f} % without"]  # fmt: skip
    if summary.get("per_op"):
        lines += ["", per_op_table(summary["per_op"])]
    return "\n".join(lines)


def main() -> int:
    """Parse flags; run the workers through the launcher (or be one of them)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of the four modes (default 20)")
    parser.add_argument("--block", type=int, default=10, help="iterations per mode and round (default 10)")
    parser.add_argument("--warmup", type=int, default=20, help="iterations before timing (default 20)")
    parser.add_argument("--settle", type=int, default=1,
                        help="untimed iterations at the start of each block, in its mode (default 1)")
    parser.add_argument("--launcher-seconds", type=float, default=20.0,
                        help="seconds of launcher CPU sampled per launcher mode (0: skip; default 20)")
    parser.add_argument("--nproc", type=int, default=4, help="ranks (default 4)")
    parser.add_argument("--layout", default="TP2PP2",
                        help="TPxPPy on those ranks, the rest DP (default TP2PP2)")
    parser.add_argument("--per-op", action="store_true",
                        help="also meter the CPU per call of each collective in each mode (a wrapper in all)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.rounds, args.block) < 1 or min(args.warmup, args.settle, args.launcher_seconds) < 0:
        parser.error("--rounds and --block must be >= 1; --warmup, --settle and --launcher-seconds >= 0")
    if args.nproc < 1:
        parser.error("--nproc must be >= 1")
    _layout_flags(args)  # a malformed layout fails here, before anything starts
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory(prefix="unicron_monbench_") as scratch:
        tmp = Path(scratch)
        out = tmp / "result.json"
        cmd = [sys.executable, "-m", "megatron_unicron.launch", "--unicron", "--no-warm-spare",
               "--nproc-per-node", str(args.nproc), __file__, "--worker", "--out", str(out),
               "--rounds", str(args.rounds), "--block", str(args.block), "--warmup", str(args.warmup),
               "--settle", str(args.settle),
               "--nproc", str(args.nproc), "--layout", args.layout, *(["--per-op"] if args.per_op else [])]
        # fmt: skip
        env = job_env()
        done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-4000:])
            return done.returncode
        payload = json.loads(out.read_text())
        summary = summarise([rank["rows"] for rank in payload], args)
        if args.per_op:
            summary["per_op"] = per_op([rank["ops"] for rank in payload], args)
        if args.launcher_seconds:
            summary["launcher_cpu_pct"] = {
                mode: launcher_cpu(mode == "on", args, tmp) for mode in ("off", "on")
            }
    print(json.dumps(summary, indent=2) if args.json else table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
