"""The self-healing demo: a tiny GPT on two simulated nodes loses one node and trains on.

    python examples/gpt/demo.py [--iters 40] [--fault-iter 12] [--bring-back]

Starts one ``unicron-run --unicron`` launcher per simulated node (2 nodes x 2 CPU ranks, TP1 PP2 DP2:
each node holds one pipeline, a data-parallel replica of the other). At ``--fault-iter`` the fault
injector kills node 1 (its launcher and both its workers, as a machine that vanishes). Node 0's
coordinator notices the expired lease, grades it SEV1, asks the plan generator for a layout for the two
survivors, and the survivors move to it in the same processes, copying state from each other instead of
reloading a checkpoint. With ``--bring-back`` node 1 is started again and the job scales back up.
The terminal shows the incident, the new layout, the transition's timing and the loss going on.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]
KEEP = ("iteration ", "unicron:", "unicron-inject", "error", "Error", "lost", "back", "rejoining")
LOGS = ("incident", "transition", "metrics")


def free_port() -> int:
    """A TCP port nobody listens on, for the job's store."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shorten(text: str) -> str:
    """Megatron's iteration line cut down to what the demo is about."""
    fields = dict(f.strip().split(": ", 1) for f in text.split("|")[1:] if ": " in f)
    iteration = text.split("iteration")[1].split("|")[0].strip()
    loss = fields.get("lm loss", "-")
    millis = fields.get("elapsed time per iteration (ms)", "?")
    return f"iteration {iteration:>7}  lm loss {loss}  ({millis} ms)"


def stream(name: str, pipe: IO[str], done: threading.Event) -> None:
    """Echo the lines of one launcher that tell the story, prefixed with its node."""
    for line in pipe:
        fired = "unicron-inject: fired" in line
        if fired or (any(word in line for word in KEEP) and "WARNING megatron" not in line):
            text = line.rstrip()
            print(f"[{name}] {shorten(text) if 'lm loss' in text else text}", flush=True)
    done.set()


def launcher(
    node: int, port: int, args: argparse.Namespace, logs: Path, inject: bool
) -> subprocess.Popen[str]:
    """Start the launcher of one simulated node; ``inject`` arms the node-loss fault."""
    cmd = [
        sys.executable, "-m", "megatron_unicron.launch", "--unicron", "--nnodes", "2",
        "--node-rank", str(node), "--master-port", str(port), "--run-id", "demo", "--nproc-per-node", "2",
        str(ROOT / "examples/gpt/pretrain_gpt.py"),
        "--yaml-cfg", str(ROOT / "examples/gpt/configs/tiny_gpt_unicron.yaml"),
        "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2",
        "--train-iters", str(args.iters),
    ]  # fmt: skip
    cmd += [f"--unicron-{name}-log={logs / name}.jsonl" for name in LOGS]
    if inject:
        cmd += ["--unicron-inject", f"node:3:{args.fault_iter}"]
        if args.bring_back:  # slower iterations while node 1 restarts, so there is something to scale up to
            for rank in (0, 1):
                cmd += ["--unicron-inject", f"slow=3:{rank}:{args.fault_iter + 1}"]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of one JSON-lines log, none if it was never written."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def describe_incident(incident: dict[str, Any]) -> str:
    """One line: severity, root cause, node, action and the times from the fault."""
    start = incident.get("t_fault")
    marks = (("detected", "t_detected"), ("decided", "t_decided"), ("trained again", "t_resumed"))
    times = ", ".join(
        f"{name} +{incident[key] - start:.2f} s"
        for name, key in marks
        if incident.get(key) is not None and start is not None
    )
    return (
        f"incident {incident['incident']}: {incident['severity']} {incident['root_kind']} "
        f"on {incident['node']} -> {incident['action']}; {times}"
    )


def describe_transition(members: list[dict[str, Any]]) -> str:
    """One line per generation: action, layout, the slowest member's split, bytes moved."""
    split = {k: max(m["seconds"][k] for m in members) for k in members[0]["seconds"]}
    parts = ", ".join(f"{k} {v:.2f}" for k, v in split.items())
    moved = sum(m["bytes_moved"] for m in members)
    first = members[0]
    return (
        f"generation {first['generation']}: {first['action']} to {first['layout']} in "
        f"{sum(split.values()):.2f} s ({parts}), {moved} bytes moved, "
        f"resumed after iteration {first['resume_iteration']}"
    )


def summary(logs: Path) -> None:
    """Print the incidents, the transitions and the loss curve from the job's logs."""
    print("\n=== what happened ===")
    for incident in read_jsonl(logs / "incident.jsonl"):
        print(describe_incident(incident))
    transitions = read_jsonl(logs / "transition.jsonl")
    for gen in sorted({t["generation"] for t in transitions}):
        members = [t for t in transitions if t["generation"] == gen and t["member"]]
        if members:
            print(describe_transition(members))
    losses = {m["iteration"]: m["lm_loss"] for m in read_jsonl(logs / "metrics.jsonl")}
    print("loss: " + " ".join(f"{it}:{loss:.3f}" for it, loss in sorted(losses.items())))


def follow(name: str, proc: subprocess.Popen[str]) -> threading.Event:
    """Stream one launcher's output on a thread; the event is set when it has ended."""
    done = threading.Event()
    assert proc.stdout is not None
    threading.Thread(target=stream, args=(name, proc.stdout, done), daemon=True).start()
    return done


def main() -> int:
    """Run the two-node job, kill node 1, optionally bring it back, then summarize."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--iters", type=int, default=40, help="training iterations (default 40)")
    parser.add_argument(
        "--fault-iter", type=int, default=12, help="iteration at which node 1 dies (default 12)"
    )
    parser.add_argument("--bring-back", action="store_true", help="restart node 1 and scale back up")
    args = parser.parse_args()
    if args.fault_iter >= args.iters:
        parser.error(f"--fault-iter {args.fault_iter} must be below --iters {args.iters}")
    if args.bring_back:
        args.iters = max(args.iters, 150)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="unicron_demo_") as tmp:
        logs = Path(tmp)
        print(f"2 simulated nodes x 2 CPU ranks, TP1 PP2 DP2; node 1 dies at iteration {args.fault_iter}\n")
        procs = [launcher(node, port, args, logs, True) for node in (0, 1)]
        done = [follow(f"node{k}", proc) for k, proc in enumerate(procs)]
        if args.bring_back:
            procs[1].wait()
            time.sleep(1.0)
            print("[demo] node 1 is repaired: starting it again", flush=True)
            procs.append(launcher(1, port, args, logs, False))
            done.append(follow("node1", procs[-1]))
        code = procs[0].wait()
        for proc in procs[1:]:
            proc.wait()
        for event in done:
            event.wait(5)
        summary(logs)
        return code


if __name__ == "__main__":
    sys.exit(main())
