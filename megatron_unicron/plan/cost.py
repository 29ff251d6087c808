"""The paper's cost model: weighted achieved FLOP/s (WAF) and the per-job reward of a candidate plan.

    F(t, x)  = w(t) · T(t, x)   if x >= x_min(t), else 0
    G(t, x') = F(t, x') · D_running − [transition needed] · F(t, x') · D_transition(t, x, x')

* `D_running` is how long the new plan is expected to run before the next change: the cluster re-plans
  at its next failure, and with n surviving nodes that each fail at rate 1/MTBF (exponential, independent)
  the next failure comes after MTBF/n on average. `CostParams.running_s` overrides it.
* `D_transition` is the switch time: an in-process transition (`transition_s`) when the job keeps
  running on some GPUs, a start from the persistent checkpoint (`start_s`) when it has none (a parked or
  new job, or one that lost all its nodes), 0 when it is parked (nothing to do).
* A transition is needed when the job's node count changes or it lost a node.

**Which WAF is charged during a transition: the new one, F(t, x′).** The reward is meant to be the work
the job actually does over the horizon D_running under the new plan. The job does nothing while it
switches and runs at F(t, x′) for the remaining D_running − D_transition, which is exactly
F(t, x′)·D_running − F(t, x′)·D_transition. Charging the old WAF F(t, x) instead would make growing a
job look cheaper than it is (F(t, x) < F(t, x′)) and would charge nothing to a job that was parked or
stalled on a dead node (F = 0 there), so a restart from checkpoint would look free. With the new WAF,
parking a job (x′ = 0) correctly costs nothing beyond its lost output, and keeping a job where it is
(no transition) wins whenever F(t, x)·D ≥ F(t, x′)·(D − D_transition).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_unicron.plan.errors import PlanInputError

__all__ = ["CostParams", "waf", "reward_curve", "DEFAULT_NODE_MTBF_S"]

# Llama 3 405B (failures.md §6): 419 unexpected interruptions in 54 days on 16,384 GPUs = 2,048 nodes
# of 8, i.e. one per node every 54 * 2048 / 419 = 264 days.
DEFAULT_NODE_MTBF_S = 54 * 2048 / 419 * 86400.0


@dataclass(frozen=True, kw_only=True)
class CostParams:
    """Inputs of D_running and D_transition (seconds)."""

    node_mtbf_s: float = DEFAULT_NODE_MTBF_S
    # "tens of seconds" for a Unicron transition (unicron-paper.md §7, [M]); to be replaced by the
    # transition benchmark's measurement.
    transition_s: float = 30.0
    # environment setup + initialisation of a job started from its checkpoint: 14 min (paper §2 [S]).
    start_s: float = 14 * 60.0
    running_s: float | None = None

    def __post_init__(self) -> None:
        for f in ("node_mtbf_s", "transition_s", "start_s"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise PlanInputError(f"cost.{f}: expected a number >= 0, got {v!r}")
        if not self.node_mtbf_s > 0:
            raise PlanInputError("cost.node_mtbf_s: must be > 0")
        if self.running_s is not None and not self.running_s > 0:
            raise PlanInputError(f"cost.running_s: must be > 0, got {self.running_s!r}")

    def d_running(self, alive_nodes: int) -> float:
        """Expected seconds until the next failure among `alive_nodes` nodes."""
        if self.running_s is not None:
            return self.running_s
        return self.node_mtbf_s / max(alive_nodes, 1)

    def d_transition(self, from_gpus: int, to_gpus: int) -> float:
        """Seconds a job produces nothing while it switches from `from_gpus` to `to_gpus`."""
        if to_gpus == 0:
            return 0.0
        return self.start_s if from_gpus == 0 else self.transition_s

    def to_dict(self) -> dict[str, Any]:
        """YAML-ready mapping."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "cost") -> CostParams:
        """Accepts the fields, plus `node_mtbf_hours` for convenience; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)} | {"node_mtbf_hours"}
        d = dict(data)
        for key in d:
            if key not in known:
                raise PlanInputError(f"{where}.{key}: unknown key; expected one of {sorted(known)}")
        if "node_mtbf_hours" in d:
            hours = d.pop("node_mtbf_hours")
            if isinstance(hours, bool) or not isinstance(hours, (int, float)) or not hours > 0:
                raise PlanInputError(f"{where}.node_mtbf_hours: expected a number > 0, got {hours!r}")
            d["node_mtbf_s"] = float(hours) * 3600.0
        try:
            return cls(**d)
        except PlanInputError as err:
            raise PlanInputError(str(err).replace("cost.", f"{where}.", 1)) from None


def waf(weight: float, flops: float, gpus: int, x_min: int) -> float:
    """F(t, x): weighted achieved FLOP/s, 0 below the job's minimum GPU count."""
    return weight * flops if gpus >= max(x_min, 1) and flops > 0 else 0.0


def reward_curve(
    waf_by_nodes: np.ndarray, current_nodes: int, affected: bool, d_running: float, cost: CostParams
) -> np.ndarray:
    """G(t, k) for k = 0..n whole nodes, given F(t, k) (vectorised over k)."""
    k = np.arange(len(waf_by_nodes))
    need = (waf_by_nodes > 0) & (affected | (k != current_nodes))
    d_tr = cost.d_transition(0 if current_nodes == 0 else 1, 1)
    return waf_by_nodes * d_running - np.where(need, waf_by_nodes * d_tr, 0.0)
