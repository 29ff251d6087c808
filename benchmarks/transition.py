"""Transition benchmark: fault -> first good step with unicron, against Megatron's checkpoint restart.

    python benchmarks/transition.py [--json] [--repeat N] [--scenarios dp-rank-killed,dp4-rank-killed,...]

For each scenario the tiny CPU GPT (TP1 PP2 DP2 on 4 ranks, DP4, or TP2 PP2; two simulated nodes for the node
losses, of 2 or 4 ranks) is trained with ``--unicron`` and one injected fault (a rank failing again:
two, the second measured). From the incident log: fault -> detected ->
decided -> resumed (first good step of the new generation); from the transition log (every process
writes one line per transition): the split of the transition (agree, capture, leave, groups, model,
targets, plan, transfer, load), bytes received against the bytes the new layout needed from others, and
iterations lost (committed iterations thrown away: the one in flight is redone, not lost).
``node-returns`` loses a node early (iteration 20 of 1500), starts a new launcher for it once the job runs
on the survivors, and measures the scale-up: the pause from the last step before the switch to the first
step at the larger layout (no fault: detect and decide are "-"); its baseline is the relaunch of the
whole job from the newest checkpoint that Megatron needs to change its size.

The baseline, in the same run: Megatron's recovery. The whole job dies with the fault (a torchrun-style
launcher ends the group), is relaunched with ``--load`` from the newest checkpoint (saved every
``--save-interval`` iterations) and recomputes up to where it failed: fault -> back at the failed
iteration, all of relaunch, import, rebuild, load and recomputation counted. A hang is noticed by
Megatron only at its collective timeout (``--distributed-timeout-minutes``, 10 by default) and a lost
node needs an operator: both are reported as the timeout, not waited for.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_unicron.incident_log import read_log  # noqa: E402
from megatron_unicron.testing.harness import run_job, start_job  # noqa: E402

SCRIPT = str(ROOT / "examples/gpt/pretrain_gpt.py")
YAML = str(ROOT / "examples/gpt/configs/tiny_gpt.yaml")
# Late enough for the node's warm spare to have done its imports (it starts once training runs), as
# it has when a fault strikes hours into a job; 103 keeps the baseline's recomputation at 2 iterations.
FAULT_ITERATION = 103
ITERS = 111
SCALE_UP_FAULT_ITERATION = 20
SCALE_UP_ITERS = 1500  # ~35 s on the survivors (23 ms per iteration), while the node's launcher starts
MEGATRON_TIMEOUT_S = 600.0  # Megatron-LM's --distributed-timeout-minutes default: when it notices a hang


@dataclass(frozen=True)
class Scenario:
    """One fault to recover from."""

    name: str
    fault: str
    nnodes: int = 1
    what: str = ""
    tp_pp: tuple[int, int] = (1, 2)  # on 4 ranks: TP1 PP2 DP2 unless said otherwise
    flags: tuple[str, ...] = ()  # more flags of the unicron run
    launcher: tuple[str, ...] = ()  # more flags of its launcher
    ranks: int = 4
    earlier: tuple[str, ...] = ()
    """Faults before ``fault`` (their incidents are not measured: the last incident is)."""
    common: tuple[str, ...] = ()
    """Flags of both runs, unicron's and the baseline's (the model and optimizer)."""
    returns: bool = False
    """The lost node comes back: the measured transition is the scale-up to the larger layout."""


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("dp-rank-killed", f"kill:3:{FAULT_ITERATION}", what="a DP rank SIGKILLed (TP/PP kept)"),
        # By default (--unicron-restart-min-replicas 2) the survivors of a DP 2 job wait for the restart, so
        # that a second fault before it is back never finds a shard without a live copy; with 1 they train
        # on at DP 1 at once (torchft's behaviour); with four replicas two train on either way.
        Scenario("dp-rank-killed-cold", f"kill:3:{FAULT_ITERATION}", what="the same, restarted without "
                 "the warm spare (a new interpreter imports torch and megatron-core)",
                 launcher=("--no-warm-spare",)),
        Scenario("dp-rank-killed-min1", f"kill:3:{FAULT_ITERATION}", what="the same, training on at DP 1",
                 flags=("--unicron-restart-min-replicas", "1")),
        Scenario("dp4-rank-killed", f"kill:3:{FAULT_ITERATION}", what="a DP rank of four SIGKILLed",
                 tp_pp=(1, 1)),
        Scenario("dp-rank-killed-allreduce", f"kill:3:{FAULT_ITERATION}:allreduce",
                 what="a DP rank SIGKILLed in the gradient all-reduce"),
        Scenario("dp-rank-killed-optimizer", f"kill:3:{FAULT_ITERATION}:optimizer",
                 what="a DP rank SIGKILLed in the optimizer step"),
        # The DistributedOptimizer shards Adam's state over DP: the killed rank's shard has no live copy,
        # so it comes from the node's snapshot (every iteration).
        Scenario("distopt-rank-killed", f"kill:3:{FAULT_ITERATION}", what="a DistributedOptimizer DP rank "
                 "SIGKILLed", common=("--use-distributed-optimizer",),
                 flags=("--unicron-snapshot-interval", "1")),
        Scenario("relayout", f"ecc:3:{FAULT_ITERATION}", what="an ECC error excludes a rank: PP re-layout"),
        Scenario("hang", f"hang:3:{FAULT_ITERATION}", what="a rank SIGSTOPped"),
        Scenario("hang-min1", f"hang:3:{FAULT_ITERATION}", what="the same, training on at DP 1",
                 flags=("--unicron-restart-min-replicas", "1")),
        Scenario("node-lost", f"node:3:{FAULT_ITERATION}", nnodes=2, what="a node (2 ranks) lost"),
        # TP2 PP2 has no DP replica: the first kill restarts rank 1 from its snapshot; the second, within
        # the escalation window, is SEV1 and the 3 survivors go on at a smaller layout.
        Scenario("tp2pp2-rank-kept-failing", f"kill:1:{FAULT_ITERATION}", tp_pp=(2, 2),
                 earlier=(f"kill:1:{FAULT_ITERATION - 40}",), what="a rank of TP2 PP2 killed a second time",
                 flags=("--unicron-snapshot-interval", "1")),
        # Lost early, so that the returning node's launcher has time to import and join: the job runs on
        # the survivors meanwhile, then switches to the larger layout at an iteration announced ahead.
        Scenario("node-returns", f"node:3:{SCALE_UP_FAULT_ITERATION}", nnodes=2, returns=True,
                 what="the lost node (2 ranks) back: scale-up"),
        # 2 nodes x 4 ranks; devices too small for TP or PP alone: the survivors keep TP2 PP2 at DP 1.
        Scenario("node-lost-8", f"node:4:{FAULT_ITERATION}", nnodes=2, ranks=8, tp_pp=(2, 2),
                 what="a node (4 of 8 ranks) lost at TP2 PP2 DP2",
                 flags=("--unicron-device-memory-gib", "0.002")),
    )
}


@dataclass
class Result:
    """What one recovery cost."""

    scenario: str
    first_good_step_s: float
    detect_s: float
    decide_s: float
    transition_s: dict[str, float]
    resume_s: float
    bytes_moved: int
    bytes_needed: int
    iterations_lost: int
    mean_iteration_s: float
    baseline_s: float
    baseline_note: str
    layout: str = ""
    restarted_in: str = ""
    """Where the failed rank was restarted: "warm spare", "new process", or "" (nothing restarted)."""
    extra: dict[str, float] = field(default_factory=dict)


def _flags(tmp: Path, name: str, scenario: Scenario, *extra: str) -> list[str]:
    tp, pp = scenario.tp_pp
    layout = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    metrics = ["--unicron-metrics-log", str(tmp / f"{name}.metrics.jsonl")]
    iters = SCALE_UP_ITERS if scenario.returns else ITERS
    return [SCRIPT, "--yaml-cfg", YAML, *layout, "--train-iters", str(iters), *metrics, *scenario.common,
            *extra]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def unicron_run(scenario: Scenario, tmp: Path) -> Result:
    logs = [
        "--unicron", "--unicron-incident-log", str(tmp / "incidents.jsonl"),
        "--unicron-transition-log", str(tmp / "transitions.jsonl"),
    ]  # fmt: skip
    for fault in (*scenario.earlier, scenario.fault):
        logs += ["--unicron-inject", fault]
    argv = _flags(tmp, "unicron", scenario, *logs, *scenario.flags)
    launcher = ["--unicron", *scenario.launcher]
    per_node = scenario.ranks // scenario.nnodes
    if scenario.nnodes == 1:
        result = run_job(argv, nproc_per_node=per_node, launcher_args=launcher, timeout_s=600)
    else:
        with start_job(argv, nproc_per_node=per_node, nnodes=scenario.nnodes, launcher_args=launcher,
                       timeout_s=600) as job:
            if scenario.returns:
                job.wait_for_output("-> reconfigure", timeout_s=240)
                job.rejoin_node(scenario.nnodes - 1)
                job.wait_for_output("scale-up to", timeout_s=240)
            result = job.wait()
    if scenario.returns:
        return _scale_up_result(scenario, tmp, result.nodes[0].returncode, result.output)
    incident = read_log(str(tmp / "incidents.jsonl"))[len(scenario.earlier)]
    if incident.get("t_resumed") is None:
        raise RuntimeError(f"{scenario.name}: the job did not resume\n{result.output[-3000:]}")
    transitions = [t for t in _records(tmp / "transitions.jsonl") if t["member"]]
    first = [t for t in transitions if t["generation"] == incident["generation"] + 1] or transitions
    split: dict[str, float] = {}
    for key in first[0]["seconds"]:
        split[key] = max(t["seconds"].get(key, 0.0) for t in first)
    metrics = _records(tmp / "unicron.metrics.jsonl")
    times = [
        m["elapsed_ms"] / 1000 for m in metrics if m["iteration"] < FAULT_ITERATION and m["iteration"] > 2
    ]
    t_fault, t_detected, t_decided = incident["t_fault"], incident["t_detected"], incident["t_decided"]
    t_resumed = incident["t_resumed"]
    return Result(
        scenario=scenario.name,
        first_good_step_s=t_resumed - t_fault,
        detect_s=t_detected - t_fault,
        decide_s=t_decided - t_detected,
        transition_s=split,
        resume_s=t_resumed - t_decided,
        bytes_moved=sum(t["bytes_moved"] for t in first),
        bytes_needed=sum(t["bytes_needed"] for t in first),
        iterations_lost=(FAULT_ITERATION - 1) - min(t["resume_iteration"] for t in first),
        mean_iteration_s=statistics.median(times) if times else float("nan"),
        baseline_s=float("nan"),
        baseline_note="",
        layout=first[0]["layout"],
        restarted_in="" if incident["action"] != "restart" else
                     "warm spare" if "in the warm spare" in result.stderr else
                     "new process" if "restarting rank" in result.stderr else "",
    )


def _scale_up_result(scenario: Scenario, tmp: Path, returncode: int, output: str) -> Result:
    """The scale-up's pause: the last step before the switch -> the first step at the larger layout."""
    metrics = _records(tmp / "unicron.metrics.jsonl")
    transitions = [t for t in _records(tmp / "transitions.jsonl") if t["member"]]
    if returncode != 0 or not transitions:
        raise RuntimeError(f"{scenario.name}: the job failed or never scaled up\n{output[-3000:]}")
    last_generation = max(t["generation"] for t in transitions)
    switch = [t for t in transitions if t["generation"] == last_generation]
    layout = switch[0]["layout"]
    after = [m for m in metrics if m["layout"] == layout and m["iteration"] > SCALE_UP_FAULT_ITERATION]
    before = [m for m in metrics if m["iteration"] < after[0]["iteration"] and m["layout"] != layout]
    shrunk = [m["elapsed_ms"] / 1000 for m in before if m["iteration"] > SCALE_UP_FAULT_ITERATION + 2]
    pause = after[0]["time"] - before[-1]["time"]
    return Result(
        scenario=scenario.name,
        first_good_step_s=pause,
        detect_s=float("nan"),
        decide_s=float("nan"),
        transition_s={k: max(t["seconds"].get(k, 0.0) for t in switch) for k in switch[0]["seconds"]},
        resume_s=pause,
        bytes_moved=sum(t["bytes_moved"] for t in switch),
        bytes_needed=sum(t["bytes_needed"] for t in switch),
        iterations_lost=before[-1]["iteration"] - min(t["resume_iteration"] for t in switch),
        mean_iteration_s=statistics.median(shrunk) if shrunk else float("nan"),
        baseline_s=float("nan"),
        baseline_note="",
        layout=layout,
    )


def baseline_run(scenario: Scenario, tmp: Path, save_interval: int) -> tuple[float, str]:
    """Megatron: the group dies, relaunches from the newest checkpoint, recomputes to the failed iteration."""
    if scenario.name.startswith("hang"):
        return MEGATRON_TIMEOUT_S, f"> {MEGATRON_TIMEOUT_S:.0f} s (collective timeout)"
    if scenario.name.startswith("node-lost"):
        return MEGATRON_TIMEOUT_S, "job down until an operator drains the node"
    if scenario.returns:  # stopped and relaunched on all nodes from the newest checkpoint, as after a kill
        scenario = Scenario(scenario.name, f"kill:3:{FAULT_ITERATION}", tp_pp=scenario.tp_pp)
    ckpt = tmp / "ckpt"
    argv = _flags(
        tmp, "baseline", scenario, "--save", str(ckpt), "--save-interval", str(save_interval),
        "--load", str(ckpt),
    )  # fmt: skip
    fault = scenario.fault if scenario.name != "relayout" else f"kill:3:{FAULT_ITERATION}"
    argv += ["--unicron-inject", fault]
    launcher = ["--max-restarts", "1"]
    result = run_job(argv, nproc_per_node=scenario.ranks, launcher_args=launcher, timeout_s=600)
    if result.returncode != 0:
        raise RuntimeError(f"baseline failed\n{result.output[-3000:]}")
    fired = [line for line in result.output.splitlines() if "unicron-inject: fired" in line]
    t_fault = float(fired[0].split("t_fault=")[1].split(")")[0])
    back = [m["time"] for m in _records(tmp / "baseline.metrics.jsonl") if m["iteration"] >= FAULT_ITERATION]
    return min(t for t in back if t > t_fault) - t_fault, f"checkpoint every {save_interval} iterations"


def measure(names: Sequence[str], repeat: int, save_interval: int) -> list[Result]:
    results = []
    for name in names:
        scenario = SCENARIOS[name]
        runs = []
        for _ in range(repeat):
            with tempfile.TemporaryDirectory() as tmp:
                result = unicron_run(scenario, Path(tmp))
                result.baseline_s, result.baseline_note = baseline_run(scenario, Path(tmp), save_interval)
                runs.append(result)
        runs.sort(key=lambda r: r.first_good_step_s)
        results.append(runs[len(runs) // 2])  # the median run
    return results


def _seconds(value: float) -> str:
    return "-" if value != value else f"{value:.2f}"  # NaN: not a fault (a scale-up)


def table(results: Sequence[Result]) -> str:
    head = (
        "| scenario | layout after | restarted in | fault -> first good step | detect | decide "
        "| transition (max over ranks) | resume | bytes moved / needed | iterations lost "
        "| mean iteration | baseline | speedup |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in results:
        split = ", ".join(f"{k} {v:.2f}" for k, v in r.transition_s.items() if v >= 0.005)
        speed = r.baseline_s / r.first_good_step_s
        base = r.baseline_note if r.baseline_note.startswith(">") or "operator" in r.baseline_note else (
            f"{r.baseline_s:.1f} s ({r.baseline_note})"
        )  # fmt: skip
        lines.append(
            f"| {r.scenario} | {r.layout} | {r.restarted_in or '-'} | {r.first_good_step_s:.2f} s "
            f"| {_seconds(r.detect_s)} | {_seconds(r.decide_s)} | {split} | {r.resume_s:.2f} "
            f"| {r.bytes_moved} / {r.bytes_needed} | {r.iterations_lost} "
            f"| {r.mean_iteration_s:.3f} s | {base} | {speed:.0f}x |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--repeat", type=int, default=1, help="runs per scenario (the median is shown)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated scenario names")
    parser.add_argument("--save-interval", type=int, default=5, help="the baseline's checkpoint interval")
    args = parser.parse_args(argv)
    names = [n for n in args.scenarios.split(",") if n]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    started = time.time()
    results = measure(names, args.repeat, args.save_interval)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        print(table(results))
        print(f"\n({time.time() - started:.0f} s; faults at iteration {FAULT_ITERATION} of {ITERS})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
