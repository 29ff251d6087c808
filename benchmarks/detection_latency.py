"""Detection latency per fault kind on real 4-rank GPT training, against plain megatron-core; monitoring cost.

    PYTHONPATH=. python benchmarks/detection_latency.py [--json] [--repeat 5] [--baseline-repeat 1]
        [--cap 60] [--overhead-rounds 3] [--kinds KIND ...]

**Unicron.** ``examples/gpt/pretrain_gpt.py`` (the tiny YAML model) on 4 gloo ranks through
``unicron-run --unicron``, faults injected with ``--unicron-inject``, several per run at different
iterations; each fault's latency is ``t_detected - t_fault`` of its incident line (``t_fault``: when the
injector fired, ``t_detected``: the root event's detection). Runs: the SEV3 kinds at TP2 PP2; the SEV2
kinds and process exits/hangs at TP1 PP2 DP2 (a restarted rank's state comes from its DP replica); the
SEV1 device kinds at DP4, three per run (each shrinks the job); lost nodes with four one-rank launchers,
three per run. The escalation window is 0 so that repeats of a kind stay at its own severity.

**Baseline.** The same fault under plain megatron-core training, launched as torchrun does (the project's
launcher without ``--unicron``; Megatron's default ``--distributed-timeout-minutes 10``), one fault per
run: how long until anything notices (the first failure line any process prints: a traceback, a gloo
error, the launcher's failure report), and until the launcher has torn the job down. Waiting is capped at
``--cap`` seconds ("> cap").

**Overhead.** Healthy iteration time with and without ``--unicron`` (TP2 PP2, 80 iterations, seconds per
iteration over iterations 21-80 from the Megatron log lines' timestamps), runs interleaved off/on for
``--overhead-rounds`` rounds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from megatron_unicron.events import ErrorKind
from megatron_unicron.incident_log import read_log
from megatron_unicron.taxonomy import action_for, severity_of
from megatron_unicron.testing.harness import REPO_ROOT, run_job, start_job

SCRIPT = os.path.join(REPO_ROOT, "examples/gpt/pretrain_gpt.py")
YAML = os.path.join(REPO_ROOT, "examples/gpt/configs/tiny_gpt.yaml")
UNICRON = [
    "--unicron",
    "--unicron-detection-pg-timeout-s",
    "3",
    "--unicron-detection-escalation-window-s",
    "0",
]
DP2 = ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2"]
DP4 = ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1"]
PAPER_WORST_S = 5.6

SEV3_KINDS = ("nccl-timeout", "network", "link-flap", "conn-refused", "conn-reset", "close")
SEV2_KINDS = ("other", "illegal-memory", "cuda")
PROCESS_KINDS = ("kill", "exit", "hang")
SEV1_KINDS = ("ecc", "nvlink", "dma", "driver")
ROWS = (
    "nccl-timeout",
    "ecc",
    "nvlink",
    "network",
    "link-flap",
    "other",
    "hang",
    "illegal-memory",
    "dma",
    "conn-refused",
    "cuda",
    "conn-reset",
    "driver",
    "close",
    "kill",
    "exit",
    "node",
)
LABEL = {
    "kill": "exited (SIGKILL)",
    "exit": "exited (exit 13)",
    "node": "lost-node",
    "close": "close (conn-reset)",
}
TARGET_CLASS = {"kill": "process exit", "exit": "process exit", "node": "lost node", "hang": "hang"}
TARGET_S = {"exception": 0.2, "process exit": 0.5, "lost node": 3.0}
FIRED = re.compile(r"unicron-inject: fired (\S+) \(t_fault=([0-9.]+)\)")
ITERATION_LINE = re.compile(r"^ \[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\] iteration\s+(\d+)/")
NOTICE = re.compile(
    r"Traceback|Error|error:|Connection (reset|closed|refused)|Timed out|killed by|exited with "
    r"code|failed|lost"
)
PHASES = ("forward", "backward", "optimizer")


@dataclass
class KindResult:
    """Latencies measured for one fault kind."""

    kind: str
    detect_s: list[float] = field(default_factory=list)
    decide_s: list[float] = field(default_factory=list)
    resume_s: list[float] = field(default_factory=list)
    wrong_grade: list[str] = field(default_factory=list)
    mean_iteration_s: list[float] = field(default_factory=list)
    baseline_sign_s: list[float | None] = field(default_factory=list)
    baseline_down_s: list[float | None] = field(default_factory=list)

    def target(self) -> tuple[str, float]:
        """The target class and its bound in seconds (a hang's depends on the mean iteration time)."""
        name = TARGET_CLASS.get(self.kind, "exception")
        if name == "hang":
            mean = statistics.mean(self.mean_iteration_s) if self.mean_iteration_s else 0.0
            return name, 3.0 * mean + 0.5
        return name, TARGET_S[name]


def _spec_kind(spec: str) -> str:
    return spec.split(":")[0].split("=")[0]


def _flags(name: str, tmp: Path) -> tuple[Path, Path, list[str]]:
    log, metrics = tmp / f"{name}.incidents.jsonl", tmp / f"{name}.metrics.jsonl"
    return log, metrics, ["--unicron-incident-log", str(log), "--unicron-metrics-log", str(metrics)]


def unicron_run(
    name: str,
    tmp: Path,
    layout: Sequence[str],
    specs: Sequence[str],
    results: dict[str, KindResult],
    *,
    nproc: int = 4,
    nnodes: int = 1,
) -> None:
    """One --unicron run with ``specs``; every incident with a fired fault becomes a sample of its kind."""
    iters = max(int(s.split(":")[2]) for s in specs) + 3
    log, metrics, logs = _flags(name, tmp)
    argv = [SCRIPT, "--yaml-cfg", YAML, "--train-iters", str(iters), *UNICRON, *logs, *layout]
    for spec in specs:
        argv += ["--unicron-inject", spec]
    started = time.monotonic()
    keep = os.environ.get("DETECTION_LATENCY_KEEP")  # a directory: keep each run's output there
    result = run_job(
        argv,
        nproc_per_node=nproc,
        nnodes=nnodes,
        launcher_args=["--unicron", "--shutdown-timeout", "5"],
        timeout_s=900,
    )
    if keep:
        Path(keep, f"{name}.log").write_text(result.output)
        Path(keep, f"{name}.incidents.jsonl").write_text(log.read_text() if log.exists() else "")
    fired = {float(t): spec for spec, t in FIRED.findall(result.output)}
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    healthy = [r["elapsed_ms"] / 1000.0 for r in records[3:]]
    mean_iteration = statistics.mean(healthy) if healthy else 0.0
    lines = read_log(str(log))
    matched = 0
    for spec in sorted(set(specs) - set(fired.values())):
        print(f"  {name}: {spec} did not fire", file=sys.stderr)
    for line in lines:
        cause = _fired_spec(fired, line["t_fault"])
        if cause is None:
            what = f"{line['severity']} {line['root_kind']} {line['ranks']} at iteration {line['iteration']}"
            print(f"  {name}: incident {line['incident']} matches no fault: {what} -> {line['action']} "
                  f"({line['outcome']}): {line['message'][:200]}", file=sys.stderr)  # fmt: skip
            continue
        matched += 1
        kind = _spec_kind(cause)
        res = results[kind]
        res.detect_s.append(line["t_detected"] - line["t_fault"])
        res.decide_s.append(line["t_decided"] - line["t_detected"])
        if line["t_resumed"] is not None:
            res.resume_s.append(line["t_resumed"] - line["t_decided"])
        res.mean_iteration_s.append(mean_iteration)
        expected = _expected_severity(kind)
        if line["severity"] != expected or line["action"] != action_for_name(expected):
            res.wrong_grade.append(f"{cause}: {line['severity']} {line['action']}")
    print(
        f"  {name}: {len(fired)}/{len(specs)} fired, {len(lines)} incidents, {matched} matched, "
        f"exit {result.returncode}, {time.monotonic() - started:.0f} s",
        file=sys.stderr,
        flush=True,
    )


def _fired_spec(fired: dict[float, str], t_fault: float | None) -> str | None:
    """The fault whose ``t_fault`` (printed to the microsecond) an incident carries."""
    if t_fault is None:
        return None
    return next((spec for t, spec in fired.items() if abs(t - t_fault) < 1e-5), None)


def _expected_severity(kind: str) -> str:
    error = {"kill": "exited", "exit": "exited", "node": "lost-node", "close": "conn-reset"}.get(kind, kind)
    return severity_of(ErrorKind(error)).name


def action_for_name(severity: str) -> str:
    """The action a severity's name stands for (SEV1: reconfigure, as the plan generator is wired in)."""
    from megatron_unicron.events import Severity

    return action_for(Severity[severity]).value


def unicron_plans(kinds: Sequence[str], repeat: int) -> list[tuple[str, list[str], list[str], int, int]]:
    """``(name, layout flags, specs, nproc, nnodes)`` of every --unicron run."""
    plans = []
    for group, layout, chosen, step in (
        ("sev3", [], SEV3_KINDS, 2),
        ("sev2", DP2, SEV2_KINDS, 3),
        ("process", DP2, PROCESS_KINDS, 3),
    ):
        wanted = [k for k in chosen if k in kinds]
        specs = [
            f"{k}:{i % 4}:{3 + step * i}:{PHASES[i % 3] if k not in PROCESS_KINDS else 'forward'}"
            for i, k in enumerate(k for _ in range(repeat) for k in wanted)
        ]
        if specs:
            plans.append((group, layout, specs, 4, 1))
    # Each SEV1 fault leaves its rank out: ranks 3, then 0, then 1 are members whatever the planner keeps.
    queue = [k for _ in range(repeat) for k in SEV1_KINDS if k in kinds]
    for n in range(0, len(queue), 3):
        specs = [f"{k}:{rank}:{it}:forward" for k, rank, it in zip(queue[n : n + 3], (3, 0, 1), (3, 7, 11))]
        plans.append((f"sev1-{n // 3}", DP4, specs, 4, 1))
    if "node" in kinds:  # node0 hosts the store and the coordinator: it stays
        for n in range((repeat + 2) // 3):
            plans.append(
                (f"node-{n}", DP4, ["node:3:3:forward", "node:1:7:forward", "node:2:11:forward"], 1, 4)
            )
    return plans


def baseline_run(kind: str, cap_s: float, results: dict[str, KindResult]) -> None:
    """Plain training (no --unicron), one fault at iteration 5: seconds until a failure shows, and until the
    launchers have torn the job down (None: not within ``cap_s``)."""
    spec = {"node": "node:3:5:forward"}.get(kind, f"{kind}:3:5:forward")
    nnodes, nproc = (2, 2) if kind == "node" else (1, 4)
    argv = [SCRIPT, "--yaml-cfg", YAML, "--train-iters", "12", "--unicron-inject", spec]
    job = start_job(
        argv,
        nproc_per_node=nproc,
        nnodes=nnodes,
        launcher_args=["--shutdown-timeout", "5"],
        timeout_s=cap_s + 180,
    )
    seen = [0] * nnodes
    t_fault: float | None = None
    sign: float | None = None
    down: float | None = None
    with job:
        while True:
            now = time.time()
            for node in range(nnodes):
                text = job.read_output(node)
                for line in text[seen[node] :].splitlines():
                    found = FIRED.search(line)
                    if found:
                        t_fault = float(found.group(2))
                    elif (
                        t_fault is not None and sign is None and NOTICE.search(line) and "Warning" not in line
                    ):
                        sign = now - t_fault
                seen[node] = len(text)
            ended = all(_ended(pid) for pid in job.launcher_pids)
            if ended or (t_fault is not None and now - t_fault > cap_s):
                if ended and t_fault is not None:
                    down = now - t_fault
                break
            time.sleep(0.01)
    results[kind].baseline_sign_s.append(sign)
    results[kind].baseline_down_s.append(down)
    print(
        f"  baseline {kind}: fired {t_fault is not None}, first sign {sign}, down {down}",
        file=sys.stderr,
        flush=True,
    )


def _ended(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def seconds_per_iteration(output: str, first: int = 20) -> float | None:
    """Wall seconds per iteration after ``first``, from the Megatron log lines' timestamps."""
    stamps = {}
    for line in output.splitlines():
        found = ITERATION_LINE.match(line)
        if found:
            stamps[int(found.group(2))] = dt.datetime.fromisoformat(found.group(1)).timestamp()
    last = max(stamps, default=0)
    if first not in stamps or last <= first:
        return None
    return (stamps[last] - stamps[first]) / (last - first)


def _cpu_seconds(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def healthy_run(mode: str, tmp: Path, iters: int, first: int = 20) -> tuple[float | None, float | None]:
    """(wall, CPU) seconds per iteration over iterations ``first``..``iters`` of a fault-free run.

    Wall: from the Megatron log lines' timestamps. CPU: user + system time of the launcher and its workers
    (the coordinator and agent threads included), sampled when those two log lines appear.
    """
    on = mode == "on"
    flags = [*UNICRON, "--unicron-incident-log", str(tmp / "healthy.incidents.jsonl")] if on else []
    argv = [SCRIPT, "--yaml-cfg", YAML, "--train-iters", str(iters), *flags]
    marks = {f"iteration {first:8d}/", f"iteration {iters:8d}/"}
    cpu: list[float] = []
    # The warm spare's one-off start (imports) is measured apart (``spare_cost``): here it would land in
    # the timed window of a short run, which a long job amortises to nothing.
    launcher = ["--unicron", "--no-warm-spare"] if on else []
    with start_job(argv, nproc_per_node=4, launcher_args=launcher, timeout_s=600) as job:
        while not all(_ended(pid) for pid in job.launcher_pids):
            text = job.read_output(0)
            if len(cpu) < len(marks) and sum(m in text for m in marks) > len(cpu):
                cpu.append(_cpu_seconds([*job.launcher_pids, *job.worker_pids()]))
            time.sleep(0.005)
        result = job.wait()
    wall = seconds_per_iteration(result.output, first) if result.returncode == 0 else None
    return wall, (cpu[1] - cpu[0]) / (iters - first) if len(cpu) == 2 and result.returncode == 0 else None


def spare_cost(timeout_s: float = 120.0) -> dict[str, float]:
    """What one node's warm spare costs once: CPU seconds and resident memory of its preloading.

    Measured on a spare for ``pretrain_gpt.py`` and the benchmark's job flags (it imports, then builds the
    job's datasets) from its start until it waits for a worker (its CPU time stops moving).
    """
    from megatron_unicron.spare import WarmSpare
    from megatron_unicron.workers import bound_to_this_process

    started = time.monotonic()
    argv = (sys.executable, "-u", SCRIPT, "--yaml-cfg", YAML)  # the job's flags: it prepares its datasets too
    spare = WarmSpare(argv, {**os.environ, "WORLD_SIZE": "4"}, bound_to_this_process())
    try:
        process = psutil.Process(spare.pid)
        last, still_since = -1.0, time.monotonic()
        while time.monotonic() - started < timeout_s:
            times = process.cpu_times()
            cpu = times.user + times.system
            if cpu != last:
                last, still_since = cpu, time.monotonic()
            elif time.monotonic() - still_since > 1.0 and process.status() == psutil.STATUS_SLEEPING:
                break
            time.sleep(0.05)
        rss = process.memory_info().rss
    finally:
        spare.close()
    return {"ready_s": still_since - started, "cpu_s": last, "rss_mib": rss / 2**20}


def overhead(rounds: int, tmp: Path, iters: int = 80) -> dict[str, Any]:
    """Healthy seconds per iteration (wall and CPU) without and with --unicron, in interleaved pairs."""
    runs: dict[str, list[tuple[float | None, float | None]]] = {"off": [], "on": []}
    for n in range(rounds):
        for mode in ("off", "on") if n % 2 == 0 else ("on", "off"):
            runs[mode].append(healthy_run(mode, tmp, iters))
            print(
                f"  overhead round {n} {mode}: wall, cpu s/it {runs[mode][-1]}", file=sys.stderr, flush=True
            )
    report: dict[str, Any] = {"pairs": rounds, "spare": spare_cost()}
    for index, what in ((0, "wall"), (1, "cpu")):
        pairs = [(a[index], b[index]) for a, b in zip(runs["off"], runs["on"])]
        good = [(a, b) for a, b in pairs if a is not None and b is not None]
        ratios = [b / a - 1.0 for a, b in good]
        report[what] = {
            "off_s": [a for a, _ in good],
            "on_s": [b for _, b in good],
            "overhead": ratios,
            "median_off_s": statistics.median(a for a, _ in good) if good else None,
            "median_on_s": statistics.median(b for _, b in good) if good else None,
            "median_overhead": statistics.median(ratios) if ratios else None,
        }
    return report


def _fmt(values: Sequence[float | None], cap_s: float) -> str:
    if not values:
        return "-"
    if any(v is None for v in values):
        return f"> {cap_s:g} s"
    known = [v for v in values if v is not None]
    if len(known) == 1:
        return f"{known[0]:.3f}"
    return f"{statistics.median(known):.3f} / {max(known):.3f}"


def summary(results: dict[str, KindResult], cap_s: float) -> list[dict[str, Any]]:
    """One row per kind: unicron median/max against its target, and the baseline."""
    rows = []
    for kind in ROWS:
        res = results.get(kind)
        if res is None or not (res.detect_s or res.baseline_sign_s):
            continue
        name, bound = res.target()
        worst = max(res.detect_s) if res.detect_s else None
        rows.append(
            {
                "kind": LABEL.get(kind, kind),
                "n": len(res.detect_s),
                "median_s": statistics.median(res.detect_s) if res.detect_s else None,
                "max_s": worst,
                "target": name,
                "target_s": bound,
                "meets_target": worst is not None and worst <= bound,
                "under_paper_worst": worst is not None and worst <= PAPER_WORST_S,
                "decide_median_s": statistics.median(res.decide_s) if res.decide_s else None,
                "resume_median_s": statistics.median(res.resume_s) if res.resume_s else None,
                "wrong_grade": res.wrong_grade,
                "mean_iteration_s": statistics.mean(res.mean_iteration_s) if res.mean_iteration_s else None,
                "baseline_first_sign_s": res.baseline_sign_s,
                "baseline_job_down_s": res.baseline_down_s,
                "baseline_first_sign": _fmt(res.baseline_sign_s, cap_s),
                "baseline_job_down": _fmt(res.baseline_down_s, cap_s),
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]], over: dict[str, Any] | None) -> str:
    """The tables for RESULTS."""
    out = [
        "| fault | n | unicron detect median / max (s) | target | decide (s) | back to training (s) | "
        "baseline: first sign (s) | baseline: job down (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        det = f"{r['median_s']:.3f} / {r['max_s']:.3f}" if r["n"] else "-"
        mark = "ok" if r["meets_target"] else "MISSED"
        dec = f"{r['decide_median_s']:.2f}" if r["decide_median_s"] is not None else "-"
        res = f"{r['resume_median_s']:.2f}" if r["resume_median_s"] is not None else "-"
        out.append(
            f"| {r['kind']} | {r['n']} | {det} | ≤ {r['target_s']:.2f} ({r['target']}): {mark} | {dec} | "
            f"{res} | {r['baseline_first_sign']} | {r['baseline_job_down']} |"
        )
    if over:
        out += ["", "| healthy s/iteration | off (plain) | on (--unicron) | overhead: median [min, max] |",
                "|---|---|---|---|"]  # fmt: skip
        for what in ("wall", "cpu"):
            o = over[what]
            if o["median_overhead"] is None:
                continue
            ratios = o["overhead"]
            out.append(
                f"| {what} ({len(ratios)} pairs) | {o['median_off_s']:.4f} | {o['median_on_s']:.4f} | "
                f"{100 * o['median_overhead']:+.1f} % [{100 * min(ratios):+.1f}, {100 * max(ratios):+.1f}] |"
            )
        spare = over["spare"]
        out += ["", f"warm spare, once per node: ready {spare['ready_s']:.1f} s after its start, "
                    f"{spare['cpu_s']:.2f} CPU s, {spare['rss_mib']:.0f} MiB resident (the timed runs above "
                    "use --no-warm-spare)"]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--repeat", type=int, default=5, help="injections per kind (default 5)")
    parser.add_argument("--baseline-repeat", type=int, default=1, help="plain runs per kind (default 1)")
    parser.add_argument("--cap", type=float, default=60.0, help="seconds a baseline waits after the fault")
    parser.add_argument("--overhead-rounds", type=int, default=3, help="off/on pairs (0: skip)")
    parser.add_argument("--kinds", nargs="*", choices=ROWS, default=list(ROWS), help="fault kinds to measure")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.baseline_repeat < 0 or args.cap <= 0:
        parser.error("--repeat must be >= 1, --baseline-repeat >= 0 and --cap > 0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = {k: KindResult(k) for k in ROWS}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="detection_latency_") as tmp:
        for name, layout, specs, nproc, nnodes in unicron_plans(args.kinds, args.repeat):
            unicron_run(name, Path(tmp), layout, specs, results, nproc=nproc, nnodes=nnodes)
        for kind in args.kinds:
            for _ in range(args.baseline_repeat):
                baseline_run(kind, args.cap, results)
        over = overhead(args.overhead_rounds, Path(tmp)) if args.overhead_rounds > 0 else None
    rows = summary(results, args.cap)
    report = {
        "rows": rows,
        "overhead": over,
        "cap_s": args.cap,
        "repeat": args.repeat,
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "seconds": time.monotonic() - started,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(markdown(rows, over))
    return 0


if __name__ == "__main__":
    sys.exit(main())
