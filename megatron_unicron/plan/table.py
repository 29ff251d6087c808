"""Throughput tables T(job, x): the best layout and its achieved FLOP/s for every feasible GPU count.

A table comes from `tools/profile_throughput.py` (measured) or `plan.throughput.analytic_table`
(modelled); both write the same YAML:

    model: tiny                 # informational
    global_batch_size: 8        # informational, checked against the job when given
    step: 1                     # entries cover step, 2·step, ... without holes
    source: profile             # profile | analytic
    entries:
      - {gpus: 1, flops: 1.9e9, iteration_time_s: 0.21, layout: {tp: 1, pp: 1, dp: 1, micro_batch_size: 8}}
      - {gpus: 3, flops: 0}     # an infeasible count is listed with flops 0 and no layout

`recompute: full` marks an entry whose layout only fits with full activation recomputation.

A table with a hole (a multiple of `step` between its first and last entry that is missing) is
rejected with the count that is missing, so a typo never silently turns into "the job cannot run".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from megatron_unicron.plan.errors import PlanInputError
from megatron_unicron.plan.layouts import Layout

__all__ = ["TableEntry", "ThroughputTable", "load_table", "save_table"]


@dataclass(frozen=True)
class TableEntry:
    """T(job, gpus): achieved aggregate FLOP/s of the best layout (flops 0, layout None: infeasible)."""

    gpus: int
    flops: float
    layout: Layout | None
    iteration_time_s: float | None = None
    recompute: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 1:
            raise PlanInputError(f"entry.gpus: expected a positive integer, got {self.gpus!r}")
        if isinstance(self.flops, bool) or not isinstance(self.flops, (int, float)) or not self.flops >= 0:
            raise PlanInputError(
                f"entry for {self.gpus} GPUs: flops must be a number >= 0, got {self.flops!r}"
            )
        if self.flops > 0 and self.layout is None:
            raise PlanInputError(f"entry for {self.gpus} GPUs: flops > 0 needs a layout")
        if self.layout is not None and self.layout.num_gpus != self.gpus:
            raise PlanInputError(
                f"entry for {self.gpus} GPUs: layout {self.layout} uses {self.layout.num_gpus}"
            )

    def to_dict(self) -> dict[str, Any]:
        """YAML-ready mapping."""
        out: dict[str, Any] = {"gpus": self.gpus, "flops": float(self.flops)}
        if self.layout is not None:
            out["layout"] = self.layout.to_dict()
        if self.iteration_time_s is not None:
            out["iteration_time_s"] = float(self.iteration_time_s)
        if self.recompute is not None:
            out["recompute"] = self.recompute
        return out


@dataclass(frozen=True, kw_only=True)
class ThroughputTable:
    """Entries at every multiple of `step` from the first to the last, sorted by GPU count."""

    entries: tuple[TableEntry, ...]
    step: int = 1
    source: str = "analytic"
    model: str = ""
    global_batch_size: int | None = None

    def __post_init__(self) -> None:
        if not self.entries:
            raise PlanInputError("table: no entries")
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 1:
            raise PlanInputError(f"table.step: expected a positive integer, got {self.step!r}")
        gpus = [e.gpus for e in self.entries]
        if gpus != sorted(set(gpus)):
            raise PlanInputError("table.entries: GPU counts must be increasing and unique")
        for g in gpus:
            if g % self.step:
                raise PlanInputError(f"table.entries: {g} GPUs is not a multiple of step {self.step}")
        expected = range(gpus[0], gpus[-1] + 1, self.step)
        missing = sorted(set(expected) - set(gpus))
        if missing:
            raise PlanInputError(
                f"table.entries: hole at {missing[0]} GPUs; list every multiple of step {self.step} from "
                f"{gpus[0]} to {gpus[-1]} (an infeasible count as flops: 0)"
            )

    @property
    def max_gpus(self) -> int:
        """Largest GPU count listed."""
        return self.entries[-1].gpus

    @property
    def x_min(self) -> int | None:
        """Smallest feasible GPU count, None when nothing is feasible."""
        return next((e.gpus for e in self.entries if e.flops > 0), None)

    def entry(self, gpus: int) -> TableEntry | None:
        """The entry for exactly `gpus`, None if the table does not list it."""
        i = (gpus - self.entries[0].gpus) // self.step
        if gpus % self.step or not 0 <= i < len(self.entries):
            return None
        return self.entries[i]

    def best_within(self, gpus: int, x_min: int = 0, x_max: int | None = None) -> TableEntry | None:
        """Highest-FLOP/s feasible entry with x_min <= x <= min(gpus, x_max); fewest GPUs on ties."""
        cap = gpus if x_max is None else min(gpus, x_max)
        best: TableEntry | None = None
        for e in self.entries:
            if e.gpus > cap:
                break
            if e.gpus >= x_min and e.flops > 0 and (best is None or e.flops > best.flops):
                best = e
        return best

    def curve(
        self, gpus_per_node: int, max_nodes: int, x_min: int = 0, x_max: int | None = None
    ) -> tuple[np.ndarray, list[TableEntry | None]]:
        """Best FLOP/s and entry on k whole nodes, k = 0..max_nodes (fewest GPUs on ties)."""
        gpus = np.array([e.gpus for e in self.entries])
        flops = np.array([e.flops for e in self.entries], dtype=np.float64)
        usable = (flops > 0) & (gpus >= x_min)
        if x_max is not None:
            usable &= gpus <= x_max
        flops = np.where(usable, flops, 0.0)
        # running best over entries sorted by GPU count; a new best must be strictly better
        prior = np.maximum.accumulate(np.concatenate([[0.0], flops[:-1]]))
        best_idx = np.maximum.accumulate(np.where(flops > prior, np.arange(len(flops)), -1))
        # entries reachable on k nodes: gpus <= k * gpus_per_node
        reach = np.searchsorted(gpus, np.arange(max_nodes + 1) * gpus_per_node, side="right") - 1
        idx = np.where(reach >= 0, best_idx[np.maximum(reach, 0)], -1)
        out = np.where(idx >= 0, flops[np.maximum(idx, 0)], 0.0)
        chosen = [self.entries[i] if i >= 0 and out[k] > 0 else None for k, i in enumerate(idx.tolist())]
        return out, chosen

    def to_dict(self) -> dict[str, Any]:
        """YAML-ready mapping (the format in the module docstring)."""
        out: dict[str, Any] = {"model": self.model, "step": self.step, "source": self.source}
        if self.global_batch_size is not None:
            out["global_batch_size"] = self.global_batch_size
        out["entries"] = [e.to_dict() for e in self.entries]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "table") -> ThroughputTable:
        """Parse the YAML mapping; every error names the field."""
        known = {"model", "step", "source", "global_batch_size", "entries", "device"}
        for key in data:
            if key not in known:
                raise PlanInputError(f"{where}.{key}: unknown key; expected one of {sorted(known)}")
        raw = data.get("entries")
        if not isinstance(raw, list) or not raw:
            raise PlanInputError(f"{where}.entries: expected a non-empty list")
        entries = []
        for i, item in enumerate(raw):
            w = f"{where}.entries[{i}]"
            if not isinstance(item, Mapping):
                raise PlanInputError(f"{w}: expected a mapping")
            for key in item:
                if key not in ("gpus", "flops", "layout", "iteration_time_s", "recompute"):
                    raise PlanInputError(
                        f"{w}.{key}: unknown key; expected gpus, flops, layout, iteration_time_s, recompute"
                    )
            if "gpus" not in item or "flops" not in item:
                raise PlanInputError(f"{w}: needs gpus and flops")
            layout = Layout.from_dict(item["layout"], f"{w}.layout") if item.get("layout") else None
            flops = item["flops"]
            if isinstance(flops, str):
                try:
                    flops = float(flops)
                except ValueError:
                    raise PlanInputError(f"{w}.flops: not a number: {flops!r}") from None
            try:
                entries.append(
                    TableEntry(
                        gpus=item["gpus"],
                        flops=flops,
                        layout=layout,
                        iteration_time_s=item.get("iteration_time_s"),
                        recompute=item.get("recompute"),
                    )
                )
            except PlanInputError as err:
                raise PlanInputError(f"{w}: {err}") from None
        try:
            return cls(
                entries=tuple(entries),
                step=data.get("step", 1),
                source=str(data.get("source", "profile")),
                model=str(data.get("model", "")),
                global_batch_size=data.get("global_batch_size"),
            )
        except PlanInputError as err:
            raise PlanInputError(str(err).replace("table.", f"{where}.", 1)) from None


def load_table(path: str | Path) -> ThroughputTable:
    """Read a YAML throughput table; errors name the file and the field."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as err:
        raise PlanInputError(f"table {p}: cannot read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise PlanInputError(f"table {p}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, Mapping):
        raise PlanInputError(f"table {p}: expected a mapping at the top level")
    return ThroughputTable.from_dict(data, where=f"table {p}")


def save_table(table: ThroughputTable, path: str | Path) -> None:
    """Write `table` as YAML."""
    Path(path).write_text(yaml.safe_dump(table.to_dict(), sort_keys=False))


def replace_entries(table: ThroughputTable, entries: tuple[TableEntry, ...]) -> ThroughputTable:
    """A copy of `table` with other entries."""
    return dataclasses.replace(table, entries=entries)
