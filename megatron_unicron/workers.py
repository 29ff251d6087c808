"""Worker processes: start one bound to its agent's life, see its exit at once, stop it.

Each worker runs in its own session (its own process group, as torchrun starts them), so stopping it
also reaches anything it forked. It gets ``PR_SET_PDEATHSIG=SIGKILL`` before exec, so when its agent dies
(even by SIGKILL) the kernel kills it: no orphan outlives a launcher. A waiter thread per worker blocks
in ``waitpid`` and reports the exit the moment it happens, with its wall time.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, kw_only=True)
class WorkerExit:
    """How and when one worker process ended."""

    rank: int
    local_rank: int
    node: str
    pid: int
    attempt: int
    returncode: int
    """``Popen`` convention: the exit code, or ``-N`` when killed by signal N."""
    time: float
    """Wall time (``time.time()``) at which the agent saw the exit."""
    error: str = ""
    """First line of the worker's recorded exception (``TORCHELASTIC_ERROR_FILE``), if it wrote one."""

    def __post_init__(self) -> None:
        if self.rank < 0 or self.local_rank < 0 or self.attempt < 0:
            raise ValueError(f"rank, local_rank and attempt must be >= 0: {self}")

    @property
    def failed(self) -> bool:
        """Whether the worker ended with anything but exit code 0."""
        return self.returncode != 0

    @property
    def signal(self) -> int | None:
        """The signal that killed the worker, if one did."""
        return -self.returncode if self.returncode < 0 else None

    @property
    def shell_code(self) -> int:
        """The exit status a shell would report: the code, or 128 + signal number."""
        return 128 + -self.returncode if self.returncode < 0 else self.returncode

    def how(self) -> str:
        """``exited with code 3`` or ``killed by SIGKILL``."""
        if self.signal is None:
            return f"exited with code {self.returncode}"
        try:
            name = signal.Signals(self.signal).name
        except ValueError:
            name = f"signal {self.signal}"
        return f"killed by {name}"

    def describe(self) -> str:
        """One line naming the rank, how it ended, where and when."""
        stamp = time.strftime("%H:%M:%S", time.localtime(self.time)) + f".{int(self.time % 1 * 1000):03d}"
        line = (
            f"rank {self.rank} (local_rank {self.local_rank}, {self.node}, pid {self.pid}, attempt "
            f"{self.attempt}) {self.how()} at {stamp}"
        )
        return f"{line}: {self.error}" if self.error else line

    def to_json(self) -> str:
        """JSON for the store."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkerExit:
        """Inverse of ``to_json``."""
        return cls(**json.loads(text))


def _pdeathsig_preexec(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child die with SIGKILL when the spawning thread's process dies."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork: the child only calls it

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def bound_to_this_process() -> Callable[[], None]:
    """The ``preexec_fn`` of every process an agent starts: it dies with the agent's thread."""
    return _pdeathsig_preexec(os.getpid())


def read_error_file(path: str) -> str:
    """First line of the exception a worker recorded in torch's error-file format, or ``""``."""
    try:
        with open(path, encoding="utf-8") as f:
            data: Any = json.load(f)
    except (OSError, ValueError):
        return ""
    message = data.get("message", "") if isinstance(data, dict) else ""
    if isinstance(message, dict):
        message = message.get("message", "")
    first = str(message).strip().splitlines()[0] if str(message).strip() else ""
    return first[:300]


class WorkerProcess:
    """One running worker, with a waiter thread that reports its exit through ``on_exit``.

    Must be created on a thread that outlives the worker: the kernel's parent-death signal fires when
    the *thread* that forked the child exits.
    """

    def __init__(
        self,
        *,
        argv: Sequence[str],
        env: Mapping[str, str],
        rank: int,
        local_rank: int,
        node: str,
        attempt: int,
        error_file: str,
        on_exit: Callable[[WorkerProcess, WorkerExit], None],
        process: subprocess.Popen[bytes] | None = None,
    ) -> None:
        self.rank = rank
        self.local_rank = local_rank
        self.node = node
        self.attempt = attempt
        self.error_file = error_file
        self.stopped_at: float | None = None
        """Wall time at which the agent asked this worker to stop, if it did."""
        self._exit: WorkerExit | None = None
        self._done = threading.Event()
        self._on_exit = on_exit
        # ``process``: a warm spare already handed this worker's environment (``spare.WarmSpare``).
        self._popen = process if process is not None else subprocess.Popen(
            list(argv),
            env=dict(env),
            start_new_session=True,
            preexec_fn=bound_to_this_process(),
        )
        self.pid = self._popen.pid
        self._waiter = threading.Thread(target=self._wait, name=f"unicron-wait-rank{rank}", daemon=True)
        self._waiter.start()

    def _wait(self) -> None:
        returncode = self._popen.wait()
        self._exit = WorkerExit(
            rank=self.rank,
            local_rank=self.local_rank,
            node=self.node,
            pid=self.pid,
            attempt=self.attempt,
            returncode=returncode,
            time=time.time(),
            error=read_error_file(self.error_file) if returncode != 0 else "",
        )
        self._done.set()
        self._on_exit(self, self._exit)

    @property
    def exit(self) -> WorkerExit | None:
        """The worker's exit, once it has ended."""
        return self._exit

    @property
    def stopped_by_agent(self) -> bool:
        """Whether the worker ended after (so presumably because) the agent asked it to stop."""
        return self._exit is not None and self.stopped_at is not None and self._exit.time >= self.stopped_at

    def alive(self) -> bool:
        """Whether the worker has not been seen to exit yet."""
        return not self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the exit to be recorded; return whether it was."""
        return self._done.wait(timeout)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the worker's process group (it and anything it forked)."""
        if not self.alive():
            return
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:  # the group is gone and its id reused: fall back to the process
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass


def stop_workers(workers: Sequence[WorkerProcess], grace_s: float) -> None:
    """SIGTERM every live worker, wait up to ``grace_s`` seconds, then SIGKILL the rest and reap them."""
    live = [w for w in workers if w.alive()]
    if not live:
        return
    now = time.time()
    for w in live:
        w.stopped_at = now
        w.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for w in live:
        w.wait(max(0.0, deadline - time.monotonic()))
    stubborn = [w for w in live if w.alive()]
    for w in stubborn:
        log.warning("rank %d (pid %d) ignored SIGTERM for %.0fs: sending SIGKILL", w.rank, w.pid, grace_s)
        w.signal(signal.SIGKILL)
    for w in stubborn:
        w.wait()
