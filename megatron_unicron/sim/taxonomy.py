"""Failure kinds the simulator knows: share, severity and how the failure first shows itself.

Shares are the paper's Figure 1 (percent of the top-5% tasks by resources on Alibaba's platform that
ended with that error; they sum to 43.4), severities its Table 1, both as collected in
`shared/notes/failures.md` §1. "Others" is treated as SEV2 (failures.md). The signal class says which
detector sees it first (failures.md's "class of signal" column):

* EXCEPTION: an exception inside the training process (caught and forwarded in-band);
* HANG: nothing raises, a collective or the iteration stalls (NCCL timeout, task hang);
* EXIT: the process dies without an exception (no share in Figure 1; kind `exited_abnormally`);
* LOST: the whole node disappears (no share in Figure 1; kind `lost_connection`).

`node_back` is not a failure: it marks a repaired node returning in a trace.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["Signal", "FailureKind", "KINDS", "NODE_BACK", "kind"]

NODE_BACK = "node_back"


class Signal(str, enum.Enum):
    """Which detector sees a failure first."""

    EXCEPTION = "exception"
    HANG = "hang"
    EXIT = "exit"
    LOST = "lost"


@dataclass(frozen=True)
class FailureKind:
    """One failure type: name, share of tasks (percent), severity 1..3, first signal."""

    name: str
    share: float
    severity: int
    signal: Signal

    @property
    def takes_node_down(self) -> bool:
        """SEV1 failures isolate the node until it is repaired."""
        return self.severity == 1


KINDS: Mapping[str, FailureKind] = MappingProxyType(
    {
        k.name: k
        for k in (
            FailureKind("nccl_timeout", 10.1, 3, Signal.HANG),
            FailureKind("ecc_error", 5.0, 1, Signal.EXCEPTION),
            FailureKind("nvlink_error", 4.5, 1, Signal.EXCEPTION),
            FailureKind("other_network_error", 4.0, 3, Signal.EXCEPTION),
            FailureKind("link_flapping", 3.9, 3, Signal.EXCEPTION),
            FailureKind("others", 3.3, 2, Signal.EXCEPTION),
            FailureKind("task_hang", 3.1, 2, Signal.HANG),
            FailureKind("illegal_memory_access", 2.1, 2, Signal.EXCEPTION),
            FailureKind("invalid_dma_mapping", 2.1, 1, Signal.EXCEPTION),
            FailureKind("connection_refused", 2.1, 3, Signal.EXCEPTION),
            FailureKind("cuda_error", 1.6, 2, Signal.EXCEPTION),
            FailureKind("connection_reset", 1.0, 3, Signal.EXCEPTION),
            FailureKind("gpu_driver_error", 0.6, 1, Signal.EXCEPTION),
            FailureKind("exited_abnormally", 0.0, 2, Signal.EXIT),
            FailureKind("lost_connection", 0.0, 1, Signal.LOST),
        )
    }
)


def kind(name: str) -> FailureKind:
    """The failure kind called `name` (ValueError naming the choices otherwise)."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(
            f"unknown failure kind {name!r}; expected one of {sorted(KINDS)} or {NODE_BACK}"
        ) from None
