"""Calibrate the analytic throughput model against profiled iterations.

The analytic iteration time is a weighted sum of six terms (`plan.throughput.iteration_features`:
compute, TP communication, PP communication, micro-batch slots, DP communication, a constant). A profile
gives measured iteration times for a few layouts; `calibrate` fits the six non-negative coefficients by
least squares on relative error, with a ridge term that pulls every coefficient towards its prior
(`AnalyticParams` defaults) so that terms a small profile cannot identify (e.g. TP communication when
only DP layouts were measured) keep their modelled value instead of collapsing to zero.
Non-negativity is exact: with six unknowns every active set is tried (64 small solves).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_unicron.plan.errors import PlanInputError
from megatron_unicron.plan.hardware import DeviceSpec
from megatron_unicron.plan.layouts import Layout
from megatron_unicron.plan.memory import MemoryOptions
from megatron_unicron.plan.models import ModelShape
from megatron_unicron.plan.throughput import AnalyticParams, iteration_features

__all__ = ["Measurement", "calibrate", "fit_error"]


@dataclass(frozen=True)
class Measurement:
    """A measured iteration time of one layout."""

    layout: Layout
    iteration_time_s: float

    def __post_init__(self) -> None:
        if not self.iteration_time_s > 0:
            raise PlanInputError(f"measurement for {self.layout}: iteration_time_s must be > 0")


def _nnls_ridge(a: np.ndarray, y: np.ndarray, prior: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """argmin ||a x - y||² + ||weight (x - prior)||² subject to x >= 0 (exhaustive active sets)."""
    n = a.shape[1]
    aa = np.vstack([a, np.diag(weight)])
    yy = np.concatenate([y, weight * prior])
    best, best_cost = np.maximum(prior, 0.0), np.inf
    for free in itertools.product((True, False), repeat=n):
        idx = [i for i in range(n) if free[i]]
        x = np.zeros(n)
        if idx:
            sol, *_ = np.linalg.lstsq(aa[:, idx], yy, rcond=None)
            if (sol < 0).any():
                continue
            x[idx] = sol
        cost = float(np.sum((aa @ x - yy) ** 2))
        if cost < best_cost:
            best, best_cost = x, cost
    return best


def calibrate(
    model: ModelShape,
    global_batch_size: int,
    gpus_per_node: int,
    device: DeviceSpec,
    measurements: Sequence[Measurement],
    base: AnalyticParams | None = None,
    memory: MemoryOptions | None = None,
    ridge: float = 0.05,
) -> AnalyticParams:
    """Fit the six coefficients of `base` (default: uncalibrated `for_device`) to the measurements."""
    if not measurements:
        raise PlanInputError("calibrate: no measurements")
    base = base or AnalyticParams.for_device(device)
    memory = memory or MemoryOptions()
    feats = np.array(
        [
            iteration_features(model, m.layout, global_batch_size, gpus_per_node, device, base, memory)
            for m in measurements
        ]
    )
    y = np.array([m.iteration_time_s for m in measurements])
    a = feats / y[:, None]
    prior = base.coefficients()
    # Ridge weights in the units of each relative-error column; an absent term (all-zero column) is
    # held at its prior.
    col = np.sqrt((a**2).mean(axis=0))
    weight = np.sqrt(ridge) * np.where(col > 0, col, 1.0)
    theta = _nnls_ridge(a, np.ones(len(y)), prior, weight)
    keep = 1 - base.dp_overlap
    return dataclasses.replace(
        base,
        compute_scale=float(theta[0]),
        tp_comm_scale=float(theta[1]),
        pp_comm_scale=float(theta[2]),
        microbatch_overhead_s=float(theta[3]),
        dp_comm_scale=float(theta[4] / keep) if keep > 0 else 1.0,
        iteration_overhead_s=float(theta[5]),
    )


def fit_error(
    model: ModelShape,
    global_batch_size: int,
    gpus_per_node: int,
    device: DeviceSpec,
    measurements: Sequence[Measurement],
    params: AnalyticParams,
    memory: MemoryOptions | None = None,
) -> float:
    """Largest relative error of `params`' predictions over the measurements."""
    memory = memory or MemoryOptions()
    worst = 0.0
    for m in measurements:
        f = iteration_features(model, m.layout, global_batch_size, gpus_per_node, device, params, memory)
        worst = max(worst, abs(float(f @ params.coefficients()) / m.iteration_time_s - 1))
    return worst
