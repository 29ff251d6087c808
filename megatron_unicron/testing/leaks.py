"""Resource snapshots a worker writes at its start and end, so a test can prove it leaked nothing.

A worker (the training script, or a test's worker) calls ``write_report_if_requested("start")`` first
thing and ``write_report_if_requested("end")`` last, after destroying its process groups. When the
environment variable ``UNICRON_LEAK_REPORT`` names a directory (the test harness sets it), each call
writes ``<dir>/<rank>-<pid>-<tag>.json``; otherwise it does nothing. The harness compares the two.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from dataclasses import asdict, dataclass
from typing import Any

import psutil

REPORT_DIR_ENV = "UNICRON_LEAK_REPORT"


@dataclass(frozen=True, kw_only=True)
class ThreadInfo:
    """One live Python thread."""

    name: str
    daemon: bool


@dataclass(frozen=True, kw_only=True)
class ResourceSnapshot:
    """What a process holds at one moment."""

    tag: str
    rank: int | None
    pid: int
    threads: tuple[ThreadInfo, ...]
    """Live Python threads (native threads of C++ libraries are not listed)."""
    native_threads: int
    """Every OS thread of the process, for information."""
    process_groups: int
    """Entries of torch.distributed's process-group map (0 when torch.distributed is not in use)."""
    fds: dict[int, str]
    """Open file descriptors and what they point at."""
    children: tuple[int, ...]
    """Pids of live descendant processes."""

    @property
    def non_daemon_threads(self) -> tuple[str, ...]:
        """Names of the non-daemon threads other than the main thread (they keep a process alive)."""
        main = threading.main_thread().name
        return tuple(t.name for t in self.threads if not t.daemon and t.name != main)

    def to_json(self) -> str:
        """JSON (file-descriptor numbers become strings)."""
        data = asdict(self)
        data["fds"] = {str(k): v for k, v in self.fds.items()}
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ResourceSnapshot:
        """Inverse of ``to_json``."""
        data: dict[str, Any] = json.loads(text)
        data["threads"] = tuple(ThreadInfo(**t) for t in data["threads"])
        data["fds"] = {int(k): v for k, v in data["fds"].items()}
        data["children"] = tuple(data["children"])
        return cls(**data)


def _process_group_count() -> int:
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available():
        return 0
    return len(dist.distributed_c10d._world.pg_map)


def _open_fds() -> dict[int, str]:
    fds: dict[int, str] = {}
    fd_dir = "/proc/self/fd"
    for name in os.listdir(fd_dir):
        try:
            fds[int(name)] = os.readlink(os.path.join(fd_dir, name))
        except OSError:  # the descriptor listdir itself used, closed by now
            continue
    return fds


def resource_snapshot(tag: str = "") -> ResourceSnapshot:
    """Threads, process groups, open file descriptors and child processes of this process, now."""
    rank_env = os.environ.get("RANK")
    me = psutil.Process()
    return ResourceSnapshot(
        tag=tag,
        rank=int(rank_env) if rank_env is not None and rank_env.isdigit() else None,
        pid=os.getpid(),
        threads=tuple(ThreadInfo(name=t.name, daemon=t.daemon) for t in threading.enumerate()),
        native_threads=me.num_threads(),
        process_groups=_process_group_count(),
        fds=_open_fds(),
        children=tuple(c.pid for c in me.children(recursive=True)),
    )


def write_report_if_requested(tag: str) -> str | None:
    """If ``UNICRON_LEAK_REPORT`` is set, write this process's snapshot there; return the file's path."""
    directory = os.environ.get(REPORT_DIR_ENV)
    if not directory:
        return None
    snap = resource_snapshot(tag)
    rank = "norank" if snap.rank is None else str(snap.rank)
    path = os.path.join(directory, f"{rank}-{snap.pid}-{tag}.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(snap.to_json())
    os.replace(tmp, path)
    return path
