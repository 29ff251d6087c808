"""The unicron config tree: the ``unicron:`` section of a YAML job config and the ``--unicron-*`` flags.

Every leaf field below is, with no further code (see :mod:`megatron_unicron.configtree`):

- a YAML key under ``unicron:`` (sections nest: ``unicron: {detection: {slow_factor: 4}}``), and
- a flag ``--unicron-<field>`` or ``--unicron-<section>-<field>`` (``enabled`` is plain ``--unicron``),
  whose help is the field's docstring.

To add a setting, add a documented field (and its check in ``__post_init__``); nothing else changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from megatron_unicron import configtree
from megatron_unicron.errors import FieldError

__all__ = ["DetectionConfig", "UnicronConfig"]


def _require(ok: bool, name: str, value: object, problem: str) -> None:
    if not ok:
        raise FieldError(name, value, problem)


@dataclass(frozen=True, kw_only=True)
class DetectionConfig:
    """Failure detection: node leases and the thresholds that call a slow step a hang."""

    lease_interval_s: float = 1.0
    """Seconds between two renewals of a node's heartbeat lease."""

    lease_ttl_s: float = 3.0
    """A node whose lease is not renewed for this many seconds is declared lost."""

    slow_factor: float = 3.0
    """An iteration or collective slower than this many times its running mean is reported as a hang."""

    warmup_floor_s: float = 2.0
    """Smallest hang threshold in seconds, used while the running mean is still unreliable."""

    grace_window_s: float = 0.5
    """Seconds to wait after a first fault report so that correlated reports join the same incident."""

    settle_window_s: float = 0.1
    """Seconds to wait instead, when a process exit, a lost node, a stopped process or a bad device
    already explains the incident (at most grace_window_s): enough for the other exits of one cause."""

    min_timeout_s: float = 0.5
    """A collective's adaptive timeout never drops below this many seconds (scheduler noise is no hang)."""

    pg_timeout_s: float = 30.0
    """Process groups' own operation timeout with --unicron: how long an abandoned, stuck operation may
    linger before its group is released (adaptive timeouts detect hangs long before)."""

    escalation_window_s: float = 60.0
    """The same fault (kind and rank) again within this many seconds is graded one severity up."""

    resume_timeout_s: float = 120.0
    """A recovery whose new generation has not trained a step after this many seconds is escalated."""

    def __post_init__(self) -> None:
        positive = ("lease_interval_s", "lease_ttl_s", "warmup_floor_s", "min_timeout_s", "pg_timeout_s")
        for name in (*positive, "resume_timeout_s"):
            value = getattr(self, name)
            _require(value > 0, name, value, "must be a positive number of seconds")
        for name in ("grace_window_s", "settle_window_s", "escalation_window_s"):
            value = getattr(self, name)
            _require(value >= 0, name, value, "must be zero or a positive number of seconds")
        _require(self.lease_ttl_s > self.lease_interval_s, "lease_ttl_s", self.lease_ttl_s,
                 f"must be longer than lease_interval_s ({self.lease_interval_s}), "
                 "or every lease expires between two renewals")
        _require(self.slow_factor > 1, "slow_factor", self.slow_factor,
                 "must be greater than 1 (a step cannot be slower than itself)")


@dataclass(frozen=True, kw_only=True)
class UnicronConfig:
    """Self-healing training: detection, recovery, metrics and fault injection."""

    enabled: bool = field(default=False, metadata={"flag": "--unicron"})
    """Switch the self-healing mode on (in-band detection, graded recovery, live reconfiguration)."""

    metrics_log: str | None = field(default=None, metadata={"metavar": "PATH"})
    """Write one JSON line per iteration to PATH (written with or without --unicron)."""

    transition_log: str | None = field(default=None, metadata={"metavar": "PATH"})
    """Append one JSON line per transition and process to PATH (timings, bytes moved, new layout)."""

    incident_log: str | None = field(default=None, metadata={"metavar": "PATH"})
    """Write one JSON line per incident (fault, severity, action, timeline) to PATH."""

    inject: tuple[str, ...] = field(default=(), metadata={"metavar": "KIND:RANK:ITER[:PHASE]"})
    """Inject fault KIND on RANK at iteration ITER, optionally in PHASE (tests and demos)."""

    snapshot_interval: int = 0
    """Copy the training state to node-local shared memory every N iterations, in the background
    (0: never; needs --unicron)."""

    persist_interval: int = 0
    """Also write every M-th snapshot as a torch_dist checkpoint to --save, in the background (0: never)."""

    restart_min_replicas: int = 2
    """While a restarted process comes back, the intact DP replicas train on if at least N are left
    (1: even a single copy, as torchft does; a second fault meanwhile then needs a snapshot or checkpoint)."""

    device_memory_gib: float = 0.0
    """Memory of one device, in GiB, that new layouts must fit when the job is re-planned (0: the CUDA
    device's own, or the plan generator's CPU preset without CUDA)."""

    detection: DetectionConfig = field(default_factory=DetectionConfig)

    def __post_init__(self) -> None:
        _require(self.device_memory_gib >= 0, "device_memory_gib", self.device_memory_gib,
                 "must be 0 (the device's own) or a positive number of GiB")
        for name in ("snapshot_interval", "persist_interval"):
            value = getattr(self, name)
            _require(value >= 0, name, value, "must be 0 (never) or a positive number of iterations")
        _require(self.restart_min_replicas >= 1, "restart_min_replicas", self.restart_min_replicas,
                 "must be at least 1 (the number of intact DP replicas that train on during a restart)")
        for spec in self.inject:
            _require(bool(spec.strip()), "inject", spec, "give a fault as KIND:RANK:ITER[:PHASE]")

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, source: str = "the unicron section",
        spelled: Mapping[str, str] | None = None,
    ) -> UnicronConfig:
        """Build from the ``unicron:`` mapping of a YAML job config (merged with flags, if any).

        ``source`` names the file for error messages; ``spelled`` maps dotted keys
        (``unicron.detection.slow_factor``) to the flags that set them. Raises ConfigError.
        """
        return configtree.build(cls, data, source=source, spelled=spelled, root=("unicron",))

    def to_dict(self) -> dict[str, Any]:
        """Return the tree as nested plain dicts (the ``unicron:`` section of a YAML job config)."""
        return configtree.to_dict(self)
