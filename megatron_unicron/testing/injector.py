"""Deterministic fault injection for tests, benchmarks and users rehearsing failures.

A schedule is a list of ``KIND:RANK:ITER[:PHASE]`` specs, from ``--unicron-inject`` (repeatable), the
``unicron: inject:`` list of the YAML job config, or the environment variable ``UNICRON_INJECT``
(comma-separated). RANK is the launch rank, ITER the 1-based iteration in flight, PHASE one of forward,
backward, allreduce, optimizer, p2p, save (default forward). KIND is:

* ``kill`` (SIGKILL itself), ``exit`` (exit code 13), ``hang`` (SIGSTOP itself), ``slow=F`` (from then
  on every iteration of the rank takes F times as long), ``node`` (SIGKILL its agent: the agent's
  workers die with it, as a lost node), ``close`` (shut down the rank's connections to its peers, not
  the one to the job's store, then fail: the peers see ``Connection closed by peer`` at once, as when
  a link drops, while the rank's process groups stay registered for the recovery to abandon);
  ``corrupt`` (the next state this rank sends in a transition arrives corrupted: a byte flipped after
  its checksum, as bad memory or a bad link would; pair it with a fault that causes a transition);
* one per error type: ``nccl-timeout``, ``ecc``, ``nvlink``, ``network``, ``link-flap``, ``other``,
  ``illegal-memory``, ``dma``, ``conn-refused``, ``cuda``, ``conn-reset``, ``driver``: raised as an
  :class:`InjectedFault` carrying a real error text of that kind.

Each fault fires once per job, even across a restarted process (it marks itself fired in the store when
there is one), logs one line, and is counted in :attr:`FaultInjector.fired`.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from megatron_unicron.errors import ConfigError
from megatron_unicron.events import ErrorKind, Phase
from megatron_unicron.taxonomy import error_text

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

ENV_VAR = "UNICRON_INJECT"
EXIT_CODE = 13
PROCESS_KINDS = ("kill", "exit", "hang", "slow", "node", "close", "corrupt")
ERROR_KINDS = tuple(
    k.value for k in ErrorKind if k not in (ErrorKind.TASK_HANG, ErrorKind.EXITED, ErrorKind.LOST_NODE)
)


class InjectedFault(RuntimeError):
    """A fault raised by the injector, with the real error text of its kind."""


@dataclass(frozen=True)
class FaultSpec:
    """One scheduled fault."""

    kind: str
    rank: int
    iteration: int
    phase: Phase = Phase.FORWARD
    factor: float = 1.0  # for ``slow``
    index: int = 0  # position in the schedule (names the fault in the store)

    def __str__(self) -> str:
        kind = f"slow={self.factor:g}" if self.kind == "slow" else self.kind
        return f"{kind}:{self.rank}:{self.iteration}:{self.phase.value}"


def parse_spec(text: str, index: int = 0) -> FaultSpec:
    """Parse ``KIND:RANK:ITER[:PHASE]``; ConfigError names the bad part and the choices."""
    parts = text.strip().split(":")
    if len(parts) not in (3, 4):
        raise ConfigError(f"fault spec {text!r}: expected KIND:RANK:ITER[:PHASE], e.g. kill:3:5:forward")
    kind, factor = parts[0], 1.0
    if kind.startswith("slow="):
        try:
            factor = float(kind.split("=", 1)[1])
        except ValueError:
            raise ConfigError(f"fault spec {text!r}: slow=FACTOR needs a number, e.g. slow=1.5") from None
        if factor < 1.0:
            raise ConfigError(f"fault spec {text!r}: slow=FACTOR must be >= 1")
        kind = "slow"
    if kind not in PROCESS_KINDS + ERROR_KINDS:
        choices = ", ".join("slow=F" if k == "slow" else k for k in PROCESS_KINDS + ERROR_KINDS)
        raise ConfigError(f"fault spec {text!r}: unknown kind {kind!r}; choose one of {choices}")
    try:
        rank, iteration = int(parts[1]), int(parts[2])
    except ValueError:
        raise ConfigError(f"fault spec {text!r}: RANK and ITER must be integers") from None
    if rank < 0 or iteration < 1:
        raise ConfigError(f"fault spec {text!r}: RANK must be >= 0 and ITER >= 1 (iterations count from 1)")
    phase = Phase.FORWARD
    if len(parts) == 4:
        try:
            phase = Phase(parts[3])
        except ValueError:
            names = ", ".join(p.value for p in Phase if p is not Phase.OTHER)
            raise ConfigError(
                f"fault spec {text!r}: unknown phase {parts[3]!r}; choose one of {names}"
            ) from None
    return FaultSpec(kind=kind, rank=rank, iteration=iteration, phase=phase, factor=factor, index=index)


def schedule_from(specs: Iterable[str], environ: dict[str, str] | None = None) -> tuple[FaultSpec, ...]:
    """The whole schedule: the given specs, then those of ``UNICRON_INJECT``."""
    env = os.environ if environ is None else environ
    texts = list(specs) + [t for t in env.get(ENV_VAR, "").split(",") if t.strip()]
    return tuple(parse_spec(text, i) for i, text in enumerate(texts))


def close_peer_sockets(keep_ports: Collection[int]) -> int:
    """Shut down this process's connected TCP sockets, except those to or from ``keep_ports``.

    The descriptors stay open (their owners, e.g. gloo's transport, still hold them); every read or write
    on them fails from now on, here and at the peer. Returns how many connections were shut down.
    """
    closed = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=int(name))
        except OSError:  # closed meanwhile, or not a socket after all
            continue
        try:
            if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                peer_port = sock.getpeername()[1]
            except OSError:  # a listening socket
                continue
            if peer_port in keep_ports or sock.getsockname()[1] in keep_ports:
                continue
            sock.shutdown(socket.SHUT_RDWR)
            closed += 1
        except OSError:
            continue
        finally:
            sock.detach()  # the descriptor belongs to its owner: never close it here
    return closed


class FaultInjector:
    """Fires the faults scheduled for this rank when the worker enters their iteration and phase.

    ``mark_fired(spec, record) -> bool`` claims a fault job-wide (False: it fired before, e.g. before
    this process was restarted); ``close_connections`` closes this rank's process groups (for ``close``);
    ``corrupt_transfer`` makes the next transfer this rank sends arrive corrupted (for ``corrupt``).
    """

    def __init__(
        self,
        schedule: Sequence[FaultSpec],
        rank: int,
        *,
        mark_fired: Callable[[FaultSpec, dict[str, Any]], bool] | None = None,
        close_connections: Callable[[], None] | None = None,
        corrupt_transfer: Callable[[], None] | None = None,
    ) -> None:
        self.pending = [spec for spec in schedule if spec.rank == rank]
        self.rank = rank
        self.mark_fired = mark_fired
        self.close_connections = close_connections
        self.corrupt_transfer = corrupt_transfer
        self.fired: collections.Counter[str] = collections.Counter()
        self.slow_factor = 1.0
        self.t_fault: float | None = None

    def __call__(self, iteration: int, phase: Phase) -> None:
        """Phase listener: fire every pending fault of this iteration and phase."""
        for spec in list(self.pending):
            if spec.iteration == iteration and spec.phase is phase:
                self.pending.remove(spec)
                self._fire(spec)

    def _fire(self, spec: FaultSpec) -> None:
        now = time.time()
        record = {"fault": str(spec), "kind": spec.kind, "rank": spec.rank, "iteration": spec.iteration,
                  "phase": spec.phase.value, "t_fault": now, "pid": os.getpid()}  # fmt: skip
        if self.mark_fired is not None and not self.mark_fired(spec, record):
            return
        self.fired[spec.kind] += 1
        self.t_fault = now
        logger.warning("unicron-inject: fired %s (t_fault=%.6f) %s", spec, now, json.dumps(record))
        for handler in logging.getLogger().handlers:
            handler.flush()
        if spec.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif spec.kind == "exit":
            os._exit(EXIT_CODE)
        elif spec.kind == "hang":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif spec.kind == "slow":
            self.slow_factor = spec.factor
        elif spec.kind == "node":
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(30)  # the agent's death takes this process with it (PDEATHSIG)
        elif spec.kind == "close":
            if self.close_connections is not None:
                self.close_connections()
            raise InjectedFault(error_text(ErrorKind.CONN_RESET) + " (this rank closed its connections)")
        elif spec.kind == "corrupt":
            if self.corrupt_transfer is not None:
                self.corrupt_transfer()
        else:
            raise InjectedFault(error_text(ErrorKind(spec.kind)))

    def delay_for(self, iteration_seconds: float) -> float:
        """Extra seconds a slowed rank waits after an iteration that took ``iteration_seconds``."""
        return (self.slow_factor - 1.0) * iteration_seconds


def flip_a_byte(payload: torch.Tensor) -> None:
    """Corrupt a uint8 payload in place, as one flipped bit in transit would."""
    if payload.numel():
        payload[payload.numel() // 2] ^= 1
