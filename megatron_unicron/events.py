"""Values that travel through the store: fault reports, incidents, and the decisions that end them.

A worker or an agent reports a :class:`FaultEvent`; the coordinator groups correlated events into an
:class:`Incident` (its root cause is the most severe event), grades it and publishes a
:class:`Decision` for the next generation of the job. All are frozen and serialise to JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from enum import Enum, IntEnum
from typing import Any, TypeVar


class ErrorKind(str, Enum):
    """The failure taxonomy: the paper's 13 error types, plus process exit and lost node."""

    NCCL_TIMEOUT = "nccl-timeout"
    ECC = "ecc"
    NVLINK = "nvlink"
    NETWORK = "network"
    LINK_FLAP = "link-flap"
    OTHER = "other"
    TASK_HANG = "hang"
    ILLEGAL_MEMORY = "illegal-memory"
    DMA = "dma"
    CONN_REFUSED = "conn-refused"
    CUDA = "cuda"
    CONN_RESET = "conn-reset"
    DRIVER = "driver"
    EXITED = "exited"
    LOST_NODE = "lost-node"


class Severity(IntEnum):
    """SEV1 is the most severe (a lost node or device); compare with ``min`` to find the worst."""

    SEV1 = 1
    SEV2 = 2
    SEV3 = 3


class Action(str, Enum):
    """What the coordinator does about an incident."""

    REATTEMPT = "reattempt"  # SEV3: new communicators, same processes and layout, redo the iteration
    RESTART = "restart"  # SEV2: restart the failed process on its node, same layout
    RECONFIGURE = "reconfigure"  # SEV1: isolate the node, re-plan, transition to a new layout
    STOP = "stop"  # give up cleanly, saying why and how to resume
    SCALE_UP = "scale-up"  # a node came back: re-plan to a larger layout


class Phase(str, Enum):
    """Where in an iteration a worker was when it failed."""

    FORWARD = "forward"
    BACKWARD = "backward"
    ALLREDUCE = "allreduce"
    OPTIMIZER = "optimizer"
    P2P = "p2p"
    SAVE = "save"
    OTHER = "other"


T = TypeVar("T")


def _to_json(value: Any) -> str:
    def default(obj: Any) -> Any:
        if isinstance(obj, Enum):
            return obj.value
        raise TypeError(f"not serialisable: {obj!r}")

    return json.dumps(asdict(value), default=default, sort_keys=True)


@dataclass(frozen=True, kw_only=True)
class FaultEvent:
    """One report of something wrong, by the worker that saw it or by an agent."""

    job: str
    kind: ErrorKind
    rank: int | None  # None for node-level events
    node: str
    generation: int
    message: str = ""
    iteration: int | None = None
    phase: Phase | None = None
    source: str = "worker"  # worker | agent | coordinator
    t_fault: float | None = None  # when an injected fault fired (wall clock, seconds)
    t_detected: float = 0.0
    exit_code: int | None = None  # for EXITED: the exit code, or -signal

    def to_json(self) -> str:
        """JSON for the store."""
        return _to_json(self)

    @classmethod
    def from_json(cls, text: str | bytes) -> FaultEvent:
        """Inverse of :meth:`to_json`."""
        data = json.loads(text)
        data["kind"] = ErrorKind(data["kind"])
        data["phase"] = Phase(data["phase"]) if data.get("phase") else None
        return cls(**data)


@dataclass(frozen=True, kw_only=True)
class LayoutSpec:
    """A parallel layout as a decision carries it."""

    tp: int
    pp: int
    dp: int

    def __post_init__(self) -> None:
        if min(self.tp, self.pp, self.dp) < 1:
            raise ValueError(f"layout degrees must be >= 1, got TP{self.tp} PP{self.pp} DP{self.dp}")

    @property
    def world_size(self) -> int:
        """Ranks the layout uses."""
        return self.tp * self.pp * self.dp

    def __str__(self) -> str:
        return f"TP{self.tp}PP{self.pp}DP{self.dp}"


@dataclass(frozen=True, kw_only=True)
class Decision:
    """What every process of the job does to enter generation ``generation``.

    ``members`` lists the processes (by their launch rank, which never changes) that train in the new
    generation, in new-rank order; ``live`` lists every process still alive (members and warm spares),
    which can all serve state during the transition; ``restart`` lists launch ranks whose process the
    agent restarts before the generation forms.
    """

    job: str
    generation: int
    action: Action
    incident: str
    layout: LayoutSpec
    members: tuple[int, ...]
    live: tuple[int, ...]
    restart: tuple[int, ...] = ()
    rank_node: dict[int, str] = field(default_factory=dict)
    resume_iteration: int | None = None
    at_iteration: int | None = None  # a planned transition: members switch after this many iterations
    reason: str = ""

    def __post_init__(self) -> None:
        if self.action is not Action.STOP and len(self.members) != self.layout.world_size:
            raise ValueError(f"{len(self.members)} members cannot form {self.layout}")
        if not set(self.members) <= set(self.live) | set(self.restart):
            raise ValueError("every member must be live or restarted")

    def new_rank(self, launch_rank: int) -> int | None:
        """This process's rank in the new generation, or None for a warm spare."""
        return self.members.index(launch_rank) if launch_rank in self.members else None

    def to_json(self) -> str:
        """JSON for the store."""
        return _to_json(self)

    @classmethod
    def from_json(cls, text: str | bytes) -> Decision:
        """Inverse of :meth:`to_json`."""
        data = json.loads(text)
        data["action"] = Action(data["action"])
        data["layout"] = LayoutSpec(**data["layout"])
        for name in ("members", "live", "restart"):
            data[name] = tuple(data[name])
        data["rank_node"] = {int(k): v for k, v in data.get("rank_node", {}).items()}
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
