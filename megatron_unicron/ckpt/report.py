"""The validation report of a conversion: every full tensor's shape and checksums before and after.

Checksums of a full tensor: ``sum`` is the float64 sum of its elements, ``sha256`` the SHA-256 of its bytes in
C order (for a stacked ``decoder.layers.*`` key: layer 0's slab, then layer 1's, ...), so anyone can check a
value with ``hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes())``. Both are accumulated
slab by slab while streaming. ``before`` is measured on the slabs read from the source, ``written`` on the
slabs handed to the writer (after re-padding the vocabulary), ``after`` by reading the written checkpoint
back.
"""

from __future__ import annotations

import hashlib
import json
import resource
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


class TensorStats:
    """Streaming shape / dtype / float64-sum / sha256 of a full tensor, fed slab by slab in C order."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.shape = shape
        self.dtype = dtype
        self.total = 0.0
        self.numel = 0
        self._sha = hashlib.sha256()
        self._next_layer = 0

    def add(self, slab: torch.Tensor, layer: int | None) -> None:
        """Add the next slab (layers must come in ascending order)."""
        if layer is not None:
            if layer != self._next_layer:
                raise RuntimeError(f"slab of layer {layer} out of order (expected {self._next_layer})")
            self._next_layer += 1
        t = slab.detach().contiguous()
        flat = t.reshape(-1)
        if t.dtype in (torch.bfloat16, torch.float16):  # numpy has no bf16: upcast block by block
            for i in range(0, flat.numel(), 1 << 22):
                self.total += float(np.add.reduce(flat[i : i + (1 << 22)].float().numpy(), dtype=np.float64))
        else:  # numpy accumulates in float64 without a float64 copy (torch's sum(dtype=) is 5x slower)
            self.total += float(np.add.reduce(flat.numpy(), dtype=np.float64))
        self.numel += t.numel()
        self._sha.update(t.reshape(-1).view(torch.uint8).numpy().data)  # the buffer itself, no copy

    def digest(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "shape": list(self.shape),
            "dtype": str(self.dtype).replace("torch.", ""),
            "numel": self.numel,
            "sum": self.total,
            "sha256": self._sha.hexdigest(),
        }


@dataclass
class KeyReport:
    """One key's before / written / after summaries and the verdict."""

    key: str
    before: dict[str, Any] | None = None
    written: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    note: str = ""
    verified: bool = True  # False when the output was not read back (--no-validate)

    @property
    def status(self) -> str:
        """``identical``, ``resized`` (vocab padding changed), ``derived``, ``dropped`` or ``MISMATCH``."""
        if self.written is None:
            return "dropped"
        if not self.verified:
            return "written (not read back)"
        if self.after is None or self.after["sha256"] != self.written["sha256"]:
            return "MISMATCH"
        if self.before is None:
            return "derived"
        if self.before["sha256"] == self.after["sha256"]:
            return "identical"
        return "resized" if self.note else "MISMATCH"


@dataclass
class ConversionReport:
    """Everything ``unicron-convert`` prints: source, target, per-key checks, totals, time, memory."""

    source: dict[str, Any]
    target: dict[str, Any]
    keys: dict[str, KeyReport] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # open + convert + write (the GB/s figure)
    seconds_validate: float = 0.0  # reading the output back
    cpu_seconds: float = 0.0  # user + system CPU time of the conversion (without the read-back)
    bytes_read: int = 0
    bytes_written: int = 0
    largest_tensor_bytes: int = 0
    largest_slab_bytes: int = 0

    def key(self, name: str) -> KeyReport:
        """The entry of ``name`` (created on first use)."""
        return self.keys.setdefault(name, KeyReport(name))

    @property
    def ok(self) -> bool:
        """True when no key mismatches."""
        return all(k.status != "MISMATCH" for k in self.keys.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        counts: dict[str, int] = {}
        for k in self.keys.values():
            counts[k.status] = counts.get(k.status, 0) + 1
        peak = peak_rss_bytes()
        return {
            "ok": self.ok,
            "source": self.source,
            "target": self.target,
            "notes": self.notes,
            "totals": {
                "keys": len(self.keys),
                "status": counts,
                "seconds": round(self.seconds, 3),
                "seconds_validate": round(self.seconds_validate, 3),
                "cpu_seconds": round(self.cpu_seconds, 3),
                "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written,
                "gb_per_s": round(self.bytes_read / max(self.seconds, 1e-9) / 1e9, 4),
                "peak_rss_bytes": peak,
                "largest_tensor_bytes": self.largest_tensor_bytes,
                "largest_slab_bytes": self.largest_slab_bytes,
            },
            "tensors": {
                k: {
                    "status": v.status,
                    "note": v.note,
                    "before": v.before,
                    "written": v.written,
                    "after": v.after,
                }
                for k, v in self.keys.items()
            },
        }

    def to_json(self) -> str:
        """The report as JSON."""
        return json.dumps(self.as_dict(), indent=1)

    def to_text(self) -> str:
        """A human table: one line per key, then totals."""
        d = self.as_dict()
        lines = [f"source: {_kv(self.source)}", f"target: {_kv(self.target)}"]
        lines += [f"note: {n}" for n in self.notes]
        width = max((len(k) for k in self.keys), default=10)
        lines.append(
            f"{'tensor':<{width}}  {'shape before -> after':<28} {'dtype':<9} {'sum before':>16} "
            f"{'sum after':>16}  sha256 before/after   status"
        )
        for k, v in self.keys.items():
            b, a = v.before or {}, v.after or {}
            shapes = f"{_shape(b)} -> {_shape(a)}"
            lines.append(
                f"{k:<{width}}  {shapes:<28} {(a or b).get('dtype', ''):<9} {_num(b):>16} {_num(a):>16}  "
                f"{b.get('sha256', '-')[:8]}/{a.get('sha256', '-')[:8]}  {v.status}"
                + (f" ({v.note})" if v.note else "")
            )
        t = d["totals"]
        lines.append(
            f"totals: {t['keys']} tensors {t['status']}; read {t['bytes_read'] / 1e6:.2f} MB, wrote "
            f"{t['bytes_written'] / 1e6:.2f} MB in {t['seconds']:.2f} s ({t['gb_per_s']:.3f} GB/s), "
            f"read back in {t['seconds_validate']:.2f} s; "
            f"peak RSS {t['peak_rss_bytes'] / 2**20:.1f} MiB, largest tensor "
            f"{t['largest_tensor_bytes'] / 2**20:.2f} MiB, "
            f"largest slab {t['largest_slab_bytes'] / 2**20:.2f} MiB"
        )
        if not self.ok:
            verdict = "MISMATCH (see above)"
        elif any(not k.verified for k in self.keys.values()):
            verdict = "OK, written without reading it back (--no-validate)"
        else:
            verdict = "OK, every tensor verified"
        lines.append("RESULT: " + verdict)
        return "\n".join(lines)


def _kv(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def _shape(s: dict[str, Any]) -> str:
    return "x".join(map(str, s["shape"])) if s else "-"


def _num(s: dict[str, Any]) -> str:
    return f"{s['sum']:.6g}" if s else "-"


def peak_rss_bytes() -> int:
    """Peak resident set size of this process.

    ``VmHWM`` of ``/proc/self/status`` where it exists: ``getrusage``'s ``ru_maxrss`` also counts the parent's
    memory when the process was started with fork/vfork + exec, which would inflate a CLI's figure.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
