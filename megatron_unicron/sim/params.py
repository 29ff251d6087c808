"""Every constant the simulated policies use, with its source; overridable from YAML.

Sources, abbreviated beside each constant:
* [paper]  the Unicron paper as summarised in shared/notes/unicron-paper.md (tags [S]/[M] there);
* [fail]   shared/notes/failures.md;
* [peers]  shared/notes/peers-measured.md (torchft / NVRx recovery measured on CPU);
* [oobleck-artifact]  the simulator the Oobleck authors published for their SOSP'23 figures
  (SymbioticLab/Oobleck, tools/simulator/{oobleck,varuna,bamboo}_simulator.py): measured per-model
  reconfiguration/restart/checkpoint times and throughputs of Oobleck, Varuna and Bamboo on the same
  hardware (GPT-3 2.7B and 6.7B rows used; a per-billion-parameter slope is a linear fit of the two);
* [measured]  this project's benchmarks (benchmarks/RESULTS.md): detection mechanisms do not depend on
  the accelerator, so the CPU figures stand for a GPU cluster too (the 0.5 s grace window before a
  decision is left out: it is small beside any recovery);
* [estimate]  no source found; the reason is given. These are the values to replace with measurements.

`load_params(path)` reads a YAML mapping `{unicron: {...}, megatron: {...}, oobleck: {...}, varuna:
{...}, bamboo: {...}}` of overrides (unknown keys are an error), so measured detection and transition
times can be plugged in without code changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "UnicronParams",
    "MegatronParams",
    "OobleckParams",
    "VarunaParams",
    "BambooParams",
    "PolicyParams",
    "load_params",
    "params_from_dict",
]

MINUTE = 60.0


@dataclass(frozen=True, kw_only=True)
class UnicronParams:
    """Unicron: in-band detection, severity actions, planner-driven transitions."""

    exception_detection_s: float = 0.03  # [measured] worst over the 13 exception kinds: 0.022 s
    exit_detection_s: float = 0.07  # [measured] waitpid: SIGKILL 0.041 s median, 0.068 s max
    lease_detection_s: float = 3.0  # [measured] lease TTL 3 s: 2.59 s median, 2.93 s max (paper: 5.6 s)
    hang_detection_iterations: float = 3.0  # [paper] statistical monitoring flags 3x the mean iteration
    reattempt_s: float = (
        10.0  # [estimate] SEV3: rebuild communicators + redo the iteration (not measured yet)
    )
    # [estimate] SEV2: restart one process, state from a DP replica; torchft's restart+heal is 2.2-2.8 s on
    # a tiny CPU model [peers], CUDA/NCCL init and model build at scale take tens of seconds.
    restart_process_s: float = 60.0
    transition_s: float = 30.0  # [paper][M] "tens of seconds" per reconfiguration (not measured yet)
    start_s: float = 14 * MINUTE  # [paper] a job started from its checkpoint: env setup + init, 14 min
    recompute_on_start_s: float = 15 * MINUTE  # [paper] lost progress when a job restarts from checkpoint


@dataclass(frozen=True, kw_only=True)
class MegatronParams:
    """Megatron with checkpoint-restart: timeout-bound detection, 9/14/15-minute restart, manual drain."""

    hang_timeout_s: float = 30 * MINUTE  # [paper] collective timeout the baseline waits for
    # [estimate] a process that raises exits; torchrun/Slurm tear the job down within seconds to a minute
    exception_detection_s: float = 30.0
    requeue_s: float = 9 * MINUTE  # [paper] re-queuing / scheduling
    setup_s: float = 14 * MINUTE  # [paper] environment setup and initialisation
    recompute_s: float = 15 * MINUTE  # [paper] recomputing progress lost since the last checkpoint
    # [estimate] an operator finds and drains the faulty node, down-scales the configuration and realigns
    # the checkpoint; the paper gives "hours to days" of sub-healthy running, not the response time.
    manual_drain_s: float = 60 * MINUTE


@dataclass(frozen=True, kw_only=True)
class OobleckParams:
    """Oobleck (SOSP'23): PP x DP pipeline templates, reconfigures from in-memory replicas."""

    max_tp: int = 1  # [Oobleck paper §3] pipeline templates: pipeline + data parallelism, no TP
    # [estimate] throughput relative to Megatron's kernels under the same PP x DP restriction: 1.0, i.e.
    # optimistic for Oobleck; the Unicron paper's healthy-throughput figure (lower for all three
    # peers) could not be read. Relative to Varuna and Bamboo the artifact's measurements are used.
    efficiency: float = 1.0
    hang_timeout_s: float = (
        30 * MINUTE
    )  # [estimate] no in-band hang detection: the same torch timeout as Megatron
    detection_s: float = 5.0  # [estimate] node loss seen as the agent's TCP disconnect
    reconfigure_base_s: float = 3.3  # [oobleck-artifact] 6 s at 2.7B, 10 s at 6.7B: 3.3 s + 1.0 s/B params
    reconfigure_per_bparam_s: float = 1.0  # [oobleck-artifact]
    process_restart_s: float = (
        60.0  # [estimate] a failed process restarts and its node rejoins (same as Unicron SEV2)
    )


@dataclass(frozen=True, kw_only=True)
class VarunaParams:
    """Varuna (EuroSys'22): PP x DP, morphing by checkpoint + restart from a long-lived manager."""

    max_tp: int = 1  # [Varuna docs, morphing.rst] pipeline stages x data-parallel replicas, no TP
    efficiency: float = (
        0.95  # [oobleck-artifact] GPT-3 6.7B at 30 GPUs: Varuna 5.24 vs Oobleck 5.51 samples/s
    )
    hang_timeout_s: float = 30 * MINUTE  # [estimate] as Megatron: no in-band hang detection
    detection_s: float = 10.0  # [oobleck-artifact] global rendezvous timeout of 10 s in varuna_simulator.py
    restart_base_s: float = 389.0  # [oobleck-artifact] 515 s at 2.7B, 701 s at 6.7B: 389 s + 46.5 s/B params
    restart_per_bparam_s: float = 46.5  # [oobleck-artifact]
    checkpoint_every_iterations: int = 10  # [oobleck-artifact] checkpoint_per_iter default
    checkpoint_base_s: float = 2.75  # [oobleck-artifact] 50 s at 2.7B, 120 s at 6.7B: 2.75 s + 17.5 s/B
    checkpoint_per_bparam_s: float = 17.5  # [oobleck-artifact]


@dataclass(frozen=True, kw_only=True)
class BambooParams:
    """Bamboo (NSDI'23): redundant computation on the pipeline neighbour, failover without restart."""

    max_tp: int = 1  # [Bamboo paper] DeepSpeed pipeline fork, no TP
    # [oobleck-artifact] each node holds its successor's stage (redundant layers): the artifact lists
    # Bamboo out of memory from GPT-3 medium upwards; modelled as 2x the model state per GPU.
    model_state_multiplier: float = 2.0
    efficiency: float = 0.25  # [oobleck-artifact] GPT-2 at 30 GPUs: Bamboo 27.0 vs Oobleck 110.0 samples/s
    failover_slowdown: float = 1.5  # [oobleck-artifact] fallback_slowdown after a node is lost
    hang_timeout_s: float = 30 * MINUTE  # [estimate] as Megatron: no in-band hang detection
    detection_s: float = 30.0  # [oobleck-artifact] global rendezvous timeout of 30 s in bamboo_simulator.py
    reconfigure_base_s: float = 81.5  # [oobleck-artifact] 230 s at 2.7B, 450 s at 6.7B: 81.5 s + 55 s/B
    reconfigure_per_bparam_s: float = 55.0  # [oobleck-artifact]
    process_restart_s: float = 60.0  # [estimate] same as Oobleck


@dataclass(frozen=True, kw_only=True)
class PolicyParams:
    """The parameters of all five policies."""

    unicron: UnicronParams = field(default_factory=UnicronParams)
    megatron: MegatronParams = field(default_factory=MegatronParams)
    oobleck: OobleckParams = field(default_factory=OobleckParams)
    varuna: VarunaParams = field(default_factory=VarunaParams)
    bamboo: BambooParams = field(default_factory=BambooParams)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """YAML-ready mapping."""
        return dataclasses.asdict(self)


def params_from_dict(data: Mapping[str, Any], where: str = "params") -> PolicyParams:
    """Defaults overridden by `data`; unknown sections or keys raise ValueError naming them."""
    out: dict[str, Any] = {}
    defaults = PolicyParams()
    for section, value in data.items():
        if section not in {f.name for f in dataclasses.fields(PolicyParams)}:
            raise ValueError(
                f"{where}.{section}: unknown policy; expected unicron, megatron, oobleck, varuna, bamboo"
            )
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}.{section}: expected a mapping")
        base = getattr(defaults, section)
        known = {f.name for f in dataclasses.fields(base)}
        for key, v in value.items():
            if key not in known:
                raise ValueError(f"{where}.{section}.{key}: unknown key; expected one of {sorted(known)}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{where}.{section}.{key}: expected a number >= 0, got {v!r}")
        out[section] = dataclasses.replace(base, **dict(value))
    return dataclasses.replace(defaults, **out)


def load_params(path: str | Path) -> PolicyParams:
    """Read overrides from a YAML file (see module docstring)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"params {p}: cannot read ({err})") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"params {p}: expected a mapping at the top level")
    return params_from_dict(data, str(p))
