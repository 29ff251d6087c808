"""Run jobs through ``unicron-run`` from tests, with a hard timeout and proof that nothing leaked.

``run_job`` starts the launcher (one per node for a multi-node job, all on this machine) as a
subprocess in its own session and returns a ``JobResult``. ``start_job`` returns the ``RunningJob``
instead, so a test can signal or SIGKILL one node's launcher mid-run. Every process of the job inherits
a unique marker in its environment (``UNICRON_TEST_MARKER``): after the job the harness lists the marked
processes still alive (``JobResult.survivors``) and kills them, so a leak fails its own test and never
the next one. On timeout the whole tree is killed and ``JobTimeout`` carries the captured output.
Workers that call ``leaks.write_report_if_requested`` leave resource reports that ``assert_no_leaks``
compares (start against end).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import psutil

import megatron_unicron
from megatron_unicron.testing.leaks import REPORT_DIR_ENV, ResourceSnapshot

MARKER_ENV = "UNICRON_TEST_MARKER"
REPO_ROOT = str(Path(megatron_unicron.__file__).resolve().parent.parent)


class JobTimeout(AssertionError):
    """The job did not end in time; the message holds its output."""


@dataclass(frozen=True, kw_only=True)
class NodeResult:
    """How one node's launcher ended."""

    node_rank: int
    pid: int
    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True, kw_only=True)
class Survivor:
    """A process of the job still alive after every launcher ended."""

    pid: int
    cmdline: str


@dataclass(frozen=True, kw_only=True)
class JobResult:
    """Everything a test may assert on after a job."""

    returncode: int
    """The first non-zero launcher exit status, in node order (0 if all succeeded)."""
    stdout: str
    stderr: str
    duration_s: float
    nodes: tuple[NodeResult, ...]
    reports: tuple[ResourceSnapshot, ...]
    """Resource reports the workers wrote (``leaks.write_report_if_requested``)."""
    survivors: tuple[Survivor, ...]
    marker: str

    @property
    def output(self) -> str:
        """stdout then stderr, for messages."""
        return f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"

    def report(self, rank: int, tag: str) -> ResourceSnapshot | None:
        """The report of ``rank`` with ``tag`` (the last one, if the rank ran several times)."""
        found = [r for r in self.reports if r.rank == rank and r.tag == tag]
        return found[-1] if found else None


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def marked_processes(marker: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose environment carries ``UNICRON_TEST_MARKER=marker``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(MARKER_ENV) == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _kill_marked(marker: str) -> None:
    for proc in marked_processes(marker):
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def launcher_argv(
    argv: Sequence[str], *, nproc_per_node: int, nnodes: int = 1, node_rank: int = 0,
    master_port: int | None = None, launcher_args: Sequence[str] = (),
) -> list[str]:
    """The command line of one node's launcher."""
    cmd = [sys.executable, "-m", "megatron_unicron.launch", "--nproc-per-node", str(nproc_per_node)]
    if nnodes > 1:
        cmd += ["--nnodes", str(nnodes), "--node-rank", str(node_rank)]
    if master_port is not None:
        cmd += ["--master-port", str(master_port)]
    return cmd + list(launcher_args) + list(argv)


class RunningJob:
    """A job started by ``start_job``; use it as a context manager so it is always cleaned up."""

    def __init__(
        self, argv: Sequence[str], *, nproc_per_node: int, nnodes: int = 1,
        launcher_args: Sequence[str] = (), env: Mapping[str, str | None] | None = None, timeout_s: float,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        if nnodes < 1 or nproc_per_node < 1 or timeout_s <= 0:
            raise ValueError("nnodes and nproc_per_node must be >= 1 and timeout_s > 0")
        self.marker = uuid.uuid4().hex
        self.nnodes = nnodes
        self._dir = tempfile.mkdtemp(prefix="unicron_job_")
        self.report_dir = os.path.join(self._dir, "reports")
        os.makedirs(self.report_dir)
        full_env = dict(os.environ)
        full_env.setdefault("OMP_NUM_THREADS", "1")
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, full_env.get("PYTHONPATH")) if p)
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        full_env[MARKER_ENV] = self.marker
        full_env[REPORT_DIR_ENV] = self.report_dir
        port = free_port() if nnodes > 1 and "--master-port" not in launcher_args else None
        self._start = time.monotonic()
        self._deadline = self._start + timeout_s
        self._timeout_s = timeout_s
        self._procs: list[subprocess.Popen[bytes]] = []
        self._outs: list[tuple[str, str]] = []
        self._rejoined: list[tuple[int, subprocess.Popen[bytes], tuple[str, str]]] = []
        self._launch = (argv, nproc_per_node, launcher_args, port, dict(full_env), cwd)
        self._result: JobResult | None = None
        try:
            for node_rank in range(nnodes):
                self._start_launcher(node_rank, argv, nproc_per_node, launcher_args, port, full_env, cwd)
        except BaseException:
            self.close()
            raise

    def _start_launcher(
        self, node_rank: int, argv: Sequence[str], nproc_per_node: int, launcher_args: Sequence[str],
        port: int | None, env: Mapping[str, str], cwd: str | os.PathLike[str] | None,
    ) -> None:
        out, err = (os.path.join(self._dir, f"node{node_rank}.{s}") for s in ("out", "err"))
        self._outs.append((out, err))
        cmd = launcher_argv(argv, nproc_per_node=nproc_per_node, nnodes=self.nnodes, node_rank=node_rank,
                            master_port=port, launcher_args=launcher_args)
        with open(out, "wb") as fo, open(err, "wb") as fe:
            self._procs.append(subprocess.Popen(cmd, env=dict(env), cwd=cwd, stdout=fo, stderr=fe,
                                                stdin=subprocess.DEVNULL, start_new_session=True))

    def rejoin_node(self, node_rank: int) -> None:
        """Start a new launcher for ``node_rank`` (a repaired node coming back into the running job)."""
        argv, nproc_per_node, launcher_args, port, env, cwd = self._launch
        count = sum(1 for k, _, _ in self._rejoined if k == node_rank) + 1
        out, err = (os.path.join(self._dir, f"node{node_rank}.back{count}.{s}") for s in ("out", "err"))
        cmd = launcher_argv(argv, nproc_per_node=nproc_per_node, nnodes=self.nnodes, node_rank=node_rank,
                            master_port=port, launcher_args=launcher_args)
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen(cmd, env=dict(env), cwd=cwd, stdout=fo, stderr=fe,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self._rejoined.append((node_rank, proc, (out, err)))

    def rejoined_output(self) -> str:
        """What the launchers started by ``rejoin_node`` printed so far."""
        return "".join(Path(o).read_text(errors="replace") + Path(e).read_text(errors="replace")
                       for _, _, (o, e) in self._rejoined)

    @property
    def launcher_pids(self) -> list[int]:
        """Pid of each node's launcher, by node rank."""
        return [p.pid for p in self._procs]

    def signal_node(self, node_rank: int, signum: int) -> None:
        """Send ``signum`` to one node's launcher process (only to it, not to its workers)."""
        self._procs[node_rank].send_signal(signum)

    def kill_node(self, node_rank: int) -> None:
        """SIGKILL one node's launcher, as a lost machine would vanish."""
        self.signal_node(node_rank, signal.SIGKILL)

    def worker_pids(self) -> list[int]:
        """Live processes of the job other than the launchers."""
        launchers = set(self.launcher_pids)
        return [p.pid for p in marked_processes(self.marker) if p.pid not in launchers]

    def read_output(self, node_rank: int = 0) -> str:
        """What one node's launcher (and its workers) printed so far, stdout then stderr."""
        out, err = self._outs[node_rank]
        return Path(out).read_text(errors="replace") + Path(err).read_text(errors="replace")

    def wait_for_output(
        self, text: str, *, count: int = 1, node_rank: int = 0, timeout_s: float = 30.0
    ) -> None:
        """Wait until ``text`` appears ``count`` times in one node's output."""
        deadline = min(time.monotonic() + timeout_s, self._deadline)
        while self.read_output(node_rank).count(text) < count:
            if time.monotonic() >= deadline or all(p.poll() is not None for p in self._procs):
                raise AssertionError(f"{text!r} x{count} never appeared in node{node_rank}'s output:\n"
                                     + self.read_output(node_rank)[-4000:])
            time.sleep(0.05)

    def wait(self, survivor_grace_s: float = 5.0) -> JobResult:
        """Wait for every launcher to exit (killing the job at its deadline) and collect the result."""
        if self._result is not None:
            return self._result
        for proc in [*self._procs, *(p for _, p, _ in self._rejoined)]:
            try:
                proc.wait(max(0.0, self._deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._kill_everything()
                text = "\n".join(f"=== node{k} ===\n{self.read_output(k)[-6000:]}"
                                 for k in range(self.nnodes))
                raise JobTimeout(f"job did not end within {self._timeout_s:g}s; killed it.\n{text}") from None
        duration = time.monotonic() - self._start
        survivors = self._survivors(survivor_grace_s)
        self._result = self._collect(duration, survivors)
        return self._result

    def _survivors(self, grace_s: float) -> tuple[Survivor, ...]:
        deadline = time.monotonic() + grace_s
        while True:
            alive = marked_processes(self.marker)
            if not alive or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        found = []
        for proc in alive:
            try:
                found.append(Survivor(pid=proc.pid, cmdline=" ".join(proc.cmdline())))
            except psutil.Error:
                continue
        _kill_marked(self.marker)
        return tuple(found)

    def _collect(self, duration: float, survivors: tuple[Survivor, ...]) -> JobResult:
        nodes = []
        for k, proc in enumerate(self._procs):
            out, err = (Path(p).read_text(errors="replace") for p in self._outs[k])
            nodes.append(NodeResult(node_rank=k, pid=proc.pid, returncode=int(proc.returncode),
                                    stdout=out, stderr=err))
        reports = []
        for path in sorted(Path(self.report_dir).glob("*.json")):
            reports.append(ResourceSnapshot.from_json(path.read_text()))
        if self.nnodes == 1:
            stdout, stderr = nodes[0].stdout, nodes[0].stderr
        else:
            stdout = "".join(f"=== node{n.node_rank} ===\n{n.stdout}" for n in nodes)
            stderr = "".join(f"=== node{n.node_rank} ===\n{n.stderr}" for n in nodes)
        for k, _, (out, err) in self._rejoined:
            stdout += f"=== node{k} (rejoined) ===\n" + Path(out).read_text(errors="replace")
            stderr += f"=== node{k} (rejoined) ===\n" + Path(err).read_text(errors="replace")
        return JobResult(
            returncode=next((n.returncode for n in nodes if n.returncode != 0), 0), stdout=stdout,
            stderr=stderr, duration_s=duration, nodes=tuple(nodes), reports=tuple(reports),
            survivors=survivors, marker=self.marker,
        )

    def _kill_everything(self) -> None:
        for proc in [*self._procs, *(p for _, p, _ in self._rejoined)]:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        _kill_marked(self.marker)
        for proc in [*self._procs, *(p for _, p, _ in self._rejoined)]:
            proc.wait()

    def close(self) -> None:
        """Kill whatever is still running and delete the job's temporary files."""
        if any(p.poll() is None for p in [*self._procs, *(p for _, p, _ in self._rejoined)]):
            self._kill_everything()
        _kill_marked(self.marker)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RunningJob:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def start_job(
    argv: Sequence[str], *, nproc_per_node: int, nnodes: int = 1, launcher_args: Sequence[str] = (),
    env: Mapping[str, str | None] | None = None, timeout_s: float, cwd: str | os.PathLike[str] | None = None,
) -> RunningJob:
    """Start ``unicron-run [launcher_args] argv`` on ``nnodes`` simulated nodes of this machine.

    ``env`` is added to this process's environment (a None value removes the variable); the harness
    also sets ``PYTHONPATH`` to the repository, ``OMP_NUM_THREADS=1`` unless given, the job's marker and
    the leak-report directory.
    """
    return RunningJob(argv, nproc_per_node=nproc_per_node, nnodes=nnodes, launcher_args=launcher_args,
                      env=env, timeout_s=timeout_s, cwd=cwd)


def run_job(
    argv: Sequence[str], *, nproc_per_node: int, nnodes: int = 1, launcher_args: Sequence[str] = (),
    env: Mapping[str, str | None] | None = None, timeout_s: float, cwd: str | os.PathLike[str] | None = None,
) -> JobResult:
    """Run a job to its end (or kill it at ``timeout_s`` and raise ``JobTimeout``)."""
    with start_job(argv, nproc_per_node=nproc_per_node, nnodes=nnodes, launcher_args=launcher_args,
                   env=env, timeout_s=timeout_s, cwd=cwd) as job:
        return job.wait()


class JobRunner:
    """Starts jobs for one test and, at ``close()``, kills whatever they left running."""

    def __init__(self, workers_dir: str | os.PathLike[str] = ".") -> None:
        self.workers_dir = Path(workers_dir)
        self._jobs: list[RunningJob] = []

    def worker(self, name: str) -> str:
        """Path of a worker script in ``workers_dir``."""
        return str(self.workers_dir / name)

    def run(
        self, argv: Sequence[str], *, nproc_per_node: int, nnodes: int = 1, launcher_args: Sequence[str] = (),
        env: Mapping[str, str | None] | None = None, timeout_s: float = 60.0,
    ) -> JobResult:
        """Run a job to its end (see ``harness.run_job``)."""
        return run_job(argv, nproc_per_node=nproc_per_node, nnodes=nnodes, launcher_args=launcher_args,
                       env=env, timeout_s=timeout_s)

    def start(
        self, argv: Sequence[str], *, nproc_per_node: int, nnodes: int = 1, launcher_args: Sequence[str] = (),
        env: Mapping[str, str | None] | None = None, timeout_s: float = 60.0,
    ) -> RunningJob:
        """Start a job and hand it back for signalling (see ``harness.start_job``)."""
        job = start_job(argv, nproc_per_node=nproc_per_node, nnodes=nnodes, launcher_args=launcher_args,
                        env=env, timeout_s=timeout_s)
        self._jobs.append(job)
        return job

    def close(self) -> list[str]:
        """Kill and clean up every job started; return a description of what was still running."""
        leftovers = []
        for job in self._jobs:
            leftovers += [f"pid {p.pid}: {' '.join(p.cmdline())}" for p in marked_processes(job.marker)]
            job.close()
        return leftovers



def assert_no_leaks(result: JobResult, *, ranks: Iterable[int] | None = None, fd_slack: int = 4) -> None:
    """Fail unless no process survived and every rank ended clean.

    Each rank in ``ranks`` (default: every rank that wrote a start report; at least one must have)
    needs an end report with no process group left, no non-daemon thread besides the main one, no
    child process, and at most ``fd_slack`` more open file descriptors than at its start.
    """
    problems = [f"process {s.pid} survived the job: {s.cmdline}" for s in result.survivors]
    expected = sorted(set(ranks) if ranks is not None else
                      {r.rank for r in result.reports if r.tag == "start" and r.rank is not None})
    if not expected:
        problems.append("no worker wrote a leak report (call leaks.write_report_if_requested)")
    for rank in expected:
        start, end = result.report(rank, "start"), result.report(rank, "end")
        if start is None or end is None:
            problems.append(f"rank {rank}: missing {'start' if start is None else 'end'} report")
            continue
        if end.process_groups:
            problems.append(f"rank {rank}: {end.process_groups} process group(s) left at exit")
        if end.non_daemon_threads:
            problems.append(f"rank {rank}: non-daemon thread(s) left: {', '.join(end.non_daemon_threads)}")
        if end.children:
            problems.append(f"rank {rank}: child process(es) left: {end.children}")
        if len(end.fds) > len(start.fds) + fd_slack:
            new = sorted(set(end.fds.values()) - set(start.fds.values()))
            problems.append(f"rank {rank}: {len(start.fds)} fds at start, {len(end.fds)} at end: {new}")
    if problems:
        raise AssertionError("leaks found:\n  " + "\n  ".join(problems) + "\n" + result.output[-4000:])
