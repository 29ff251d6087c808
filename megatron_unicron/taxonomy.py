"""The failure taxonomy: each error type's severity, action, share, real error text and classifier.

The 13 error types of the Unicron paper (its Figure 1 shares, in percent of the top-5% tasks on
Alibaba's platform, and its Table 1 severities), plus the two signals without exception text:

=================  =====  ========  =============================================================
kind               share  severity  how it shows (on CPU/gloo, how the project injects it)
=================  =====  ========  =============================================================
nccl-timeout       10.1   SEV3      a collective exceeds its (adaptive) timeout
ecc                 5.0   SEV1      exception naming an uncorrectable ECC error
nvlink              4.5   SEV1      exception naming NVLink
network             4.0   SEV3      ``DistNetworkError`` / socket errors
link-flap           3.9   SEV3      transient link errors (an IB port going down and up)
other               3.3   SEV2      any unclassified exception
hang                3.1   SEV2      an iteration far slower than its mean, no exception
illegal-memory      2.1   SEV2      ``CUDA error: an illegal memory access was encountered``
dma                 2.1   SEV1      exception naming an invalid DMA mapping
conn-refused        2.1   SEV3      ``Connection refused``
cuda                1.6   SEV2      ``CUDA error: ...`` other than an illegal memory access
conn-reset          1.0   SEV3      ``Connection reset by peer`` / ``Connection closed by peer``
driver              0.6   SEV1      exception naming the GPU driver (an Xid)
exited              --    SEV2      the process exited abnormally (signal or non-zero code)
lost-node           --    SEV1      the node's agent stopped renewing its lease
=================  =====  ========  =============================================================

Actions by severity: SEV3 reattempt in place, SEV2 restart the process, SEV1 reconfigure. A fault
that recurs escalates one severity up (see the coordinator).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType

from megatron_unicron.events import Action, ErrorKind, Severity


@dataclass(frozen=True)
class KindInfo:
    """What the project knows about one error kind."""

    kind: ErrorKind
    severity: Severity
    share_percent: float  # of the paper's top-5% tasks; 0 for the signals without exception text
    error_text: str  # a real message of that kind (what the fault injector raises)


_INFO = (
    KindInfo(
        ErrorKind.NCCL_TIMEOUT,
        Severity.SEV3,
        10.1,
        "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 10000ms "
        "for recv operation to complete",
    ),
    KindInfo(ErrorKind.ECC, Severity.SEV1, 5.0, "CUDA error: uncorrectable ECC error encountered"),
    KindInfo(
        ErrorKind.NVLINK,
        Severity.SEV1,
        4.5,
        "CUDA error: uncorrectable NVLink error was detected during the execution",
    ),
    KindInfo(
        ErrorKind.NETWORK,
        Severity.SEV3,
        4.0,
        "torch.distributed.DistNetworkError: failed to recv, got 0 bytes: Network is unreachable",
    ),
    KindInfo(
        ErrorKind.LINK_FLAP,
        Severity.SEV3,
        3.9,
        "NCCL WARN NET/IB : Got async event : port error (link flapping on mlx5_0:1)",
    ),
    KindInfo(ErrorKind.OTHER, Severity.SEV2, 3.3, "RuntimeError: unexpected error in the training step"),
    KindInfo(
        ErrorKind.TASK_HANG,
        Severity.SEV2,
        3.1,
        "the iteration took far longer than its running mean (task hang)",
    ),
    KindInfo(
        ErrorKind.ILLEGAL_MEMORY,
        Severity.SEV2,
        2.1,
        "CUDA error: an illegal memory access was encountered",
    ),
    KindInfo(
        ErrorKind.DMA,
        Severity.SEV1,
        2.1,
        "NVRM: Xid 31: MMU Fault: ENGINE GRAPHICS: invalid DMA mapping",
    ),
    KindInfo(ErrorKind.CONN_REFUSED, Severity.SEV3, 2.1, "[Errno 111] Connection refused"),
    KindInfo(ErrorKind.CUDA, Severity.SEV2, 1.6, "CUDA error: unspecified launch failure"),
    KindInfo(
        ErrorKind.CONN_RESET,
        Severity.SEV3,
        1.0,
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:8067: "
        "Connection reset by peer",
    ),
    KindInfo(
        ErrorKind.DRIVER,
        Severity.SEV1,
        0.6,
        "NVRM: Xid 79: GPU has fallen off the bus (GPU driver error)",
    ),
    KindInfo(ErrorKind.EXITED, Severity.SEV2, 0.0, "the process exited abnormally"),
    KindInfo(ErrorKind.LOST_NODE, Severity.SEV1, 0.0, "the node's lease expired (lost connection)"),
)

KINDS = MappingProxyType({info.kind: info for info in _INFO})

ACTION_BY_SEVERITY = MappingProxyType(
    {Severity.SEV3: Action.REATTEMPT, Severity.SEV2: Action.RESTART, Severity.SEV1: Action.RECONFIGURE}
)

# Most specific first: an ECC error is also a "CUDA error", a refused connection is also a socket error.
_PATTERNS: tuple[tuple[ErrorKind, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern, re.IGNORECASE))
    for kind, pattern in (
        (ErrorKind.ECC, r"\becc\b"),
        (ErrorKind.NVLINK, r"nvlink"),
        (ErrorKind.DMA, r"dma mapping"),
        (ErrorKind.DRIVER, r"\bxid\b|fallen off the bus|driver (error|version)"),
        (ErrorKind.ILLEGAL_MEMORY, r"illegal memory access"),
        (ErrorKind.CUDA, r"cuda error|cudnn error|cublas"),
        (ErrorKind.NCCL_TIMEOUT, r"timed out|timeout|watchdog caught collective"),
        (ErrorKind.LINK_FLAP, r"port error|link flap|link is down|link down"),
        (ErrorKind.CONN_REFUSED, r"connection refused"),
        (ErrorKind.CONN_RESET, r"connection reset|connection closed by peer|broken pipe"),
        (ErrorKind.NETWORK, r"network|no route to host|socket|distnetworkerror|gloo"),
    )
)


def severity_of(kind: ErrorKind) -> Severity:
    """The kind's base severity (before escalation)."""
    return KINDS[kind].severity


def action_for(severity: Severity) -> Action:
    """What is done about an incident of that severity."""
    return ACTION_BY_SEVERITY[severity]


def error_text(kind: ErrorKind) -> str:
    """A real error message of that kind."""
    return KINDS[kind].error_text


def classify_message(message: str) -> ErrorKind:
    """The kind an error message names, ``other`` when it names none."""
    for kind, pattern in _PATTERNS:
        if pattern.search(message):
            return kind
    return ErrorKind.OTHER


def classify_exception(error: BaseException) -> ErrorKind:
    """Classify an exception by the types and texts of it and its causes (outermost text first)."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    kind = classify_message(" | ".join(f"{type(e).__name__}: {e}" for e in chain))
    if kind is not ErrorKind.OTHER:
        return kind
    for link in chain:
        if isinstance(link, ConnectionRefusedError):
            return ErrorKind.CONN_REFUSED
        if isinstance(link, (ConnectionResetError, BrokenPipeError)):
            return ErrorKind.CONN_RESET
        if isinstance(link, (ConnectionError, OSError)) and link.errno is not None:
            return ErrorKind.NETWORK
    return ErrorKind.OTHER
