"""PNG plot of the cluster WAF over time per policy, with the trace's failures marked.

matplotlib is an optional dependency (`pip install megatron_unicron[plot]`); it is imported here only,
with the non-interactive Agg backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from megatron_unicron.sim.engine import SimResult
from megatron_unicron.sim.taxonomy import KINDS

__all__ = ["plot_waf"]

_SEVERITY_COLOUR = {1: "tab:red", 2: "tab:orange", 3: "tab:gray"}


def plot_waf(
    results: Mapping[str, SimResult],
    out: str | Path,
    title: str = "",
    panels: Sequence[tuple[str, Mapping[str, SimResult]]] | None = None,
) -> Path:
    """Step plot of WAF (PFLOP/s) against hours; one panel per (title, results) pair in `panels`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the install
        raise RuntimeError("--plot needs matplotlib: pip install 'megatron_unicron[plot]'") from err
    groups = list(panels) if panels else [(title, results)]
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 3.2 * len(groups)), squeeze=False, dpi=90)
    for ax, (label, res) in zip(axes[:, 0], groups):
        failures = next(iter(res.values())).failures if res else ()
        for ev in failures:
            ax.axvline(ev.time_s / 3600, color=_SEVERITY_COLOUR[KINDS[ev.kind].severity], lw=0.6, alpha=0.5)
        for name, r in res.items():
            hours = [t / 3600 for t in r.times] + [r.horizon_s / 3600]
            rates = [x / 1e15 for x in r.rates] + [r.rates[-1] / 1e15]
            ax.step(hours, rates, where="post", label=f"{name} ({r.fraction_of_failure_free:.0%})", lw=1.2)
        ax.set_ylabel("cluster WAF (PFLOP/s)")
        ax.set_title(label or "WAF over time (failures: red SEV1, orange SEV2, grey SEV3)", fontsize=10)
        ax.legend(fontsize=8, loc="lower left")
        ax.set_ylim(bottom=0)
    axes[-1, 0].set_xlabel("hours")
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path)
    plt.close(fig)
    return path
