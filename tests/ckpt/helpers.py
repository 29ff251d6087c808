"""Helpers for the checkpoint tests: a launcher for the megatron-core worker and the converter CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "mcore_worker.py")


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.setdefault("OMP_NUM_THREADS", "1")
    e["TORCH_CPP_LOG_LEVEL"] = "ERROR"
    return e


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def launch(nproc: int, args: list[str], timeout: float = 300.0) -> str:
    """Run ``nproc`` ranks of the worker; the parent hosts the TCPStore. Returns rank 0's output."""
    import torch.distributed as dist

    port = _free_port()
    store = dist.TCPStore("127.0.0.1", port, None, True, timedelta(seconds=120), wait_for_workers=False)
    procs = []
    for r in range(nproc):
        e = env()
        e.update(RANK=str(r), WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(
            subprocess.Popen(
                [sys.executable, WORKER, *args],
                env=e,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    deadline = time.time() + timeout
    outs: list[str] = [""] * nproc
    try:
        for r, p in enumerate(procs):
            outs[r], _ = p.communicate(timeout=max(1.0, deadline - time.time()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        del store
    codes = [p.returncode for p in procs]
    if any(codes):
        bad = next(r for r, c in enumerate(codes) if c)
        raise RuntimeError(f"worker ranks exited {codes}; rank {bad} output:\n{outs[bad][-6000:]}")
    return outs[0]


def save_run(out: str, cfg: dict[str, Any], layout: tuple[int, int]) -> str:
    nproc = layout[0] * layout[1]
    return launch(
        nproc,
        ["--phase", "save", "--cfg", json.dumps(cfg), "--layout", f"{layout[0]},{layout[1]}", "--out", out],
    )


def load_run(
    nproc: int, cfg: dict[str, Any], ref: str, ckpts: list[tuple[Any, ...]], out: str
) -> list[dict[str, Any]]:
    """Load each (format, dir, tp, pp[, "distopt"|"plain"]) in a fresh layout of one ``nproc``-rank world."""
    spec = ",".join(":".join(map(str, c)) for c in ckpts)
    launch(nproc, ["--phase", "load", "--cfg", json.dumps(cfg), "--ref", ref, "--ckpts", spec, "--out", out])
    with open(out) as f:
        result: list[dict[str, Any]] = json.load(f)
    return result


def convert(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``python tools/convert_checkpoint.py ARGV`` from the repo root."""
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), *argv],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and p.returncode != 0:
        raise RuntimeError(f"convert failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p
