"""``unicron-run``: the project's launcher, a drop-in for ``torchrun``'s static launch.

``unicron-run [--nnodes N --node-rank K --master-addr A --master-port P] --nproc-per-node M
[--max-restarts R] [--unicron] script.py [script args]`` starts ``M`` workers on this node with
torchrun's environment. The launcher of node rank 0 hosts the job's store (a TCPStore) itself, never a
worker; the others connect to it. Each launcher runs one node agent (``agent.NodeAgent``) that
supervises its workers, forwards SIGINT/SIGTERM/SIGHUP/SIGQUIT (as SIGTERM, then SIGKILL after
``--shutdown-timeout``) and leaves no orphan behind.

Exit status (torchrun always exits 1 on failure; this launcher says what happened):
0 when every worker succeeded; the root-cause worker's exit code, or 128 + its signal when it was killed
(137 for SIGKILL); 128 + signal when the launcher itself was stopped by a signal (130 for Ctrl-C);
1 for a launcher error (a peer node lost, the store unreachable); 2 for bad command-line input.

Without ``--unicron`` a worker's death ends the group on every node, as with torchrun. With it the
survivors keep running: each agent reports its workers' deaths and carries out restarts, and node rank
0's launcher also runs the job's coordinator (``coordinator.py``), which turns fault reports and lost
nodes into incidents and decisions, printing one ``unicron: incident ...`` line per incident. The job
then ends when training is done (exit 0) or when the coordinator stops it (the reason is printed; the
exit status is a failed worker's as above, else 1).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import uuid
from collections.abc import Sequence
from datetime import timedelta
from types import FrameType
from typing import NoReturn

PROG = "unicron-run"
DEFAULT_MASTER_PORT = 29500  # torchrun's default when the job spans several nodes


class _Parser(argparse.ArgumentParser):
    """Reports bad input as one line (no usage dump) and exits 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{PROG}: error: {message} (see {PROG} --help)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The command line: torchrun's static-launch flags, ``--unicron``, then the script and its args."""
    p = _Parser(
        prog=PROG, allow_abbrev=False,
        usage=f"{PROG} [launcher flags] script.py [script args]",
        description="Start and supervise the workers of one node of a job, with torchrun's flags and "
                    "worker environment; node rank 0's launcher hosts the job's store.",
        epilog="Exit status: 0 on success; the root-cause worker's exit code (128 + signal if it was "
               "killed); 128 + signal if the launcher was stopped by one; 1 for a launcher error; 2 for "
               "bad input.",
    )
    p.add_argument("--nnodes", default="1", help="number of nodes (launchers) in the job (default 1)")
    p.add_argument("--nproc-per-node", "--nproc_per_node", default="1", help="workers per node (default 1)")
    p.add_argument("--node-rank", "--node_rank", type=int, default=0, help="this node's rank (default 0)")
    p.add_argument("--master-addr", "--master_addr", default="127.0.0.1",
                   help="address of node rank 0, which hosts the store (default 127.0.0.1)")
    p.add_argument("--master-port", "--master_port", type=int, default=None,
                   help=f"store port; default: a free port on one node, {DEFAULT_MASTER_PORT} on several")
    p.add_argument("--max-restarts", "--max_restarts", type=int, default=0,
                   help="restarts of the whole worker group before failing (default 0)")
    p.add_argument("--rdzv-id", "--rdzv_id", "--run-id", dest="run_id", default=None,
                   help="job id, the same on every node (TORCHELASTIC_RUN_ID, UNICRON_JOB; default: "
                        "random on one node, 'none' on several)")
    p.add_argument("--standalone", action="store_true", help="single node with a free port (as torchrun)")
    p.add_argument("--shutdown-timeout", "--shutdown_timeout", type=float, default=30.0,
                   help="seconds between SIGTERM and SIGKILL when stopping workers (default 30)")
    p.add_argument("--join-timeout", type=float, default=600.0,
                   help="seconds to wait for the other nodes (default 600)")
    p.add_argument("--unicron", action="store_true",
                   help="self-healing mode: report failures to the job's coordinator (run by node rank 0), "
                        "which reattempts, restarts failed workers or reconfigures the job")
    p.add_argument("--no-warm-spare", dest="warm_spare", action="store_false",
                   help="with --unicron: do not keep a pre-imported spare interpreter per node to restart a "
                        "failed worker in (it takes the worker's place in well under a second)")
    p.add_argument("-m", "--module", action="store_true", help="run the script as a module (python -m)")
    p.add_argument("--no-python", "--no_python", action="store_true",
                   help="execute the script directly instead of with this Python")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="launcher log level (default INFO)")
    p.add_argument("training_script", nargs="?",
                   help="the worker script (or module with -m, program with --no-python)")
    p.add_argument("training_script_args", nargs=argparse.REMAINDER, help="arguments for the script")
    return p


def _positive_int(parser: argparse.ArgumentParser, flag: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        parser.error(f"{flag} must be a whole number, got {text!r}")
    if value < 1:
        parser.error(f"{flag} must be >= 1, got {value}")
    return value


def _nnodes(parser: argparse.ArgumentParser, text: str) -> int:
    lo, sep, hi = text.partition(":")
    if sep and lo != hi:
        parser.error(f"--nnodes {text}: elastic node ranges are not supported; give one number")
    return _positive_int(parser, "--nnodes", lo)


def worker_argv(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[str, ...]:
    """The worker command line, checked so that a typo fails here rather than in every worker."""
    script, rest = args.training_script, list(args.training_script_args)
    if not script:
        parser.error(f"no training script given: {PROG} [launcher flags] script.py [script args]")
    if args.module and args.no_python:
        parser.error("--module and --no-python cannot be combined")
    if args.no_python:
        if shutil.which(script) is None:
            parser.error(f"program {script!r} not found or not executable")
        return (script, *rest)
    if args.module:
        return (sys.executable, "-u", "-m", script, *rest)
    if not os.path.isfile(script):
        parser.error(f"training script {script!r} not found")
    return (sys.executable, "-u", script, *rest)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of ``unicron-run`` (and ``python -m megatron_unicron.launch``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    nnodes = _nnodes(parser, args.nnodes)
    nproc = _positive_int(parser, "--nproc-per-node", args.nproc_per_node)
    if args.standalone and nnodes != 1:
        parser.error("--standalone runs a single node; drop --nnodes")
    if not 0 <= args.node_rank < nnodes:
        parser.error(f"--node-rank must be in [0, {nnodes - 1}] for --nnodes {nnodes}, got {args.node_rank}")
    if args.max_restarts < 0:
        parser.error(f"--max-restarts must be >= 0, got {args.max_restarts}")
    if args.master_port is not None and not 0 <= args.master_port < 2**16:
        parser.error(f"--master-port must be in [0, 65535], got {args.master_port}")
    if args.shutdown_timeout < 0 or args.join_timeout <= 0:
        parser.error("--shutdown-timeout must be >= 0 and --join-timeout > 0")
    cmd = worker_argv(args, parser)
    single = nnodes == 1 and (args.master_port is None or args.standalone)
    port = 0 if single else (args.master_port if args.master_port is not None else DEFAULT_MASTER_PORT)
    job = args.run_id or (uuid.uuid4().hex[:12] if single else "none")
    if "/" in job:
        parser.error(f"--rdzv-id {job!r} must not contain '/'")
    node = f"node{args.node_rank}"
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format=f"[{PROG} %(asctime)s {node}] %(levelname)s %(message)s")
    sys.exit(_run(args, cmd=cmd, nnodes=nnodes, nproc=nproc, port=port, job=job))


def _run(
    args: argparse.Namespace, *, cmd: tuple[str, ...], nnodes: int, nproc: int, port: int, job: str
) -> int:
    env = dict(os.environ)  # the workers' base environment, before this process changes its own
    # The launcher's own C++ warnings (a peer's store connection dropping) are noise; workers keep theirs.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    # torch is imported here, after argument checking, so bad input fails fast.
    from megatron_unicron.agent import (
        SIGNALS_TO_FORWARD,
        AgentConfig,
        NodeAgent,
        default_policy,
    )
    from megatron_unicron.store import StoreAddressInUse, StoreError, connect_store, host_store

    def fail(message: str, code: int = 1) -> int:
        sys.stderr.write(f"{PROG}: error: {message}\n")
        return code

    try:
        if args.node_rank == 0:
            store = host_store(args.master_addr, port)
        else:
            store = connect_store(args.master_addr, port, timedelta(seconds=args.join_timeout))
    except StoreAddressInUse as e:
        return fail(f"cannot host the store: {e}; pick another --master-port")
    except StoreError as e:
        return fail(f"{e}; is node rank 0's launcher running?")
    except KeyboardInterrupt:
        return fail("interrupted while connecting to the store", 128 + signal.SIGINT)

    if "OMP_NUM_THREADS" not in env and nproc > 1:  # as torchrun: one thread per worker unless told
        env["OMP_NUM_THREADS"] = "1"
    env.setdefault("TORCHELASTIC_SIGNALS_TO_HANDLE", ",".join(s.name for s in SIGNALS_TO_FORWARD))
    mode = "unicron" if args.unicron else "torchrun"
    config = AgentConfig(
        job=job, node_rank=args.node_rank, nnodes=nnodes, nproc_per_node=nproc, argv=cmd,
        master_addr=args.master_addr, master_port=store.address[1], max_restarts=args.max_restarts,
        mode=mode, shutdown_timeout_s=args.shutdown_timeout, join_timeout_s=args.join_timeout, base_env=env,
        warm_spare=args.warm_spare,
    )
    agent = NodeAgent(config, store, default_policy(mode))
    coordinator = None
    if args.unicron and args.node_rank == 0:
        from megatron_unicron.coordinator import Coordinator, CoordinatorThread
        from megatron_unicron.protocol import JobChannel

        def emit(line: str) -> None:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

        from megatron_unicron.replan import make_plan_fn, make_scale_up_fn, make_shrink_fn

        channel = JobChannel(store.clone(), agent.keys)
        coordinator = CoordinatorThread(Coordinator(
            channel, nodes=[f"node{k}" for k in range(nnodes)],
            rank_node={r: f"node{r // nproc}" for r in range(nnodes * nproc)},
            plan_fn=make_plan_fn(channel.config), scale_fn=make_scale_up_fn(channel.config),
            shrink_fn=make_shrink_fn(channel.config),
            lease_renewal_s=config.lease_interval_s, emit=emit))
        coordinator.start()
    logging.getLogger(__name__).info(
        "job %s: %s, %d node(s) x %d worker(s), store %s:%d (%s)", job, mode, nnodes, nproc,
        args.master_addr, store.address[1], "hosted here" if args.node_rank == 0 else "node0's")

    def forward(signum: int, frame: FrameType | None) -> None:
        agent.stop(signum)

    previous = {s: signal.signal(s, forward) for s in SIGNALS_TO_FORWARD}
    try:
        result = agent.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if coordinator is not None:
            coordinator.stop()
        store.close()
    for line in result.summary(job):
        sys.stderr.write(f"{PROG}: {line}\n")
    return result.returncode


if __name__ == "__main__":
    main()
