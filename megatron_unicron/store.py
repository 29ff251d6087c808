"""The coordination store: one small interface, a TCPStore backend, and the job's key names.

Launchers, agents, workers and (later) the coordinator meet in one key-value store. On one machine, or
a small cluster, it is a ``torch.distributed.TCPStore`` hosted by the launcher of node rank 0, never by
a worker: a dead host rank would take the rendezvous down with it. An etcd backend can implement the
same ``Store`` interface later. Every blocking call takes its timeout as a ``timedelta``.

Key layout (``JobKeys``): ``unicron/<job>/...`` for the launchers' own bookkeeping (node registration,
leases, restart attempts) and ``unicron/<job>/gen<g>/...`` for one generation of the job (fault reports,
the coordinator's decision, the prefix of that generation's process groups). Every key outside
``unicron/`` belongs to the workers' own rendezvous (``init_process_group`` over ``env://``) and is
cleared between restart attempts.
"""

from __future__ import annotations

import json
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

#: Prefix of every key the project itself writes; anything else belongs to the workers.
ROOT = "unicron"


class StoreError(RuntimeError):
    """A store operation failed."""


class StoreTimeout(StoreError):
    """A blocking store operation did not complete within its timeout."""


class StoreUnavailable(StoreError):
    """The store cannot be reached (never started, or its host process is gone)."""


class StoreAddressInUse(StoreError):
    """The store cannot be hosted because its port is taken."""


class Store(ABC):
    """The operations the project needs from a coordination store (values are bytes; str is UTF-8)."""

    @property
    @abstractmethod
    def address(self) -> tuple[str, int]:
        """``(host, port)`` clients use to reach this store."""

    @abstractmethod
    def set(self, key: str, value: bytes | str) -> None:
        """Write ``value`` under ``key``."""

    @abstractmethod
    def get(self, key: str, timeout: timedelta) -> bytes:
        """Return the value of ``key``, waiting up to ``timeout`` for it to appear."""

    @abstractmethod
    def try_get(self, key: str) -> bytes | None:
        """Return the value of ``key`` now, or None if it does not exist."""

    @abstractmethod
    def add(self, key: str, amount: int) -> int:
        """Atomically add ``amount`` to the integer counter ``key`` (created at 0); return the new value."""

    @abstractmethod
    def append(self, key: str, value: bytes | str) -> None:
        """Atomically append ``value`` to ``key`` (created empty)."""

    @abstractmethod
    def compare_set(self, key: str, expected: bytes | str, desired: bytes | str) -> bytes:
        """Set ``key`` to ``desired`` if it holds ``expected`` (``b""``: absent); return what it holds."""

    @abstractmethod
    def wait(self, keys: Sequence[str], timeout: timedelta) -> None:
        """Block until every key exists; raise ``StoreTimeout`` after ``timeout``."""

    @abstractmethod
    def check(self, keys: Sequence[str]) -> bool:
        """Whether every key exists now."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Delete ``key``; return whether it existed."""

    @abstractmethod
    def list_keys(self, prefix: str = "") -> list[str]:
        """Every key starting with ``prefix``."""

    @abstractmethod
    def clone(self) -> Store:
        """A new connection to the same store, for use by another thread."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection (and stop the server if this object hosts it)."""


def _to_bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


class TCPStoreBackend(Store):
    """``Store`` over a ``torch.distributed.TCPStore`` connection (client or host)."""

    def __init__(self, tcp_store: dist.TCPStore, host: str) -> None:
        self._store: dist.TCPStore | None = tcp_store
        self._host = host

    @property
    def c10d_store(self) -> dist.TCPStore:
        """The underlying c10d store, to build process groups on (wrap it in a ``PrefixStore``)."""
        if self._store is None:
            raise StoreUnavailable("this store connection is closed")
        return self._store

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` clients use to reach this store."""
        return self._host, int(self.c10d_store.port)

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except dist.DistStoreError as e:
            if "timeout" in str(e):
                raise StoreTimeout(f"store {what}: {e}") from None
            raise StoreError(f"store {what}: {e}") from None
        except dist.DistNetworkError as e:
            host, port = self._host, self.c10d_store.port
            raise StoreUnavailable(f"lost the store at {host}:{port} during {what}: {e}") from None

    def set(self, key: str, value: bytes | str) -> None:
        """Write ``value`` under ``key``."""
        self._call(f"set({key})", self.c10d_store.set, key, _to_bytes(value))

    def get(self, key: str, timeout: timedelta) -> bytes:
        """Return the value of ``key``, waiting up to ``timeout`` for it to appear."""
        self.wait([key], timeout)
        return bytes(self._call(f"get({key})", self.c10d_store.get, key))

    def try_get(self, key: str) -> bytes | None:
        """Return the value of ``key`` now, or None if it does not exist."""
        if not self.check([key]):
            return None
        return bytes(self._call(f"get({key})", self.c10d_store.get, key))

    def add(self, key: str, amount: int) -> int:
        """Atomically add ``amount`` to the integer counter ``key``; return the new value."""
        return int(self._call(f"add({key})", self.c10d_store.add, key, amount))

    def append(self, key: str, value: bytes | str) -> None:
        """Atomically append ``value`` to ``key``."""
        self._call(f"append({key})", self.c10d_store.append, key, _to_bytes(value))  # type: ignore[attr-defined]

    def compare_set(self, key: str, expected: bytes | str, desired: bytes | str) -> bytes:
        """Set ``key`` to ``desired`` if it holds ``expected`` (``b""``: absent); return what it holds."""
        expected_b = _to_bytes(expected)
        cas = self.c10d_store.compare_set
        held = bytes(self._call(f"compare_set({key})", cas, key, expected_b, _to_bytes(desired)))
        if held == expected_b and expected_b and not self.check([key]):
            # TCPStore echoes a non-empty ``expected`` back for a missing key without setting it.
            return b""
        return held

    def wait(self, keys: Sequence[str], timeout: timedelta) -> None:
        """Block until every key exists; raise ``StoreTimeout`` after ``timeout``."""
        self._call(f"wait({', '.join(keys)})", self.c10d_store.wait, list(keys), timeout)

    def check(self, keys: Sequence[str]) -> bool:
        """Whether every key exists now."""
        return bool(self._call("check", self.c10d_store.check, list(keys)))

    def delete(self, key: str) -> bool:
        """Delete ``key``; return whether it existed."""
        return bool(self._call(f"delete({key})", self.c10d_store.delete_key, key))

    def list_keys(self, prefix: str = "") -> list[str]:
        """Every key starting with ``prefix``."""
        keys = self._call("list_keys", self.c10d_store.list_keys)
        return sorted(k for k in keys if k.startswith(prefix))

    def clone(self) -> TCPStoreBackend:
        """A new client connection to the same store, for use by another thread."""
        return TCPStoreBackend(self._call("clone", self.c10d_store.clone), self._host)  # type: ignore[attr-defined]

    def close(self) -> None:
        """Drop the connection; the server stops when its hosting object is closed."""
        self._store = None


def host_store(host: str, port: int, timeout: timedelta = timedelta(seconds=60)) -> TCPStoreBackend:
    """Host a TCPStore server in this process on ``host:port`` (0 picks a free port) and connect to it.

    ``timeout`` is the default of the connection's own blocking calls. Raises ``StoreAddressInUse``
    when the port is taken.
    """
    try:
        tcp = dist.TCPStore(host, port, None, True, timeout, wait_for_workers=False)
    except dist.DistNetworkError as e:
        if "EADDRINUSE" in str(e) or "address already in use" in str(e):
            raise StoreAddressInUse(f"port {port} on {host} is already in use") from None
        raise StoreUnavailable(f"cannot host the store on {host}:{port}: {e}") from None
    return TCPStoreBackend(tcp, host)


def connect_store(host: str, port: int, timeout: timedelta) -> TCPStoreBackend:
    """Connect to a store hosted on ``host:port``, waiting up to ``timeout`` for its host to come up.

    The wait probes the port from Python (interruptible by signals, no C++ retry log on stderr) before
    the TCPStore client connects.
    """
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                break
        except OSError as e:
            if time.monotonic() >= deadline:
                raise StoreUnavailable(
                    f"cannot reach the store at {host}:{port} within {timeout.total_seconds():g}s ({e})"
                ) from None
            time.sleep(0.1)
    try:
        tcp = dist.TCPStore(host, port, None, False, timeout)
    except (dist.DistNetworkError, dist.DistStoreError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StoreUnavailable(f"cannot connect to the store at {host}:{port} ({first})") from None
    return TCPStoreBackend(tcp, host)


# ---------------------------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class AttemptKeys:
    """Keys of one launch attempt (``TORCHELASTIC_RESTART_COUNT``) of the worker group."""

    prefix: str

    def ready(self, node: str) -> str:
        """Set by a node's agent when it is ready to start this attempt's workers."""
        return f"{self.prefix}/ready/{node}"

    @property
    def go(self) -> str:
        """Set by node 0 once every node is ready and the workers' old keys are cleared."""
        return f"{self.prefix}/go"

    @property
    def failure(self) -> str:
        """The attempt's root-cause failure (first writer wins, through ``compare_set``)."""
        return f"{self.prefix}/failure"

    def done(self, node: str) -> str:
        """Set by a node's agent when all its workers of this attempt exited with code 0."""
        return f"{self.prefix}/done/{node}"


@dataclass(frozen=True)
class GenerationKeys:
    """Keys of one generation of a job (a generation = one layout of the worker group)."""

    prefix: str

    @property
    def faults(self) -> str:
        """Fault reports, appended as JSON lines (``append_record``)."""
        return f"{self.prefix}/faults"

    @property
    def decision(self) -> str:
        """The coordinator's decision for this generation."""
        return f"{self.prefix}/decision"

    @property
    def process_groups(self) -> str:
        """Prefix for this generation's process groups (``PrefixStore(keys.process_groups, store)``)."""
        return f"{self.prefix}/pg"


@dataclass(frozen=True)
class JobKeys:
    """Names of every key a job uses, rooted at ``unicron/<job>``."""

    job: str

    def __post_init__(self) -> None:
        if not self.job or "/" in self.job:
            raise ValueError(f"job id {self.job!r} must be non-empty and contain no '/'")

    @property
    def prefix(self) -> str:
        """``unicron/<job>``."""
        return f"{ROOT}/{self.job}"

    @property
    def spec(self) -> str:
        """The job's shape as node 0 declared it (JSON), checked by every other node."""
        return f"{self.prefix}/spec"

    def node_owner(self, node: str) -> str:
        """Which launcher registered as ``node`` (first writer wins)."""
        return f"{self.prefix}/nodes/{node}/owner"

    def lease(self, node: str) -> str:
        """The node agent's lease: the wall time of its last renewal (TCPStore has no TTL)."""
        return f"{self.prefix}/nodes/{node}/lease"

    @property
    def abort(self) -> str:
        """Why the job was aborted (a launcher stopped by a signal, or one that hit an error)."""
        return f"{self.prefix}/abort"

    def left(self, node: str) -> str:
        """Set (to the agent's final message) when a node's agent leaves the job, its workers gone."""
        return f"{self.prefix}/nodes/{node}/left"

    def attempt(self, attempt: int) -> AttemptKeys:
        """Keys of launch attempt ``attempt``."""
        return AttemptKeys(f"{self.prefix}/attempt{attempt}")

    def gen(self, generation: int) -> GenerationKeys:
        """Keys of generation ``generation``."""
        if generation < 0:
            raise ValueError(f"generation must be >= 0, got {generation}")
        return GenerationKeys(f"{self.prefix}/gen{generation}")


# ------------------------------------------------------------------------------ leases and records


def renew_lease(store: Store, key: str, now: float | None = None) -> None:
    """Write the current wall time under ``key`` (leases are compared across hosts: keep clocks in sync)."""
    store.set(key, f"{time.time() if now is None else now:.6f}")


def lease_age(store: Store, key: str, now: float | None = None) -> float | None:
    """Seconds since the lease under ``key`` was last renewed, or None if it never was."""
    raw = store.try_get(key)
    if raw is None:
        return None
    return (time.time() if now is None else now) - float(raw.decode())


def append_record(store: Store, key: str, record: Mapping[str, Any]) -> None:
    """Append one JSON record (a line) to the list under ``key``; concurrent writers are safe."""
    store.append(key, json.dumps(dict(record), sort_keys=True) + "\n")


def read_records(store: Store, key: str) -> list[dict[str, Any]]:
    """Every record appended under ``key`` so far, oldest first."""
    raw = store.try_get(key)
    if raw is None:
        return []
    return [json.loads(line) for line in raw.decode().splitlines() if line]


def clear_worker_keys(store: Store) -> int:
    """Delete every key outside ``unicron/`` (the workers' rendezvous of an ended attempt); return how many.

    torch's ``env://`` rendezvous writes fixed key names (``default_pg/0//cpu//0/<rank>``: each rank's
    address); keys left by the previous attempt would point the next one at dead peers.
    """
    stale = [k for k in store.list_keys() if not k.startswith(f"{ROOT}/")]
    for key in stale:
        store.delete(key)
    return len(stale)
